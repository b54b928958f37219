//! The Rust snippets of the workspace README, as doc tests: build.rs makes each ```rust block
//! of README.md the doc of a module `readme_line_<N>` (N: the line its fence is on), so
//! `cargo test` compiles them (and runs those not marked `no_run`), and a snippet that no
//! longer compiles fails the build, naming its README line.
//!
//! The example binaries of this package are `warren-demo` (src/demo.rs) and `reports-worker`
//! (src/reports_worker.rs, a custom worker with a Rust handler).

#[cfg(test)]
mod readme;

include!(concat!(env!("OUT_DIR"), "/readme_snippets.rs"));
