//! The `converge` binary: command line, config loading and daemon wiring.

fn main() {}
