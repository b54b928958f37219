//! Lines on stdout. `println!` panics when stdout is a closed pipe (`warren dlq list | head`);
//! a command-line tool should stop quietly instead, as `cat` or `grep` do.

use std::fmt;
use std::io::{self, Write};

/// Writes one line to stdout; exits the process (status 0) when the reader has gone away.
pub(crate) fn line(args: fmt::Arguments<'_>) {
    let mut out = io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // Any other failure (a full disk) is worth saying, but not worth a panic.
        eprintln!("warren: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` for the CLI's results, through [`line()`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// `n` and `noun`, made plural unless `n` is 1: "1 job", "3 jobs", "0 dead letters".
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_singular_for_one_only() {
        assert_eq!(super::count(0, "job"), "0 jobs");
        assert_eq!(super::count(1, "dead letter"), "1 dead letter");
        assert_eq!(super::count(2, "slot"), "2 slots");
    }
}
