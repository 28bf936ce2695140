//! The `primespark` binary: see `primespark --help`.

// mimalloc instead of glibc's allocator: the dataflows allocate and free many small rows and
// keys across threads, where it measured ~1.6x the events/s of glibc malloc
// (benches/all_windows.rs, which uses the same allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    primespark_dataflows::cli::main()
}
