//! mimalloc's memory options for a pipeline on a Pi, set by the binaries (`primespark` and the
//! test suites' `primespark-under-test`) first thing in `main`.
//!
//! mimalloc keeps freed pages for a while (`purge_delay`, 10 ms, times 10 for its arenas)
//! before it returns them: while catching up a backlog, rows are freed and allocated again at
//! hundreds of MB/s across threads, and the retained pages made peak RSS 2.5 times the live
//! heap (heaptrack: 172 MB heap, 418 MB RSS catching up 1M events). Purging at once, with
//! arena memory committed on demand, measured 290 MB against 475-513 MB at the same events/s
//! (1M events, 1 MiB fetches; README "Speed"). mimalloc reads its options from the
//! environment when the process loads, before `main`, so the binary sets the ones the
//! environment does not name and executes itself again (same pid, arguments and descriptors);
//! a value set by the operator wins.

/// The options and their values here (`MIMALLOC_*` of mimalloc 3).
#[cfg(unix)]
const DEFAULTS: [(&str, &str); 2] = [
    ("MIMALLOC_PURGE_DELAY", "0"),
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
];

/// Executes the binary again with the defaults the environment lacks; returns when
/// nothing is missing or the executable cannot be run again (then mimalloc's own
/// defaults apply: more memory, same results).
#[cfg(unix)]
pub fn with_mimalloc_defaults() {
    use std::os::unix::process::CommandExt;
    let missing: Vec<_> = DEFAULTS
        .iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args);
    for (k, v) in missing {
        cmd.env(k, v);
    }
    // Returns only if the executable could not be run again.
    let _ = cmd.exec();
}
