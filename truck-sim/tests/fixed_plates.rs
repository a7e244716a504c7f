//! Plates stay the same across restarts (issue #16): two runs of the real
//! binary without `--seed` list the same fleet, and `--seed` changes it.

use std::collections::HashSet;
use std::process::Command;

fn plates(extra: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_truck-sim"))
        .args(["--list-plates", "--trucks", "15000"])
        .args(extra)
        .env_remove("TRUCK_SIM_SEED")
        .output()
        .expect("running truck-sim");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("plates are ASCII")
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_restart_without_seed_brings_back_the_same_plates() {
    let first = plates(&[]);
    let second = plates(&[]);
    assert_eq!(first.len(), 15_000);
    assert_eq!(first, second);
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 15_000);
}

#[test]
fn the_seed_option_chooses_another_fleet() {
    let default = plates(&[]);
    let seeded = plates(&["--seed", "7"]);
    assert_eq!(seeded, plates(&["--seed", "7"]));
    assert_ne!(default, seeded);
}
