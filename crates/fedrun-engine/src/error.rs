//! The errors of the engine's actors.
//!
//! One enum for the crate, so that a caller of any engine actor matches on one type. Each variant
//! carries what the caller needs to act on the failure, and its message reads on its own in a log.

use fedrun_core::CoreError;

/// What can go wrong when asking an engine actor to do something.
///
/// # Example
/// ```
/// use fedrun_engine::EngineError;
///
/// let e = EngineError::EventTooDeep(20);
/// assert_eq!(e.to_string(), "Recursive event calls too deep (>20)");
/// assert_eq!(EngineError::NoConfigurator.to_string(), "No configurator set up.");
/// ```
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum EngineError {
    /// A component with this id is already registered.
    #[error("duplicate component id {0}")]
    DuplicateComponent(String),
    /// A widget with this id is already registered.
    #[error("duplicate widget id {0}")]
    DuplicateWidget(String),
    /// A runtime component build was asked for, but no component factory is registered.
    #[error("No configurator set up.")]
    NoConfigurator,
    /// A runtime component build was asked for, but no build authorizer is installed.
    #[error("No component build authorizer set up.")]
    NoBuildAuthorizer,
    /// The build authorizer refused a node of the component config tree.
    #[error("component not authorized: {path}: {reason}")]
    ComponentNotAuthorized {
        /// The node path of the refused config (`runtime_component`, `runtime_component.args.x`).
        path: String,
        /// The authorizer's reason.
        reason: String,
    },
    /// A component config is malformed (not an object, bad `path`, bad `args`, ...).
    #[error("bad component config: {0}")]
    BadComponentConfig(String),
    /// No factory is registered for the class a component config names.
    #[error("unknown component class {0}")]
    UnknownComponentClass(String),
    /// A factory failed (returned an error or panicked).
    #[error("failed to build component of class {class}: {reason}")]
    ComponentBuildFailed {
        /// The class the factory was registered for.
        class: String,
        /// The factory's error text, or the panic message.
        reason: String,
    },
    /// A nested component config (an entry of `args`) could not be built.
    #[error("failed to instantiate class for arg {arg}: {reason}")]
    NestedComponentFailed {
        /// The name of the `args` entry.
        arg: String,
        /// Why the nested build failed.
        reason: String,
    },
    /// An event was fired from inside more than the allowed number of nested event handlers.
    #[error("Recursive event calls too deep (>{0})")]
    EventTooDeep(usize),
    /// The actor that should answer has stopped (its mailbox is closed).
    #[error("the {actor} actor is gone (mailbox closed)")]
    ActorGone {
        /// Which actor.
        actor: &'static str,
    },
    /// An aux topic was empty (registration or send).
    #[error("topic must not be empty")]
    EmptyTopic,
    /// An aux message handler is already registered for this topic (no replacement).
    #[error("handler already registered for topic {0}")]
    DuplicateAuxHandler(String),
    /// An aux target name is neither a reserved word nor a known job client; nothing was sent.
    #[error("invalid target {0}: not server, server_parent or a job client")]
    UnknownTarget(String),
    /// `@ALL` was asked for before the job clients were loaded.
    #[error("job clients are not loaded yet: @ALL cannot be resolved")]
    JobClientsNotLoaded,
    /// The engine's process type is none of `CP`, `SP`, `CJ`, `SJ`, so target cells cannot be
    /// named.
    #[error("invalid process_type {0}")]
    InvalidProcessType(String),
    /// A target's cell name is not a valid FQCN.
    #[error("invalid target FQCN '{fqcn}': {reason}")]
    InvalidTargetFqcn {
        /// The cell name that was built.
        fqcn: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The engine's cell is stopped or did not accept a message in time.
    #[error("cell {fqcn} unavailable: {reason}")]
    CellUnavailable {
        /// The cell's name.
        fqcn: String,
        /// What happened.
        reason: String,
    },
    /// A stream's producer failed, panicked or returned a zero timeout; the receivers were told
    /// the stream ended with `EXECUTION_EXCEPTION`.
    #[error("stream {tx_id}: {reason}")]
    StreamProducerFailed {
        /// The stream's transaction id.
        tx_id: String,
        /// What went wrong.
        reason: String,
    },
    /// A task name is already routed to an executor (a task is done by one executor only).
    #[error("task {0} is already routed to an executor")]
    DuplicateTaskRoute(String),
    /// A client job config (`config_fed_client.json`) is malformed.
    #[error("bad client job config: {0}")]
    BadJobConfig(String),
    /// A feature a job config asks for is not implemented yet.
    #[error("{0} not supported yet")]
    NotSupportedYet(String),
    /// The client runner could not sync with the server's runner before the deadline.
    #[error("cannot sync with the {target} runner after {waited:?}")]
    RunnerSyncFailed {
        /// The runner asked (`server`).
        target: String,
        /// How long the client tried.
        waited: std::time::Duration,
    },
    /// The site's FQSN names a parent site that is not one of the job's clients, so there is no
    /// cell to pull tasks from (NVFlare: "cannot find parent").
    #[error("cannot find parent '{parent}' of site {fqsn} among the job's clients")]
    UnknownParent {
        /// The parent site's name (the second-to-last component of the FQSN).
        parent: String,
        /// The site's FQSN.
        fqsn: String,
    },
    /// A built-in widget is not registered (or is not of the expected type).
    #[error("widget {0} is not available")]
    MissingWidget(String),
    /// An admin command the engine does not answer.
    #[error("unknown command {0}")]
    UnknownCommand(String),
    /// An error of the data model.
    #[error(transparent)]
    Core(#[from] CoreError),
}
