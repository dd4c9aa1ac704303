//! Differential test: `segmenter replay` against the independent Python implementation of the
//! spec in `tools/segref/` on seeded random streams (late events, duplicates, malformed lines,
//! every rule form). Any disagreement on a change record or a rejected line fails the test.

use std::path::Path;
use std::process::Command;

fn difftest(config: &str, seeds: &str, customers: u32, events: u32) {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new("python3")
        .arg(Path::new(root).join("tools/segref/difftest.py"))
        .args(["--segmenter", env!("CARGO_BIN_EXE_segmenter")])
        .args(["--config", config, "--seeds", seeds])
        .args(["--customers", &customers.to_string()])
        .args(["--events", &events.to_string()])
        .current_dir(root)
        .output()
        .expect("python3 must be installed to run the differential test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "segmenter and tools/segref disagree:\n{stdout}\n{stderr}"
    );
    let agreed = stdout
        .lines()
        .filter(|line| line.contains(": same ("))
        .count();
    assert!(agreed > 0, "no seed was compared:\n{stdout}\n{stderr}");
}

#[test]
fn agrees_with_the_reference_on_the_differential_segments() {
    difftest("tools/segref/differential.toml", "1-12", 15, 300);
}

#[test]
fn agrees_with_the_reference_on_the_shipped_segments() {
    difftest("config/segments.toml", "200-203", 40, 1500);
}
