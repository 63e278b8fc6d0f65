//! `fedrun simulate`: a whole federation — one server job and N client jobs — in one process.
//!
//! NVFlare's simulator runs a job's server app and its client apps together on one machine, so
//! a job can be tried before it is deployed. This crate does the same with fedrun's pieces: the
//! server job of `fedrun-server` (ScatterAndGather with FedAvg), one client job engine of
//! `fedrun-engine` per site with a `ClientRunner`, all on one in-process network and one actix
//! `System`. The `fedrun` binary only parses its arguments; everything else is here, so tests
//! and benchmarks run exactly what the command runs.
//!
//! # Layout
//!
//! - [`simulate`](mod@simulate): [`simulate()`] (the command), [`SimulationSetup`] (what a run
//!   needs), [`Simulation`] (start, then run to the end), [`SimulationControl`] (abort or stop
//!   parts of a running federation), [`SimulationReport`] (status, rounds, final model, how each
//!   client ended), [`RunObserver`] (progress).
//! - [`job`]: [`JobDefinition`](job::JobDefinition), NVFlare's job layout read from a directory
//!   (`meta.json`, `app/config/config_fed_{client,server}.json`) or the built-in example.
//! - [`factories`]: the component classes the simulator adds (the zero-initialised persistor)
//!   and [`SiteFactory`](factories::SiteFactory) for per-site executors.
//! - [`logreg`], [`trainer`], [`rng`]: the example model — logistic regression on synthetic
//!   data each site generates from its own seed — and its executor, `LogRegTrainer`.
//! - [`output`]: the per-round table, `metrics.json` and `model.json`.
//! - [`transport`]: what carries the messages — the in-process network or NVFlare's wire over
//!   loopback TCP (`fedrun simulate --transport tcp`).
//! - [`server_cmd`] and [`client_cmd`]: `fedrun server` and `fedrun client`, the server job and
//!   one client job as separate processes talking over TCP.
//! - [`deployed`]: [`DeployedJob`](deployed::DeployedJob), a job as NVFlare's client parent
//!   deploys it into a site's workspace, loaded for `fedrun job`; with [`hocon`] (NVFlare's
//!   `.conf` configs) and [`config_vars`] (NVFlare's `{var}` references).
//! - [`error`] holds [`CliError`], the crate's one error type.
//!
//! # Example: two sites, one round of the built-in job
//! ```
//! use fedrun_cli::job::JobDefinition;
//! use fedrun_cli::{NoObserver, RunStatus, Simulation, SimulationSetup};
//!
//! let workspace = std::env::temp_dir().join(format!("fedrun-doc-{}", uuid::Uuid::new_v4()));
//! let mut job = JobDefinition::builtin_logreg().unwrap();
//! job.set_min_clients(2).unwrap();
//! job.set_num_rounds(1).unwrap();
//! let report = actix::System::new().block_on(async {
//!     let simulation = Simulation::start(SimulationSetup::new(job, 2, &workspace)).await.unwrap();
//!     simulation.run(&mut NoObserver).await
//! });
//! assert_eq!(report.status, RunStatus::Completed);
//! assert_eq!(report.round_metrics[0].clients, ["site-1", "site-2"]);
//! assert!(report.clients.iter().all(|c| c.end.ended_by_end_run()));
//! std::fs::remove_dir_all(&workspace).unwrap();
//! ```

pub mod cj;
pub mod client_cmd;
pub mod config_vars;
pub mod deployed;
pub mod error;
pub mod factories;
pub mod hocon;
pub mod job;
pub mod logreg;
pub mod output;
pub mod rng;
pub mod server_cmd;
pub mod simulate;
pub mod tls_opts;
pub mod trainer;
pub mod transport;

pub use error::CliError;
pub use simulate::{
    simulate, simulate_setup, ClientEnd, ClientReport, NoObserver, RunObserver, RunStatus,
    SimulateOptions, Simulation, SimulationControl, SimulationReport, SimulationSetup, Timing,
};
