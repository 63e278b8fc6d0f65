//! fedrun's client job engine: NVFlare's `ClientRunManager` as actix actors.
//!
//! NVFlare's engine is one object that owns everything a client job needs. fedrun splits it into
//! actors, each the single owner of one part of that state, so that no lock is shared and each
//! part can be tested alone:
//!
//! | actor | owns | module |
//! |---|---|---|
//! | [`RunInfo`] | the run info (job id, current task, start time), the context manager, the error log, the run's abort signal | [`run_info`] |
//! | [`ComponentRegistry`] | components, event handlers, widgets, component factories and the build authorizer; event firing | [`registry`] |
//!
//! The other parts come next, on top of these two: the aux runner (aux messages in and out), the
//! object streamer, the task fetcher, and a thin `ClientRunManager` facade actor that forwards
//! one message per NVFlare engine method.
//!
//! Supporting modules: [`component`] (the [`Component`] and [`EventHandler`] traits and
//! [`ComponentRef`]), [`event`] (the event fan-out, spec §2.7) and [`error`] ([`EngineError`]).
//!
//! # Example
//! ```
//! use actix::Actor;
//! use fedrun_engine::{
//!     handler_fn, AddComponent, ComponentRegistry, FireEvent, NewContext, RunInfo, RunInfoConfig,
//! };
//!
//! actix::System::new().block_on(async {
//!     let run = RunInfo::new(RunInfoConfig::new("site-1", "job-1")).start();
//!     let registry = ComponentRegistry::new("job-1", "site-1")
//!         .with_error_sink(run.clone().recipient())
//!         .start();
//!     let marker = handler_fn("marker", |event: &str, ctx: &mut fedrun_core::FlContext| {
//!         ctx.put("seen", event, true, false);
//!         Ok(())
//!     });
//!     let component = fedrun_engine::ComponentRef::from_arc(marker);
//!     registry.send(AddComponent { id: "marker".into(), component }).await.unwrap().unwrap();
//!
//!     let ctx = run.send(NewContext).await.unwrap();
//!     let ctx = registry
//!         .send(FireEvent { event_type: "_start_run".into(), ctx })
//!         .await
//!         .unwrap()
//!         .unwrap();
//!     assert_eq!(ctx.get_prop("seen").unwrap().as_str(), Some("_start_run"));
//! });
//! ```

// The module is `aux` (the facade imports `crate::aux`), but its files live in `aux_runner/`:
// `aux` is a reserved file name on Windows, where a checkout with an `aux` path fails.
#[path = "aux_runner/mod.rs"]
pub mod aux;
pub mod component;
pub mod error;
pub mod event;
pub mod registry;
pub mod run_info;
pub mod stream;

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
pub use registry::{
    factory, AddComponent, AddHandler, AddWidget, BuildArgs, BuildAuthorizer, BuildComponent,
    ComponentFactory, ComponentRegistry, FireEvent, GetAllComponents, GetComponent,
    GetHandlerNames, GetWidget, PersistComponents, RegisterComponentFactory, SetBuildAuthorizer,
};
pub use run_info::{
    AbortRun, ErrorReport, GetAbortSignal, GetRunInfo, MarkRunStarted, NewContext, ReportError,
    ResetErrors, RunInfo, RunInfoConfig, SetCurrentTask, ShowErrors,
};
pub use stream::{
    RegisterStreamProcessing, StreamConfig, StreamObjects, StreamOutcome, StreamProcessor,
};
