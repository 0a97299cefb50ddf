//! The pure layers import no runtime, socket, thread or clock: only the engine and the client
//! library do I/O. This reads their sources and fails on any such import.

use std::path::{Path, PathBuf};

/// Modules that must stay pure (files, or folders of files).
const PURE: &[&str] = &[
    "src/shard",
    "src/wire",
    "src/store",
    "src/tls",
    "src/session.rs",
    "src/signaling.rs",
    "src/policy.rs",
    "src/routing.rs",
    "src/metrics.rs",
];

/// What a pure module may not name.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "tokio_uring",
    "socket2",
    "std::net",
    "std::thread",
    "std::time::Instant",
    "Instant::now",
    "SystemTime",
    "std::fs",
    "libc::",
    "crate::engine",
    "crate::client",
];

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

#[test]
fn the_pure_layers_name_no_runtime_socket_thread_or_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for m in PURE {
        rust_files(&root.join(m), &mut files);
    }
    assert!(files.len() >= 15, "found only {} files", files.len());
    let mut found = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
                if code.contains(word) {
                    found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "pure modules doing I/O:\n{}",
        found.join("\n")
    );
}
