//! Exit codes shared by warren's command-line programs (`warren`, `warren-worker`).

/// A bad config, bad flags, or a set-up that cannot work (BSD sysexits EX_USAGE).
pub const USAGE: u8 = 64;
