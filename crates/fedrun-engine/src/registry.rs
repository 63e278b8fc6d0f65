//! The `ComponentRegistry` actor: the job's components, event handlers, widgets and component
//! factories, in one owned store.
//!
//! NVFlare spreads these over the engine and the runner config, which loses map identity and
//! makes components added later invisible. Here one actor owns them all:
//!
//! - components by id, in insertion order ([`AddComponent`], [`GetComponent`],
//!   [`GetAllComponents`]); a component that handles events is also appended to the handler list;
//! - the handler list, in registration order ([`AddHandler`], no de-duplication, as NVFlare);
//! - event firing ([`FireEvent`]): the fan-out runs on a snapshot of the handler list in
//!   a future spawned outside the mailbox, so a handler may fire a nested event through this same
//!   actor without deadlocking it;
//! - widgets ([`AddWidget`], [`GetWidget`]);
//! - runtime component builds ([`BuildComponent`]) from factories registered by class
//!   ([`RegisterComponentFactory`]) under an authorizer ([`SetBuildAuthorizer`]).
//!
//! Unlike NVFlare, a component built at run time is **not** made an event handler
//! behind the caller's back: [`BuildComponent`] only returns it; the caller decides whether to
//! register it (e.g. with [`AddComponent`], which also subscribes it when it handles events).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use actix::{Actor, Context, Handler, Message, MessageResult, Recipient, ResponseFuture};
use fedrun_core::FlContext;
use serde_json::Value as Json;

use crate::component::{panic_text, Component, ComponentRef, EventHandler};
use crate::error::EngineError;
use crate::event::fire_event_collecting;
use crate::run_info::ReportError;

/// The default mailbox capacity of the [`ComponentRegistry`] actor.
pub const DEFAULT_REGISTRY_MAILBOX: usize = 256;

/// The node path of the root of a runtime component build (what the authorizer sees first).
pub const RUNTIME_COMPONENT_PATH: &str = "runtime_component";

/// The error-log group under which failing event handlers are reported.
pub const EVENT_ERROR_GROUP: &str = "event";

/// What a factory gets to build one component.
///
/// Every `args` entry of the config is either in [`args`](BuildArgs::args) (data, as JSON) or, when
/// it was a nested component config that was built first, in
/// [`components`](BuildArgs::components) under the same name (and absent from `args`). A nested
/// config that is disabled appears in `args` as `null`.
#[derive(Clone, Debug, Default)]
pub struct BuildArgs {
    /// The class the factory was looked up by (the registration key).
    pub class: String,
    /// The data arguments (the config's `args`, or `args.class_attributes` when present).
    pub args: serde_json::Map<String, Json>,
    /// The nested components, built before this one, by argument name.
    pub components: HashMap<String, ComponentRef>,
}

impl BuildArgs {
    /// The nested component `arg` as a `T`, if it was built and is a `T`.
    pub fn component<T: Component>(&self, arg: &str) -> Option<Arc<T>> {
        self.components
            .get(arg)
            .and_then(ComponentRef::downcast::<T>)
    }
}

/// Builds one component from its arguments; an `Err` text becomes
/// [`EngineError::ComponentBuildFailed`]. A panic is caught and reported the same way.
pub type ComponentFactory = Arc<dyn Fn(BuildArgs) -> Result<ComponentRef, String> + Send + Sync>;

/// Decides whether a node of a component config tree may be built: gets the node and its path
/// (`runtime_component`, `runtime_component.args.<arg>`, ...); an `Err` text refuses the build.
pub type BuildAuthorizer = Arc<dyn Fn(&Json, &str) -> Result<(), String> + Send + Sync>;

/// Makes a [`ComponentFactory`] from a function that returns a concrete component.
///
/// # Example
/// ```
/// use fedrun_engine::{factory, BuildArgs, Component};
///
/// struct Trainer { lr: f64 }
/// impl Component for Trainer {}
///
/// let f = factory(|args: BuildArgs| {
///     let lr = args.args.get("lr").and_then(|v| v.as_f64()).ok_or("missing lr")?;
///     Ok(Trainer { lr })
/// });
/// let mut args = fedrun_engine::BuildArgs::default();
/// args.args.insert("lr".into(), serde_json::json!(0.1));
/// let built = f(args).unwrap();
/// assert_eq!(built.downcast::<Trainer>().unwrap().lr, 0.1);
/// ```
pub fn factory<T, F>(f: F) -> ComponentFactory
where
    T: Component,
    F: Fn(BuildArgs) -> Result<T, String> + Send + Sync + 'static,
{
    Arc::new(move |args| f(args).map(ComponentRef::new))
}

/// The actor that owns components, handlers, widgets and component factories.
///
/// # Example
/// ```
/// use actix::Actor;
/// use fedrun_engine::{AddComponent, ComponentRef, ComponentRegistry, GetComponent};
///
/// actix::System::new().block_on(async {
///     let reg = ComponentRegistry::new("job-1", "site-1").start();
///     reg.send(AddComponent { id: "c".into(), component: ComponentRef::new(String::from("x")) })
///         .await.unwrap().unwrap();
///     let c = reg.send(GetComponent { id: "c".into() }).await.unwrap().unwrap();
///     assert_eq!(c.downcast::<String>().unwrap().as_str(), "x");
/// });
/// ```
pub struct ComponentRegistry {
    job_id: String,
    site: String,
    components: Vec<(String, ComponentRef)>,
    index: HashMap<String, usize>,
    handlers: Arc<Vec<Arc<dyn EventHandler>>>,
    widgets: HashMap<String, ComponentRef>,
    factories: HashMap<String, ComponentFactory>,
    authorizer: Option<BuildAuthorizer>,
    error_sink: Option<Recipient<ReportError>>,
    mailbox_capacity: usize,
}

impl ComponentRegistry {
    /// An empty registry for `job_id` at `site` (not started; call `.start()`).
    pub fn new(job_id: impl Into<String>, site: impl Into<String>) -> Self {
        Self {
            job_id: job_id.into(),
            site: site.into(),
            components: Vec::new(),
            index: HashMap::new(),
            handlers: Arc::new(Vec::new()),
            widgets: HashMap::new(),
            factories: HashMap::new(),
            authorizer: None,
            error_sink: None,
            mailbox_capacity: DEFAULT_REGISTRY_MAILBOX,
        }
    }

    /// Reports failing event handlers to `sink` (normally the [`RunInfo`](crate::RunInfo) actor),
    /// in group [`EVENT_ERROR_GROUP`], keyed by handler name.
    pub fn with_error_sink(mut self, sink: Recipient<ReportError>) -> Self {
        self.error_sink = Some(sink);
        self
    }

    /// Sets the mailbox capacity (at least 1).
    pub fn with_mailbox_capacity(mut self, capacity: usize) -> Self {
        self.mailbox_capacity = capacity.max(1);
        self
    }

    fn prefix(&self) -> String {
        format!("[job={} site={}]", self.job_id, self.site)
    }

    fn log_handling(&self, msg: &str) {
        log::debug!("{} ComponentRegistry handles {msg}", self.prefix());
    }

    fn add_handler(&mut self, handler: Arc<dyn EventHandler>) {
        Arc::make_mut(&mut self.handlers).push(handler);
    }

    /// Calls the authorizer on `node` and then on every nested component config in its `args`.
    fn authorize(
        &self,
        authorizer: &BuildAuthorizer,
        node: &Json,
        path: &str,
    ) -> Result<(), EngineError> {
        let verdict = std::panic::catch_unwind(AssertUnwindSafe(|| authorizer(node, path)))
            .unwrap_or_else(|payload| Err(format!("authorizer {}", panic_text(payload.as_ref()))));
        if let Err(reason) = verdict {
            log::warn!(
                "{} component build refused at {path}: {reason}",
                self.prefix()
            );
            return Err(EngineError::ComponentNotAuthorized {
                path: path.to_owned(),
                reason,
            });
        }
        let Some(args) = node.get("args").and_then(Json::as_object) else {
            return Ok(());
        };
        for (arg, value) in args {
            match value {
                Json::Object(_) if has_class_key(value) => {
                    self.authorize(authorizer, value, &format!("{path}.args.{arg}"))?;
                }
                Json::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if item.is_object() && has_class_key(item) {
                            self.authorize(authorizer, item, &format!("{path}.args.{arg}.{i}"))?;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Finds the factory a class config names: (registration key, factory).
    fn resolve(
        &self,
        config: &serde_json::Map<String, Json>,
    ) -> Result<(String, ComponentFactory), EngineError> {
        let spec = class_spec(config)?;
        let found = match &spec {
            ClassSpec::Path(path) => self.factories.get(path).map(|f| (path.clone(), f.clone())),
            ClassSpec::Name(name) => self.resolve_short_name(name)?,
        };
        found.ok_or_else(|| EngineError::UnknownComponentClass(spec.text().to_owned()))
    }

    /// A short class name: an exact registration, else the one registration whose last
    /// `.`-component is the name (NVFlare's module scan).
    fn resolve_short_name(
        &self,
        name: &str,
    ) -> Result<Option<(String, ComponentFactory)>, EngineError> {
        if let Some(f) = self.factories.get(name) {
            return Ok(Some((name.to_owned(), f.clone())));
        }
        let mut matches: Vec<(&String, &ComponentFactory)> = self
            .factories
            .iter()
            .filter(|(class, _)| class.rsplit('.').next() == Some(name))
            .collect();
        match matches.len() {
            0 => Ok(None),
            1 => Ok(matches.pop().map(|(c, f)| (c.clone(), f.clone()))),
            _ => {
                let mut classes: Vec<&str> = matches.iter().map(|(c, _)| c.as_str()).collect();
                classes.sort_unstable();
                Err(EngineError::BadComponentConfig(format!(
                    "class name {name} is ambiguous: {}",
                    classes.join(", ")
                )))
            }
        }
    }

    /// Is `value` a nested component config to build: `config_type` absent or `component`, and
    /// a class key that resolves to a registered factory.
    fn is_class_config(&self, value: &serde_json::Map<String, Json>) -> bool {
        let component_type = match value.get("config_type") {
            None => true,
            Some(t) => t.as_str() == Some("component"),
        };
        component_type && self.resolve(value).is_ok()
    }

    /// Builds a config that was already authorized (generic builder).
    fn build(&self, config: &Json, path: &str) -> Result<Option<ComponentRef>, EngineError> {
        if is_falsy(config) {
            return Ok(None);
        }
        let Some(obj) = config.as_object() else {
            return Err(EngineError::BadComponentConfig(format!(
                "component config at {path} must be an object, got {}",
                json_kind(config)
            )));
        };
        if obj.get("disabled") == Some(&Json::Bool(true)) {
            log::debug!("{} component config at {path} is disabled", self.prefix());
            return Ok(None);
        }
        let (class, factory) = self.resolve(obj)?;
        let mut args = match obj.get("args") {
            None | Some(Json::Null) => serde_json::Map::new(),
            Some(Json::Object(a)) => a.clone(),
            Some(other) => {
                return Err(EngineError::BadComponentConfig(format!(
                    "args of {class} at {path} must be an object, got {}",
                    json_kind(other)
                )))
            }
        };
        let mut components = HashMap::new();
        if let Some(attrs) = args.get("class_attributes") {
            // The class attributes replace the args, as they are: nothing inside is built.
            let Some(attrs) = attrs.as_object() else {
                return Err(EngineError::BadComponentConfig(format!(
                    "args.class_attributes of {class} at {path} must be an object"
                )));
            };
            args = attrs.clone();
        } else {
            let nested: Vec<String> = args
                .iter()
                .filter(|(_, v)| v.as_object().is_some_and(|o| self.is_class_config(o)))
                .map(|(k, _)| k.clone())
                .collect();
            for arg in nested {
                let Some(value) = args.get(&arg) else {
                    continue;
                };
                match self.build(value, &format!("{path}.args.{arg}")) {
                    Ok(Some(component)) => {
                        args.remove(&arg);
                        components.insert(arg, component);
                    }
                    Ok(None) => {
                        args.insert(arg, Json::Null);
                    }
                    Err(e) => {
                        return Err(EngineError::NestedComponentFailed {
                            arg,
                            reason: e.to_string(),
                        })
                    }
                }
            }
        }
        let build_args = BuildArgs {
            class: class.clone(),
            args,
            components,
        };
        let built = std::panic::catch_unwind(AssertUnwindSafe(|| factory(build_args)))
            .unwrap_or_else(|payload| Err(panic_text(payload.as_ref())));
        match built {
            Ok(component) => {
                log::debug!("{} built component {class} at {path}", self.prefix());
                Ok(Some(component))
            }
            Err(reason) => {
                log::error!(
                    "{} factory of {class} failed at {path}: {reason}",
                    self.prefix()
                );
                Err(EngineError::ComponentBuildFailed { class, reason })
            }
        }
    }
}

/// How a config names its class.
enum ClassSpec {
    /// `path` or `class_path`: a full `module.Class` path.
    Path(String),
    /// `name`: a short class name.
    Name(String),
}

impl ClassSpec {
    fn text(&self) -> &str {
        match self {
            ClassSpec::Path(s) | ClassSpec::Name(s) => s,
        }
    }
}

/// Does an object carry one of the keys that name a class?
fn has_class_key(value: &Json) -> bool {
    ["path", "class_path", "name"]
        .iter()
        .any(|k| value.get(k).is_some())
}

/// The class a config names, by key presence: `path`, then `class_path`, then `name`.
fn class_spec(config: &serde_json::Map<String, Json>) -> Result<ClassSpec, EngineError> {
    for key in ["path", "class_path"] {
        if let Some(value) = config.get(key) {
            let Some(path) = value.as_str() else {
                return Err(EngineError::BadComponentConfig(format!(
                    "{key} spec must be a string, got {}",
                    json_kind(value)
                )));
            };
            if path.is_empty() {
                return Err(EngineError::BadComponentConfig(
                    "path spec must not be empty".to_owned(),
                ));
            }
            if !path.contains('.') {
                return Err(EngineError::BadComponentConfig(format!(
                    "missing module name in {key} spec {path}"
                )));
            }
            return Ok(ClassSpec::Path(path.to_owned()));
        }
    }
    match config.get("name") {
        Some(Json::String(name)) if !name.is_empty() => Ok(ClassSpec::Name(name.clone())),
        Some(_) => Err(EngineError::BadComponentConfig(
            "class name must be a non-empty string".to_owned(),
        )),
        None => Err(EngineError::BadComponentConfig(
            "component config must have 'path', 'class_path' or 'name'".to_owned(),
        )),
    }
}

/// Python truthiness of a JSON value (`null`, `false`, `0`, `""`, `[]`, `{}` are falsy).
fn is_falsy(value: &Json) -> bool {
    match value {
        Json::Null => true,
        Json::Bool(b) => !b,
        Json::Number(n) => n.as_f64() == Some(0.0),
        Json::String(s) => s.is_empty(),
        Json::Array(a) => a.is_empty(),
        Json::Object(o) => o.is_empty(),
    }
}

fn json_kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a bool",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

impl Actor for ComponentRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

/// Registers a component under `id`; one that handles events is also appended to the handlers.
///
/// Replies [`EngineError::DuplicateComponent`] when `id` is taken (nothing changes then).
#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct AddComponent {
    /// The component's id.
    pub id: String,
    /// The component.
    pub component: ComponentRef,
}

impl Handler<AddComponent> for ComponentRegistry {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, msg: AddComponent, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("AddComponent");
        if self.index.contains_key(&msg.id) {
            log::warn!("{} duplicate component id {}", self.prefix(), msg.id);
            return Err(EngineError::DuplicateComponent(msg.id));
        }
        if let Some(handler) = msg.component.as_event_handler() {
            log::debug!(
                "{} component {} is an event handler ({}): appended to the handlers",
                self.prefix(),
                msg.id,
                handler.name()
            );
            self.add_handler(handler);
        }
        self.index.insert(msg.id.clone(), self.components.len());
        self.components.push((msg.id, msg.component));
        Ok(())
    }
}

/// Asks for the component registered under `id` (`None` when unknown).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Option<ComponentRef>")]
pub struct GetComponent {
    /// The component's id.
    pub id: String,
}

impl Handler<GetComponent> for ComponentRegistry {
    type Result = Option<ComponentRef>;

    fn handle(&mut self, msg: GetComponent, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetComponent");
        self.index
            .get(&msg.id)
            .and_then(|&i| self.components.get(i))
            .map(|(_, c)| c.clone())
    }
}

/// Asks for every component with its id, in insertion order.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Vec<(String, ComponentRef)>")]
pub struct GetAllComponents;

impl Handler<GetAllComponents> for ComponentRegistry {
    type Result = MessageResult<GetAllComponents>;

    fn handle(&mut self, _msg: GetAllComponents, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetAllComponents");
        MessageResult(self.components.clone())
    }
}

/// Appends an event handler (no type check needed, no de-duplication, as NVFlare).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddHandler {
    /// The handler.
    pub handler: Arc<dyn EventHandler>,
}

impl Handler<AddHandler> for ComponentRegistry {
    type Result = ();

    fn handle(&mut self, msg: AddHandler, _ctx: &mut Context<Self>) {
        self.log_handling("AddHandler");
        self.add_handler(msg.handler);
    }
}

/// Asks for the names of the event handlers, in registration order.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Vec<String>")]
pub struct GetHandlerNames;

impl Handler<GetHandlerNames> for ComponentRegistry {
    type Result = Vec<String>;

    fn handle(&mut self, _msg: GetHandlerNames, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetHandlerNames");
        self.handlers.iter().map(|h| h.name().to_owned()).collect()
    }
}

/// Fires an event to every handler, in registration order, and replies with the context after
/// the last handler (see [`fire_event`](crate::fire_event)).
///
/// The fan-out runs outside the actor's mailbox on a snapshot of the handler list (handlers added
/// meanwhile see the next event), so handlers may talk to this actor, fire nested events included.
/// Failing handlers are also reported to the error sink, if one is set.
#[derive(Debug, Message)]
#[rtype(result = "Result<FlContext, EngineError>")]
pub struct FireEvent {
    /// The event type (e.g. `_start_run`).
    pub event_type: String,
    /// The context the handlers work on.
    pub ctx: FlContext,
}

impl Handler<FireEvent> for ComponentRegistry {
    type Result = ResponseFuture<Result<FlContext, EngineError>>;

    fn handle(&mut self, msg: FireEvent, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("FireEvent");
        let handlers = Arc::clone(&self.handlers);
        let prefix = self.prefix();
        let sink = self.error_sink.clone();
        Box::pin(async move {
            let (ctx, failures) =
                fire_event_collecting(&handlers, &msg.event_type, msg.ctx, &prefix).await?;
            if let Some(sink) = sink {
                for (name, error) in failures {
                    let report = ReportError {
                        group: EVENT_ERROR_GROUP.to_owned(),
                        key: name,
                        message: format!("{}: {error}", msg.event_type),
                    };
                    if sink.send(report).await.is_err() {
                        log::warn!("{prefix} error sink is gone: handler failure not recorded");
                    }
                }
            }
            Ok(ctx)
        })
    }
}

/// Registers a widget under `id`; one that handles events is also appended to the
/// handlers (NVFlare appends its widgets to the handler list).
#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct AddWidget {
    /// The widget's id (e.g. `info_collector`).
    pub id: String,
    /// The widget.
    pub widget: ComponentRef,
}

impl Handler<AddWidget> for ComponentRegistry {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, msg: AddWidget, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("AddWidget");
        if self.widgets.contains_key(&msg.id) {
            return Err(EngineError::DuplicateWidget(msg.id));
        }
        if let Some(handler) = msg.widget.as_event_handler() {
            self.add_handler(handler);
        }
        self.widgets.insert(msg.id, msg.widget);
        Ok(())
    }
}

/// Asks for the widget registered under `id` (`None` when unknown).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Option<ComponentRef>")]
pub struct GetWidget {
    /// The widget's id.
    pub id: String,
}

impl Handler<GetWidget> for ComponentRegistry {
    type Result = Option<ComponentRef>;

    fn handle(&mut self, msg: GetWidget, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetWidget");
        self.widgets.get(&msg.id).cloned()
    }
}

/// NVFlare's `persist_components`: not supported, logs a warning and does nothing.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct PersistComponents {
    /// Whether the run completed (ignored).
    pub completed: bool,
}

impl Handler<PersistComponents> for ComponentRegistry {
    type Result = ();

    fn handle(&mut self, _msg: PersistComponents, _ctx: &mut Context<Self>) {
        self.log_handling("PersistComponents");
        log::warn!(
            "{} will not persist components, not supported by ComponentRegistry",
            self.prefix()
        );
    }
}

/// Registers the factory that builds `class` (a `module.Class` path, or a short name); a
/// factory already registered for `class` is replaced (with a warning).
///
/// Replies [`EngineError::BadComponentConfig`] for an empty class.
#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct RegisterComponentFactory {
    /// The class this factory builds, as configs name it.
    pub class: String,
    /// The factory.
    pub factory: ComponentFactory,
}

impl Handler<RegisterComponentFactory> for ComponentRegistry {
    type Result = Result<(), EngineError>;

    fn handle(&mut self, msg: RegisterComponentFactory, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("RegisterComponentFactory");
        if msg.class.is_empty() {
            return Err(EngineError::BadComponentConfig(
                "a component factory needs a non-empty class".to_owned(),
            ));
        }
        if self
            .factories
            .insert(msg.class.clone(), msg.factory)
            .is_some()
        {
            log::warn!("{} factory for class {} replaced", self.prefix(), msg.class);
        }
        Ok(())
    }
}

/// Installs the build authorizer (replacing any previous one).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetBuildAuthorizer {
    /// The authorizer.
    pub authorizer: BuildAuthorizer,
}

impl Handler<SetBuildAuthorizer> for ComponentRegistry {
    type Result = ();

    fn handle(&mut self, msg: SetBuildAuthorizer, _ctx: &mut Context<Self>) {
        self.log_handling("SetBuildAuthorizer");
        self.authorizer = Some(msg.authorizer);
    }
}

/// Builds a component from a config at run time (NVFlare's `build_component`).
///
/// Order: no factory registered → [`EngineError::NoConfigurator`]; no authorizer →
/// [`EngineError::NoBuildAuthorizer`]; a falsy config (`null`, `{}`, ...) → `Ok(None)`; not an
/// object → [`EngineError::BadComponentConfig`]; then the authorizer runs over the whole tree
/// (node `runtime_component`, then every nested class config of `args` as
/// `runtime_component.args.<arg>`, recursively) **before any factory is called**; then the build:
/// `"disabled": true` → `Ok(None)`; the class is named by `path`, else `class_path`, else `name`
/// (decided by key presence); nested class configs in `args` (`config_type` absent or
/// `component`, class registered) are built first and handed to the parent's factory in
/// [`BuildArgs::components`]; `config_type: "dict"` entries stay data; `args.class_attributes`
/// replaces the args.
///
/// The built component is only returned: it is neither registered nor subscribed to events,
/// unlike in NVFlare; send [`AddComponent`] to do both.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Option<ComponentRef>, EngineError>")]
pub struct BuildComponent {
    /// The component config.
    pub config: Json,
}

impl Handler<BuildComponent> for ComponentRegistry {
    type Result = Result<Option<ComponentRef>, EngineError>;

    fn handle(&mut self, msg: BuildComponent, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("BuildComponent");
        if self.factories.is_empty() {
            return Err(EngineError::NoConfigurator);
        }
        let Some(authorizer) = self.authorizer.clone() else {
            return Err(EngineError::NoBuildAuthorizer);
        };
        if is_falsy(&msg.config) {
            return Ok(None);
        }
        if !msg.config.is_object() {
            return Err(EngineError::BadComponentConfig(format!(
                "component config must be an object, got {}",
                json_kind(&msg.config)
            )));
        }
        self.authorize(&authorizer, &msg.config, RUNTIME_COMPONENT_PATH)?;
        self.build(&msg.config, RUNTIME_COMPONENT_PATH)
    }
}
