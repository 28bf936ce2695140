//! The fuzz targets (`tests/fuzz`: the event decoders and the wire protocol's message parsing)
//! run for a bounded time from their committed corpus, as `deploy/dev/fuzz.sh smoke` runs
//! them, and find no crash. Each corpus input (among them the Parse message that once panicked
//! pgwire's decoder) is replayed first, so a regression fails here at once.

use std::process::Command;

use primespark_tests::repo_root;

/// Seconds per target: long enough for libFuzzer to get past the corpus and mutate.
const SECONDS: &str = "20";

#[test]
fn fuzz_targets_find_no_crash_in_a_bounded_run() {
    let root = repo_root();
    let out = Command::new(root.join("deploy/dev/fuzz.sh"))
        .args(["smoke", SECONDS])
        .current_dir(&root)
        .output()
        .expect("run deploy/dev/fuzz.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fuzz smoke failed ({}):\n{stdout}\n{}",
        out.status,
        tail(&stderr, 80)
    );
    for target in ["event_decoders", "wire_messages"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("fuzz: {target}: Done ")))
            .unwrap_or_else(|| panic!("no summary for {target}:\n{stdout}"));
        // "fuzz: T: Done N runs in S second(s); ..."
        let runs: u64 = line
            .split_whitespace()
            .nth(3)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no run count in {line:?}"));
        assert!(runs >= 1_000, "{target} hardly ran: {line}");
        assert!(line.ends_with("no crash"), "{line}");
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
