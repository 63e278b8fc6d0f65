//! fedrun: the engine of a federated-learning client job, compatible with NVIDIA FLARE.
//!
//! This crate re-exports the public API of the workspace's crates.

pub use fedrun_core as core;
pub use fedrun_core::{AppReturnCode, CellReturnCode, Map, ReturnCode, Shareable, Value};
pub use fedrun_fobs as fobs;
