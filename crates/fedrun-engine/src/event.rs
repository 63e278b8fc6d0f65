//! The event fan-out: how one event reaches every handler.
//!
//! The registry actor owns the handler list; this module owns the algorithm, so that it can be
//! run on a snapshot of the list outside the actor's mailbox (a handler may then fire a nested
//! event through the registry without deadlocking it).
//!
//! For each fired event: a fresh event id; `__event_data__`, `__event_origin__` and
//! `__event_scope__` (default [`EVENT_SCOPE_LOCAL`]) are read from the context and written back
//! before every handler (a handler may have changed them); `###event_depth` guards recursion
//! (more than [`MAX_EVENT_DEPTH`] nested fires are refused) and is restored when the fan-out ends,
//! whatever the handlers did. A handler that fails or panics is logged and recorded
//! in the context's `__exceptions__` map (handler name → error text); the others still run.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use fedrun_core::constants::fl_ctx_key;
use fedrun_core::{FlContext, Map, Value};
use futures::FutureExt;

use crate::component::{panic_text, EventHandler};
use crate::error::EngineError;

/// The deepest allowed nesting of event firing: a fire that finds a depth above this is refused.
pub const MAX_EVENT_DEPTH: usize = 20;

/// The default event scope.
pub const EVENT_SCOPE_LOCAL: &str = "local";

/// Runs one event through `handlers`, in order, and returns the context afterwards.
///
/// `log_prefix` goes in front of every log line (e.g. `[job=j1 site=site-1]`).
///
/// # Errors
/// [`EngineError::EventTooDeep`] when the context's `###event_depth` is above
/// [`MAX_EVENT_DEPTH`]; no handler runs then. Handler failures are not errors of the fan-out:
/// they are recorded in `__exceptions__`.
///
/// # Example
/// ```
/// use fedrun_core::FlContext;
/// use fedrun_engine::{fire_event, handler_fn, EventHandler};
/// use std::sync::Arc;
///
/// let h: Arc<dyn EventHandler> = handler_fn("h", |_e: &str, _c: &mut FlContext| Err("boom".into()));
/// let ctx = futures::executor::block_on(fire_event(&[h], "_start_run", FlContext::new(), "")).unwrap();
/// let exceptions = ctx.get_prop("__exceptions__").unwrap();
/// assert_eq!(exceptions.as_map().unwrap().get("h").and_then(|v| v.as_str()), Some("boom"));
/// ```
pub async fn fire_event(
    handlers: &[Arc<dyn EventHandler>],
    event_type: &str,
    ctx: FlContext,
    log_prefix: &str,
) -> Result<FlContext, EngineError> {
    fire_event_collecting(handlers, event_type, ctx, log_prefix)
        .await
        .map(|(ctx, _failures)| ctx)
}

/// [`fire_event`], also returning the failures of this fan-out as (handler name, error text), in
/// handler order (the registry reports them to the run's error log).
pub(crate) async fn fire_event_collecting(
    handlers: &[Arc<dyn EventHandler>],
    event_type: &str,
    mut ctx: FlContext,
    log_prefix: &str,
) -> Result<(FlContext, Vec<(String, String)>), EngineError> {
    let mut failures = Vec::new();
    let event_id = uuid::Uuid::new_v4().to_string();
    let event_data = ctx.get_prop(fl_ctx_key::EVENT_DATA).unwrap_or(Value::Nil);
    let event_origin = ctx.get_prop(fl_ctx_key::EVENT_ORIGIN).unwrap_or(Value::Nil);
    let event_scope = ctx
        .get_prop(fl_ctx_key::EVENT_SCOPE)
        .unwrap_or_else(|| Value::from(EVENT_SCOPE_LOCAL));

    let depth_value = ctx.get_prop(fl_ctx_key::EVENT_DEPTH);
    let depth = depth_value.as_ref().and_then(Value::as_i64).unwrap_or(0);
    if depth > MAX_EVENT_DEPTH as i64 {
        log::error!(
            "{log_prefix} event {event_type} refused: recursive event calls too deep (depth {depth} > {MAX_EVENT_DEPTH})"
        );
        return Err(EngineError::EventTooDeep(MAX_EVENT_DEPTH));
    }
    // Engine-owned keys are written with `put` (private, non-sticky): a raw local write cannot be
    // refused by a mask conflict, so the depth always advances and is always restored.
    ctx.put(fl_ctx_key::EVENT_DEPTH, depth + 1, true, false);

    log::debug!(
        "{log_prefix} firing event {event_type} (id {event_id}, depth {depth}) to {} handler(s)",
        handlers.len()
    );
    for handler in handlers {
        ctx.put(fl_ctx_key::EVENT_ID, event_id.as_str(), true, false);
        ctx.put(fl_ctx_key::EVENT_DATA, event_data.clone(), true, false);
        ctx.put(fl_ctx_key::EVENT_ORIGIN, event_origin.clone(), true, false);
        ctx.put(fl_ctx_key::EVENT_SCOPE, event_scope.clone(), true, false);

        let outcome = AssertUnwindSafe(handler.handle_event(event_type, &mut ctx))
            .catch_unwind()
            .await;
        let error = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(text)) => text,
            Err(payload) => panic_text(payload.as_ref()),
        };
        log::error!(
            "{log_prefix} event handler {} failed on {event_type}: {error}",
            handler.name()
        );
        record_exception(&mut ctx, handler.name(), error.clone());
        failures.push((handler.name().to_owned(), error));
    }

    // Restore the depth as found (an absent depth is restored as 0, as NVFlare does).
    ctx.put(fl_ctx_key::EVENT_DEPTH, depth, true, false);
    Ok((ctx, failures))
}

/// Adds `name → error` to the context's `__exceptions__` map (created when missing).
fn record_exception(ctx: &mut FlContext, name: &str, error: String) {
    let mut exceptions = match ctx.get_prop(fl_ctx_key::EXCEPTIONS) {
        Some(Value::Map(m)) => m,
        _ => Map::new(),
    };
    exceptions.insert(name, error);
    ctx.put(fl_ctx_key::EXCEPTIONS, exceptions, true, false);
}
