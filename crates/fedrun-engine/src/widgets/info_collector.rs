//! NVFlare's `InfoCollector` widget: the run's stats and error log, for the admin commands.
//!
//! The CJ answers the parent's `show_stats`, `show_errors` and `reset_errors` commands from this
//! widget (NVFlare's `ShowStatsCommand` & co. look it up with `get_widget("info_collector")`).
//!
//! - **Stats** are collected on demand: [`InfoCollector::show_stats`] fires
//!   `info_collector.get_stats` on a new context holding an empty collector under
//!   `info_collector.stats_collector`; every component that wants to report adds its group with
//!   [`add_stats`] (merge, NVFlare's `GroupInfoCollector.add_info`) or [`set_stats`] (replace,
//!   `set_info`), and the collected `{group: info}` map is returned. NVFlare returns `{}` before
//!   `_start_run` and after `_end_run`; fedrun always collects.
//! - **Errors** live in the run's error log ([`RunInfo`]): every part of the engine reports there,
//!   and this widget also records the `_critical/_error/_warning/_exception_log_available` events
//!   NVFlare's components fire (group = the event's origin, else `general`; key = `critical`,
//!   `error`, `warning` or `exception`; the event data is the message). NVFlare keeps only the
//!   latest error per group and key and never clears them through the engine;
//!   fedrun keeps a bounded list and [`InfoCollector::reset_errors`] really clears it. NVFlare also
//!   clears everything on `_start_run`; fedrun keeps errors reported before the run started.
//!
//! The widget holds weak addresses only: the registry that holds the widget must not be kept alive
//! by it.

use actix::{Addr, WeakAddr};
use fedrun_core::constants::{event_type, fl_ctx_key, info_collector as ic};
use fedrun_core::{FlContext, Map, Value};
use futures::future::BoxFuture;

use crate::component::{Component, EventHandler};
use crate::error::EngineError;
use crate::registry::{ComponentRegistry, FireEvent};
use crate::run_info::{ErrorReport, NewContext, ReportError, ResetErrors, RunInfo, ShowErrors};

/// The group of log events fired without an origin.
pub const GENERAL_GROUP: &str = "general";

/// The info collector widget (see the module doc). Registered by the engine builder under
/// `info_collector`.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use fedrun_cell::Network;
/// use fedrun_core::{FlContext, Map, Value};
/// use fedrun_engine::{add_stats, handler_fn, ClientEngine, InfoCollector};
///
/// actix::System::new().block_on(async {
///     let engine = ClientEngine::builder("site-1", "job-1").start(&Network::new()).await.unwrap();
///     let reporter = handler_fn("trainer", |event: &str, ctx: &mut FlContext| {
///         if event == "info_collector.get_stats" {
///             let mut info = Map::new();
///             info.insert("round", 3);
///             add_stats(ctx, "trainer", info);
///         }
///         Ok(())
///     });
///     engine.add_handler(reporter).await.unwrap();
///     let stats = engine.show_stats().await.unwrap();
///     let trainer = stats.get("trainer").and_then(Value::as_map).unwrap();
///     assert_eq!(trainer.get("round").and_then(Value::as_i64), Some(3));
///     let widget: Arc<InfoCollector> = engine.info_collector().await.unwrap();
///     assert!(widget.show_errors().await.unwrap().is_none());
/// });
/// ```
pub struct InfoCollector {
    prefix: String,
    run_info: WeakAddr<RunInfo>,
    registry: WeakAddr<ComponentRegistry>,
}

impl std::fmt::Debug for InfoCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InfoCollector")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl InfoCollector {
    /// The widget of `site`'s engine for `job_id`, over its run info and registry.
    pub fn new(
        site: &str,
        job_id: &str,
        run_info: &Addr<RunInfo>,
        registry: &Addr<ComponentRegistry>,
    ) -> Self {
        Self {
            prefix: format!("[job={job_id} site={site}] InfoCollector"),
            run_info: run_info.downgrade(),
            registry: registry.downgrade(),
        }
    }

    fn run_info(&self) -> Result<Addr<RunInfo>, EngineError> {
        self.run_info
            .upgrade()
            .ok_or(EngineError::ActorGone { actor: "RunInfo" })
    }

    /// NVFlare's `get_run_stats()`: fires `info_collector.get_stats` and returns what the
    /// handlers collected, group → info (empty when nobody reported).
    ///
    /// # Errors
    /// [`EngineError::ActorGone`] when the engine is stopped.
    pub async fn show_stats(&self) -> Result<Map, EngineError> {
        let run_info = self.run_info()?;
        let registry = self.registry.upgrade().ok_or(EngineError::ActorGone {
            actor: "ComponentRegistry",
        })?;
        let mut ctx = run_info
            .send(NewContext)
            .await
            .map_err(|_| EngineError::ActorGone { actor: "RunInfo" })?;
        ctx.put(ic::CTX_KEY_STATS_COLLECTOR, Value::map(), true, false);
        let fired = FireEvent {
            event_type: ic::EVENT_TYPE_GET_STATS.to_owned(),
            ctx,
        };
        let ctx = registry
            .send(fired)
            .await
            .map_err(|_| EngineError::ActorGone {
                actor: "ComponentRegistry",
            })??;
        match ctx.get_prop(ic::CTX_KEY_STATS_COLLECTOR) {
            Some(Value::Map(stats)) => Ok(stats),
            other => {
                log::warn!(
                    "{} a handler replaced the stats collector with {}; no stats",
                    self.prefix,
                    other.as_ref().map_or("nothing", Value::kind)
                );
                Ok(Map::new())
            }
        }
    }

    /// NVFlare's `get_errors()`: the run's error log, `None` when empty.
    ///
    /// # Errors
    /// [`EngineError::ActorGone`] when the engine is stopped.
    pub async fn show_errors(&self) -> Result<Option<ErrorReport>, EngineError> {
        self.run_info()?
            .send(ShowErrors)
            .await
            .map_err(|_| EngineError::ActorGone { actor: "RunInfo" })
    }

    /// NVFlare's `reset_errors()`, working: clears the run's error log.
    ///
    /// # Errors
    /// [`EngineError::ActorGone`] when the engine is stopped.
    pub async fn reset_errors(&self) -> Result<(), EngineError> {
        self.run_info()?
            .send(ResetErrors)
            .await
            .map_err(|_| EngineError::ActorGone { actor: "RunInfo" })
    }

    /// Records one log event in the error log.
    async fn record_log_event(&self, event: &str, ctx: &FlContext) -> Result<(), String> {
        let key = match event {
            event_type::CRITICAL_LOG_AVAILABLE => "critical",
            event_type::ERROR_LOG_AVAILABLE => "error",
            event_type::WARNING_LOG_AVAILABLE => "warning",
            _ => "exception",
        };
        let group = match ctx.get_prop(fl_ctx_key::EVENT_ORIGIN) {
            Some(Value::Str(origin)) if !origin.is_empty() => origin,
            _ => GENERAL_GROUP.to_owned(),
        };
        let message = match ctx.get_prop(fl_ctx_key::EVENT_DATA) {
            Some(Value::Str(message)) => message,
            other => {
                return Err(format!(
                    "wrong event data type for event {event}: expect a message but got {}",
                    other.as_ref().map_or("nothing", Value::kind)
                ))
            }
        };
        let run_info = self.run_info().map_err(|e| e.to_string())?;
        let report = ReportError {
            group,
            key: key.to_owned(),
            message,
        };
        run_info.send(report).await.map_err(|e| {
            log::warn!("{} error not recorded: {e}", self.prefix);
            e.to_string()
        })
    }
}

impl Component for InfoCollector {
    fn as_event_handler(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn EventHandler>> {
        Some(self)
    }
}

impl EventHandler for InfoCollector {
    fn name(&self) -> &str {
        "InfoCollector"
    }

    fn handle_event<'a>(
        &'a self,
        event: &'a str,
        ctx: &'a mut FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            match event {
                event_type::CRITICAL_LOG_AVAILABLE
                | event_type::ERROR_LOG_AVAILABLE
                | event_type::WARNING_LOG_AVAILABLE
                | event_type::EXCEPTION_LOG_AVAILABLE => self.record_log_event(event, ctx).await,
                _ => Ok(()),
            }
        })
    }
}

/// Adds `info` to the stats of `group` during `info_collector.get_stats` (keys already there are
/// overwritten, others kept: NVFlare's `GroupInfoCollector.add_info`). Returns `false`, changing
/// nothing, when `ctx` is not a stats collection.
///
/// # Example
/// ```
/// use fedrun_core::{FlContext, Map, Value};
/// use fedrun_engine::add_stats;
///
/// let mut ctx = FlContext::new();
/// assert!(!add_stats(&mut ctx, "g", Map::new()));
/// ctx.put("info_collector.stats_collector", Value::map(), true, false);
/// let mut info = Map::new();
/// info.insert("a", 1);
/// assert!(add_stats(&mut ctx, "g", info));
/// ```
pub fn add_stats(ctx: &mut FlContext, group: &str, info: Map) -> bool {
    update_stats(ctx, group, info, false)
}

/// Sets the stats of `group` to `info` during `info_collector.get_stats` (NVFlare's
/// `GroupInfoCollector.set_info`). Returns `false`, changing nothing, when `ctx` is not a stats
/// collection.
pub fn set_stats(ctx: &mut FlContext, group: &str, info: Map) -> bool {
    update_stats(ctx, group, info, true)
}

fn update_stats(ctx: &mut FlContext, group: &str, info: Map, replace: bool) -> bool {
    let Some(Value::Map(mut stats)) = ctx.get_prop(ic::CTX_KEY_STATS_COLLECTOR) else {
        return false;
    };
    match stats.get_mut(group) {
        Some(Value::Map(existing)) if !replace => {
            for (k, v) in info.into_pairs() {
                existing.insert(k, v);
            }
        }
        _ => {
            stats.insert(group, Value::Map(info));
        }
    }
    ctx.put(ic::CTX_KEY_STATS_COLLECTOR, Value::Map(stats), true, false);
    true
}
