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
    /// An error of the data model.
    #[error(transparent)]
    Core(#[from] CoreError),
}
