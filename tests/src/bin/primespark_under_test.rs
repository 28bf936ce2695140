//! The `primespark` command line, built inside the test package so that integration tests can
//! spawn, kill and restart it.

fn main() -> std::process::ExitCode {
    primespark_dataflows::cli::main()
}
