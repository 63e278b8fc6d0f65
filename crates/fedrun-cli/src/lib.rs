//! `fedrun simulate`: a whole federation — one server job and N client jobs — in one process.
//!
//! (Crate docs are completed when the simulation lands.)

pub mod error;
pub mod job;
pub mod logreg;
pub mod output;
pub mod rng;
pub mod trainer;

pub use error::CliError;
