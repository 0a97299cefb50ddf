//! `openmesh-relay fleet check`: the example fleet file passes and shows its paths; a bad
//! one is refused with its reason and a failing exit status.

use std::process::Command;

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
