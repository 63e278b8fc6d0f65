//! fedrun's server job: the server side of NVFlare's task protocol, and its workflows.
//!
//! A federated job has one server job (`SJ`, cell `server.<job>`) and one client job per site
//! (`CJ`, cell `<site>.<job>`). Client jobs pull tasks from the server job (`get_task`), run
//! them and push results (`submit_update`); the server job's workflows decide which tasks to
//! hand out and what to do with the results. This crate is that server job, on the same cells
//! and engine actors as fedrun's client jobs:
//!
//! - [`server_job`]: [`ServerJob`] — start it with [`ServerJob::builder`], run workflows on it,
//!   end the run;
//! - [`task_manager`]: the [`TaskManager`] actor, sole owner of the task queue;
//! - `protocol` (private): the exact wire form of replies, from the NVFlare capture;
//! - [`controller`]: [`Controller`], the workflows' API (`broadcast_and_wait`);
//! - [`task`]: [`Task`] and [`TaskResult`];
//! - [`workflow`]: the [`Workflow`] trait, [`WorkflowOutcome`], [`RoundMetrics`],
//!   [`WorkflowEvent`];
//! - [`sag`]: [`ScatterAndGather`], NVFlare's FedAvg workflow;
//! - [`aggregator`]: [`Aggregator`] and [`FedAvg`];
//! - [`persistor`]: [`ModelPersistor`] and [`NpyPersistor`];
//! - [`model`]: [`ModelWeights`], the global model;
//! - [`config`]: [`ServerJobConfig`], building all of it from NVFlare's
//!   `config_fed_server.json`;
//! - [`ServerError`], the crate's one error type ([`error`]).
//!
//! # Example: one FedAvg round with a hand-written client
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use fedrun_cell::{Cell, CellMessage, Fqcn, Network, SendRequest};
//! use fedrun_core::{Dxo, NdArray, PeerContext, Shareable, Value};
//! use fedrun_server::{FedAvg, ModelWeights, NpyPersistor, SagConfig, ScatterAndGather, ServerJob};
//!
//! actix::System::new().block_on(async {
//!     let network = Network::new();
//!     let server = ServerJob::builder("job-1")
//!         .job_clients(&["site-1"])
//!         .poll_interval(Duration::from_millis(10))
//!         .start(&network)
//!         .await
//!         .unwrap();
//!
//!     // site-1's job cell: asks for a task, answers with weights + 1
//!     let site = Cell::start(Fqcn::job_cell("site-1", "job-1").unwrap(), network.clone()).unwrap();
//!     let client = tokio::task::spawn_local(async move {
//!         let mut me = PeerContext::default();
//!         me.set("__run_num__", "job-1");
//!         me.set("__identity_name__", "site-1");
//!         loop {
//!             let mut ask = Shareable::new();
//!             ask.set_peer_context(me.clone());
//!             let req = SendRequest::new("server_command", "get_task",
//!                 Fqcn::new("server.job-1").unwrap(), CellMessage::new(ask), Duration::from_secs(5));
//!             let task = site.send_request(req).await.unwrap().payload.into_shareable().unwrap();
//!             match task.header_or_none("task_name").and_then(Value::as_str) {
//!                 Some("__end_run__") => break,
//!                 Some("train") => {}
//!                 _ => { tokio::time::sleep(Duration::from_millis(10)).await; continue; }
//!             }
//!             let mut dxo = Dxo::from_shareable(&task).unwrap();
//!             let w = dxo.data.get("w").and_then(Value::as_ndarray).unwrap().to_f32_vec().unwrap();
//!             let w: Vec<f32> = w.iter().map(|x| x + 1.0).collect();
//!             dxo.data.insert("w", NdArray::from_f32(&[2], &w).unwrap());
//!             let mut result = dxo.to_shareable();
//!             result.set_cookie_jar(task.cookie_jar().unwrap().clone());
//!             result.set_peer_context(me.clone());
//!             let push = SendRequest::new("server_command", "submit_update",
//!                 Fqcn::new("server.job-1").unwrap(), CellMessage::new(result), Duration::from_secs(5));
//!             site.send_request(push).await.unwrap();
//!         }
//!     });
//!
//!     let mut initial = ModelWeights::new();
//!     initial.insert("w".into(), NdArray::from_f32(&[2], &[0.0, 1.0]).unwrap());
//!     let dir = std::env::temp_dir().join(format!("fedrun-lib-doc-{}", std::process::id()));
//!     let persistor = NpyPersistor::new(&dir).with_initial_weights(initial);
//!     let mut sag = ScatterAndGather::new(SagConfig::new(1, 2), Arc::new(FedAvg::default()),
//!                                         Arc::new(persistor));
//!     let outcome = server.run_workflow(&mut sag).await.unwrap();
//!     assert_eq!(outcome.rounds.len(), 2);
//!     assert_eq!(outcome.model.unwrap()["w"].to_f32_vec().unwrap(), vec![2.0, 3.0]);
//!     client.await.unwrap(); // the client saw __end_run__
//!     server.stop().await;
//!     std::fs::remove_dir_all(&dir).unwrap();
//! });
//! ```

pub mod aggregator;
pub mod config;
pub mod controller;
pub mod error;
pub mod model;
pub mod np_persistor;
pub mod persistor;
mod protocol;
pub mod sag;
pub mod server_job;
pub mod task;
pub mod task_manager;
pub mod workflow;

pub use aggregator::{
    Aggregator, Contribution, FedAvg, SharedAggregator, WeightedSum, NUM_STEPS_CURRENT_ROUND,
};
pub use config::{
    BuiltServerJob, ConfigEntry, FullModelShareableGenerator, ServerFactories, ServerJobConfig,
    WorkflowArgs, WorkflowFactory, FULL_MODEL_GENERATOR_CLASS, INTIME_AGGREGATOR_CLASS,
    NPY_PERSISTOR_CLASS, NP_MODEL_PERSISTOR_CLASS, SAG_CLASS,
};
pub use controller::Controller;
pub use error::ServerError;
pub use model::{weights_from_dxo, weights_to_dxo, ModelWeights};
pub use np_persistor::NpModelPersistor;
pub use persistor::{
    load_npy_model, save_npy_model, InitialModel, ModelPersistor, NpyPersistor, SharedPersistor,
};
pub use sag::{SagConfig, ScatterAndGather};
pub use server_job::{
    ServerJob, ServerJobBuilder, DEFAULT_CLIENT_GRACE, DEFAULT_POLL_INTERVAL, RUN_FAILED_REASON,
    RUN_FAILED_TOPIC, SERVER_IDENTITY,
};
pub use task::{Task, TaskResult};
pub use task_manager::{RunPhase, TaskManager};
pub use workflow::{RoundMetrics, Workflow, WorkflowEvent, WorkflowOutcome};
