//! The `fedrun` command.
fn main() {}
