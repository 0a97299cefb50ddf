//! `openmesh-relay fleet check`: the example fleet file passes and shows its paths; a bad
//! one is refused with its reason and a failing exit status.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Relay;

fn check(file: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openmesh-relay"))
        .args(["fleet", "check"])
        .arg(file)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_example_fleet_file_checks_and_a_bad_one_is_refused_with_its_reason() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/fleet-example.toml");
    let (ok, text) = check(&example);
    assert!(ok, "{text}");
    assert!(text.contains("generation 3, 6 relays, 7 links"), "{text}");
    assert!(
        text.contains("ing -> egr: ing > nyc > egr (1000 us)"),
        "{text}"
    );

    let dir = std::env::temp_dir().join(format!("om-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    let text = std::fs::read_to_string(&example)
        .unwrap()
        .replace("trust = 20", "trust = 120");
    std::fs::write(&bad, text).unwrap();
    let (ok, text) = check(&bad);
    assert!(!ok);
    assert!(
        text.contains("relay cheap: trust 120 is above 100"),
        "{text}"
    );
    assert_eq!(text.matches("above 100").count(), 1, "said once: {text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn sighup(relay: &Relay) {
    Command::new("kill")
        .args(["-HUP", &relay.pid().to_string()])
        .status()
        .unwrap();
}

/// Polls the log until it contains `what` (5 s at most).
fn log_says(relay: &Relay, what: &str) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if relay.log().contains(what) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// `--fleet`: every core applies the snapshot; SIGHUP applies a newer valid one, refuses a bad
/// or older one with its reason and keeps what it runs; a start whose file is bad runs on the
/// last good snapshot.
#[test]
fn the_fleet_file_applies_on_every_core_reloads_and_falls_back_to_the_last_good_one() {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/fleet-example.toml"),
    )
    .unwrap();
    let files = common::fresh_dir();
    std::fs::create_dir_all(&files).unwrap();
    let path = files.join("fleet.toml");
    std::fs::write(&path, &example).unwrap();
    let p = path.to_str().unwrap();
    let gen = |relay: &Relay, core: &str, want: f64| {
        relay.settled_metric(
            "openmesh_fleet_generation",
            &[&format!("core=\"{core}\"")],
            want,
        )
    };
    let relay = Relay::start(&["--cores", "2", "--fleet", p], None);
    assert_eq!(gen(&relay, "0", 3.0), 3.0);
    assert_eq!(gen(&relay, "1", 3.0), 3.0);

    // A bad file: refused with its reason, generation 3 stays.
    std::fs::write(&path, example.replace("trust = 20", "trust = 120")).unwrap();
    sighup(&relay);
    assert!(
        log_says(&relay, "fleet file not reloaded"),
        "{}",
        relay.log()
    );
    assert!(relay.log().contains("trust 120 is above 100"));
    // An older generation: refused too.
    std::fs::write(&path, example.replace("generation = 3", "generation = 2")).unwrap();
    sighup(&relay);
    assert!(log_says(
        &relay,
        "generation 2 is not newer than the 3 applied"
    ));
    assert_eq!(gen(&relay, "0", 3.0), 3.0);
    // A newer one: on every core.
    std::fs::write(&path, example.replace("generation = 3", "generation = 4")).unwrap();
    sighup(&relay);
    assert_eq!(gen(&relay, "0", 4.0), 4.0);
    assert_eq!(gen(&relay, "1", 4.0), 4.0);

    // A start with a bad file runs on the last good snapshot (generation 4).
    let dir = relay.kill9();
    std::fs::write(&path, "generation = 5\nnonsense = true\n").unwrap();
    let relay = Relay::start_in(dir, &["--cores", "2", "--fleet", p], None);
    assert_eq!(gen(&relay, "0", 4.0), 4.0);
    assert!(relay.log().contains("running on the last good snapshot"));
    // And one with an older valid file too (as SIGHUP would).
    let dir = relay.kill9();
    std::fs::write(&path, &example).unwrap();
    let relay = Relay::start_in(dir, &["--cores", "2", "--fleet", p], None);
    assert_eq!(gen(&relay, "1", 4.0), 4.0);
    assert!(relay.log().contains("older than the last good snapshot"));
    drop(relay);
    std::fs::remove_dir_all(&files).unwrap();

    // With no last good snapshot, a bad file stops the start with its reason.
    let data = common::fresh_dir();
    let out = Command::new(env!("CARGO_BIN_EXE_openmesh-relay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--fleet",
        ])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&data);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refused"));
}
