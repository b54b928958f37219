//! The stock worker binary: command steps only. To add Rust handlers, write a binary that calls
//! `warren_worker::cli::main(|b| b.handler("name", MyHandler))`.

fn main() -> std::process::ExitCode {
    warren_worker::cli::main(|builder| builder)
}
