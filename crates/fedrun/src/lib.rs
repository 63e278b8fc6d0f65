//! fedrun: the engine of a federated-learning client job, compatible with NVIDIA FLARE.
//!
//! This crate gathers the workspace's public API in one place:
//!
//! - [`core`]: NVFlare's data model ([`Shareable`], [`Value`], return codes, `FlContext`, ...);
//! - [`fobs`]: NVFlare's FOBS payload codec, byte-exact with NVFlare 2.9;
//! - [`cell`]: cells, cell messages and the in-process network;
//! - [`engine`]: the client job engine: the `ClientRunManager` facade and its actors, started
//!   with [`ClientEngine`] and driven through an [`EngineHandle`]; executors and the task loop;
//! - [`server`]: the server job: NVFlare's task protocol, workflows, ScatterAndGather/FedAvg;
//! - [`wire`]: NVFlare's wire: SFM frames and the TCP transport for cells;
//! - [`secure`]: NVFlare's end-to-end secure messages: credentials from a startup kit
//!   (`wire::WireConfig::secure`), the envelope, certificate checks.
//!
//! # Example
//! ```
//! use fedrun::{cell::Network, ClientEngine};
//!
//! actix::System::new().block_on(async {
//!     let engine = ClientEngine::builder("site-1", "job-1").start(&Network::new()).await.unwrap();
//!     assert_eq!(engine.get_run_info().await.unwrap().job_id, "job-1");
//! });
//! ```

pub use fedrun_cell as cell;
pub use fedrun_core as core;
pub use fedrun_core::{AppReturnCode, CellReturnCode, Map, ReturnCode, Shareable, Value};
pub use fedrun_engine as engine;
pub use fedrun_engine::{ClientEngine, EngineError, EngineHandle};
pub use fedrun_fobs as fobs;
pub use fedrun_secure as secure;
pub use fedrun_server as server;
pub use fedrun_wire as wire;
