//! The `primespark` binary: see `primespark --help`.

fn main() -> std::process::ExitCode {
    primespark_dataflows::cli::main()
}
