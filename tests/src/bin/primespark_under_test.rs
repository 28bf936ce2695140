//! The `primespark` command line, built inside the test package so that integration tests can
//! spawn, kill and restart it. Same allocator and allocator options as the shipped binary.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    #[cfg(unix)]
    primespark_dataflows::allocator::with_mimalloc_defaults();
    primespark_dataflows::cli::main()
}
