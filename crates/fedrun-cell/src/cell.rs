//! The cell: one CellNet endpoint (one FQCN) as an actix actor.
//!
//! A [`Cell`] owns what NVFlare's `CoreCell` owns for one endpoint: the request handlers
//! registered per `(channel, topic)`, and the table of requests waiting for their reply. It sends
//! through a [`Transport`] and receives [`Deliver`] messages from it. Users talk to it through a
//! [`CellHandle`] (typed async methods) or directly through its [`Addr`] with the message
//! structs below.
//!
//! Guarantees:
//! - a request always yields a reply [`CellMessage`]; transport failures, timeouts and aborts
//!   are *replies* whose `cn__return_code` says what happened (never a Rust error);
//! - the actor is never blocked by a wait or by a request handler: waits run as detached
//!   futures, handlers as futures spawned in the actor's context;
//! - a panicking handler becomes a `process_exception` reply and the cell keeps serving;
//! - a received message marked with [`header::DOWNLOAD_REFS`] is resolved by the cell's
//!   [`PayloadResolver`] before its handler or its waiter sees it; if it cannot be (no
//!   resolver, or the download failed) a reply becomes an error reply and a request is answered
//!   with an error, never passed on half-decoded.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::{
    Actor, ActorContext, ActorFutureExt, Addr, AsyncContext, Context, Handler, Message, Recipient,
    ResponseFuture,
};
use fedrun_core::{CellReturnCode, Value};
use futures::future::{BoxFuture, FutureExt};
use tokio::sync::oneshot;

use crate::abort::AbortSignal;
use crate::error::{CellError, HandlerError};
use crate::fqcn::Fqcn;
use crate::message::{header, CellMessage, MsgType};
#[cfg(doc)]
use crate::network::Network;
use crate::network::{Deliver, Transport};
use crate::permit::InboundPermit;
use crate::resolve::{PayloadResolver, ResolveError};

/// Capacity of a cell's mailbox. actix parks a sender once the mailbox holds this many
/// messages, but the parking is per sender handle: every clone of an address starts unblocked
/// and may always queue one more, and `do_send` ignores the capacity, so it is no bound on a
/// cell's inbound work. A network transport bounds
/// that with the [`InboundPermit`] of each delivery.
pub const MAILBOX_CAPACITY: usize = 1024;

/// The wildcard channel or topic of a handler registration.
pub const WILDCARD: &str = "*";

/// What a request handler returns: `Ok(Some(reply))` to answer, `Ok(None)` to send no reply
/// (the requester then times out), `Err(e)` to answer with the code mapped from `e`.
pub type HandlerResult = Result<Option<CellMessage>, HandlerError>;

/// A request handler written as a function returning a future.
pub type HandlerFn = Arc<dyn Fn(CellMessage) -> BoxFuture<'static, HandlerResult> + Send + Sync>;

/// The message an actor receives when it is registered as a request handler.
///
/// The payload is the request, with all its headers (`cn__origin`, `cn__channel`, ...).
#[derive(Debug, Message)]
#[rtype(result = "Result<Option<CellMessage>, HandlerError>")]
pub struct IncomingRequest(pub CellMessage);

/// A request handler: a function (see [`request_handler`]) or an actor.
///
/// # Example
///
/// ```
/// use fedrun_cell::{request_handler, CellMessage, RequestHandler};
///
/// let echo: RequestHandler = request_handler(|req: CellMessage| async move {
///     Ok(Some(CellMessage::new(req.payload)))
/// });
/// # let _ = echo;
/// ```
#[derive(Clone)]
pub enum RequestHandler {
    /// A function returning a future.
    Fn(HandlerFn),
    /// An actor handling [`IncomingRequest`]. If its mailbox is closed the request is answered
    /// with `process_exception`. (A panic inside that actor is the actor's own business: it
    /// cannot be caught here.)
    Actor(Recipient<IncomingRequest>),
}

impl std::fmt::Debug for RequestHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestHandler::Fn(_) => f.write_str("RequestHandler::Fn"),
            RequestHandler::Actor(_) => f.write_str("RequestHandler::Actor"),
        }
    }
}

impl From<Recipient<IncomingRequest>> for RequestHandler {
    fn from(r: Recipient<IncomingRequest>) -> Self {
        RequestHandler::Actor(r)
    }
}

impl From<HandlerFn> for RequestHandler {
    fn from(f: HandlerFn) -> Self {
        RequestHandler::Fn(f)
    }
}

/// Wraps an async closure as a [`RequestHandler`].
pub fn request_handler<F, Fut>(f: F) -> RequestHandler
where
    F: Fn(CellMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    RequestHandler::Fn(Arc::new(move |msg| f(msg).boxed()))
}

/// Registers (or replaces) the handler of requests on `(channel, topic)`.
///
/// Either may be [`WILDCARD`]. Lookup order for an incoming request: `(channel, topic)`, then
/// `(channel, "*")`, then `("*", "*")`. Registering an existing key replaces the handler (as
/// NVFlare does) and logs it at info level.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), CellError>")]
pub struct RegisterRequestHandler {
    /// The channel.
    pub channel: String,
    /// The topic.
    pub topic: String,
    /// The handler.
    pub handler: RequestHandler,
}

/// Sends a request and waits for its reply; the result is always a reply message.
///
/// Headers set on the request: `msg_type=req`, a fresh uuid4 `req_id`,
/// `reply_expected=true`, `origin`/`from` = this cell, `destination`/`to` = `target`, `channel`,
/// `topic`, `route=[[self, now]]`, `send_time`, `secure`, `optional`, `payload_encoding` (and
/// `payload_len` when known without encoding). Any other header the caller put on `message`
/// (application headers, `cn__msg_root_id`, ...) is kept.
///
/// Failures are replies synthesised locally, with no `cn__origin`, whose `cn__return_code` is:
/// `invalid_target` / `target_unreachable` when the transport cannot deliver, `timeout` when no
/// reply came within `timeout` or when `abort` is triggered (before sending: nothing is sent),
/// `comm_error` when the cell stops while waiting. `cn__error` describes the failure.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use fedrun_cell::{CellMessage, Fqcn, SendRequest};
///
/// let req = SendRequest::new("aux_communication", "__sync_runner__", Fqcn::SERVER,
///                            CellMessage::empty(), Duration::from_secs(5))
///     .with_optional(true);
/// assert!(req.optional && !req.secure && req.abort.is_none());
/// ```
#[derive(Debug, Message)]
#[rtype(result = "CellMessage")]
pub struct SendRequest {
    /// The channel.
    pub channel: String,
    /// The topic.
    pub topic: String,
    /// The destination cell.
    pub target: Fqcn,
    /// The request (payload and extra headers).
    pub message: CellMessage,
    /// How long to wait for the reply, sending included.
    pub timeout: Duration,
    /// Failures about this request are logged at debug level only.
    pub optional: bool,
    /// End-to-end encryption requested (recorded in the header; in-process there is none).
    pub secure: bool,
    /// Ends the wait early with a `timeout` reply when triggered.
    pub abort: Option<AbortSignal>,
}

impl SendRequest {
    /// A request with `optional = false`, `secure = false` and no abort signal.
    pub fn new(
        channel: impl Into<String>,
        topic: impl Into<String>,
        target: Fqcn,
        message: CellMessage,
        timeout: Duration,
    ) -> Self {
        SendRequest {
            channel: channel.into(),
            topic: topic.into(),
            target,
            message,
            timeout,
            optional: false,
            secure: false,
            abort: None,
        }
    }

    /// Sets `optional`.
    pub fn with_optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Sets `secure`.
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// Sets the abort signal.
    pub fn with_abort(mut self, abort: AbortSignal) -> Self {
        self.abort = Some(abort);
        self
    }
}

/// Sends one request per `(target, message)` concurrently and waits for all the replies.
///
/// Each request behaves exactly like a [`SendRequest`] with the shared channel, topic, timeout,
/// flags and abort signal; the result has one reply per target. **Duplicate targets**: every
/// request is sent (each with its own `req_id`), and the map keeps the reply of the *last*
/// occurrence in `requests`, like NVFlare's reply conversion where later targets overwrite
/// earlier ones.
#[derive(Debug, Message)]
#[rtype(result = "HashMap<Fqcn, CellMessage>")]
pub struct SendMultiRequest {
    /// The requests, one per target.
    pub requests: Vec<(Fqcn, CellMessage)>,
    /// The channel.
    pub channel: String,
    /// The topic.
    pub topic: String,
    /// How long to wait for each reply, sending included.
    pub timeout: Duration,
    /// Failures are logged at debug level only.
    pub optional: bool,
    /// End-to-end encryption requested.
    pub secure: bool,
    /// Ends every wait early with `timeout` replies when triggered.
    pub abort: Option<AbortSignal>,
}

impl SendMultiRequest {
    /// A multi-request with `optional = false`, `secure = false` and no abort signal.
    pub fn new(
        channel: impl Into<String>,
        topic: impl Into<String>,
        requests: Vec<(Fqcn, CellMessage)>,
        timeout: Duration,
    ) -> Self {
        SendMultiRequest {
            requests,
            channel: channel.into(),
            topic: topic.into(),
            timeout,
            optional: false,
            secure: false,
            abort: None,
        }
    }

    /// Sets `optional`.
    pub fn with_optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Sets `secure`.
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }

    /// Sets the abort signal.
    pub fn with_abort(mut self, abort: AbortSignal) -> Self {
        self.abort = Some(abort);
        self
    }
}

/// Sends `message` to every target without expecting replies.
///
/// Headers as for a request, except `reply_expected=false` and **no `req_id`**. The
/// result has one entry per target: `ok` once the target cell accepted the message, or the
/// transport's code (`target_unreachable`, `invalid_target`). Duplicate targets receive the
/// message once per occurrence and share one entry. The payload is shared, not copied, between
/// targets.
#[derive(Debug, Message)]
#[rtype(result = "HashMap<Fqcn, CellReturnCode>")]
pub struct FireAndForget {
    /// The channel.
    pub channel: String,
    /// The topic.
    pub topic: String,
    /// The destination cells.
    pub targets: Vec<Fqcn>,
    /// The message (payload and extra headers).
    pub message: CellMessage,
    /// Failures are logged at debug level only.
    pub optional: bool,
    /// End-to-end encryption requested.
    pub secure: bool,
}

impl FireAndForget {
    /// A fire-and-forget send with `optional = false` and `secure = false`.
    pub fn new(
        channel: impl Into<String>,
        topic: impl Into<String>,
        targets: Vec<Fqcn>,
        message: CellMessage,
    ) -> Self {
        FireAndForget {
            channel: channel.into(),
            topic: topic.into(),
            targets,
            message,
            optional: false,
            secure: false,
        }
    }

    /// Sets `optional`.
    pub fn with_optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// Sets `secure`.
    pub fn with_secure(mut self, secure: bool) -> Self {
        self.secure = secure;
        self
    }
}

/// Stops the cell: it leaves the transport (becomes unreachable at once), every request still
/// waiting for a reply gets a `comm_error` reply immediately (the failure is the link going
/// away, not the peer being slow), running handlers are dropped, and the actor stops. The
/// answer comes once the actor has stopped; messages still queued in its mailbox are dropped
/// (their senders see a closed mailbox).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Stop;

/// Sets (or, with `None`, removes) the cell's [`PayloadResolver`]. Set it right after start,
/// before the cell registers handlers or sends requests: a message carrying download
/// references that arrives while no resolver is set is refused.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPayloadResolver(pub Option<Arc<dyn PayloadResolver>>);

/// Requests waiting for their reply: `req_id` → the waiter's channel.
///
/// Shared (`Arc<Mutex<..>>`) rather than plain actor state, on purpose: the waiting future is
/// detached from the actor (an actix `ResponseFuture`), so on timeout or abort it removes its own
/// entry directly instead of sending a clean-up message through the mailbox (which may be full,
/// making the clean-up late, or closed). The lock is never held across an await.
type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<CellMessage>>>>;

/// One CellNet endpoint. Start it with [`Cell::start`]; use it through the returned
/// [`CellHandle`].
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use fedrun_cell::{request_handler, Cell, CellMessage, Fqcn, Network, SendRequest};
/// use fedrun_core::{CellReturnCode, Shareable};
///
/// actix::System::new().block_on(async {
///     let net = Network::new();
///     let server = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
///     let job = Cell::start(Fqcn::job_cell("site-1", "job1").unwrap(), net).unwrap();
///     server
///         .register_request_handler("test", "echo", request_handler(|req: CellMessage| async move {
///             Ok(Some(CellMessage::new(req.payload)))
///         }))
///         .await
///         .unwrap();
///     let reply = job
///         .send_request(SendRequest::new("test", "echo", Fqcn::SERVER,
///                                        CellMessage::new(Shareable::new()),
///                                        Duration::from_secs(5)))
///         .await
///         .unwrap();
///     assert_eq!(reply.return_code(), CellReturnCode::Ok);
///     assert!(reply.payload.as_shareable().is_some());
/// });
/// ```
pub struct Cell {
    fqcn: Fqcn,
    transport: Arc<dyn Transport>,
    handlers: HashMap<(String, String), RequestHandler>,
    waiters: Waiters,
    shut_down: bool,
    /// Callers of [`Stop`] waiting for the actor to be fully stopped.
    stop_waiters: Vec<oneshot::Sender<()>>,
    /// Completes payloads that carry download references (see [`PayloadResolver`]).
    resolver: Option<Arc<dyn PayloadResolver>>,
}

impl Cell {
    /// Starts a cell named `fqcn` on `transport` (usually a [`Network`]) and registers it there.
    ///
    /// Returns a `Result`, unlike `Actor::start`, because registration can fail: two live cells
    /// cannot share one name.
    ///
    /// # Errors
    ///
    /// [`CellError::DuplicateFqcn`] when a live cell already uses `fqcn` on that transport.
    ///
    /// # Panics
    ///
    /// Like any actix actor start, when called outside a running actix `System`.
    pub fn start<T: Transport>(fqcn: Fqcn, transport: T) -> Result<CellHandle, CellError> {
        Self::start_shared(fqcn, Arc::new(transport))
    }

    /// [`Cell::start`] with a transport that is already shared.
    ///
    /// # Errors
    ///
    /// [`CellError::DuplicateFqcn`] when a live cell already uses `fqcn` on that transport.
    ///
    /// # Panics
    ///
    /// Like any actix actor start, when called outside a running actix `System`.
    pub fn start_shared(
        fqcn: Fqcn,
        transport: Arc<dyn Transport>,
    ) -> Result<CellHandle, CellError> {
        // Create the context first so that the mailbox exists, and register it before the actor
        // runs: a failed registration then simply drops the never-started actor.
        let ctx: Context<Cell> = Context::new();
        let addr = ctx.address();
        transport.register(fqcn.clone(), addr.clone().recipient())?;
        let cell = Cell {
            fqcn: fqcn.clone(),
            transport,
            handlers: HashMap::new(),
            waiters: Arc::new(Mutex::new(HashMap::new())),
            shut_down: false,
            stop_waiters: Vec::new(),
            resolver: None,
        };
        ctx.run(cell);
        Ok(CellHandle { fqcn, addr })
    }

    /// This cell's name.
    pub fn fqcn(&self) -> &Fqcn {
        &self.fqcn
    }

    /// Leaves the transport and answers every pending request with `comm_error`. Idempotent.
    fn shut_down(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        self.transport.unregister(&self.fqcn);
        // the resolver usually holds this cell's handle: drop it so nothing keeps the cell alive
        self.resolver = None;
        let pending: Vec<(String, oneshot::Sender<CellMessage>)> = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        log::info!(
            "cell {}: stopped, {} pending request(s) answered with comm_error",
            self.fqcn,
            pending.len()
        );
        for (req_id, tx) in pending {
            let mut reply = CellMessage::empty();
            reply.headers.set_msg_type(MsgType::Reply);
            reply.headers.set_req_id(req_id);
            reply.headers.set_destination(self.fqcn.as_str());
            reply.headers.set_return_code(CellReturnCode::CommError);
            reply
                .headers
                .set_error(format!("cell {} stopped while waiting", self.fqcn));
            // The waiter may have given up at the same moment: nothing to do then.
            let _ = tx.send(reply);
        }
    }

    /// Sets the headers every outgoing request / fire-and-forget message carries.
    fn stamp_outgoing(&self, msg: &mut CellMessage, out: &Outgoing<'_>, req_id: Option<&str>) {
        let now = epoch_secs();
        let h = &mut msg.headers;
        h.set_msg_type(MsgType::Req);
        h.set_channel(out.channel);
        h.set_topic(out.topic);
        h.set_origin(self.fqcn.as_str());
        h.set_from(self.fqcn.as_str());
        h.set_destination(out.target.as_str());
        h.set_to(out.target.as_str());
        match req_id {
            Some(id) => {
                h.set_req_id(id);
                h.set_reply_expected(true);
            }
            None => {
                h.remove(header::REQ_ID);
                h.set_reply_expected(false);
            }
        }
        h.set_route([(self.fqcn.as_str(), now)]);
        h.set_send_time(now);
        h.set_secure(out.secure);
        h.set_optional(out.optional);
        stamp_payload(msg);
    }

    /// Prepares one request (headers, waiter) synchronously and returns the future that sends
    /// it and waits for the reply. The future is independent of the actor.
    fn request_future(
        &self,
        out: Outgoing<'_>,
        mut message: CellMessage,
        timeout: Duration,
        abort: Option<AbortSignal>,
    ) -> impl Future<Output = CellMessage> + 'static {
        let req_id = uuid::Uuid::new_v4().to_string();
        let failure = LocalFailure {
            me: self.fqcn.clone(),
            target: out.target.clone(),
            channel: out.channel.to_owned(),
            topic: out.topic.to_owned(),
            req_id: req_id.clone(),
            optional: out.optional,
        };
        log::debug!(
            "cell {}: request {req_id} to {} on {}/{}",
            self.fqcn,
            out.target,
            out.channel,
            out.topic
        );
        let already_aborted = abort.as_ref().is_some_and(AbortSignal::is_triggered);
        let mut rx = None;
        if !already_aborted {
            self.stamp_outgoing(&mut message, &out, Some(&req_id));
            let (tx, wait) = oneshot::channel();
            // Insert before anything is sent, so that even an immediate reply finds its waiter.
            self.waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(req_id.clone(), tx);
            rx = Some(wait);
        }
        let transport = Arc::clone(&self.transport);
        let waiters = Arc::clone(&self.waiters);
        async move {
            let Some(rx) = rx else {
                return failure.reply(CellReturnCode::Timeout, "aborted before sending");
            };
            let exchange = async {
                transport.route(message).await.map_err(|code| {
                    (
                        code,
                        format!("cannot deliver to {}: {code}", failure.target),
                    )
                })?;
                rx.await
                    .map_err(|_| (CellReturnCode::CommError, "reply channel closed".to_owned()))
            };
            let timed = async {
                match tokio::time::timeout(timeout, exchange).await {
                    Ok(result) => result,
                    Err(_) => Err((
                        CellReturnCode::Timeout,
                        format!("no reply within {timeout:?}"),
                    )),
                }
            };
            let outcome = match abort {
                Some(abort) => {
                    tokio::select! {
                        biased;
                        () = abort.triggered() => {
                            Err((CellReturnCode::Timeout, "aborted while waiting".to_owned()))
                        }
                        r = timed => r,
                    }
                }
                None => timed.await,
            };
            match outcome {
                Ok(reply) => reply,
                Err((code, text)) => {
                    waiters
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&failure.req_id);
                    failure.reply(code, &text)
                }
            }
        }
    }

    /// Hands a received message to its waiter (reply, return) or its handler (request).
    /// `permit` is held until the message is done with (see [`InboundPermit`]).
    fn dispatch(&mut self, msg: CellMessage, permit: InboundPermit, ctx: &mut Context<Self>) {
        match msg.headers.msg_type() {
            Some(MsgType::Reply | MsgType::Return) => self.complete_waiters(msg),
            Some(MsgType::Req) => self.serve_request(msg, permit, ctx),
            None => self.log_drop(&msg, "message without a valid cn__msg_type, dropped"),
        }
    }

    /// A message whose payload carries download references: run the resolver on a future
    /// spawned in the actor's context, then dispatch the completed message, or its failure.
    fn resolve_then_dispatch(
        &mut self,
        msg: CellMessage,
        permit: InboundPermit,
        ctx: &mut Context<Self>,
    ) {
        let Some(resolver) = self.resolver.clone() else {
            let error = ResolveError::new(
                CellReturnCode::ProcessException,
                "payload carries download references but this cell has no payload resolver",
            );
            let headers = msg.headers;
            self.resolve_failed(headers, &error, permit, ctx);
            return;
        };
        let headers = msg.headers.clone();
        let resolving = resolver.resolve(msg);
        let task = actix::fut::wrap_future::<_, Self>(resolving).map(
            move |result, cell: &mut Cell, ctx: &mut Context<Cell>| match result {
                Ok(mut resolved) => {
                    resolved.headers.remove(header::DOWNLOAD_REFS);
                    cell.dispatch(resolved, permit, ctx);
                }
                Err(e) => cell.resolve_failed(headers, &e, permit, ctx),
            },
        );
        ctx.spawn(task);
    }

    /// A message that could not be resolved: a reply or return reaches its waiter as an error
    /// reply; a request is answered with the error (when it expects an answer). Logged either
    /// way.
    fn resolve_failed(
        &mut self,
        mut headers: crate::message::Headers,
        error: &ResolveError,
        permit: InboundPermit,
        ctx: &mut Context<Self>,
    ) {
        headers.remove(header::DOWNLOAD_REFS);
        let msg = CellMessage {
            headers,
            payload: crate::message::Payload::None,
        };
        log::warn!(
            "cell {}: payload of a {} on {}/{} from {:?} not resolved: {error}",
            self.fqcn,
            msg.headers.msg_type().map_or("message", |t| t.as_str()),
            msg.headers.channel().unwrap_or(""),
            msg.headers.topic().unwrap_or(""),
            msg.headers.origin().unwrap_or("")
        );
        match msg.headers.msg_type() {
            Some(MsgType::Reply | MsgType::Return) => {
                let mut reply = msg;
                reply.headers.set_return_code(error.code);
                reply.headers.set_error(error.text.as_str());
                self.complete_waiters(reply);
            }
            Some(MsgType::Req) => {
                let failure = HandlerFailure(error.clone());
                self.serve_request_with(msg, Some(failure), permit, ctx);
            }
            None => self.log_drop(&msg, "message without a valid cn__msg_type, dropped"),
        }
    }

    /// A reply or a return: hand it to the waiter(s) of its request id(s).
    fn complete_waiters(&self, msg: CellMessage) {
        let ids: Vec<String> = msg
            .headers
            .req_ids()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut found = Vec::with_capacity(ids.len());
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(PoisonError::into_inner);
            for id in &ids {
                if let Some(tx) = waiters.remove(id) {
                    found.push((id.clone(), tx));
                }
            }
        }
        if found.is_empty() {
            self.log_drop(
                &msg,
                &format!("late or unknown reply (req_id {ids:?}), dropped"),
            );
            return;
        }
        let last = found.len() - 1;
        let mut msg = Some(msg);
        for (i, (id, tx)) in found.into_iter().enumerate() {
            let reply = if i == last { msg.take() } else { msg.clone() };
            let Some(reply) = reply else { break };
            if let Err(reply) = tx.send(reply) {
                self.log_drop(
                    &reply,
                    &format!("reply for {id} arrived as its waiter gave up, dropped"),
                );
            }
        }
    }

    /// Logs a dropped message: warning, or debug when the message is optional.
    fn log_drop(&self, msg: &CellMessage, why: &str) {
        let h = &msg.headers;
        let level = if h.optional() == Some(true) {
            log::Level::Debug
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "cell {}: {why} (channel {:?}, topic {:?}, origin {:?})",
            self.fqcn,
            h.channel().unwrap_or(""),
            h.topic().unwrap_or(""),
            h.origin().unwrap_or("")
        );
    }

    fn find_handler(&self, channel: &str, topic: &str) -> Option<RequestHandler> {
        let key = |c: &str, t: &str| (c.to_owned(), t.to_owned());
        self.handlers
            .get(&key(channel, topic))
            .or_else(|| self.handlers.get(&key(channel, WILDCARD)))
            .or_else(|| self.handlers.get(&key(WILDCARD, WILDCARD)))
            .cloned()
    }

    /// A request addressed to this cell: run its handler on a future spawned in the actor's
    /// context (so that it is dropped if the cell stops) and route the reply.
    fn serve_request(
        &mut self,
        request: CellMessage,
        permit: InboundPermit,
        ctx: &mut Context<Self>,
    ) {
        self.serve_request_with(request, None, permit, ctx);
    }

    /// [`Cell::serve_request`]; with `failure`, the handler is not run and the request is
    /// answered with that failure. `permit` is held until the handler has finished and its
    /// reply was routed (or the future is dropped because the cell stops).
    fn serve_request_with(
        &mut self,
        request: CellMessage,
        failure: Option<HandlerFailure>,
        permit: InboundPermit,
        ctx: &mut Context<Self>,
    ) {
        let info = RequestInfo::of(&request);
        if info.destination.as_deref() != Some(self.fqcn.as_str()) {
            // A leaf cell does not forward.
            self.log_drop(
                &request,
                &format!(
                    "request for another destination {:?}, dropped (no forwarding)",
                    info.destination
                ),
            );
            return;
        }
        let handler = self.find_handler(&info.channel, &info.topic);
        let me = self.fqcn.clone();
        let transport = Arc::clone(&self.transport);
        let task = async move {
            // released when this future completes or is dropped
            let _permit = permit;
            let result = match (failure, handler) {
                (Some(HandlerFailure(e)), _) => {
                    let mut reply = CellMessage::empty();
                    reply.headers.set_return_code(e.code);
                    reply.headers.set_error(e.text);
                    Ok(Some(reply))
                }
                (None, Some(handler)) => run_handler(handler, request).await,
                (None, None) => Err(HandlerError::Other("no callback".to_owned())),
            };
            if let Err(e) = &result {
                let level = if info.optional {
                    log::Level::Debug
                } else {
                    log::Level::Warn
                };
                log::log!(
                    level,
                    "cell {me}: request on {}/{} from {:?} failed: {e}",
                    info.channel,
                    info.topic,
                    info.origin
                );
            }
            let reply = match result {
                Ok(Some(reply)) => reply,
                Ok(None) => return,
                Err(e) => {
                    let mut reply = CellMessage::empty();
                    reply.headers.set_return_code(e.return_code());
                    reply.headers.set_error(e.to_string());
                    reply
                }
            };
            if !info.reply_expected {
                log::debug!(
                    "cell {me}: reply to {}/{} discarded (no reply expected)",
                    info.channel,
                    info.topic
                );
                return;
            }
            let Some(reply) = info.make_reply(&me, reply) else {
                log::warn!(
                    "cell {me}: cannot reply on {}/{}: request has no valid origin",
                    info.channel,
                    info.topic
                );
                return;
            };
            if let Err(code) = transport.route(reply).await {
                let level = if info.optional {
                    log::Level::Debug
                } else {
                    log::Level::Warn
                };
                log::log!(
                    level,
                    "cell {me}: reply on {}/{} to {:?} not delivered: {code}",
                    info.channel,
                    info.topic,
                    info.origin
                );
            }
        };
        ctx.spawn(actix::fut::wrap_future::<_, Self>(task));
    }
}

/// Runs a handler, turning a panic (while building or polling its future) into an error.
async fn run_handler(handler: RequestHandler, request: CellMessage) -> HandlerResult {
    match handler {
        RequestHandler::Fn(f) => {
            let fut = match std::panic::catch_unwind(AssertUnwindSafe(|| f(request))) {
                Ok(fut) => fut,
                Err(panic) => return Err(panic_error(panic.as_ref())),
            };
            AssertUnwindSafe(fut)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| Err(panic_error(panic.as_ref())))
        }
        RequestHandler::Actor(recipient) => recipient
            .send(IncomingRequest(request))
            .await
            .unwrap_or_else(|e| {
                Err(HandlerError::Other(format!(
                    "handler actor unavailable: {e}"
                )))
            }),
    }
}

fn panic_error(panic: &(dyn Any + Send)) -> HandlerError {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_owned());
    HandlerError::Other(format!("handler panicked: {text}"))
}

/// A request that is answered with an error instead of being handed to its handler.
struct HandlerFailure(ResolveError);

/// Where an outgoing message goes.
struct Outgoing<'a> {
    channel: &'a str,
    topic: &'a str,
    target: &'a Fqcn,
    optional: bool,
    secure: bool,
}

/// What a locally synthesised failure reply needs.
struct LocalFailure {
    me: Fqcn,
    target: Fqcn,
    channel: String,
    topic: String,
    req_id: String,
    optional: bool,
}

impl LocalFailure {
    fn reply(&self, code: CellReturnCode, error: &str) -> CellMessage {
        let level = if self.optional {
            log::Level::Debug
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "cell {}: request {} to {} on {}/{}: {code} ({error})",
            self.me,
            self.req_id,
            self.target,
            self.channel,
            self.topic
        );
        let mut reply = CellMessage::empty();
        let h = &mut reply.headers;
        h.set_msg_type(MsgType::Reply);
        h.set_channel(self.channel.as_str());
        h.set_topic(self.topic.as_str());
        h.set_destination(self.me.as_str());
        h.set_to(self.me.as_str());
        h.set_req_id(self.req_id.as_str());
        h.set_optional(self.optional);
        h.set_return_code(code);
        h.set_error(error);
        reply
    }
}

/// The request headers a reply is built from.
struct RequestInfo {
    channel: String,
    topic: String,
    origin: Option<String>,
    from: Option<String>,
    destination: Option<String>,
    req_id: Option<Value>,
    reply_expected: bool,
    optional: bool,
    secure: bool,
}

impl RequestInfo {
    fn of(msg: &CellMessage) -> Self {
        let h = &msg.headers;
        RequestInfo {
            channel: h.channel().unwrap_or("").to_owned(),
            topic: h.topic().unwrap_or("").to_owned(),
            origin: h.origin().map(str::to_owned),
            from: h.from().map(str::to_owned),
            destination: h.destination().map(str::to_owned),
            req_id: h.get(header::REQ_ID).cloned(),
            reply_expected: h.reply_expected().unwrap_or(false),
            optional: h.optional().unwrap_or(false),
            secure: h.secure().unwrap_or(false),
        }
    }

    /// NVFlare's reply headers on top of what the handler set; `None` without a valid origin.
    fn make_reply(&self, me: &Fqcn, mut reply: CellMessage) -> Option<CellMessage> {
        let origin = Fqcn::new(self.origin.as_deref()?).ok()?;
        let to = self
            .from
            .as_deref()
            .and_then(|f| Fqcn::new(f).ok())
            .unwrap_or_else(|| origin.clone());
        let now = epoch_secs();
        let h = &mut reply.headers;
        if h.return_code().is_none() {
            h.set_return_code(CellReturnCode::Ok);
        }
        h.set_channel(self.channel.as_str());
        h.set_topic(self.topic.as_str());
        h.set_from(me.as_str());
        h.set_to(to.as_str());
        h.set_origin(me.as_str());
        h.set_destination(origin.as_str());
        match &self.req_id {
            Some(id) => {
                h.insert(header::REQ_ID, id.clone());
            }
            None => {
                h.remove(header::REQ_ID);
            }
        }
        h.set_msg_type(MsgType::Reply);
        h.set_route([(me.as_str(), now)]);
        h.set_send_time(now);
        h.set_optional(self.optional);
        h.set_secure(self.secure);
        stamp_payload(&mut reply);
        Some(reply)
    }
}

/// Sets `cn__payload_encoding`, and `cn__payload_len` when the size is known unencoded.
fn stamp_payload(msg: &mut CellMessage) {
    let encoding = msg.payload.encoding();
    msg.headers.set_payload_encoding(encoding);
    match msg.payload.known_len() {
        Some(len) => msg.headers.set_payload_len(len),
        None => {
            msg.headers.remove(header::PAYLOAD_LEN);
        }
    }
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Actor for Cell {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        log::debug!("cell {}: started", self.fqcn);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Also covers stops that did not come through `Stop` (e.g. the System shutting down).
        self.shut_down();
        for tx in self.stop_waiters.drain(..) {
            let _ = tx.send(());
        }
    }
}

impl Handler<RegisterRequestHandler> for Cell {
    type Result = Result<(), CellError>;

    fn handle(&mut self, msg: RegisterRequestHandler, _ctx: &mut Self::Context) -> Self::Result {
        if msg.channel.is_empty() || msg.topic.is_empty() {
            return Err(CellError::InvalidHandlerKey {
                channel: msg.channel,
                topic: msg.topic,
            });
        }
        log::debug!(
            "cell {}: register handler on {}/{}",
            self.fqcn,
            msg.channel,
            msg.topic
        );
        let key = (msg.channel, msg.topic);
        if self.handlers.insert(key.clone(), msg.handler).is_some() {
            log::info!(
                "cell {}: handler on {}/{} replaced",
                self.fqcn,
                key.0,
                key.1
            );
        }
        Ok(())
    }
}

impl Handler<SendRequest> for Cell {
    type Result = ResponseFuture<CellMessage>;

    fn handle(&mut self, msg: SendRequest, _ctx: &mut Self::Context) -> Self::Result {
        let out = Outgoing {
            channel: &msg.channel,
            topic: &msg.topic,
            target: &msg.target,
            optional: msg.optional,
            secure: msg.secure,
        };
        Box::pin(self.request_future(out, msg.message, msg.timeout, msg.abort))
    }
}

impl Handler<SendMultiRequest> for Cell {
    type Result = ResponseFuture<HashMap<Fqcn, CellMessage>>;

    fn handle(&mut self, msg: SendMultiRequest, _ctx: &mut Self::Context) -> Self::Result {
        log::debug!(
            "cell {}: multi-request to {} target(s) on {}/{}",
            self.fqcn,
            msg.requests.len(),
            msg.channel,
            msg.topic
        );
        let waits: Vec<_> = msg
            .requests
            .into_iter()
            .map(|(target, message)| {
                let out = Outgoing {
                    channel: &msg.channel,
                    topic: &msg.topic,
                    target: &target,
                    optional: msg.optional,
                    secure: msg.secure,
                };
                let wait = self.request_future(out, message, msg.timeout, msg.abort.clone());
                async move { (target, wait.await) }
            })
            .collect();
        Box::pin(async move {
            // Collecting in request order makes the last duplicate target win.
            futures::future::join_all(waits).await.into_iter().collect()
        })
    }
}

impl Handler<FireAndForget> for Cell {
    type Result = ResponseFuture<HashMap<Fqcn, CellReturnCode>>;

    fn handle(&mut self, msg: FireAndForget, _ctx: &mut Self::Context) -> Self::Result {
        log::debug!(
            "cell {}: fire-and-forget to {} target(s) on {}/{}",
            self.fqcn,
            msg.targets.len(),
            msg.channel,
            msg.topic
        );
        let sends: Vec<_> = msg
            .targets
            .into_iter()
            .map(|target| {
                let out = Outgoing {
                    channel: &msg.channel,
                    topic: &msg.topic,
                    target: &target,
                    optional: msg.optional,
                    secure: msg.secure,
                };
                // Headers are per target; the payload is an Arc / Bytes clone, not a copy.
                let mut message = msg.message.clone();
                self.stamp_outgoing(&mut message, &out, None);
                let transport = Arc::clone(&self.transport);
                let me = self.fqcn.clone();
                let (channel, topic, optional) = (msg.channel.clone(), msg.topic.clone(), msg.optional);
                async move {
                    let code = match transport.route(message).await {
                        Ok(()) => CellReturnCode::Ok,
                        Err(code) => {
                            let level = if optional {
                                log::Level::Debug
                            } else {
                                log::Level::Warn
                            };
                            log::log!(
                                level,
                                "cell {me}: fire-and-forget to {target} on {channel}/{topic}: {code}"
                            );
                            code
                        }
                    };
                    (target, code)
                }
            })
            .collect();
        Box::pin(async move { futures::future::join_all(sends).await.into_iter().collect() })
    }
}

impl Handler<Deliver> for Cell {
    type Result = ();

    fn handle(&mut self, Deliver(msg, permit): Deliver, ctx: &mut Self::Context) {
        let h = &msg.headers;
        log::debug!(
            "cell {}: {} on {}/{} from {}",
            self.fqcn,
            h.msg_type().map_or("message without type", |t| t.as_str()),
            h.channel().unwrap_or(""),
            h.topic().unwrap_or(""),
            h.origin().unwrap_or("")
        );
        if self.shut_down {
            self.log_drop(&msg, "cell is stopping, message dropped");
            return;
        }
        if msg.headers.contains_key(header::DOWNLOAD_REFS) {
            self.resolve_then_dispatch(msg, permit, ctx);
            return;
        }
        self.dispatch(msg, permit, ctx);
    }
}

impl Handler<SetPayloadResolver> for Cell {
    type Result = ();

    fn handle(&mut self, msg: SetPayloadResolver, _ctx: &mut Self::Context) {
        log::debug!(
            "cell {}: payload resolver {}",
            self.fqcn,
            if msg.0.is_some() { "set" } else { "removed" }
        );
        if !self.shut_down {
            self.resolver = msg.0;
        }
    }
}

impl Handler<Stop> for Cell {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _msg: Stop, ctx: &mut Self::Context) -> Self::Result {
        // Unregister and release the waiters at once; then answer only when `stopped()` has run,
        // so that once the caller sees the answer the actor is gone (its mailbox closes as the
        // actor's task ends, before this detached future runs again).
        self.shut_down();
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        ctx.stop();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// A typed, cloneable handle to a running [`Cell`].
///
/// Every method sends one message to the actor; when the actor has stopped the method returns
/// [`CellError::Stopped`] (with the unsent message handed back when the cell was already known
/// to be stopped).
#[derive(Clone, Debug)]
pub struct CellHandle {
    fqcn: Fqcn,
    addr: Addr<Cell>,
}

impl CellHandle {
    /// The cell's name.
    pub fn fqcn(&self) -> &Fqcn {
        &self.fqcn
    }

    /// The raw actor address, for code that prefers sending the message structs itself.
    pub fn addr(&self) -> &Addr<Cell> {
        &self.addr
    }

    /// Whether the actor is still running.
    pub fn is_running(&self) -> bool {
        self.addr.connected()
    }

    fn stopped(&self, unsent: Option<CellMessage>) -> CellError {
        CellError::Stopped {
            fqcn: self.fqcn.clone(),
            unsent: unsent.map(Box::new),
        }
    }

    /// Registers (or replaces) the handler of `(channel, topic)`; see [`RegisterRequestHandler`].
    ///
    /// # Errors
    ///
    /// [`CellError::InvalidHandlerKey`] for an empty channel or topic; [`CellError::Stopped`].
    pub async fn register_request_handler(
        &self,
        channel: impl Into<String>,
        topic: impl Into<String>,
        handler: impl Into<RequestHandler>,
    ) -> Result<(), CellError> {
        let msg = RegisterRequestHandler {
            channel: channel.into(),
            topic: topic.into(),
            handler: handler.into(),
        };
        self.addr.send(msg).await.map_err(|_| self.stopped(None))?
    }

    /// Sends a request and returns its reply (possibly a synthesised failure reply); see
    /// [`SendRequest`].
    ///
    /// # Errors
    ///
    /// Only [`CellError::Stopped`].
    pub async fn send_request(&self, request: SendRequest) -> Result<CellMessage, CellError> {
        if !self.addr.connected() {
            return Err(self.stopped(Some(request.message)));
        }
        self.addr
            .send(request)
            .await
            .map_err(|_| self.stopped(None))
    }

    /// Sends several requests concurrently; see [`SendMultiRequest`].
    ///
    /// # Errors
    ///
    /// Only [`CellError::Stopped`] (without the messages).
    pub async fn send_multi_request(
        &self,
        request: SendMultiRequest,
    ) -> Result<HashMap<Fqcn, CellMessage>, CellError> {
        self.addr
            .send(request)
            .await
            .map_err(|_| self.stopped(None))
    }

    /// Sends a message to several targets without waiting for replies; see [`FireAndForget`].
    ///
    /// # Errors
    ///
    /// Only [`CellError::Stopped`].
    pub async fn fire_and_forget(
        &self,
        request: FireAndForget,
    ) -> Result<HashMap<Fqcn, CellReturnCode>, CellError> {
        if !self.addr.connected() {
            return Err(self.stopped(Some(request.message)));
        }
        self.addr
            .send(request)
            .await
            .map_err(|_| self.stopped(None))
    }

    /// Sets (or removes) the cell's [`PayloadResolver`]; see [`SetPayloadResolver`].
    ///
    /// # Errors
    ///
    /// Only [`CellError::Stopped`].
    pub async fn set_payload_resolver(
        &self,
        resolver: Option<Arc<dyn PayloadResolver>>,
    ) -> Result<(), CellError> {
        self.addr
            .send(SetPayloadResolver(resolver))
            .await
            .map_err(|_| self.stopped(None))
    }

    /// Stops the cell (see [`Stop`]) and returns once the actor has stopped: from then on
    /// the cell is unreachable and this handle's methods return [`CellError::Stopped`] with
    /// the message handed back. Stopping a stopped cell does nothing.
    pub async fn stop(&self) {
        if self.addr.send(Stop).await.is_err() {
            log::debug!("cell {}: stop requested, already stopped", self.fqcn);
        }
    }
}
