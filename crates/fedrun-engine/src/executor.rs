//! Executors (the code that does a task) and the task router (which executor does which task).
//!
//! NVFlare's client job hands every task it fetches to an `Executor` chosen by task name. In
//! fedrun an executor is a [`Component`] that also implements [`Executor`]: it is configured,
//! built and registered like every other component (`BuildComponent`, `AddComponent`), and the
//! runner calls it through `Arc<dyn Executor>`.
//!
//! # Getting an executor back from a component
//!
//! The registry stores components type-erased ([`ComponentRef`]), and a `ComponentRef` can only be
//! turned back into a *concrete* type. So executors travel through the registry wrapped in one
//! concrete type, [`ExecutorComponent`], which holds the `Arc<dyn Executor>`:
//!
//! - build one with [`ExecutorComponent::component`] (or [`ExecutorComponent::new`]), or register
//!   a factory made with [`executor_factory`], which wraps what it builds;
//! - get the executor back with [`executor_of`] (a downcast to [`ExecutorComponent`]).
//!
//! An executor that handles events (its [`Component::as_event_handler`] returns a handler) keeps
//! doing so through the wrapper: `AddComponent` subscribes it as usual.
//!
//! [`TaskRouter`] maps task names to executors: exact names, plus the catch-all `"*"` used only
//! when no exact name matches. A name can be routed once.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use fedrun_cell::AbortSignal;
use fedrun_core::{FlContext, Shareable};
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::component::{Component, ComponentRef, EventHandler};
use crate::error::EngineError;
use crate::registry::{BuildArgs, ComponentFactory};

/// The task name that routes every task no exact name matches.
pub const ANY_TASK: &str = "*";

/// Does one kind of task (NVFlare's `Executor.execute`).
///
/// `execute` gets the task's name, its data (a Shareable: usually a DXO plus the server's
/// headers), a context of the run whose peer context is the server's, and an abort signal that
/// fires when the task or the run is aborted. It returns the result Shareable (its `__rc__`, if
/// set, is kept; absent means `OK`), or `Err(text)`, which the runner turns into a result with
/// return code `EXECUTION_EXCEPTION`. A panic is caught and treated as an `Err`.
///
/// Aborts are cooperative: the executor should watch `abort` (e.g. in a `tokio::select!`) and
/// return soon after it fires; whatever it returns then, the result is `TASK_ABORTED`.
///
/// # Example
/// ```
/// use fedrun_cell::AbortSignal;
/// use fedrun_core::{FlContext, Shareable};
/// use fedrun_engine::{Component, Executor};
/// use futures::future::BoxFuture;
///
/// struct Doubler;
/// impl Component for Doubler {}
/// impl Executor for Doubler {
///     fn execute<'a>(
///         &'a self,
///         _task_name: &'a str,
///         task: Shareable,
///         _ctx: &'a FlContext,
///         _abort: AbortSignal,
///     ) -> BoxFuture<'a, Result<Shareable, String>> {
///         Box::pin(async move {
///             let x = task.get("x").and_then(|v| v.as_i64()).ok_or("no x")?;
///             let mut result = Shareable::new();
///             result.insert("x", x * 2);
///             Ok(result)
///         })
///     }
/// }
///
/// let mut task = Shareable::new();
/// task.insert("x", 21);
/// let ctx = FlContext::new();
/// let result = futures::executor::block_on(
///     Doubler.execute("double", task, &ctx, AbortSignal::new()),
/// );
/// assert_eq!(result.unwrap().get("x").and_then(|v| v.as_i64()), Some(42));
/// ```
pub trait Executor: Component {
    /// Runs the task `task_name` on `task`; see the trait doc.
    fn execute<'a>(
        &'a self,
        task_name: &'a str,
        task: Shareable,
        ctx: &'a FlContext,
        abort: AbortSignal,
    ) -> BoxFuture<'a, Result<Shareable, String>>;
}

/// The component form of an executor: what the registry stores so that the executor can be found
/// again as `Arc<dyn Executor>` (see the module doc).
///
/// # Example
/// ```
/// use fedrun_core::Shareable;
/// use fedrun_engine::{executor_fn, executor_of, ExecutorComponent};
///
/// let echo = executor_fn(|_name, task, _ctx, _abort| async move { Ok::<_, String>(task) });
/// let component = ExecutorComponent::component(echo);
/// assert!(executor_of(&component).is_some());
/// assert!(executor_of(&fedrun_engine::ComponentRef::new(String::from("not one"))).is_none());
/// ```
#[derive(Clone)]
pub struct ExecutorComponent(pub Arc<dyn Executor>);

impl ExecutorComponent {
    /// Wraps an executor.
    pub fn new<E: Executor>(executor: E) -> Self {
        ExecutorComponent(Arc::new(executor))
    }

    /// Wraps an executor and makes it a [`ComponentRef`], ready for `AddComponent`.
    pub fn component<E: Executor>(executor: E) -> ComponentRef {
        ComponentRef::new(Self::new(executor))
    }

    /// The executor.
    pub fn executor(&self) -> &Arc<dyn Executor> {
        &self.0
    }
}

impl fmt::Debug for ExecutorComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ExecutorComponent(..)")
    }
}

impl Component for ExecutorComponent {
    fn as_event_handler(self: Arc<Self>) -> Option<Arc<dyn EventHandler>> {
        // The wrapped executor decides whether it handles events.
        Arc::clone(&self.0).as_event_handler()
    }
}

/// The executor a component holds, when it is an [`ExecutorComponent`].
pub fn executor_of(component: &ComponentRef) -> Option<Arc<dyn Executor>> {
    component
        .downcast::<ExecutorComponent>()
        .map(|c| Arc::clone(&c.0))
}

/// Makes a [`ComponentFactory`] for an executor type: what `f` builds is wrapped in an
/// [`ExecutorComponent`], so [`executor_of`] finds it after `BuildComponent`.
///
/// # Example
/// ```
/// use fedrun_core::Shareable;
/// use fedrun_engine::{executor_factory, executor_fn, executor_of, BuildArgs};
///
/// let f = executor_factory(|args: BuildArgs| {
///     let scale = args.args.get("scale").and_then(|v| v.as_i64()).ok_or("missing scale")?;
///     Ok(executor_fn(move |_name, task: Shareable, _ctx, _abort| async move {
///         let x = task.get("x").and_then(|v| v.as_i64()).unwrap_or(0);
///         let mut result = Shareable::new();
///         result.insert("x", x * scale);
///         Ok::<_, String>(result)
///     }))
/// });
/// let mut args = BuildArgs::default();
/// args.args.insert("scale".into(), serde_json::json!(3));
/// assert!(executor_of(&f(args).unwrap()).is_some());
/// assert!(f(BuildArgs::default()).is_err());
/// ```
pub fn executor_factory<E, F>(f: F) -> ComponentFactory
where
    E: Executor,
    F: Fn(BuildArgs) -> Result<E, String> + Send + Sync + 'static,
{
    Arc::new(move |args| f(args).map(ExecutorComponent::component))
}

/// An executor made from an async closure; see [`executor_fn`].
pub struct FnExecutor<F> {
    f: F,
}

/// Makes an executor from an async closure `f(task_name, task, ctx, abort)`.
///
/// The closure gets owned copies (the task name, the task, a clone of the context, the abort
/// signal), so its future may outlive the call's borrows.
///
/// # Example
/// ```
/// use fedrun_cell::AbortSignal;
/// use fedrun_core::{FlContext, Shareable};
/// use fedrun_engine::{executor_fn, Executor};
///
/// let fail_on_abort = executor_fn(|name: String, task: Shareable, _ctx: FlContext,
///                                  abort: AbortSignal| async move {
///     if abort.is_triggered() {
///         return Err(format!("{name} aborted"));
///     }
///     Ok(task)
/// });
/// let ctx = FlContext::new();
/// let abort = AbortSignal::new();
/// abort.trigger();
/// let r = futures::executor::block_on(fail_on_abort.execute("train", Shareable::new(), &ctx, abort));
/// assert_eq!(r.unwrap_err(), "train aborted");
/// ```
pub fn executor_fn<F, Fut>(f: F) -> FnExecutor<F>
where
    F: Fn(String, Shareable, FlContext, AbortSignal) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Shareable, String>> + Send + 'static,
{
    FnExecutor { f }
}

impl<F> fmt::Debug for FnExecutor<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnExecutor(..)")
    }
}

impl<F, Fut> Component for FnExecutor<F>
where
    F: Fn(String, Shareable, FlContext, AbortSignal) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Shareable, String>> + Send + 'static,
{
}

impl<F, Fut> Executor for FnExecutor<F>
where
    F: Fn(String, Shareable, FlContext, AbortSignal) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Shareable, String>> + Send + 'static,
{
    fn execute<'a>(
        &'a self,
        task_name: &'a str,
        task: Shareable,
        ctx: &'a FlContext,
        abort: AbortSignal,
    ) -> BoxFuture<'a, Result<Shareable, String>> {
        (self.f)(task_name.to_owned(), task, ctx.clone(), abort).boxed()
    }
}

/// Which executor does which task (NVFlare's `TaskRouter`, exact names only).
///
/// A task name is routed to at most one executor; adding it twice is
/// [`EngineError::DuplicateTaskRoute`]. The name [`ANY_TASK`] (`"*"`) routes every task that no
/// exact name matches. Other names are matched exactly (no patterns).
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use fedrun_engine::{executor_fn, EngineError, TaskRouter};
///
/// let train = Arc::new(executor_fn(|_, t, _, _| async move { Ok::<_, String>(t) }));
/// let other = Arc::new(executor_fn(|_, t, _, _| async move { Ok::<_, String>(t) }));
/// let mut router = TaskRouter::new();
/// router.add(["train", "submit_model"], train).unwrap();
/// assert!(matches!(router.add(["train"], other.clone()), Err(EngineError::DuplicateTaskRoute(t)) if t == "train"));
/// assert!(router.route("train").is_some());
/// assert!(router.route("validate").is_none());
/// router.add(["*"], other).unwrap();
/// assert!(router.route("validate").is_some());
/// assert_eq!(router.task_names(), vec!["*", "submit_model", "train"]);
/// ```
#[derive(Clone, Default)]
pub struct TaskRouter {
    routes: HashMap<String, Arc<dyn Executor>>,
}

impl TaskRouter {
    /// An empty router (every task is unknown).
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes each of `tasks` to `executor`. Fails, adding none of them, when a name is empty,
    /// repeated in `tasks`, or already routed.
    pub fn add<I, S>(&mut self, tasks: I, executor: Arc<dyn Executor>) -> Result<(), EngineError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tasks: Vec<String> = tasks.into_iter().map(Into::into).collect();
        let mut seen = std::collections::HashSet::with_capacity(tasks.len());
        for task in &tasks {
            if task.is_empty() {
                return Err(EngineError::BadJobConfig(
                    "a task name must not be empty".to_owned(),
                ));
            }
            if self.routes.contains_key(task) || !seen.insert(task.as_str()) {
                return Err(EngineError::DuplicateTaskRoute(task.clone()));
            }
        }
        for task in tasks {
            self.routes.insert(task, Arc::clone(&executor));
        }
        Ok(())
    }

    /// The executor for `task_name`: its exact route, else the `"*"` route, else `None`.
    pub fn route(&self, task_name: &str) -> Option<Arc<dyn Executor>> {
        self.routes
            .get(task_name)
            .or_else(|| self.routes.get(ANY_TASK))
            .cloned()
    }

    /// The routed task names, sorted.
    pub fn task_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Is no task routed?
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl fmt::Debug for TaskRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskRouter")
            .field("tasks", &self.task_names())
            .finish()
    }
}
