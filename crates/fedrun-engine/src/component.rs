//! Components and event handlers: the Rust shape of NVFlare's `FLComponent`.
//!
//! NVFlare keeps components as untyped Python objects in a dict and asks "is this an FLComponent?"
//! at run time. fedrun keeps them as [`ComponentRef`]s: a shared, type-erased [`Component`] that
//! the owner can turn back into its concrete type with [`ComponentRef::downcast`]. A component that
//! wants to receive events also implements [`EventHandler`] and says so through
//! [`Component::as_event_handler`]; the registry then appends it to its handler list when it is
//! added. For handlers that are just a function, [`handler_fn`] and [`async_handler_fn`] wrap a
//! closure.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use fedrun_core::FlContext;
use futures::future::BoxFuture;
use futures::FutureExt;

/// An object the engine keeps on behalf of the job (NVFlare's component).
///
/// Any `'static + Send + Sync` type can be a component; implement the trait (usually with an empty
/// body). Override [`as_event_handler`](Component::as_event_handler) when the type also implements
/// [`EventHandler`] so that registering it as a component also subscribes it to events.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use fedrun_engine::{Component, ComponentRef};
///
/// struct Aggregator { rounds: u32 }
/// impl Component for Aggregator {}
///
/// let c = ComponentRef::new(Aggregator { rounds: 3 });
/// let back: Arc<Aggregator> = c.downcast::<Aggregator>().unwrap();
/// assert_eq!(back.rounds, 3);
/// assert!(c.downcast::<String>().is_none());
/// ```
pub trait Component: Any + Send + Sync {
    /// This component as an event handler, if it is one. The default says it is not.
    ///
    /// A type that implements [`EventHandler`] overrides this with `Some(self)`.
    fn as_event_handler(self: Arc<Self>) -> Option<Arc<dyn EventHandler>> {
        None
    }
}

impl Component for String {}

/// Something that reacts to engine events (NVFlare's `FLComponent.handle_event`).
///
/// Handlers run one after the other, in registration order, on the event's context. A handler
/// returns `Err(text)` to report a failure: the engine logs it, records it in the context's
/// `__exceptions__` map under the handler's [`name`](EventHandler::name), and goes on with the next
/// handler. A panic is treated the same way.
///
/// A handler that fires a nested event through the registry sends a *clone* of `ctx` and gets the
/// updated context back; it should store that back into `ctx` (`*ctx = returned`) when it wants the
/// nested handlers' changes to be visible to the rest of this event.
///
/// # Example
/// ```
/// use fedrun_core::FlContext;
/// use fedrun_engine::EventHandler;
/// use futures::future::BoxFuture;
///
/// struct Counter;
/// impl EventHandler for Counter {
///     fn name(&self) -> &str {
///         "counter"
///     }
///     fn handle_event<'a>(
///         &'a self,
///         event_type: &'a str,
///         ctx: &'a mut FlContext,
///     ) -> BoxFuture<'a, Result<(), String>> {
///         Box::pin(async move {
///             ctx.put("last_event", event_type, true, false);
///             Ok(())
///         })
///     }
/// }
/// ```
pub trait EventHandler: Send + Sync {
    /// The handler's name: the key of its entry in `__exceptions__` when it fails.
    fn name(&self) -> &str;

    /// Handles one event on `ctx`.
    fn handle_event<'a>(
        &'a self,
        event_type: &'a str,
        ctx: &'a mut FlContext,
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// A shared, type-erased component, as the registry stores and returns it.
///
/// Cloning is cheap (one reference count). Get the concrete type back with
/// [`downcast`](ComponentRef::downcast).
///
/// # Example
/// ```
/// use fedrun_engine::ComponentRef;
///
/// let c = ComponentRef::new(String::from("a plain component"));
/// assert_eq!(c.downcast::<String>().unwrap().as_str(), "a plain component");
/// assert!(c.as_event_handler().is_none());
/// ```
#[derive(Clone)]
pub struct ComponentRef {
    inner: Arc<dyn Component>,
    type_name: &'static str,
}

impl ComponentRef {
    /// Wraps a component.
    pub fn new<T: Component>(component: T) -> Self {
        Self::from_arc(Arc::new(component))
    }

    /// Wraps a component that is already shared (the caller keeps its own typed `Arc`).
    pub fn from_arc<T: Component>(component: Arc<T>) -> Self {
        Self {
            inner: component,
            type_name: std::any::type_name::<T>(),
        }
    }

    /// Wraps an already type-erased component.
    pub fn from_dyn(component: Arc<dyn Component>) -> Self {
        Self {
            inner: component,
            type_name: "dyn Component",
        }
    }

    /// The component as a `T`, or `None` when it is of another type.
    pub fn downcast<T: Component>(&self) -> Option<Arc<T>> {
        let any: Arc<dyn Any + Send + Sync> = self.inner.clone();
        any.downcast::<T>().ok()
    }

    /// Is the component a `T`?
    pub fn is<T: Component>(&self) -> bool {
        let any: &dyn Any = &*self.inner;
        any.is::<T>()
    }

    /// The component as an event handler, when it is one (see [`Component::as_event_handler`]).
    pub fn as_event_handler(&self) -> Option<Arc<dyn EventHandler>> {
        self.inner.clone().as_event_handler()
    }

    /// The type-erased component.
    pub fn as_dyn(&self) -> &Arc<dyn Component> {
        &self.inner
    }

    /// The Rust type name of the component (for logs), as known when it was wrapped.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// Are both references the same component object?
    pub fn ptr_eq(&self, other: &ComponentRef) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl fmt::Debug for ComponentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ComponentRef")
            .field("type", &self.type_name)
            .finish_non_exhaustive()
    }
}

/// An event handler made from a synchronous closure; see [`handler_fn`].
pub struct FnHandler<F> {
    name: String,
    f: F,
}

/// Turns a synchronous closure into an event handler named `name`.
///
/// The handler is also a [`Component`] (an event-handling one), so it can be registered with
/// `AddComponent` as well as with `AddHandler`.
///
/// # Example
/// ```
/// use fedrun_engine::handler_fn;
///
/// let h = handler_fn("logger", |event: &str, _ctx: &mut fedrun_core::FlContext| {
///     if event.is_empty() { Err("no event type".to_owned()) } else { Ok(()) }
/// });
/// assert_eq!(h.name(), "logger");
/// ```
pub fn handler_fn<F>(name: impl Into<String>, f: F) -> Arc<FnHandler<F>>
where
    F: Fn(&str, &mut FlContext) -> Result<(), String> + Send + Sync + 'static,
{
    Arc::new(FnHandler {
        name: name.into(),
        f,
    })
}

impl<F> EventHandler for FnHandler<F>
where
    F: Fn(&str, &mut FlContext) -> Result<(), String> + Send + Sync + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn handle_event<'a>(
        &'a self,
        event_type: &'a str,
        ctx: &'a mut FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        let result = (self.f)(event_type, ctx);
        futures::future::ready(result).boxed()
    }
}

impl<F> Component for FnHandler<F>
where
    F: Fn(&str, &mut FlContext) -> Result<(), String> + Send + Sync + 'static,
{
    fn as_event_handler(self: Arc<Self>) -> Option<Arc<dyn EventHandler>> {
        Some(self)
    }
}

/// An event handler made from an asynchronous closure; see [`async_handler_fn`].
pub struct AsyncFnHandler<F> {
    name: String,
    f: F,
}

/// Turns an asynchronous closure into an event handler named `name`.
///
/// The closure gets the event type and a clone of the context, and gives back the context to keep
/// with its result; the returned context replaces the event's context. If the closure panics, the
/// event's context is left as it was before the call. Use this form when the handler awaits other
/// actors (for example to fire a nested event through the registry).
///
/// # Example
/// ```
/// use fedrun_core::FlContext;
/// use fedrun_engine::async_handler_fn;
///
/// let h = async_handler_fn("marker", |event: String, mut ctx: FlContext| async move {
///     ctx.put("seen", event, true, false);
///     (ctx, Ok(()))
/// });
/// assert_eq!(h.name(), "marker");
/// ```
pub fn async_handler_fn<F, Fut>(name: impl Into<String>, f: F) -> Arc<AsyncFnHandler<F>>
where
    F: Fn(String, FlContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (FlContext, Result<(), String>)> + Send + 'static,
{
    Arc::new(AsyncFnHandler {
        name: name.into(),
        f,
    })
}

impl<F> AsyncFnHandler<F> {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<F> FnHandler<F> {
    /// The handler's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<F, Fut> EventHandler for AsyncFnHandler<F>
where
    F: Fn(String, FlContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (FlContext, Result<(), String>)> + Send + 'static,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn handle_event<'a>(
        &'a self,
        event_type: &'a str,
        ctx: &'a mut FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        let fut = (self.f)(event_type.to_owned(), ctx.clone());
        Box::pin(async move {
            let (returned, result) = fut.await;
            *ctx = returned;
            result
        })
    }
}

impl<F, Fut> Component for AsyncFnHandler<F>
where
    F: Fn(String, FlContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = (FlContext, Result<(), String>)> + Send + 'static,
{
    fn as_event_handler(self: Arc<Self>) -> Option<Arc<dyn EventHandler>> {
        Some(self)
    }
}

/// The text of a caught panic payload.
pub(crate) fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_owned()
    }
}
