//! Guarantees of the `ComponentRegistry` actor: one component store, handler registration and
//! event fan-out, and authorized runtime component builds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr, Handler, Message};
use fedrun_core::{FlContext, Value};
use fedrun_engine::{
    async_handler_fn, factory, handler_fn, AddComponent, AddHandler, BuildArgs, BuildAuthorizer,
    BuildComponent, Component, ComponentRef, ComponentRegistry, EngineError, FireEvent,
    GetAllComponents, GetComponent, GetHandlerNames, NewContext, RegisterComponentFactory, RunInfo,
    RunInfoConfig, SetBuildAuthorizer, ShowErrors,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(5);

/// Sends `msg` and waits for the reply, with a deadline.
async fn ask<A, M>(addr: &Addr<A>, msg: M) -> M::Result
where
    A: Actor<Context = actix::Context<A>> + Handler<M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    tokio::time::timeout(DEADLINE, addr.send(msg))
        .await
        .expect("no reply before the deadline")
        .expect("actor mailbox closed")
}

fn registry() -> Addr<ComponentRegistry> {
    ComponentRegistry::new("job-1", "site-1").start()
}

async fn fire(
    reg: &Addr<ComponentRegistry>,
    event: &str,
    ctx: FlContext,
) -> Result<FlContext, EngineError> {
    ask(
        reg,
        FireEvent {
            event_type: event.into(),
            ctx,
        },
    )
    .await
}

/// A handler that appends its name to the `trail` prop (a list).
fn trail_handler(name: &'static str) -> ComponentRef {
    ComponentRef::from_arc(handler_fn(name, move |_e: &str, ctx: &mut FlContext| {
        append_trail(ctx, name);
        Ok(())
    }))
}

fn append_trail(ctx: &mut FlContext, name: &str) {
    let mut trail = match ctx.get_prop("trail") {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    };
    trail.push(Value::from(name));
    ctx.put("trail", trail, true, false);
}

fn trail(ctx: &FlContext) -> Vec<String> {
    match ctx.get_prop("trail") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect(),
        _ => Vec::new(),
    }
}

fn depth(ctx: &FlContext) -> Option<i64> {
    ctx.get_prop("###event_depth").and_then(|v| v.as_i64())
}

struct Plain(u32);
impl Component for Plain {}

#[actix::test]
async fn add_then_get_component_uses_one_store() {
    let reg = registry();
    // Starting from an empty registry (NVFlare loses the store's identity exactly here).
    assert!(ask(&reg, GetComponent { id: "a".into() }).await.is_none());
    assert!(ask(&reg, GetAllComponents).await.is_empty());

    let a = ComponentRef::new(Plain(1));
    let b = ComponentRef::new(Plain(2));
    ask(
        &reg,
        AddComponent {
            id: "a".into(),
            component: a.clone(),
        },
    )
    .await
    .unwrap();
    ask(
        &reg,
        AddComponent {
            id: "b".into(),
            component: b.clone(),
        },
    )
    .await
    .unwrap();

    let got = ask(&reg, GetComponent { id: "a".into() }).await.unwrap();
    assert!(got.ptr_eq(&a));
    assert_eq!(got.downcast::<Plain>().unwrap().0, 1);
    assert!(got.downcast::<String>().is_none());

    let all = ask(&reg, GetAllComponents).await;
    let ids: Vec<&str> = all.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert!(all[1].1.ptr_eq(&b));
}

#[actix::test]
async fn duplicate_component_id_is_rejected() {
    let reg = registry();
    let first = ComponentRef::new(Plain(1));
    ask(
        &reg,
        AddComponent {
            id: "a".into(),
            component: first.clone(),
        },
    )
    .await
    .unwrap();
    let err = ask(
        &reg,
        AddComponent {
            id: "a".into(),
            component: trail_handler("second"),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(err, EngineError::DuplicateComponent("a".into()));
    assert_eq!(err.to_string(), "duplicate component id a");
    let got = ask(&reg, GetComponent { id: "a".into() }).await.unwrap();
    assert!(got.ptr_eq(&first));
    // The refused component was not subscribed to events either.
    assert!(ask(&reg, GetHandlerNames).await.is_empty());
}

#[actix::test]
async fn component_that_handles_events_is_registered_as_handler() {
    let reg = registry();
    ask(
        &reg,
        AddComponent {
            id: "plain".into(),
            component: ComponentRef::new(Plain(0)),
        },
    )
    .await
    .unwrap();
    ask(
        &reg,
        AddComponent {
            id: "listener".into(),
            component: trail_handler("listener"),
        },
    )
    .await
    .unwrap();
    assert_eq!(ask(&reg, GetHandlerNames).await, ["listener"]);
    let ctx = fire(&reg, "_start_run", FlContext::new()).await.unwrap();
    assert_eq!(trail(&ctx), ["listener"]);
}

#[actix::test]
async fn fire_event_runs_handlers_in_registration_order() {
    let reg = registry();
    for name in ["h1", "h2", "h3"] {
        let handler = trail_handler(name).as_event_handler().unwrap();
        ask(&reg, AddHandler { handler }).await;
    }
    // No de-duplication, as NVFlare: h1 again runs twice.
    let again = trail_handler("h1").as_event_handler().unwrap();
    ask(&reg, AddHandler { handler: again }).await;

    let ctx = fire(&reg, "_start_run", FlContext::new()).await.unwrap();
    assert_eq!(trail(&ctx), ["h1", "h2", "h3", "h1"]);
    assert!(ctx
        .get_prop("__event_id__")
        .and_then(|v| v.as_str().map(str::len))
        .is_some_and(|n| n == 36));
    assert_eq!(ctx.get_prop("__event_scope__"), Some(Value::from("local")));
    assert_eq!(depth(&ctx), Some(0));
    assert!(ctx.get_prop("__exceptions__").is_none());
}

#[actix::test]
async fn failing_and_panicking_handlers_are_recorded_and_others_still_run() {
    let run = RunInfo::new(RunInfoConfig::new("site-1", "job-1")).start();
    let reg = ComponentRegistry::new("job-1", "site-1")
        .with_error_sink(run.clone().recipient())
        .start();
    let failing = handler_fn("failing", |_e: &str, _c: &mut FlContext| {
        Err("bad input".to_owned())
    });
    let panicking = async_handler_fn("panicking", |_e: String, _c: FlContext| async move {
        if !_e.is_empty() {
            panic!("handler blew up");
        }
        (FlContext::new(), Ok(()))
    });
    ask(&reg, AddHandler { handler: failing }).await;
    ask(&reg, AddHandler { handler: panicking }).await;
    let last = trail_handler("last").as_event_handler().unwrap();
    ask(&reg, AddHandler { handler: last }).await;

    let ctx = ask(&run, NewContext).await;
    let ctx = fire(&reg, "_end_run", ctx).await.unwrap();
    assert_eq!(trail(&ctx), ["last"]);
    let exceptions = ctx.get_prop("__exceptions__").expect("exceptions recorded");
    let exceptions = exceptions.as_map().unwrap();
    assert_eq!(exceptions.len(), 2);
    assert_eq!(
        exceptions.get("failing").and_then(Value::as_str),
        Some("bad input")
    );
    let panic_text = exceptions.get("panicking").and_then(Value::as_str).unwrap();
    assert!(panic_text.contains("handler blew up"), "{panic_text}");
    // The context survived the panic: its manager's stickers are still there.
    assert_eq!(ctx.job_id().as_deref(), Some("job-1"));
    assert_eq!(depth(&ctx), Some(0));

    // The failures also reached the run's error log.
    let report = ask(&run, ShowErrors).await.expect("failures reported");
    assert_eq!(report.records("event", "failing").len(), 1);
    assert_eq!(
        report.records("event", "failing")[0].message,
        "_end_run: bad input"
    );
    assert_eq!(report.records("event", "panicking").len(), 1);
}

#[actix::test]
async fn event_depth_over_20_is_refused_and_depth_is_restored() {
    let reg = registry();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let counter = handler_fn("counter", move |_e: &str, c: &mut FlContext| {
        counted.fetch_add(1, Ordering::SeqCst);
        // A handler that messes with the depth and then fails: the depth is restored anyway.
        c.put("###event_depth", 99, true, false);
        Err("after touching the depth".to_owned())
    });
    ask(&reg, AddHandler { handler: counter }).await;

    let mut too_deep = FlContext::new();
    too_deep.put("###event_depth", 21, true, false);
    let err = fire(&reg, "e", too_deep).await.unwrap_err();
    assert_eq!(err, EngineError::EventTooDeep(20));
    assert_eq!(err.to_string(), "Recursive event calls too deep (>20)");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no handler runs");

    let mut at_limit = FlContext::new();
    at_limit.put("###event_depth", 20, true, false);
    let ctx = fire(&reg, "e", at_limit).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(depth(&ctx), Some(20));

    let ctx = fire(&reg, "e", FlContext::new()).await.unwrap();
    assert_eq!(depth(&ctx), Some(0));
}

#[actix::test]
async fn nested_fire_from_a_handler_does_not_deadlock() {
    let reg = registry();
    let nested_reg = reg.clone();
    let outer = async_handler_fn("outer", move |event: String, ctx: FlContext| {
        let reg = nested_reg.clone();
        async move {
            if event != "outer_event" {
                return (ctx, Ok(()));
            }
            let nested = reg
                .send(FireEvent {
                    event_type: "inner_event".into(),
                    ctx: ctx.clone(),
                })
                .await;
            match nested {
                Ok(Ok(returned)) => (returned, Ok(())),
                Ok(Err(e)) => (ctx, Err(e.to_string())),
                Err(e) => (ctx, Err(e.to_string())),
            }
        }
    });
    let inner = handler_fn("inner", |event: &str, ctx: &mut FlContext| {
        if event == "inner_event" {
            append_trail(ctx, "inner");
            ctx.put("inner_depth", ctx.get_prop("###event_depth"), true, false);
        }
        Ok(())
    });
    ask(&reg, AddHandler { handler: outer }).await;
    ask(&reg, AddHandler { handler: inner }).await;

    let ctx = fire(&reg, "outer_event", FlContext::new()).await.unwrap();
    assert_eq!(trail(&ctx), ["inner"]);
    assert_eq!(ctx.get_prop("inner_depth"), Some(Value::from(2)));
    assert_eq!(depth(&ctx), Some(0));
    assert!(ctx.get_prop("__exceptions__").is_none());
}

#[actix::test]
async fn unbounded_recursion_through_the_registry_stops_at_the_depth_limit() {
    let reg = registry();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let nested_reg = reg.clone();
    let recursive = async_handler_fn("recursive", move |event: String, ctx: FlContext| {
        let reg = nested_reg.clone();
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            match reg
                .send(FireEvent {
                    event_type: event,
                    ctx: ctx.clone(),
                })
                .await
            {
                Ok(Ok(returned)) => (returned, Ok(())),
                Ok(Err(e)) => (ctx, Err(e.to_string())),
                Err(e) => (ctx, Err(e.to_string())),
            }
        }
    });
    ask(&reg, AddHandler { handler: recursive }).await;
    let ctx = fire(&reg, "again", FlContext::new()).await.unwrap();
    // Depths 0..=20 run the handler; the fire at depth 21 is refused.
    assert_eq!(calls.load(Ordering::SeqCst), 21);
    assert_eq!(depth(&ctx), Some(0));
    let exceptions = ctx.get_prop("__exceptions__").unwrap();
    assert_eq!(
        exceptions
            .as_map()
            .unwrap()
            .get("recursive")
            .and_then(Value::as_str),
        Some("Recursive event calls too deep (>20)")
    );
}

// ---- runtime component builds ----

struct Leaf {
    v: i64,
}
impl Component for Leaf {}

struct Parent {
    child: Option<Arc<Leaf>>,
    args: serde_json::Map<String, serde_json::Value>,
}
impl Component for Parent {}

struct Named(&'static str);
impl Component for Named {}

fn allow_all() -> BuildAuthorizer {
    Arc::new(|_node: &serde_json::Value, _path: &str| Ok(()))
}

/// Registers `m.Leaf` and `m.Parent`, counting factory calls.
async fn register_tree_factories(reg: &Addr<ComponentRegistry>, calls: &Arc<AtomicUsize>) {
    let c = calls.clone();
    let leaf = factory(move |a: BuildArgs| {
        c.fetch_add(1, Ordering::SeqCst);
        let v = a.args.get("v").and_then(|v| v.as_i64()).unwrap_or(0);
        Ok(Leaf { v })
    });
    let c = calls.clone();
    let parent = factory(move |a: BuildArgs| {
        c.fetch_add(1, Ordering::SeqCst);
        Ok(Parent {
            child: a.component::<Leaf>("child"),
            args: a.args,
        })
    });
    for (class, f) in [("m.Leaf", leaf), ("m.Parent", parent)] {
        ask(
            reg,
            RegisterComponentFactory {
                class: class.into(),
                factory: f,
            },
        )
        .await
        .unwrap();
    }
}

async fn build(
    reg: &Addr<ComponentRegistry>,
    config: serde_json::Value,
) -> Result<Option<ComponentRef>, EngineError> {
    ask(reg, BuildComponent { config }).await
}

#[actix::test]
async fn build_component_refused_without_configurator() {
    let reg = registry();
    ask(
        &reg,
        SetBuildAuthorizer {
            authorizer: allow_all(),
        },
    )
    .await;
    let err = build(&reg, json!({"path": "m.Leaf"})).await.unwrap_err();
    assert_eq!(err, EngineError::NoConfigurator);
    assert_eq!(err.to_string(), "No configurator set up.");
}

#[actix::test]
async fn build_component_refused_without_authorizer() {
    let reg = registry();
    let calls = Arc::new(AtomicUsize::new(0));
    register_tree_factories(&reg, &calls).await;
    let err = build(&reg, json!({"path": "m.Leaf"})).await.unwrap_err();
    assert_eq!(err, EngineError::NoBuildAuthorizer);
    assert_eq!(err.to_string(), "No component build authorizer set up.");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[actix::test]
async fn authorizer_sees_whole_tree_before_any_factory_runs() {
    let reg = registry();
    let calls = Arc::new(AtomicUsize::new(0));
    register_tree_factories(&reg, &calls).await;
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let authorizer: BuildAuthorizer = Arc::new(move |node: &serde_json::Value, path: &str| {
        log.lock().unwrap().push(path.to_owned());
        if node.get("args").and_then(|a| a.get("forbidden")).is_some() {
            Err("forbidden arg".to_owned())
        } else {
            Ok(())
        }
    });
    ask(&reg, SetBuildAuthorizer { authorizer }).await;

    let config = json!({
        "path": "m.Parent",
        "args": {
            "child": {"path": "m.Parent", "args": {
                "child": {"path": "m.Leaf", "args": {"v": 1, "forbidden": true}}
            }}
        }
    });
    let err = build(&reg, config).await.unwrap_err();
    assert_eq!(
        err,
        EngineError::ComponentNotAuthorized {
            path: "runtime_component.args.child.args.child".into(),
            reason: "forbidden arg".into(),
        }
    );
    assert!(err.to_string().contains("runtime_component"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "nothing may be built");
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "runtime_component",
            "runtime_component.args.child",
            "runtime_component.args.child.args.child"
        ]
    );
}

#[actix::test]
async fn build_component_builds_nested_components() {
    let reg = registry();
    let calls = Arc::new(AtomicUsize::new(0));
    register_tree_factories(&reg, &calls).await;
    ask(
        &reg,
        SetBuildAuthorizer {
            authorizer: allow_all(),
        },
    )
    .await;

    let config = json!({
        "path": "m.Parent",
        "args": {
            "child": {"path": "m.Leaf", "args": {"v": 7}},
            "data": {"config_type": "dict", "path": "m.Leaf", "x": 1},
            "unknown": {"path": "m.NotRegistered"},
            "plain": 3
        }
    });
    let built = build(&reg, config).await.unwrap().expect("a component");
    let parent = built.downcast::<Parent>().unwrap();
    assert_eq!(parent.child.as_ref().map(|c| c.v), Some(7));
    assert!(!parent.args.contains_key("child"), "built args leave args");
    assert_eq!(
        parent.args.get("data"),
        Some(&json!({"config_type": "dict", "path": "m.Leaf", "x": 1}))
    );
    // A nested config whose class is not known is data, as NVFlare.
    assert_eq!(
        parent.args.get("unknown"),
        Some(&json!({"path": "m.NotRegistered"}))
    );
    assert_eq!(parent.args.get("plain"), Some(&json!(3)));
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // class_attributes replace the args as they are.
    let config = json!({"path": "m.Parent", "args": {
        "class_attributes": {"a": 1, "child": {"path": "m.Leaf"}},
        "ignored": 2
    }});
    let built = build(&reg, config).await.unwrap().unwrap();
    let parent = built.downcast::<Parent>().unwrap();
    assert!(parent.child.is_none());
    assert_eq!(
        serde_json::Value::Object(parent.args.clone()),
        json!({"a": 1, "child": {"path": "m.Leaf"}})
    );

    // A built component is neither registered nor subscribed to events (#35).
    assert!(ask(&reg, GetAllComponents).await.is_empty());
    assert!(ask(&reg, GetHandlerNames).await.is_empty());
}

#[actix::test]
async fn path_precedence_and_empty_path_error() {
    let reg = registry();
    for (class, name) in [
        ("m.A", "A"),
        ("m.B", "B"),
        ("Short", "Short"),
        ("x.Dup", "x.Dup"),
        ("y.Dup", "y.Dup"),
    ] {
        ask(
            &reg,
            RegisterComponentFactory {
                class: class.into(),
                factory: factory(move |_a: BuildArgs| Ok(Named(name))),
            },
        )
        .await
        .unwrap();
    }
    ask(
        &reg,
        SetBuildAuthorizer {
            authorizer: allow_all(),
        },
    )
    .await;
    let name_of = |c: Option<ComponentRef>| c.unwrap().downcast::<Named>().unwrap().0;

    let a = build(
        &reg,
        json!({"path": "m.A", "class_path": "m.B", "name": "B"}),
    )
    .await;
    assert_eq!(name_of(a.unwrap()), "A");
    let b = build(&reg, json!({"class_path": "m.B", "name": "A"})).await;
    assert_eq!(name_of(b.unwrap()), "B");
    let by_name = build(&reg, json!({"name": "A"})).await;
    assert_eq!(name_of(by_name.unwrap()), "A");
    let short = build(&reg, json!({"name": "Short"})).await;
    assert_eq!(name_of(short.unwrap()), "Short");

    let empty = build(&reg, json!({"path": "", "class_path": "m.B"})).await;
    assert_eq!(
        empty.unwrap_err(),
        EngineError::BadComponentConfig("path spec must not be empty".into())
    );
    let no_module = build(&reg, json!({"path": "Short"})).await.unwrap_err();
    assert!(
        no_module.to_string().contains("missing module name"),
        "{no_module}"
    );
    let no_module = build(&reg, json!({"class_path": "Short"}))
        .await
        .unwrap_err();
    assert!(
        no_module.to_string().contains("missing module name"),
        "{no_module}"
    );
    let ambiguous = build(&reg, json!({"name": "Dup"})).await.unwrap_err();
    assert!(ambiguous.to_string().contains("ambiguous"), "{ambiguous}");
    let none = build(&reg, json!({"args": {}})).await.unwrap_err();
    assert!(matches!(none, EngineError::BadComponentConfig(_)), "{none}");
}

#[actix::test]
async fn disabled_config_builds_nothing() {
    let reg = registry();
    let calls = Arc::new(AtomicUsize::new(0));
    register_tree_factories(&reg, &calls).await;
    ask(
        &reg,
        SetBuildAuthorizer {
            authorizer: allow_all(),
        },
    )
    .await;
    assert!(build(&reg, json!({"path": "m.Leaf", "disabled": true}))
        .await
        .unwrap()
        .is_none());
    for falsy in [json!(null), json!({}), json!(false), json!(""), json!([])] {
        assert!(build(&reg, falsy).await.unwrap().is_none());
    }
    // A disabled nested config is handed to the parent as null.
    let built = build(
        &reg,
        json!({"path": "m.Parent", "args": {"child": {"path": "m.Leaf", "disabled": true}}}),
    )
    .await
    .unwrap()
    .unwrap();
    let parent = built.downcast::<Parent>().unwrap();
    assert!(parent.child.is_none());
    assert_eq!(parent.args.get("child"), Some(&json!(null)));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "only the parent was built");

    let not_object = build(&reg, json!("m.Leaf")).await.unwrap_err();
    assert!(
        matches!(not_object, EngineError::BadComponentConfig(_)),
        "{not_object}"
    );
}

#[actix::test]
async fn unknown_class_is_an_error() {
    let reg = registry();
    let calls = Arc::new(AtomicUsize::new(0));
    register_tree_factories(&reg, &calls).await;
    ask(
        &reg,
        SetBuildAuthorizer {
            authorizer: allow_all(),
        },
    )
    .await;
    let err = build(&reg, json!({"path": "m.Nope"})).await.unwrap_err();
    assert_eq!(err, EngineError::UnknownComponentClass("m.Nope".into()));
    let err = build(&reg, json!({"name": "Nope"})).await.unwrap_err();
    assert_eq!(err, EngineError::UnknownComponentClass("Nope".into()));
}

#[actix::test]
async fn failing_or_panicking_factory_is_a_build_error() {
    let reg = registry();
    let failing = factory(|_a: BuildArgs| -> Result<Leaf, String> { Err("no GPU".into()) });
    let panicking = factory(|_a: BuildArgs| -> Result<Leaf, String> { panic!("factory bug") });
    for (class, f) in [("m.Failing", failing), ("m.Panicking", panicking)] {
        ask(
            &reg,
            RegisterComponentFactory {
                class: class.into(),
                factory: f,
            },
        )
        .await
        .unwrap();
    }
    ask(
        &reg,
        SetBuildAuthorizer {
            authorizer: allow_all(),
        },
    )
    .await;
    let err = build(&reg, json!({"path": "m.Failing"})).await.unwrap_err();
    assert_eq!(
        err,
        EngineError::ComponentBuildFailed {
            class: "m.Failing".into(),
            reason: "no GPU".into()
        }
    );
    let err = build(&reg, json!({"path": "m.Panicking"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("factory bug"), "{err}");
    // A nested failure names the argument; the registry keeps serving.
    let err = build(
        &reg,
        json!({"path": "m.Failing", "args": {"inner": {"path": "m.Panicking"}}}),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, EngineError::NestedComponentFailed { arg, .. } if arg == "inner"),
        "{err}"
    );
}
