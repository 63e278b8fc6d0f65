//! fedrun's client job engine: NVFlare's `ClientRunManager` as actix actors.
//!
//! NVFlare's engine is one object that owns everything a client job needs. fedrun splits it into
//! actors, each the single owner of one part of that state, so that no lock is shared and each
//! part can be tested alone, and puts NVFlare's single point of contact back in front of them:
//!
//! | actor | owns | module |
//! |---|---|---|
//! | [`ClientRunManager`] | nothing: forwards one message type per engine method to its owner | [`facade`] |
//! | [`RunInfo`] | the run info (job id, current task, start time), the context manager, the error log, the run's abort signal | [`run_info`] |
//! | [`ComponentRegistry`] | components, event handlers, widgets, component factories and the build authorizer; event firing | [`registry`] |
//! | [`AuxRunner`] | aux handlers, target resolution, the job-client directory; aux requests in and out | [`aux`] |
//! | [`StreamProcessor`] | consumer factories, receiving streams, sending streams | [`stream`] |
//! | [`TaskFetcher`] | task pulls and result pushes to the server job (or the parent site's), the last task id, the communication timeout, the job's session id | [`task_fetcher`] |
//!
//! [`ClientEngine::builder`] starts them all, with the job's cell, and returns an
//! [`EngineHandle`]: one async method per engine call, for users who would rather not build
//! messages ([`handle`]). Supporting modules: [`component`] (the [`Component`] and
//! [`EventHandler`] traits and [`ComponentRef`]), [`event`] (the event fan-out) and
//! [`error`] ([`EngineError`]). The repository's `docs/architecture.md` and
//! `docs/runtime-semantics.md` describe the path of a message and the runtime guarantees.
//!
//! On top of the engine, the job's own work: [`executor`] (the [`Executor`] trait and the
//! [`TaskRouter`] from task names to executors), [`job_config`] (the client app's
//! `config_fed_client.json`, built into components and a router) and [`runner`] (the
//! [`ClientRunner`] task loop: fetch, execute, check, send, until the run ends). NVFlare's two
//! built-in client widgets live in [`widgets`]: the [`InfoCollector`] (`show_stats`,
//! `show_errors`, `reset_errors`) and the [`FedEventRunner`] (fed events to and from the server
//! job), both registered by [`ClientEngine::builder`] and reachable through `get_widget`.
//! [`np`] has NVFlare's numpy example executors (`NPTrainer`, `NPValidator`) under their NVFlare
//! class paths, so NVFlare's hello-numpy jobs run unchanged.
//!
//! # Example: an engine inside your own actix System
//! ```
//! use std::time::Duration;
//! use fedrun_cell::Network;
//! use fedrun_core::Shareable;
//! use fedrun_engine::{aux_handler, AuxTargets, ClientEngine};
//!
//! actix::System::new().block_on(async {
//!     let network = Network::new(); // the in-process network: every cell of this process
//!     let sites = ["site-1", "site-2"]; // the job's clients, as its job meta names them
//!     let site1 = ClientEngine::builder("site-1", "job-1").job_clients(&sites);
//!     let site1 = site1.start(&network).await.unwrap();
//!     let site2 = ClientEngine::builder("site-2", "job-1").job_clients(&sites);
//!     let site2 = site2.start(&network).await.unwrap();
//!     let echo = aux_handler(|req| async move { Ok::<_, String>(req.request) });
//!     site2.register_aux_message_handler("echo", echo).await.unwrap();
//!
//!     let mut request = Shareable::new();
//!     request.insert("x", 1);
//!     let target = AuxTargets::Site("site-2".into());
//!     let replies = site1.send_aux_request(target, "echo", request, Duration::from_secs(5));
//!     let replies = replies.await.unwrap();
//!     assert_eq!(replies["site-2"].get("x").and_then(|v| v.as_i64()), Some(1));
//! });
//! ```

// The module is `aux` (the facade imports `crate::aux`), but its files live in `aux_runner/`:
// `aux` is a reserved file name on Windows, where a checkout with an `aux` path fails.
#[path = "aux_runner/mod.rs"]
pub mod aux;
pub mod component;
pub mod download;
pub mod error;
pub mod event;
pub mod executor;
pub mod facade;
pub mod handle;
pub mod job_config;
pub mod np;
pub mod registry;
pub mod run_info;
pub mod runner;
pub mod stream;
pub mod task_fetcher;
pub mod widgets;

pub use aux::{
    aux_handler, aux_timeout_secs, AuxConfig, AuxHandler, AuxHandlerFn, AuxReplies, AuxRequest,
    AuxRunner, AuxTargets, DispatchAuxRequest, FireAndForgetAuxRequest, GetClientFromName,
    GetClients, GetJobClients, MulticastAuxRequests, RegisterAuxMessageHandler, SendAuxRequest,
    ValidateTargets,
};
pub use component::{
    async_handler_fn, handler_fn, AsyncFnHandler, Component, ComponentRef, EventHandler, FnHandler,
};
pub use error::EngineError;
pub use event::{fire_event, EVENT_SCOPE_LOCAL, MAX_EVENT_DEPTH};
pub use executor::{
    executor_factory, executor_fn, executor_of, Executor, ExecutorComponent, FnExecutor,
    TaskRouter, ANY_TASK,
};
pub use facade::{AbortApp, ClientRunManager, EngineActors, Forwarded, StopEngine};
pub use handle::{ClientEngine, ClientEngineBuilder, EngineHandle};
pub use job_config::{ClientJobConfig, ComponentSpec, ExecutorSpec};
pub use registry::{
    factory, AddComponent, AddHandler, AddWidget, BuildArgs, BuildAuthorizer, BuildComponent,
    ComponentFactory, ComponentRegistry, FireEvent, GetAllComponents, GetComponent,
    GetHandlerNames, GetWidget, PersistComponents, RegisterComponentFactory, SetBuildAuthorizer,
};
pub use run_info::{
    AbortRun, ErrorReport, GetAbortSignal, GetRunInfo, MarkRunStarted, NewContext, ReportError,
    ResetErrors, RunInfo, RunInfoConfig, SetCurrentTask, ShowErrors,
};
pub use runner::{ClientRunner, RunEnd, RunOutcome, RunnerConfig, RunnerControl, RunningTask};
pub use stream::{
    RegisterStreamProcessing, StreamConfig, StreamObjects, StreamOutcome, StreamProcessor,
};
pub use task_fetcher::{
    parent_site_name, FetcherState, GetFetcherState, GetTaskAssignment, OfferTaskResult,
    SendTaskResult, TaskFetcher, TaskFetcherConfig, TaskPull, OFFERED_REFS_HEADER,
};
pub use widgets::{
    add_stats, answer_info_command, set_stats, FedEventRunner, InfoCollector, FED_EVENT_QUEUE,
};
