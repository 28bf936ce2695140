//! The `primespark` binary: see `primespark --help`.

// mimalloc instead of glibc's allocator: the dataflows allocate and free many small rows and
// keys across threads, where it measured ~1.6x the events/s of glibc malloc
// (benches/all_windows.rs, which uses the same allocator).
// `--features system-allocator` keeps glibc's, for heap profilers that interpose malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    #[cfg(all(unix, not(feature = "system-allocator")))]
    primespark_dataflows::allocator::with_mimalloc_defaults();
    primespark_dataflows::cli::main()
}
