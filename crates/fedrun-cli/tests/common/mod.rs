//! Helpers shared by the process-level integration tests of the `fedrun` binary.

pub mod attack;
pub mod attacker;
