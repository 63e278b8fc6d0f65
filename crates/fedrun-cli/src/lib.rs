//! `fedrun simulate`: a whole federation — one server job and N client jobs — in one process.
//!
//! (Crate docs are completed below.)

pub mod error;
pub mod factories;
pub mod job;
pub mod logreg;
pub mod output;
pub mod rng;
pub mod simulate;
pub mod trainer;

pub use error::CliError;
pub use simulate::{
    simulate, ClientEnd, ClientReport, NoObserver, RunObserver, RunStatus, SimulateOptions,
    Simulation, SimulationControl, SimulationReport, SimulationSetup, Timing,
};
