//! NVFlare's `ClientFedEventRunner` widget: fed events between this site and the server job.
//!
//! A *fed event* is an event fired with scope `federation` (`__event_scope__`) and a Shareable as
//! its data (`__event_data__`); [`EngineHandle::fire_fed_event`](crate::EngineHandle::fire_fed_event)
//! fires one. This widget, one of the engine's event handlers, sends every outgoing fed event to
//! the server job as a fire-and-forget aux message on topic `fed.event`, after stamping the
//! headers NVFlare's runner stamps (`_event_type`, `_origin` = this site, `_timestamp`,
//! `_event_id` = a fresh uuid4 hex). Events whose `_direction` header is not `out` (the default)
//! are incoming ones and are not sent again. Before `_start_run` (or `_system_bootstrap`) the
//! widget is not ready and skips sending with a warning, as NVFlare does.
//!
//! On `_start_run` it registers the aux handler for `fed.event`. An incoming fed event is checked
//! (sender identity in its peer props → else `MISSING_PEER_CONTEXT`; `_timestamp` present,
//! `_event_id` absent or a non-empty string, `_event_type` a non-empty string → else
//! `BAD_REQUEST_DATA`), dropped as a duplicate when its sender already sent that event id (the
//! last [`MAX_EVENT_ID_CACHE_SIZE`] ids per sender are kept), marked `_direction = in`, queued,
//! and answered `OK` at once. A poster task fires the queued events one by one, in arrival order,
//! on a new context with the event data, scope `federation` and the sender's peer context.
//!
//! Differences from NVFlare, on purpose: the queue is bounded ([`FED_EVENT_QUEUE`]); an event
//! that finds it full, or arrives after `_end_run`, is dropped with a warning and answered
//! `SERVICE_UNAVAILABLE` instead of growing memory without limit. On `_end_run` the poster fires
//! what is queued and ends (NVFlare waits a further grace period); an aborted run ends it at once.
//! The `_check_end_run_readiness` vote is not implemented (the runner does not run that check).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use actix::{Addr, WeakAddr};
use fedrun_cell::AbortSignal;
use fedrun_core::constants::{
    event_scope, event_type, fed_event_header as feh, fl_ctx_key, reserved_topic,
};
use fedrun_core::{AppReturnCode, FlContext, PeerContext, Shareable, Value};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use crate::aux::{
    aux_handler, AuxRequest, AuxRunner, FireAndForgetAuxRequest, RegisterAuxMessageHandler,
};
use crate::component::{Component, EventHandler};
use crate::registry::{ComponentRegistry, FireEvent};
use crate::run_info::{GetAbortSignal, NewContext, RunInfo};

/// How many received fed events may wait for the poster.
pub const FED_EVENT_QUEUE: usize = 1024;

/// How many event ids are remembered per sender to drop duplicates (NVFlare's bound).
pub const MAX_EVENT_ID_CACHE_SIZE: usize = 10_000;

/// The fed-event runner widget (see the module doc). Registered by the engine builder under
/// `fed_event_runner`.
pub struct FedEventRunner {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FedEventRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FedEventRunner")
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

struct Shared {
    prefix: String,
    aux: WeakAddr<AuxRunner>,
    registry: WeakAddr<ComponentRegistry>,
    run_info: WeakAddr<RunInfo>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// `_start_run` (or `_system_bootstrap`) was seen: outgoing events are sent.
    ready: bool,
    /// The `fed.event` aux handler is registered.
    registered: bool,
    /// The poster's queue; `None` before the start and after `_end_run`.
    queue: Option<mpsc::Sender<Incoming>>,
    /// Event ids received, per sender.
    seen: HashMap<String, SeenIds>,
}

#[derive(Default)]
struct SeenIds {
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl SeenIds {
    fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if self.ids.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
        }
        while self.order.len() > MAX_EVENT_ID_CACHE_SIZE {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
    }
}

/// A received fed event waiting to be fired.
struct Incoming {
    event_type: String,
    data: Shareable,
    peer: Option<PeerContext>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn reply(rc: AppReturnCode) -> Shareable {
    Shareable::make_reply(rc, None)
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl FedEventRunner {
    /// The widget of `site`'s engine for `job_id`.
    pub fn new(
        site: &str,
        job_id: &str,
        aux: &Addr<AuxRunner>,
        registry: &Addr<ComponentRegistry>,
        run_info: &Addr<RunInfo>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                prefix: format!("[job={job_id} site={site}] FedEventRunner"),
                aux: aux.downgrade(),
                registry: registry.downgrade(),
                run_info: run_info.downgrade(),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Is the runner ready to send fed events (`_start_run` seen)?
    pub fn is_ready(&self) -> bool {
        self.shared.state().ready
    }

    /// `_start_run` / `_system_bootstrap`: register the aux handler, start the poster.
    async fn start(&self) -> Result<(), String> {
        let shared = &self.shared;
        if shared.state().registered {
            shared.state().ready = true;
            return Ok(());
        }
        let (aux, run_info) = match (shared.aux.upgrade(), shared.run_info.upgrade()) {
            (Some(aux), Some(run_info)) => (aux, run_info),
            _ => return Err("the engine is stopping".to_owned()),
        };
        let abort = run_info
            .send(GetAbortSignal)
            .await
            .map_err(|e| format!("no abort signal: {e}"))?;
        let (tx, rx) = mpsc::channel(FED_EVENT_QUEUE);
        let receiver = Arc::clone(shared);
        let handler = aux_handler(move |req: AuxRequest| {
            let shared = Arc::clone(&receiver);
            async move { Ok(receive(&shared, req)) }
        });
        let registered = aux
            .send(RegisterAuxMessageHandler::new(
                reserved_topic::FED_EVENT,
                handler,
            ))
            .await
            .map_err(|e| e.to_string())?;
        registered.map_err(|e| e.to_string())?;
        {
            let mut state = shared.state();
            state.registered = true;
            state.ready = true;
            state.queue = Some(tx);
        }
        actix::spawn(post(
            shared.prefix.clone(),
            shared.registry.clone(),
            shared.run_info.clone(),
            rx,
            abort,
        ));
        log::debug!("{} ready: receiving fed events", shared.prefix);
        Ok(())
    }

    /// An outgoing fed event: stamp it and send it to the server job.
    async fn send_out(&self, event: &str, ctx: &FlContext) -> Result<(), String> {
        let scope = match ctx.get_prop(fl_ctx_key::EVENT_SCOPE) {
            Some(Value::Str(s)) => s,
            _ => event_scope::LOCAL.to_owned(),
        };
        if scope != event_scope::FEDERATION {
            return Ok(());
        }
        let mut data = match ctx.get_prop(fl_ctx_key::EVENT_DATA) {
            Some(Value::Shareable(data)) => *data,
            other => {
                return Err(format!(
                    "bad fed event: expect data to be Shareable but got {}",
                    other.as_ref().map_or("nothing", Value::kind)
                ))
            }
        };
        let outgoing = match data.header_or_none(feh::DIRECTION) {
            None | Some(Value::Nil) => true,
            Some(v) => v.as_str() == Some("out"),
        };
        if !outgoing {
            return Ok(());
        }
        data.set_header(feh::EVENT_TYPE, event);
        data.set_header(feh::ORIGIN, ctx.identity_name());
        data.set_header(feh::TIMESTAMP, now_secs());
        data.set_header(feh::EVENT_ID, uuid::Uuid::new_v4().simple().to_string());
        let prefix = &self.shared.prefix;
        if !self.is_ready() {
            log::warn!("{prefix} Engine in not ready, skip the fed event firing ({event})");
            return Ok(());
        }
        let Some(aux) = self.shared.aux.upgrade() else {
            log::warn!("{prefix} fed event {event} dropped: the engine is stopping");
            return Ok(());
        };
        let mut msg = FireAndForgetAuxRequest::new(reserved_topic::FED_EVENT, data);
        msg.ctx = Some(ctx.clone());
        match aux.send(msg).await {
            Ok(Ok(())) => {
                log::debug!("{prefix} fed event {event} sent to the server");
                Ok(())
            }
            Ok(Err(e)) => Err(format!("fed event {event} not sent: {e}")),
            Err(e) => Err(format!("fed event {event} not sent: {e}")),
        }
    }
}

/// The `fed.event` aux handler: check, de-duplicate, queue, answer at once.
fn receive(shared: &Shared, req: AuxRequest) -> Shareable {
    let prefix = &shared.prefix;
    let topic = req.topic.as_str();
    let mut data = req.request;
    let sender = data
        .peer_prop(fl_ctx_key::IDENTITY_NAME)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let Some(sender) = sender else {
        log::error!(
            "{prefix} fed event dropped (topic {topic}): missing identity name of the data sender"
        );
        return reply(AppReturnCode::MissingPeerContext);
    };
    let present = |key| !matches!(data.header_or_none(key), None | Some(Value::Nil));
    if !present(feh::TIMESTAMP) {
        log::error!("{prefix} fed event from {sender} dropped (topic {topic}): missing timestamp");
        return reply(AppReturnCode::BadRequestData);
    }
    let event_id = match data.header_or_none(feh::EVENT_ID) {
        None | Some(Value::Nil) => None,
        Some(Value::Str(id)) if !id.is_empty() => Some(id.clone()),
        Some(other) => {
            log::error!(
                "{prefix} fed event from {sender} dropped (topic {topic}): invalid event ID {other:?}"
            );
            return reply(AppReturnCode::BadRequestData);
        }
    };
    let event_type = match data.header_or_none(feh::EVENT_TYPE).and_then(Value::as_str) {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => {
            log::error!(
                "{prefix} fed event from {sender} dropped (topic {topic}): missing event_type"
            );
            return reply(AppReturnCode::BadRequestData);
        }
    };
    let mut state = shared.state();
    if let Some(id) = &event_id {
        if state.seen.get(&sender).is_some_and(|s| s.contains(id)) {
            log::debug!("{prefix} duplicate fed event {event_type} ({id}) from {sender} ignored");
            return reply(AppReturnCode::Ok);
        }
    }
    data.set_header(feh::DIRECTION, "in");
    let peer = req.ctx.peer_context().cloned();
    let incoming = Incoming {
        event_type: event_type.clone(),
        data,
        peer,
    };
    let queued = match &state.queue {
        Some(queue) => queue.try_send(incoming).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "the queue is full",
            mpsc::error::TrySendError::Closed(_) => "the poster has ended",
        }),
        None => Err("the run has ended"),
    };
    if let Err(why) = queued {
        log::warn!("{prefix} fed event {event_type} from {sender} dropped (topic {topic}): {why}");
        return reply(AppReturnCode::ServiceUnavailable);
    }
    if let Some(id) = &event_id {
        state.seen.entry(sender).or_default().insert(id);
    }
    reply(AppReturnCode::Ok)
}

/// Fires the received fed events, one at a time, until the queue closes or the run aborts.
async fn post(
    prefix: String,
    registry: WeakAddr<ComponentRegistry>,
    run_info: WeakAddr<RunInfo>,
    mut rx: mpsc::Receiver<Incoming>,
    abort: AbortSignal,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = abort.triggered() => {
                log::debug!("{prefix} run aborted: {} fed event(s) not fired", rx.len());
                break;
            }
            next = rx.recv() => next,
        };
        let Some(incoming) = next else {
            break;
        };
        let Incoming {
            event_type,
            data,
            peer,
        } = incoming;
        let (Some(registry), Some(run_info)) = (registry.upgrade(), run_info.upgrade()) else {
            log::warn!("{prefix} fed event {event_type} not fired: the engine is stopping");
            break;
        };
        let Ok(mut ctx) = run_info.send(NewContext).await else {
            log::warn!("{prefix} fed event {event_type} not fired: the engine is stopping");
            break;
        };
        ctx.put(fl_ctx_key::EVENT_DATA, data, true, false);
        ctx.put(
            fl_ctx_key::EVENT_SCOPE,
            event_scope::FEDERATION,
            true,
            false,
        );
        if let Some(peer) = peer {
            ctx.set_peer_context(peer);
        }
        let fired = FireEvent {
            event_type: event_type.clone(),
            ctx,
        };
        match registry.send(fired).await {
            Ok(Ok(_)) => log::debug!("{prefix} fired received fed event {event_type}"),
            Ok(Err(e)) => log::warn!("{prefix} received fed event {event_type} not fired: {e}"),
            Err(e) => {
                log::warn!("{prefix} received fed event {event_type} not fired: {e}");
                break;
            }
        }
    }
    log::debug!("{prefix} fed event poster ended");
}

impl Component for FedEventRunner {
    fn as_event_handler(self: Arc<Self>) -> Option<Arc<dyn EventHandler>> {
        Some(self)
    }
}

impl EventHandler for FedEventRunner {
    fn name(&self) -> &str {
        "ClientFedEventRunner"
    }

    fn handle_event<'a>(
        &'a self,
        event: &'a str,
        ctx: &'a mut FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            match event {
                event_type::START_RUN | event_type::SYSTEM_BOOTSTRAP => self.start().await,
                event_type::END_RUN => {
                    // Closing the queue lets the poster fire what is queued, then end.
                    self.shared.state().queue = None;
                    Ok(())
                }
                _ => self.send_out(event, ctx).await,
            }
        })
    }
}
