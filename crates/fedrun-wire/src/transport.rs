//! The TCP transport: fedrun cells on NVFlare's wire.
//!
//! [`TcpTransport`] implements [`fedrun_cell::Transport`], so a [`fedrun_cell::Cell`] started on
//! it talks to NVFlare's Python cells (or to another fedrun process) without any change to the
//! cell. It owns the TCP side of an NVFlare endpoint:
//!
//! - **connections**: it listens (`tcp://host:port`, answering HELLO with READY) and/or connects
//!   (sending HELLO, waiting for READY, reconnecting forever with back-off 1, 2, 4, 8, 10, 10 …
//!   s). Peers are known by the endpoint name of their handshake (checked by NVFlare's rules,
//!   see [`crate::limits`]); one connection per name. A newcomer claiming the name of a live
//!   connection does not evict it: the live one is PINGed and evicted only if it does not
//!   answer within [`WireConfig::name_probe_timeout`] (a half-open connection of a peer that
//!   reconnects); otherwise the newcomer is closed. Accepted connections take a slot each
//!   ([`WireConfig::max_connections`]); silent ones are recycled first
//!   ([`WireConfig::max_silent_connections`]).
//! - **sending**: a cell message is encoded (FOBS for values, raw bytes, or nothing, by NVFlare's
//!   rule), stamped with this hop's `cn__from`/`cn__to`, and queued to the connection picked by
//!   NVFlare's leaf route rule (a peer named as the destination, else the longest prefix of the
//!   destination that is a peer, else `server`, else this endpoint's parent). Each connection
//!   has one writer task fed by a *bounded* queue: a slow peer slows its senders down instead of
//!   growing memory.
//! - **receiving**: one reader task per connection decodes frames, answers PING with PONG,
//!   answers `cellnet.channel`/`bye` with `ok`, and hands cell messages to the local cell named
//!   by `cn__destination`. A request takes a permit from its connection's budget
//!   ([`WireConfig::max_inflight_requests`], [`WireConfig::max_inflight_bytes`]) that the cell
//!   gives back when its handler has finished; without one the reader waits, so back-pressure
//!   reaches TCP. Big payloads are decoded on tokio's blocking pool. Streamed messages
//!   (`sm__STREAM`) are reassembled and acknowledged by the endpoint; the reply to a streamed
//!   request leaves as a stream on `return_only`, as the Python requester expects. A stream
//!   that receives nothing for [`WireConfig::stream_idle_timeout`] is dropped.
//! - **relaying** ([`WireConfig::forwarding`], on by default, as in NVFlare): a message for a cell
//!   that is not hosted here is passed on, undecoded, to the next hop of the route rule (a peer
//!   named as the destination, else its longest prefix that is a peer, else `server`, else this
//!   endpoint's parent), with `cn__from` = this endpoint, `cn__to` = the next hop and this
//!   endpoint appended to `cn__route`. This is NVFlare's server root relaying between a client
//!   job `site-1.J` and `site-2.J` (or the server job `server.J`). Stream chunks, ACKs and
//!   errors are ordinary cell messages addressed to the logical destination, so a relayed stream
//!   is windowed and acknowledged end to end; the relay does not reassemble it. A next hop that
//!   is already on the route (or is the peer the message came from) is refused as a loop,
//!   unless it is the destination itself. What cannot be relayed (no next hop, a loop, a
//!   closing connection) is logged; a request that expects a reply is answered with a `return`
//!   message (`comm_error`, "cannot forward", `cant_forward`), a stream chunk with an
//!   `sm__ERROR` so that its sender fails at once, anything else is dropped. With relaying off
//!   (a leaf), a message for a cell that is not here gets the same `return` or is dropped.
//! - **streaming out**: a request or fire-and-forget message above
//!   [`StreamSendConfig::threshold`] (or on a channel chosen in
//!   [`StreamSendConfig::channels`]) leaves as `sm__DATA` chunks with windowed ACKs, and its
//!   streamed reply is matched back to the waiting request by `sm__ri` (see `stream_tx`).
//!
//! Anything wrong that comes from the network (a bad frame, a header block that is not a map,
//! a payload that does not decode, a bad handshake) closes *that* connection, with a log line
//! naming the peer; the process and the other connections go on. Nothing read from a socket is
//! unwrapped.
//!
//! TLS and mTLS (NVFlare's `stcp://` and `secure_train`) wrap the same byte stream:
//! [`TcpTransport::add_tls_listener`] and [`TcpTransport::add_tls_connector`] run the TLS
//! handshake inside the handshake deadline, then HELLO/READY as above, and in mTLS bind the
//! registered name to the peer's certificate (see [`crate::tls`]).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use actix::Recipient;
use bytes::{Buf, Bytes};
use fedrun_cell::InboundPermit;
use fedrun_cell::{header, CellError, CellMessage, Deliver, Fqcn, Headers, MsgType, Transport};
use fedrun_core::{CellReturnCode, Map, Value};
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::body::Body;
use crate::codec::SfmCodec;
use crate::error::WireError;
use crate::frame::{
    epoch_secs, Frame, FrameType, HandshakeInfo, APP_ID_CELLNET, MAX_FRAME_SIZE, STREAM_ID_BASE,
};
use crate::inbound::{decode_frame, InFlight, SlotGuard, Slots};
use crate::limits::{check_endpoint_name, default_max_connections, Bounded};
use crate::message::{encode_payload_body_with, frame_from_message, take_ref_datums};
use crate::stream::{
    key as stream_key, DataType, StreamMessage, STREAM_CHANNEL, TOPIC_ACK, TOPIC_ERROR,
};
use crate::stream_rx::{
    error_pair, is_stream_reply_id, Limits, PendingReply, StreamAction, StreamReceiver,
};
use crate::stream_tx::{ChunkParams, MessageChunks, StreamSendConfig, StreamSender, Transmission};
use crate::tls::{TlsConnector, TlsListener};
use crate::tls_conn::{auth_failure, Conn, ConnRead, ConnWrite, TlsSide};

// secure messages (`cn__secure`): a child module, so that the hooks here stay one line each
#[path = "secure.rs"]
pub(crate) mod secure;

/// The channel of CellNet's own control messages.
pub const CELLNET_CHANNEL: &str = "cellnet.channel";
/// The topic a peer says goodbye on.
pub const BYE_TOPIC: &str = "bye";

/// How long [`TcpTransport::shutdown`] waits for its goodbyes to be answered (NVFlare's `bye`
/// request timeout).
const BYE_TIMEOUT: Duration = Duration::from_millis(500);
/// Answers (ACKs, stream errors, PONGs, returns, bye replies) that may wait for a connection's
/// writer. They have their own queue, written before data frames, so that a reader never waits
/// behind outgoing data (two endpoints streaming to each other would otherwise wait on each
/// other's readers) and ACKs are not delayed by a window of queued chunks.
const CONTROL_QUEUE_CAPACITY: usize = 256;
/// The largest frame a peer may send before the handshake is done: a HELLO or READY carries
/// an endpoint name and a time stamp (NVFlare's are about 150 bytes).
pub const HANDSHAKE_MAX_FRAME_SIZE: usize = 4 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Newcomers that may try in a row to take a name whose connection keeps changing under them.
const NAME_CLAIM_ATTEMPTS: usize = 3;
/// The shortest period of the check for idle streams.
const MIN_STREAM_EXPIRY_TICK: Duration = Duration::from_millis(10);

/// Settings of a [`TcpTransport`]. The defaults are NVFlare's.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use fedrun_wire::WireConfig;
///
/// let config = WireConfig {
///     reconnect_initial: Duration::from_millis(50),
///     ..WireConfig::default()
/// };
/// assert_eq!(config.heartbeat_interval, Duration::from_secs(60));
/// assert_eq!(config.reconnect_max, Duration::from_secs(10));
/// assert!(config.forwarding, "relays for cells it does not host, as NVFlare's cells do");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireConfig {
    /// How long the HELLO/READY exchange may take on a new connection (10 s).
    pub handshake_timeout: Duration,
    /// How long writing one frame may take before the connection is closed (30 s,
    /// `streaming_send_timeout`).
    pub send_timeout: Duration,
    /// A connection on which nothing arrived for this long gets a PING (60 s).
    pub heartbeat_interval: Duration,
    /// Frames that may wait for a connection's writer; senders beyond it wait (64).
    pub queue_capacity: usize,
    /// The largest frame accepted or sent ([`MAX_FRAME_SIZE`]).
    pub max_frame_size: usize,
    /// The largest streamed blob reassembled (4 GiB, NVFlare's `streaming_max_blob_size`).
    pub max_stream_blob: u64,
    /// The most bytes held by all streams being reassembled at once (4 GiB); a chunk beyond it
    /// ends its stream with an error.
    pub max_stream_buffer: u64,
    /// The most streams reassembled at once (256); a new stream beyond it is refused.
    pub max_open_streams: usize,
    /// First reconnection delay of a connector (1 s); it doubles after each failure.
    pub reconnect_initial: Duration,
    /// Longest reconnection delay (10 s).
    pub reconnect_max: Duration,
    /// How (and when) messages are sent as NVFlare streams.
    pub stream_send: StreamSendConfig,
    /// Whether this endpoint relays messages addressed to a cell it does not host (on
    /// by default, as every NVFlare cell does). A relayed message is passed on
    /// undecoded to the next hop of the route rule with this endpoint as `cn__from` and appended
    /// to `cn__route`; a next hop already on the route is refused as a loop. Off: such a
    /// message is answered with a `return` (`comm_error`, "cannot forward") if it is a request
    /// that expects a reply, and dropped otherwise, which is all a leaf needs.
    pub forwarding: bool,
    /// Cell headers put on every DATA frame this endpoint writes (requests, replies, stream
    /// chunks, ACKs, returns and goodbyes alike); empty by default. A client job in an NVFlare
    /// deployment sets its credentials here (`client_name`, `ssid`, `__token__`,
    /// `__token_signature__`): NVFlare's client job installs a filter that stamps them on every
    /// message it sends, and its server root checks them on everything it passes on
    /// (`secure_train`). A value already set on a frame is replaced.
    pub outgoing_headers: Vec<(String, String)>,
    /// The most connections accepted at once, from `accept` until they close, handshaking or
    /// not. Default: the soft `RLIMIT_NOFILE` less a reserve of a quarter of it (at least 32),
    /// so that `accept` never runs out of descriptors ([`default_max_connections`]). When all
    /// are taken, the connection silent the longest (no DATA frame yet) is closed to make room;
    /// if none is silent, the newcomer is closed. Connections this endpoint opens take none.
    pub max_connections: usize,
    /// The most accepted connections that have finished their handshake but sent no DATA frame
    /// yet (half of `max_connections` by default); beyond it the longest-silent one is closed.
    /// PINGs do not count as traffic: NVFlare peers PING every connection idle for 60 s.
    pub max_silent_connections: usize,
    /// When set, an accepted connection that sends no DATA frame this long after its handshake
    /// is closed. Off by default: a legitimate peer may stay quiet (an admin console waiting
    /// for its user), and the caps above already recycle silent connections under pressure.
    pub silent_timeout: Option<Duration>,
    /// How long the live connection of a name is given to answer a PING when a newcomer claims
    /// that name (3 s). Answered: the newcomer is refused; not answered: the old connection is
    /// taken for half-open and replaced.
    pub name_probe_timeout: Duration,
    /// The most requests read from one connection that may be in the hands of this endpoint's
    /// cells at once (64); the reader stops reading that connection until one is done.
    pub max_inflight_requests: usize,
    /// The most payload bytes of the requests of [`WireConfig::max_inflight_requests`] (256
    /// MiB, at most 4 GiB − 1); a bigger request waits until it can be served alone.
    pub max_inflight_bytes: u64,
    /// A stream being received that gets no chunk for this long is dropped (120 s, twice the
    /// sender's ACK timeout: its sender has given up by then).
    pub stream_idle_timeout: Duration,
    /// Payloads (and reassembled streams) of at least this many bytes are FOBS-decoded on
    /// tokio's blocking pool instead of an executor thread (1 MiB).
    pub blocking_decode_min: usize,
    /// Credentials for NVFlare's end-to-end secure messages (`cn__secure`): the cell's key,
    /// certificate and root CA, usually loaded from its startup kit
    /// ([`fedrun_secure::CellCredentials::from_startup_kit`]). With them, a message a local
    /// cell sends with `secure` is encrypted for its destination (after a certificate
    /// exchange) and encrypted messages for local cells are opened; without them (the
    /// default) a secure send fails with `authentication_error` and is never sent in clear,
    /// and a peer's key exchange is answered with `cert_error`.
    pub secure: Option<Arc<fedrun_secure::CellCredentials>>,
}

impl Default for WireConfig {
    fn default() -> Self {
        WireConfig {
            handshake_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(60),
            queue_capacity: 64,
            max_frame_size: MAX_FRAME_SIZE,
            max_stream_blob: 4 * 1024 * 1024 * 1024,
            max_stream_buffer: 4 * 1024 * 1024 * 1024,
            max_open_streams: 256,
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(10),
            stream_send: StreamSendConfig::default(),
            forwarding: true,
            outgoing_headers: Vec::new(),
            max_connections: default_max_connections(),
            max_silent_connections: (default_max_connections() / 2).max(1),
            silent_timeout: None,
            name_probe_timeout: Duration::from_secs(3),
            max_inflight_requests: 64,
            max_inflight_bytes: 256 * 1024 * 1024,
            stream_idle_timeout: Duration::from_secs(120),
            blocking_decode_min: 1024 * 1024,
            secure: None,
        }
    }
}

/// A `tcp://host:port` URL, as NVFlare writes them.
///
/// # Example
///
/// ```
/// use fedrun_wire::TcpUrl;
///
/// let url = TcpUrl::parse("tcp://localhost:8002").unwrap();
/// assert_eq!((url.host.as_str(), url.port), ("localhost", 8002));
/// // "0" means all interfaces
/// assert_eq!(TcpUrl::parse("tcp://0:8002").unwrap().host, "0.0.0.0");
/// assert!(TcpUrl::parse("stcp://server:8002").is_err());
/// assert!(TcpUrl::parse("tcp://server").is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpUrl {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl TcpUrl {
    /// Parses `tcp://host:port` (`host` may be `[ipv6]`; `0` means all interfaces).
    ///
    /// # Errors
    ///
    /// [`WireError::InvalidUrl`] for another scheme (`stcp` needs TLS credentials: see
    /// [`TcpTransport::add_tls_listener`]), a missing host or a port that is not a number.
    pub fn parse(url: &str) -> Result<TcpUrl, WireError> {
        let bad = |reason| WireError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let Some(rest) = url.strip_prefix("tcp://") else {
            return Err(if url.starts_with("stcp://") {
                bad("stcp (TLS) needs credentials: use add_tls_listener/add_tls_connector")
            } else {
                bad("the scheme must be tcp://")
            });
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let host = if host == "0" { "0.0.0.0" } else { host };
        Ok(TcpUrl {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for TcpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "tcp://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "tcp://{}:{}", self.host, self.port)
        }
    }
}

type Reader = FramedRead<ConnRead, SfmCodec>;
type Writer = FramedWrite<ConnWrite, SfmCodec>;

/// A frame for a connection's writer, and who wants to know it was written.
pub(crate) struct Outbound {
    pub(crate) frame: Frame,
    /// When set, the frame's payload, held as segments (the frame's own `payload` is empty).
    pub(crate) body: Option<Body>,
    pub(crate) done: Option<oneshot::Sender<Result<(), CellReturnCode>>>,
}

/// A live connection to a peer, as the senders see it.
#[derive(Clone)]
pub(crate) struct Link {
    conn_id: u64,
    pub(crate) tx: mpsc::Sender<Outbound>,
    /// The connection's answer queue (written before `tx`): relayed stream ACKs and errors go
    /// there, so that they do not wait behind a window of queued chunks.
    control: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
    /// Notified whenever a frame arrives on the connection (answers a liveness probe).
    heard: Arc<Notify>,
}

pub(crate) struct Inner {
    pub(crate) own: Fqcn,
    pub(crate) config: WireConfig,
    cells: RwLock<HashMap<Fqcn, Recipient<Deliver>>>,
    peers: RwLock<HashMap<Fqcn, Link>>,
    /// Bumped whenever the peer set changes.
    peers_changed: watch::Sender<u64>,
    shutdown: CancellationToken,
    next_conn_id: AtomicU64,
    streams: StreamReceiver,
    /// Goodbyes of [`TcpTransport::shutdown`] waiting for the peer's answer, by request id.
    bye_waiters: Mutex<HashMap<String, oneshot::Sender<()>>>,
    sender: StreamSender,
    /// The slots of accepted connections.
    slots: Arc<Slots>,
    pub(crate) secure: secure::SecureLink,
}

/// An NVFlare endpoint on TCP: the [`Transport`] of the cells of one fedrun process.
///
/// Cheap to clone (clones share everything). Background tasks (listeners, connectors,
/// connections) run on the tokio runtime of the caller (an actix `System` has one) until
/// [`TcpTransport::shutdown`].
///
/// # Example
///
/// A "server" listener and a job cell connecting to it, in one process:
///
/// ```
/// use std::time::Duration;
/// use fedrun_cell::{request_handler, Cell, CellMessage, Fqcn, SendRequest};
/// use fedrun_core::{CellReturnCode, Shareable};
/// use fedrun_wire::TcpTransport;
///
/// actix::System::new().block_on(async {
///     let (server_net, addr) = TcpTransport::listen(Fqcn::SERVER, "tcp://127.0.0.1:0").await.unwrap();
///     let server = Cell::start(Fqcn::SERVER, server_net.clone()).unwrap();
///     server
///         .register_request_handler("test", "echo", request_handler(|req: CellMessage| async move {
///             Ok(Some(CellMessage::new(req.payload)))
///         }))
///         .await
///         .unwrap();
///
///     let me = Fqcn::job_cell("site-1", "job-1").unwrap();
///     let job_net = TcpTransport::connect(me.clone(), &format!("tcp://{addr}")).unwrap();
///     assert!(job_net.wait_for_peer(&Fqcn::SERVER, Duration::from_secs(5)).await);
///     let job = Cell::start(me, job_net.clone()).unwrap();
///
///     let mut body = Shareable::new();
///     body.insert("round", 1);
///     let reply = job
///         .send_request(SendRequest::new("test", "echo", Fqcn::SERVER,
///                                        CellMessage::new(body.clone()), Duration::from_secs(5)))
///         .await
///         .unwrap();
///     assert_eq!(reply.return_code(), CellReturnCode::Ok);
///     assert_eq!(reply.payload.as_shareable(), Some(&body));
///
///     job_net.shutdown().await;
///     server_net.shutdown().await;
/// });
/// ```
#[derive(Clone)]
pub struct TcpTransport {
    inner: Arc<Inner>,
}

impl fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpTransport")
            .field("own", &self.inner.own)
            .field("peers", &self.peers())
            .finish()
    }
}

impl TcpTransport {
    /// An endpoint named `own` with no connection yet (add them with
    /// [`TcpTransport::add_listener`] and [`TcpTransport::add_connector`]).
    pub fn new(own: Fqcn, config: WireConfig) -> TcpTransport {
        let (peers_changed, _) = watch::channel(0);
        let streams = StreamReceiver::new(Limits {
            max_blob: config.max_stream_blob,
            max_buffered: config.max_stream_buffer,
            max_open: config.max_open_streams,
            idle_timeout: config.stream_idle_timeout,
            blocking_decode_min: config.blocking_decode_min,
        });
        let slots = Slots::new(
            own.clone(),
            config.max_connections,
            config.max_silent_connections,
        );
        let creds = config.secure.clone();
        TcpTransport {
            inner: Arc::new_cyclic(|me| Inner {
                own,
                config,
                cells: RwLock::new(HashMap::new()),
                peers: RwLock::new(HashMap::new()),
                peers_changed,
                shutdown: CancellationToken::new(),
                next_conn_id: AtomicU64::new(1),
                streams,
                bye_waiters: Mutex::new(HashMap::new()),
                sender: StreamSender::new(),
                slots,
                secure: secure::SecureLink::new(creds, me.clone()),
            }),
        }
    }

    /// An endpoint named `own` (default settings) that connects to `url` in the background
    /// and keeps reconnecting. Use [`TcpTransport::wait_for_peer`] to wait for the handshake.
    ///
    /// # Errors
    ///
    /// [`WireError::InvalidUrl`], or [`WireError::NoRuntime`] outside a tokio runtime.
    pub fn connect(own: Fqcn, url: &str) -> Result<TcpTransport, WireError> {
        let t = TcpTransport::new(own, WireConfig::default());
        t.add_connector(url)?;
        Ok(t)
    }

    /// An endpoint named `own` (default settings) listening on `url`; returns the bound address
    /// (useful with port 0).
    ///
    /// # Errors
    ///
    /// [`WireError::InvalidUrl`], [`WireError::Io`] when the address cannot be bound,
    /// [`WireError::NoRuntime`] outside a tokio runtime.
    pub async fn listen(own: Fqcn, url: &str) -> Result<(TcpTransport, SocketAddr), WireError> {
        let t = TcpTransport::new(own, WireConfig::default());
        let addr = t.add_listener(url).await?;
        Ok((t, addr))
    }

    /// Starts listening on `url` and returns the bound address. Each accepted connection must
    /// start with a HELLO, which is answered with READY.
    ///
    /// # Errors
    ///
    /// [`WireError::InvalidUrl`], [`WireError::Io`], [`WireError::NoRuntime`],
    /// [`WireError::ShutDown`].
    pub async fn add_listener(&self, url: &str) -> Result<SocketAddr, WireError> {
        let url = TcpUrl::parse(url)?;
        self.listen_on(url, None).await
    }

    /// Starts listening on `url` (`tcp://` or `stcp://`: TLS either way, as NVFlare's
    /// `secure_train` does) with `tls`, and returns the bound address. Each connection must
    /// complete the TLS handshake and then the HELLO/READY exchange within
    /// [`WireConfig::handshake_timeout`]; in mTLS a peer whose HELLO names an endpoint its
    /// certificate does not belong to is closed before READY, with a log line.
    ///
    /// # Errors
    ///
    /// As [`TcpTransport::add_listener`].
    pub async fn add_tls_listener(
        &self,
        url: &str,
        tls: TlsListener,
    ) -> Result<SocketAddr, WireError> {
        let url = crate::tls_conn::parse_any_url(url)?;
        self.listen_on(url, Some(TlsSide::Server(Arc::new(tls))))
            .await
    }

    async fn listen_on(&self, url: TcpUrl, tls: Option<TlsSide>) -> Result<SocketAddr, WireError> {
        self.check_running()?;
        let listener = TcpListener::bind((url.host.as_str(), url.port)).await?;
        let addr = listener.local_addr()?;
        let kind = if tls.is_some() { "TLS" } else { "TCP" };
        log::info!("endpoint {}: listening on {addr} ({kind})", self.inner.own);
        tokio::spawn(accept_loop(Arc::clone(&self.inner), listener, tls));
        Ok(addr)
    }

    /// Starts connecting to `url` in the background: HELLO, wait for READY, serve the
    /// connection; when it ends or fails, try again after 1, 2, 4, 8, 10, 10 … s (the delay
    /// starts over after a successful handshake), until [`TcpTransport::shutdown`].
    ///
    /// # Errors
    ///
    /// [`WireError::InvalidUrl`], [`WireError::NoRuntime`], [`WireError::ShutDown`].
    pub fn add_connector(&self, url: &str) -> Result<(), WireError> {
        let url = TcpUrl::parse(url)?;
        self.check_running()?;
        tokio::spawn(connect_loop(Arc::clone(&self.inner), url, None));
        Ok(())
    }

    /// As [`TcpTransport::add_connector`], over TLS with `tls` (`tcp://` or `stcp://`: TLS
    /// either way). In mTLS the server's certificate CN must be the connector's server
    /// identity. A refused certificate is logged as an authentication failure and retried
    /// at the longest back-off only.
    ///
    /// # Errors
    ///
    /// As [`TcpTransport::add_connector`], and [`WireError::IdentityMismatch`] when, in mTLS,
    /// this endpoint's name does not belong to the certificate it would present (the server
    /// would refuse it).
    pub fn add_tls_connector(&self, url: &str, tls: TlsConnector) -> Result<(), WireError> {
        let url = crate::tls_conn::parse_any_url(url)?;
        tls.check_own_name(&self.inner.own)?;
        self.check_running()?;
        let side = TlsSide::Client {
            connector: Arc::new(tls),
            host: url.host.clone(),
        };
        tokio::spawn(connect_loop(Arc::clone(&self.inner), url, Some(side)));
        Ok(())
    }

    fn check_running(&self) -> Result<(), WireError> {
        if self.inner.shutdown.is_cancelled() {
            return Err(WireError::ShutDown);
        }
        tokio::runtime::Handle::try_current().map_err(|_| WireError::NoRuntime)?;
        Ok(())
    }

    /// This endpoint's name (the `endpoint_name` of its handshakes).
    pub fn own_fqcn(&self) -> &Fqcn {
        &self.inner.own
    }

    /// The peers with a live connection, sorted.
    pub fn peers(&self) -> Vec<Fqcn> {
        let mut names: Vec<Fqcn> = self
            .inner
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// Whether a live connection to `peer` exists.
    pub fn is_connected(&self, peer: &Fqcn) -> bool {
        self.inner.is_connected(peer)
    }

    /// A receiver that is marked changed whenever a peer connects or its connection ends (the
    /// value is only a generation counter: read [`TcpTransport::peers`] or
    /// [`TcpTransport::is_connected`] after each change). Lets a server notice a client job
    /// whose connection closed, and whether it came back.
    pub fn peer_changes(&self) -> watch::Receiver<u64> {
        self.inner.peers_changed.subscribe()
    }

    /// Waits until `peer` is connected (handshake done), at most `timeout`; returns whether it
    /// is.
    pub async fn wait_for_peer(&self, peer: &Fqcn, timeout: Duration) -> bool {
        self.wait_for(timeout, |t| t.is_connected(peer)).await
    }

    /// Waits until `peer` is no longer connected, at most `timeout`; returns whether it is gone.
    pub async fn wait_for_peer_gone(&self, peer: &Fqcn, timeout: Duration) -> bool {
        self.wait_for(timeout, |t| !t.is_connected(peer)).await
    }

    async fn wait_for(&self, timeout: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let mut changes = self.inner.peers_changed.subscribe();
        let wait = async {
            loop {
                if done(self) {
                    return true;
                }
                if changes.changed().await.is_err() {
                    return done(self);
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Sends `msg` (addressed by a cell: `cn__origin`, `cn__destination`, channel, topic, and
    /// for a request `cn__req_id` with `cn__reply_expected`) to its remote destination as an
    /// NVFlare stream, whatever its size, and returns once the receiver has acknowledged every
    /// byte. A request's streamed reply is delivered to the local cell named by `cn__origin`
    /// (the cell's own request path does all this by itself when
    /// [`StreamSendConfig::wants_stream`] says so).
    ///
    /// # Errors
    ///
    /// [`WireError::InvalidDestination`], [`WireError::NoRoute`] (also for a destination on this
    /// endpoint), [`WireError::PayloadEncode`], [`WireError::StreamHeader`] (no channel, topic
    /// or origin), [`WireError::StreamRejected`] (the receiver sent `sm__ERROR`),
    /// [`WireError::StreamAckTimeout`], [`WireError::StreamInterrupted`].
    pub async fn send_streamed(&self, msg: CellMessage) -> Result<(), WireError> {
        self.inner.send_streamed(msg).await
    }

    /// Says goodbye to every peer (a `cellnet.channel`/`bye` request each; their answers are
    /// awaited, 0.5 s at most in all, as NVFlare's `Cell.stop` does, so that a peer handles the
    /// goodbye before it sees the connection close), then stops every connection, listener and
    /// connector (their sockets close in the background, see
    /// [`TcpTransport::wait_for_peer_gone`]). Idempotent. Cells on this transport stay up but
    /// can no longer reach anyone remote.
    pub async fn shutdown(&self) {
        if self.inner.shutdown.is_cancelled() {
            return;
        }
        let links: Vec<(Fqcn, Link)> = self
            .inner
            .peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut bye_ids = Vec::with_capacity(links.len());
        let byes = links.into_iter().filter_map(|(peer, link)| {
            let req_id = uuid::Uuid::new_v4().to_string();
            let frame = self.inner.bye_request(&peer, &req_id)?;
            let (answer_tx, answered) = oneshot::channel();
            self.inner
                .bye_waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(req_id.clone(), answer_tx);
            bye_ids.push(req_id);
            Some(async move {
                let (done, written) = oneshot::channel();
                let out = Outbound {
                    frame,
                    body: None,
                    done: Some(done),
                };
                if link.tx.send(out).await.is_ok() && matches!(written.await, Ok(Ok(()))) {
                    let _ = answered.await;
                }
            })
        });
        let byes: Vec<_> = byes.collect();
        let _ = tokio::time::timeout(BYE_TIMEOUT, futures::future::join_all(byes)).await;
        {
            let mut waiters = self
                .inner
                .bye_waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for id in &bye_ids {
                waiters.remove(id);
            }
        }
        log::info!("endpoint {}: shutting down", self.inner.own);
        self.inner.shutdown.cancel();
    }
}

impl Transport for TcpTransport {
    fn register(&self, fqcn: Fqcn, inbox: Recipient<Deliver>) -> Result<(), CellError> {
        let mut cells = self
            .inner
            .cells
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if cells.get(&fqcn).is_some_and(Recipient::connected) {
            return Err(CellError::DuplicateFqcn(fqcn));
        }
        log::debug!("endpoint {}: local cell {fqcn} registered", self.inner.own);
        cells.insert(fqcn, inbox);
        Ok(())
    }

    fn unregister(&self, fqcn: &Fqcn) {
        self.inner
            .cells
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(fqcn);
    }

    fn route(&self, msg: CellMessage) -> BoxFuture<'static, Result<(), CellReturnCode>> {
        let inner = Arc::clone(&self.inner);
        async move { inner.send_message(msg).await }.boxed()
    }
}

impl Inner {
    fn is_connected(&self, peer: &Fqcn) -> bool {
        self.peers
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(peer)
    }

    fn local_cell(&self, fqcn: &Fqcn) -> Option<Recipient<Deliver>> {
        self.cells
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(fqcn)
            .cloned()
    }

    /// The connection a message for `dest` leaves on (NVFlare's leaf route rule): a peer named
    /// `dest`, else the longest prefix of `dest` that is a peer, else `server`, else this
    /// endpoint's parent.
    pub(crate) fn pick_link(&self, dest: &Fqcn) -> Option<(Fqcn, Link)> {
        let peers = self.peers.read().unwrap_or_else(PoisonError::into_inner);
        let mut candidate = Some(dest.clone());
        while let Some(name) = candidate {
            if let Some(link) = peers.get(&name) {
                return Some((name, link.clone()));
            }
            candidate = name.parent();
        }
        let fallback = std::iter::once(Fqcn::SERVER).chain(self.own.parent());
        for name in fallback {
            if let Some(link) = peers.get(&name) {
                return Some((name, link.clone()));
            }
        }
        None
    }

    /// Sends a message from a local cell: deliver it locally, or encode it and queue it to the
    /// picked connection, then wait until it is written.
    pub(crate) async fn send_message(&self, mut msg: CellMessage) -> Result<(), CellReturnCode> {
        if let Some(id) = is_stream_reply_id(&msg) {
            return match self.streams.take_reply(id) {
                Some(pending) => self.send_stream_reply(&pending, &msg).await,
                None => {
                    log::warn!(
                        "endpoint {}: reply {id} answers no pending streamed request (expired?)",
                        self.own
                    );
                    Err(CellReturnCode::CommError)
                }
            };
        }
        let dest = match msg.headers.destination().map(Fqcn::new) {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                log::warn!("endpoint {}: invalid destination: {e}", self.own);
                return Err(CellReturnCode::InvalidTarget);
            }
            None => {
                log::warn!("endpoint {}: message without destination", self.own);
                return Err(CellReturnCode::InvalidTarget);
            }
        };
        if let Some(cell) = self.local_cell(&dest) {
            return cell.send(Deliver::new(msg)).await.map_err(|e| {
                log::debug!("endpoint {}: local cell {dest} gone ({e})", self.own);
                CellReturnCode::TargetUnreachable
            });
        }
        let route = if dest == self.own {
            // this endpoint's own name without a cell behind it: never sent away
            None
        } else {
            self.pick_link(&dest)
        };
        let Some((peer, link)) = route else {
            log::debug!(
                "endpoint {}: no connection leads to {dest} (peers: {:?})",
                self.own,
                self.peers
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .keys()
                    .collect::<Vec<_>>()
            );
            return Err(CellReturnCode::TargetUnreachable);
        };
        // the local download-refs header becomes datums of the payload, never a wire header
        let mut has_refs = false;
        let encoded = take_ref_datums(&mut msg.headers).and_then(|refs| {
            has_refs = !refs.is_empty();
            encode_payload_body_with(&msg.payload, &refs)
        });
        let (encoding, body) = encoded.map_err(|e| {
            log::warn!(
                "endpoint {}: message to {dest} on {}/{} not sent: {e}",
                self.own,
                msg.headers.channel().unwrap_or(""),
                msg.headers.topic().unwrap_or("")
            );
            CellReturnCode::CommError
        })?;
        if self.config.stream_send.wants_stream_with_refs(
            &msg.headers,
            body.len(),
            has_refs || secure::must_stream(&msg.headers, encoding),
        ) {
            return self
                .stream_out(&msg.headers, encoding, body, &dest, &peer, &link)
                .await
                .map_err(|e| send_error_code(&e));
        }
        if has_refs && msg.headers.msg_type() == Some(MsgType::Req) {
            // NVFlare resolves references only in streamed messages, and never streams this
            // channel: a fedrun receiver resolves them, an NVFlare one fails to decode
            log::warn!(
                "endpoint {}: request to {dest} on {}/{} carries download references on a \
                 channel NVFlare does not stream: an NVFlare receiver cannot resolve them",
                self.own,
                msg.headers.channel().unwrap_or(""),
                msg.headers.topic().unwrap_or("")
            );
        }
        let body = self
            .seal_body(&mut msg.headers, body, &dest)
            .await
            .map_err(|e| send_error_code(&e))?;
        self.stamp_hop(&mut msg.headers, &peer);
        msg.headers.set_payload_encoding(encoding);
        msg.headers.set_payload_len(body.len() as u64);
        let frame = Frame::data(msg.headers, Bytes::new());
        match frame.encoded_len().map(|head| head + body.len()) {
            Ok(len) if len > self.config.max_frame_size => {
                log::warn!(
                    "endpoint {}: message to {dest} is {len} bytes, above the frame limit {}",
                    self.own,
                    self.config.max_frame_size
                );
                return Err(CellReturnCode::MsgTooBig);
            }
            Ok(_) => {}
            Err(e) => {
                log::warn!("endpoint {}: message to {dest} not sent: {e}", self.own);
                return Err(CellReturnCode::CommError);
            }
        }
        self.queue_and_wait(&peer, &link, frame, Some(body)).await
    }

    /// [`TcpTransport::send_streamed`]: resolves the connection and streams `msg`.
    async fn send_streamed(&self, mut msg: CellMessage) -> Result<(), WireError> {
        let raw_dest = msg.headers.destination().unwrap_or("");
        let dest =
            Fqcn::new(raw_dest).map_err(|_| WireError::InvalidDestination(raw_dest.to_owned()))?;
        let route = if dest == self.own || self.local_cell(&dest).is_some() {
            None
        } else {
            self.pick_link(&dest)
        };
        let (peer, link) = route.ok_or_else(|| WireError::NoRoute(dest.to_string()))?;
        let refs = take_ref_datums(&mut msg.headers)?;
        let (encoding, body) = encode_payload_body_with(&msg.payload, &refs)?;
        self.stream_out(&msg.headers, encoding, body, &dest, &peer, &link)
            .await
    }

    /// Sends a cell's message (`logical`: its headers; `body`: its encoded payload) as an
    /// NVFlare stream over `link`. A request that expects a reply gets a
    /// fresh `sm__ri`, under which its streamed reply is expected.
    async fn stream_out(
        &self,
        logical: &Headers,
        encoding: fedrun_cell::PayloadEncoding,
        body: Body,
        dest: &Fqcn,
        peer: &Fqcn,
        link: &Link,
    ) -> Result<(), WireError> {
        let cfg = &self.config.stream_send;
        let params = ChunkParams {
            stream_id: self.sender.next_stream_id(),
            chunk_size: cfg.effective_chunk_size(),
            window_size: cfg.window_size,
        };
        let wants_reply = logical.msg_type() == Some(MsgType::Req)
            && logical.reply_expected() == Some(true)
            && logical.get(header::REQ_ID).is_some();
        let sealer = self
            .chunk_sealer(logical, logical.origin().unwrap_or(self.own.as_str()), dest)
            .await?;
        let request_id = wants_reply.then(|| uuid::Uuid::new_v4().to_string());
        let size = body.len() as u64;
        let chunks = MessageChunks::new(
            logical,
            encoding,
            body,
            request_id.clone(),
            params,
            cfg.ack_interval,
        )?;
        // forgets the reply bookkeeping unless the stream went through (also when this future
        // is dropped: the cell's request timed out mid-stream)
        let mut expected = request_id.map(|ri| {
            self.sender.expect_reply(&ri, logical);
            ExpectedReply {
                sender: &self.sender,
                request_id: ri,
                delivered: false,
            }
        });
        let t = Transmission {
            own: &self.own,
            peer,
            conn_id: link.conn_id,
            tx: &link.tx,
            target: dest,
            stream_id: params.stream_id,
            size,
            window: cfg.window_size,
            ack_timeout: cfg.ack_timeout,
            what: format!(
                "{}/{}",
                logical.channel().unwrap_or(""),
                logical.topic().unwrap_or("")
            ),
            seal: sealer.as_ref(),
        };
        let result = self
            .sender
            .transmit(&t, chunks, |h| self.stamp_hop(h, peer))
            .await;
        if let Some(e) = expected.as_mut() {
            e.delivered = result.is_ok();
        }
        result
    }

    /// Sets this hop's `cn__from`/`cn__to`; a message from a cell hosted behind this endpoint
    /// (not the endpoint's own cell) gets the endpoint appended to its route, as a forward.
    fn stamp_hop(&self, h: &mut Headers, peer: &Fqcn) {
        if h.from() != Some(self.own.as_str()) {
            h.push_route(self.own.as_str(), epoch_secs());
        }
        h.set_from(self.own.as_str());
        h.set_to(peer.as_str());
    }

    /// Sends a cell's reply to a streamed request as a stream on `return_only`.
    async fn send_stream_reply(
        &self,
        pending: &PendingReply,
        reply: &CellMessage,
    ) -> Result<(), CellReturnCode> {
        let cfg = &self.config.stream_send;
        let params = ChunkParams {
            stream_id: self.sender.next_stream_id(),
            chunk_size: cfg.effective_chunk_size(),
            window_size: cfg.window_size,
        };
        let (requester, chunks) = self
            .streams
            .reply_chunks(&self.own, pending, reply, &params)?;
        let Some((peer, link)) = self.pick_link(&requester) else {
            log::warn!(
                "endpoint {}: streamed reply to {} not sent: no connection",
                self.own,
                pending.describe()
            );
            return Err(CellReturnCode::TargetUnreachable);
        };
        log::debug!(
            "endpoint {}: streamed reply to {} in {} chunk(s)",
            self.own,
            pending.describe(),
            chunks.len()
        );
        let size = chunks
            .iter()
            .map(|c| c.payload.as_bytes().map_or(0, |b| b.len() as u64))
            .sum();
        // the reply to a secure request is sealed for the requester, chunk by chunk
        let sealer = self
            .chunk_sealer(
                &reply.headers,
                reply.headers.origin().unwrap_or(self.own.as_str()),
                &requester,
            )
            .await
            .map_err(|e| send_error_code(&e))?;
        let t = Transmission {
            own: &self.own,
            peer: &peer,
            conn_id: link.conn_id,
            tx: &link.tx,
            target: &requester,
            stream_id: params.stream_id,
            size,
            window: cfg.window_size,
            ack_timeout: cfg.ack_timeout,
            what: format!("reply to {}", pending.describe()),
            seal: sealer.as_ref(),
        };
        self.sender
            .transmit(&t, chunks.into_iter(), |h| self.stamp_hop(h, &peer))
            .await
            .map_err(|e| send_error_code(&e))
    }

    /// A streamed reply to a streamed request of a local cell: hands it to that cell.
    async fn deliver_stream_reply(&self, peer: &Fqcn, request_id: &str, reply: CellMessage) {
        let Some((requester, reply)) = self.sender.take_reply(&self.own, request_id, reply) else {
            return;
        };
        let Some(cell) = self.local_cell(&requester) else {
            log::warn!(
                "endpoint {}: streamed reply from {peer} for {requester} dropped: no such local \
                 cell",
                self.own
            );
            return;
        };
        if let Err(e) = cell.send(Deliver::new(reply)).await {
            log::warn!(
                "endpoint {}: streamed reply from {peer} for {requester} dropped: cell gone ({e})",
                self.own
            );
        }
    }

    /// Queues a frame (with its payload held as `body` when set) to a connection (waiting for
    /// queue space) and waits until it is written.
    pub(crate) async fn queue_and_wait(
        &self,
        peer: &Fqcn,
        link: &Link,
        frame: Frame,
        body: Option<Body>,
    ) -> Result<(), CellReturnCode> {
        let (done, written) = oneshot::channel();
        let out = Outbound {
            frame,
            body,
            done: Some(done),
        };
        if link.tx.send(out).await.is_err() {
            log::debug!("endpoint {}: connection to {peer} is closing", self.own);
            return Err(CellReturnCode::TargetUnreachable);
        }
        // A dropped `done` means the connection closed before the frame was written.
        written.await.unwrap_or(Err(CellReturnCode::CommError))
    }

    /// The `cellnet.channel`/`bye` request to `peer`.
    fn bye_request(&self, peer: &Fqcn, req_id: &str) -> Option<Frame> {
        let now = epoch_secs();
        let mut h = Headers::new();
        h.set_msg_type(MsgType::Req);
        h.set_channel(CELLNET_CHANNEL);
        h.set_topic(BYE_TOPIC);
        h.set_origin(self.own.as_str());
        h.set_destination(peer.as_str());
        h.set_from(self.own.as_str());
        h.set_to(peer.as_str());
        h.set_req_id(req_id);
        h.set_reply_expected(true);
        h.set_route([(self.own.as_str(), now)]);
        h.set_send_time(now);
        h.set_secure(false);
        h.set_optional(true);
        frame_from_message(CellMessage {
            headers: h,
            payload: fedrun_cell::Payload::None,
        })
        .ok()
    }

    /// Headers of a message this endpoint sends back to the sender of `request` over the
    /// connection from `peer` (a reply or a return).
    pub(crate) fn answer_headers(
        &self,
        request: &Headers,
        peer: &Fqcn,
        msg_type: MsgType,
    ) -> Option<Headers> {
        let origin = request.origin()?;
        let now = epoch_secs();
        let mut h = Headers::new();
        h.set_channel(request.channel().unwrap_or(""));
        h.set_topic(request.topic().unwrap_or(""));
        h.set_from(self.own.as_str());
        h.set_to(peer.as_str());
        h.set_origin(request.destination().unwrap_or(self.own.as_str()));
        h.set_destination(origin);
        h.set_msg_type(msg_type);
        h.set_route([(self.own.as_str(), now)]);
        h.set_send_time(now);
        h.set_optional(request.optional().unwrap_or(false));
        h.set_secure(false);
        Some(h)
    }

    /// Handles one decoded cell message that arrived from `peer` (`permit`: its share of the
    /// connection's in-flight budget, taken by the reader for a request). A reassembled
    /// streamed request takes its permit from `inflight` here, waiting for it unless the
    /// connection is cancelled.
    async fn handle_incoming(
        &self,
        peer: &Fqcn,
        msg: CellMessage,
        permit: InboundPermit,
        conn: &ConnBudget<'_>,
        tx: &mpsc::Sender<Outbound>,
    ) {
        let h = &msg.headers;
        if h.channel() == Some(CELLNET_CHANNEL) && h.topic() == Some(BYE_TOPIC) {
            self.answer_bye(peer, &msg, tx).await;
            return;
        }
        if h.channel() == Some(STREAM_CHANNEL) {
            if matches!(h.topic(), Some(TOPIC_ACK | TOPIC_ERROR)) {
                // about a stream this endpoint sends
                self.sender.on_control(&self.own, peer, &msg);
                return;
            }
            let mut actions: std::collections::VecDeque<StreamAction> =
                self.streams.on_message(&self.own, peer, msg).into();
            while let Some(action) = actions.pop_front() {
                match action {
                    StreamAction::Control(headers) => {
                        let copy = error_pair(&headers);
                        self.queue_answer(peer, headers, tx).await;
                        if let Some(copy) = copy {
                            self.queue_answer(peer, copy, tx).await;
                        }
                    }
                    StreamAction::Decode(done) => {
                        // decoded outside the receiver's lock (and off the executor when big)
                        if let Some(next) = self.streams.finish(&self.own, peer, done).await {
                            actions.push_front(next);
                        }
                    }
                    StreamAction::Deliver(msg) => {
                        let len = msg.headers.payload_len().unwrap_or(0);
                        let len = usize::try_from(len).unwrap_or(usize::MAX);
                        let permit = tokio::select! {
                            biased;
                            () = conn.cancel.cancelled() => {
                                log::warn!(
                                    "endpoint {}: streamed {}/{} from {peer} dropped: \
                                     connection closed while waiting for the in-flight budget",
                                    self.own,
                                    Bounded(msg.headers.channel().unwrap_or("")),
                                    Bounded(msg.headers.topic().unwrap_or(""))
                                );
                                return;
                            }
                            p = conn.inflight.acquire(len) => p,
                        };
                        self.deliver_local(peer, msg, permit, tx).await;
                    }
                    StreamAction::Reply { request_id, reply } => {
                        self.deliver_stream_reply(peer, &request_id, reply).await;
                    }
                }
            }
            return;
        }
        self.deliver_local(peer, msg, permit, tx).await;
    }

    /// Hands a message to the local cell it is addressed to (with its in-flight `permit`, held
    /// by the cell until it is done with it), or answers `return`.
    pub(crate) async fn deliver_local(
        &self,
        peer: &Fqcn,
        msg: CellMessage,
        permit: InboundPermit,
        tx: &mpsc::Sender<Outbound>,
    ) {
        let dest = msg.headers.destination().and_then(|d| Fqcn::new(d).ok());
        let cell = dest.as_ref().and_then(|d| self.local_cell(d));
        match (dest, cell) {
            (Some(dest), Some(cell)) => {
                if let Err(e) = cell.send(Deliver(msg, permit)).await {
                    log::warn!(
                        "endpoint {}: message from {peer} for {dest} dropped: cell gone ({e})",
                        self.own
                    );
                }
            }
            _ => self.cannot_deliver(peer, msg, tx).await,
        }
    }

    /// `bye`: reply `ok` with no payload (the peer closes the connection next). An answer to
    /// one of our own goodbyes releases [`TcpTransport::shutdown`].
    async fn answer_bye(&self, peer: &Fqcn, msg: &CellMessage, tx: &mpsc::Sender<Outbound>) {
        let h = &msg.headers;
        if h.msg_type() != Some(MsgType::Req) {
            log::debug!("endpoint {}: bye answer from {peer}", self.own);
            let mut waiters = self
                .bye_waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for id in h.req_ids() {
                if let Some(waiter) = waiters.remove(id) {
                    let _ = waiter.send(());
                }
            }
            return;
        }
        log::info!("endpoint {}: {peer} says goodbye", self.own);
        if h.reply_expected() != Some(true) {
            return;
        }
        let Some(mut reply) = self.answer_headers(h, peer, MsgType::Reply) else {
            return;
        };
        if let Some(id) = h.get(header::REQ_ID) {
            reply.insert(header::REQ_ID, id.clone());
        }
        reply.set_return_code(CellReturnCode::Ok);
        self.queue_answer(peer, reply, tx).await;
    }

    /// A message for a cell that is not here, and not relayed ([`WireConfig::forwarding`] off,
    /// or an invalid destination). A request that expects a reply is answered with `return` /
    /// `comm_error` so its sender does not wait for a timeout; anything else is dropped.
    async fn cannot_deliver(&self, peer: &Fqcn, msg: CellMessage, tx: &mpsc::Sender<Outbound>) {
        let h = &msg.headers;
        let level = if h.optional() == Some(true) {
            log::Level::Debug
        } else {
            log::Level::Warn
        };
        log::log!(
            level,
            "endpoint {}: {} from {peer} on {}/{} for {}: no such local cell",
            self.own,
            h.msg_type().map_or("message", |t| t.as_str()),
            Bounded(h.channel().unwrap_or("")),
            Bounded(h.topic().unwrap_or("")),
            Bounded(h.destination().unwrap_or(""))
        );
        self.answer_return(peer, h, tx).await;
    }

    /// The `return` message (as NVFlare sends it: `comm_error`, "cannot forward", `cant_forward`,
    /// the request's headers) for a request that expects a reply and cannot reach its destination,
    /// queued on the connection it came from. Anything else gets no answer.
    async fn answer_return(&self, peer: &Fqcn, h: &Headers, tx: &mpsc::Sender<Outbound>) {
        let wants_reply = h.msg_type() == Some(MsgType::Req) && h.reply_expected() == Some(true);
        let Some(req_id) = h.req_id().filter(|_| wants_reply) else {
            return;
        };
        let Some(mut ret) = self.answer_headers(h, peer, MsgType::Return) else {
            return;
        };
        ret.set_origin(self.own.as_str());
        ret.set_req_ids([req_id]);
        ret.set_return_code(CellReturnCode::CommError);
        ret.set_error("cannot forward");
        ret.insert(header::RETURN_REASON, "cant_forward");
        let original: Map = h.iter().map(|(k, v)| (Value::from(k), v.clone())).collect();
        ret.insert(header::ORIGINAL_HEADERS, Value::Map(original));
        self.queue_answer(peer, ret, tx).await;
    }

    /// The destination of an incoming DATA frame if this endpoint must relay it: relaying
    /// is on, the destination is a valid name, and it is neither this endpoint nor a cell hosted
    /// here. Everything else (including a frame without headers or with an invalid
    /// destination) takes the local path, which answers what it cannot deliver.
    fn relay_destination(&self, frame: &Frame) -> Option<Fqcn> {
        if !self.config.forwarding {
            return None;
        }
        let dest = Fqcn::new(frame.headers.as_ref()?.destination()?).ok()?;
        if dest == self.own || self.local_cell(&dest).is_some() {
            return None;
        }
        Some(dest)
    }

    /// Relays a DATA frame addressed to `dest`, which is not here, towards it: the next
    /// hop is picked by the route rule; `cn__from` becomes this endpoint, `cn__to` the next hop,
    /// and this endpoint is appended to `cn__route`; headers and payload are otherwise passed on
    /// as they came (the payload is neither decoded nor copied). A next hop already on the
    /// route (or the peer the frame came from) is refused as a loop, unless it is `dest`
    /// itself. Stream ACKs and errors go on the next hop's answer queue, everything else on its
    /// data queue, waiting for room (back-pressure reaches the sender's TCP connection). What
    /// cannot be relayed is answered by [`Inner::refuse_forward`].
    async fn forward(
        &self,
        peer: &Fqcn,
        mut frame: Frame,
        dest: Fqcn,
        tx: &mpsc::Sender<Outbound>,
    ) {
        let Some(mut h) = frame.headers.take() else {
            return;
        };
        let Some((next, link)) = self.pick_link(&dest) else {
            let why = format!("no connection leads to {dest}");
            self.refuse_forward(peer, h, &dest, &why, false, tx).await;
            return;
        };
        if next != dest && (next == *peer || route_contains(&h, next.as_str())) {
            let why = format!("next hop {next} is already on the route (loop)");
            self.refuse_forward(peer, h, &dest, &why, true, tx).await;
            return;
        }
        h.set_from(self.own.as_str());
        h.set_to(next.as_str());
        h.push_route(self.own.as_str(), epoch_secs());
        let answer = h.channel() == Some(STREAM_CHANNEL)
            && matches!(h.topic(), Some(TOPIC_ACK | TOPIC_ERROR));
        log::trace!(
            "endpoint {}: relaying {}/{} from {peer} for {dest} via {next}",
            self.own,
            Bounded(h.channel().unwrap_or("")),
            Bounded(h.topic().unwrap_or(""))
        );
        frame.headers = Some(h);
        let queue = if answer { &link.control } else { &link.tx };
        if let Err(mpsc::error::SendError(out)) = queue
            .send(Outbound {
                frame,
                body: None,
                done: None,
            })
            .await
        {
            let why = format!("the connection to {next} is closing");
            if let Some(h) = out.frame.headers {
                self.refuse_forward(peer, h, &dest, &why, false, tx).await;
            }
        }
    }

    /// A message that cannot be relayed (`why`; `is_loop`: refused as a loop): logged, then a
    /// request that expects a reply gets the `return` message, and a stream chunk gets an
    /// `sm__ERROR` (and its `sm__ACK` copy) from `dest` so that the streaming sender fails at
    /// once instead of waiting for ACKs; anything else is dropped.
    async fn refuse_forward(
        &self,
        peer: &Fqcn,
        mut h: Headers,
        dest: &Fqcn,
        why: &str,
        is_loop: bool,
        tx: &mpsc::Sender<Outbound>,
    ) {
        let level = if is_loop || h.optional() != Some(true) {
            log::Level::Warn
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "endpoint {}: {} from {peer} (origin {}) on {}/{} for {dest} not relayed: {why}",
            self.own,
            h.msg_type().map_or("message", |t| t.as_str()),
            Bounded(h.origin().unwrap_or("")),
            Bounded(h.channel().unwrap_or("")),
            Bounded(h.topic().unwrap_or(""))
        );
        if h.channel() == Some(STREAM_CHANNEL) {
            if let Some(error) = self.relay_stream_error(peer, &h, dest, why) {
                let copy = error_pair(&error);
                self.queue_answer(peer, error, tx).await;
                if let Some(copy) = copy {
                    self.queue_answer(peer, copy, tx).await;
                }
            }
            return;
        }
        // the request's headers as a receiver sees them (the encoding is the frame's business)
        h.remove(header::PAYLOAD_ENCODING);
        self.answer_return(peer, &h, tx).await;
    }

    /// The `sm__ERROR` message, from `dest` to the origin of a stream chunk `h` that cannot be
    /// relayed (the streaming sender accepts errors about its stream only from the cell it
    /// streams to). `None` for anything but a data chunk (ACKs, errors and aborts about a
    /// stream are not answered).
    fn relay_stream_error(
        &self,
        peer: &Fqcn,
        h: &Headers,
        dest: &Fqcn,
        why: &str,
    ) -> Option<Headers> {
        let StreamMessage::Chunk(chunk) = StreamMessage::parse(h).ok()? else {
            return None;
        };
        let origin = h.origin()?;
        let now = epoch_secs();
        let mut e = Headers::new();
        e.insert(stream_key::ID, chunk.stream_id);
        e.insert(stream_key::DATA_TYPE, u64::from(DataType::Error.as_u8()));
        e.insert(
            stream_key::ERROR_MESSAGE,
            format!("{} cannot forward to {dest}: {why}", self.own),
        );
        e.insert(stream_key::ERROR_TYPE, "StreamError");
        e.insert(stream_key::CHANNEL, chunk.channel);
        e.insert(stream_key::TOPIC, chunk.topic);
        if let Some(ri) = chunk.request_id {
            e.insert(stream_key::REQUEST_ID, ri);
        }
        e.set_reply_expected(false);
        e.set_optional(true);
        e.set_secure(false);
        e.set_topic(TOPIC_ERROR);
        e.set_channel(STREAM_CHANNEL);
        e.set_destination(origin);
        e.set_from(self.own.as_str());
        e.set_to(peer.as_str());
        e.set_origin(dest.as_str());
        e.set_msg_type(MsgType::Req);
        e.set_route([(self.own.as_str(), now)]);
        e.set_payload_encoding(fedrun_cell::PayloadEncoding::None);
        e.set_payload_len(0);
        e.set_send_time(now);
        Some(e)
    }

    /// Queues a header-only answer on the connection it answers (not waiting for the write).
    pub(crate) async fn queue_answer(
        &self,
        peer: &Fqcn,
        headers: Headers,
        tx: &mpsc::Sender<Outbound>,
    ) {
        let msg = CellMessage {
            headers,
            payload: fedrun_cell::Payload::None,
        };
        match frame_from_message(msg) {
            Ok(frame) => {
                if tx
                    .send(Outbound {
                        frame,
                        body: None,
                        done: None,
                    })
                    .await
                    .is_err()
                {
                    log::debug!("endpoint {}: answer to {peer} not sent: closing", self.own);
                }
            }
            Err(e) => log::warn!("endpoint {}: answer to {peer} not built: {e}", self.own),
        }
    }

    /// Registers a handshaken connection, runs it to its end, and unregisters it.
    /// `accepted`: the peer connected to this endpoint (it is a child: see
    /// [`Inner::forged_origin`]), with its slot and address; otherwise this endpoint connected
    /// to it (a parent). A name already held by a live connection is not taken over (see
    /// [`Inner::claim_name`]).
    async fn run_connection(
        self: Arc<Self>,
        peer: Fqcn,
        reader: Reader,
        writer: Writer,
        accepted: Option<Accepted>,
    ) {
        let conn_id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let cancel = match &accepted {
            Some(a) => a.slot.cancel.clone(),
            None => self.shutdown.child_token(),
        };
        let (tx, rx) = mpsc::channel(self.config.queue_capacity.max(1));
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE_CAPACITY);
        let heard = Arc::new(Notify::new());
        let link = Link {
            conn_id,
            tx: tx.clone(),
            control: control_tx.clone(),
            cancel: cancel.clone(),
            heard: Arc::clone(&heard),
        };
        let addr = accepted.as_ref().map(|a| a.addr);
        if !self.claim_name(&peer, link, addr, &cancel).await {
            return;
        }
        self.peers_changed.send_modify(|g| *g += 1);
        log::info!("endpoint {}: connected to {peer}", self.own);

        let writer_task = tokio::spawn(write_loop(
            self.own.clone(),
            peer.clone(),
            writer,
            rx,
            control_rx,
            cancel.clone(),
            WriteOptions {
                send_timeout: self.config.send_timeout,
                outgoing_headers: Arc::from(self.config.outgoing_headers.clone()),
            },
        ));
        let inflight = InFlight::new(
            self.config.max_inflight_requests,
            self.config.max_inflight_bytes,
        );
        let conn = ReadContext {
            slot: accepted.as_ref().map(|a| &a.slot),
            heard: &heard,
            budget: ConnBudget {
                inflight: &inflight,
                cancel: &cancel,
            },
        };
        // everything the reader sends is an answer: it goes on the control queue
        let outcome = self.read_loop(&peer, reader, &control_tx, conn).await;
        cancel.cancel();
        {
            let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
            if peers.get(&peer).is_some_and(|l| l.conn_id == conn_id) {
                peers.remove(&peer);
            }
        }
        self.peers_changed.send_modify(|g| *g += 1);
        self.streams.forget_peer(peer.as_str());
        self.sender.forget_connection(conn_id);
        drop(tx);
        drop(control_tx);
        if let Err(e) = writer_task.await {
            log::warn!("endpoint {}: writer of {peer} ended badly: {e}", self.own);
        }
        match outcome {
            Ok(()) => log::info!("endpoint {}: connection to {peer} closed", self.own),
            Err(e) => log::warn!(
                "endpoint {}: connection to {peer} closed after an error: {e}",
                self.own
            ),
        }
    }

    /// Registers `link` as the connection of `peer`. A live connection already registered
    /// under that name is kept if it answers a PING within
    /// [`WireConfig::name_probe_timeout`]: the newcomer is then refused (false; logged with the
    /// claimed name and the newcomer's address). Only a connection that does not answer (a
    /// half-open one, whose peer is reconnecting) is closed and replaced.
    async fn claim_name(
        &self,
        peer: &Fqcn,
        link: Link,
        addr: Option<SocketAddr>,
        cancel: &CancellationToken,
    ) -> bool {
        let from = addr.map_or_else(
            || "a connection this endpoint opened".to_owned(),
            |a| a.to_string(),
        );
        for _ in 0..NAME_CLAIM_ATTEMPTS {
            let old = {
                let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
                match peers.get(peer) {
                    Some(old) if !old.cancel.is_cancelled() => old.clone(),
                    _ => {
                        peers.insert(peer.clone(), link);
                        return true;
                    }
                }
            };
            let answered = tokio::select! {
                biased;
                () = cancel.cancelled() => return false,
                answered = self.probe(&old) => answered,
            };
            if answered {
                log::warn!(
                    "endpoint {}: connection from {from} claiming the name {peer} refused: the \
                     live connection of {peer} answers",
                    self.own
                );
                return false;
            }
            let mut peers = self.peers.write().unwrap_or_else(PoisonError::into_inner);
            if peers.get(peer).is_some_and(|l| l.conn_id == old.conn_id) {
                log::warn!(
                    "endpoint {}: the connection of {peer} did not answer a PING within {:?}; \
                     replaced by the new one from {from}",
                    self.own,
                    self.config.name_probe_timeout
                );
                old.cancel.cancel();
                peers.insert(peer.clone(), link);
                return true;
            }
            // the name changed hands meanwhile: look again
        }
        log::warn!(
            "endpoint {}: connection from {from} claiming the name {peer} refused: the name \
             keeps changing hands",
            self.own
        );
        false
    }

    /// PINGs a registered connection; true if anything arrives on it within
    /// [`WireConfig::name_probe_timeout`].
    async fn probe(&self, link: &Link) -> bool {
        let heard = link.heard.notified();
        tokio::pin!(heard);
        heard.as_mut().enable();
        let ping = Outbound {
            frame: Frame::ping(),
            body: None,
            done: None,
        };
        if let Err(mpsc::error::TrySendError::Closed(_)) = link.control.try_send(ping) {
            return false;
        }
        // a full answer queue means the connection is busy: its traffic answers the probe
        tokio::select! {
            () = link.cancel.cancelled() => false,
            r = tokio::time::timeout(self.config.name_probe_timeout, heard) => r.is_ok(),
        }
    }

    /// Reads frames until the peer closes, an error occurs, or the connection is cancelled;
    /// PINGs the peer when nothing arrived for [`WireConfig::heartbeat_interval`] and drops
    /// its streams idle for [`WireConfig::stream_idle_timeout`].
    async fn read_loop(
        &self,
        peer: &Fqcn,
        mut reader: Reader,
        tx: &mpsc::Sender<Outbound>,
        conn: ReadContext<'_>,
    ) -> Result<(), WireError> {
        let cancel = conn.budget.cancel;
        let heartbeat = self.config.heartbeat_interval;
        let mut idle_deadline = tokio::time::Instant::now() + heartbeat;
        let tick = (self.config.stream_idle_timeout / 2).max(MIN_STREAM_EXPIRY_TICK);
        let mut expiry = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut silent_deadline = conn
            .slot
            .and(self.config.silent_timeout)
            .map(|t| (tokio::time::Instant::now() + t, t));
        let mut active = conn.slot.is_none();
        loop {
            let silent_until = async {
                match silent_deadline {
                    Some((at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(()),
                r = reader.next() => r,
                () = tokio::time::sleep_until(idle_deadline) => {
                    log::debug!("endpoint {}: {peer} silent, sending PING", self.own);
                    // try_send: a full queue means frames are flowing, no PING needed.
                    let _ = tx.try_send(Outbound {
                        frame: Frame::ping(),
                        body: None,
                        done: None,
                    });
                    idle_deadline = tokio::time::Instant::now() + heartbeat;
                    continue;
                }
                _ = expiry.tick() => {
                    self.streams.expire_idle(&self.own, peer.as_str());
                    continue;
                }
                () = silent_until => {
                    let t = silent_deadline.map(|(_, t)| t).unwrap_or_default();
                    log::warn!(
                        "endpoint {}: {peer} sent no DATA frame within {t:?} of its handshake; \
                         closing",
                        self.own
                    );
                    return Ok(());
                }
            };
            idle_deadline = tokio::time::Instant::now() + heartbeat;
            let frame = match next {
                None => return Ok(()),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => frame,
            };
            conn.heard.notify_waiters();
            match frame.frame_type {
                FrameType::Data if frame.app_id == APP_ID_CELLNET => {
                    if !active {
                        active = true;
                        silent_deadline = None;
                        if let Some(slot) = conn.slot {
                            slot.activated();
                        }
                    }
                    if conn.slot.is_some() {
                        if let Some(why) = self.forged_origin(peer, &frame) {
                            let h = frame.headers.as_ref();
                            log::warn!(
                                "endpoint {}: frame from {peer} refused ({why}): channel {} \
                                 topic {} for {}",
                                self.own,
                                Bounded(h.and_then(Headers::channel).unwrap_or("")),
                                Bounded(h.and_then(Headers::topic).unwrap_or("")),
                                Bounded(h.and_then(Headers::destination).unwrap_or(""))
                            );
                            continue;
                        }
                    }
                    if let Some(dest) = self.relay_destination(&frame) {
                        // passed on undecoded: a relay never decodes a payload it only carries
                        tokio::select! {
                            biased;
                            () = cancel.cancelled() => return Ok(()),
                            () = self.forward(peer, frame, dest, tx) => {}
                        }
                        continue;
                    }
                    let Some(frame) = self.open_incoming(peer, frame, tx).await else {
                        continue;
                    };
                    let permit = if needs_permit(&frame) {
                        // no room in the budget: stop reading (TCP slows the peer down)
                        tokio::select! {
                            biased;
                            () = cancel.cancelled() => return Ok(()),
                            p = conn.budget.inflight.acquire(frame.payload.len()) => p,
                        }
                    } else {
                        InboundPermit::none()
                    };
                    let msg = decode_frame(frame, self.config.blocking_decode_min).await?;
                    self.handle_incoming(peer, msg, permit, &conn.budget, tx)
                        .await;
                }
                FrameType::Data => log::warn!(
                    "endpoint {}: DATA frame for app {} from {peer} dropped (no such app)",
                    self.own,
                    frame.app_id
                ),
                FrameType::Ping => {
                    let pong = Outbound {
                        frame: Frame::pong(),
                        body: None,
                        done: None,
                    };
                    if tx.send(pong).await.is_err() {
                        return Ok(());
                    }
                }
                FrameType::Pong => log::debug!("endpoint {}: PONG from {peer}", self.own),
                other => log::warn!(
                    "endpoint {}: unexpected {other} frame from {peer} ignored",
                    self.own
                ),
            }
        }
    }
}

/// Whether a DATA frame to be handled here takes a permit of the in-flight budget: a request
/// for a cell (also fire-and-forget). Replies and returns only complete a waiting request of
/// this process; stream chunks are bounded by the stream receiver (the reassembled request
/// takes its permit then); goodbyes are answered by the reader itself.
fn needs_permit(frame: &Frame) -> bool {
    let Some(h) = frame.headers.as_ref() else {
        return false;
    };
    h.msg_type() == Some(MsgType::Req)
        && h.channel() != Some(STREAM_CHANNEL)
        && !(h.channel() == Some(CELLNET_CHANNEL) && h.topic() == Some(BYE_TOPIC))
}

/// An accepted connection's slot and the peer's address.
struct Accepted {
    slot: SlotGuard,
    addr: SocketAddr,
}

/// A connection's in-flight budget and its cancellation, as the reader's helpers see them.
struct ConnBudget<'a> {
    inflight: &'a InFlight,
    cancel: &'a CancellationToken,
}

/// What the reader of one connection works with besides the socket.
struct ReadContext<'a> {
    /// The slot of an accepted connection (`None`: this endpoint opened it).
    slot: Option<&'a SlotGuard>,
    /// Notified on every frame (a liveness probe waits on it).
    heard: &'a Notify,
    budget: ConnBudget<'a>,
}

impl Inner {
    /// Why a frame that arrived on a connection the peer opened to this endpoint does not come
    /// from that peer, if it does not.
    ///
    /// A peer that connected here is a child in NVFlare's tree (a client parent or a client job
    /// connecting to the server root, a job to its parent): everything it sends originates at
    /// the endpoint it registered as or at a cell below it (a client parent relays its jobs).
    /// It may never claim a cell this endpoint hosts, nor one outside its own branch: without
    /// this check any peer that can reach the port could speak as the server job and, say, end
    /// every client's run. Connections this endpoint opened lead to its parents, which relay
    /// for everyone; they are not checked here.
    fn forged_origin(&self, peer: &Fqcn, frame: &Frame) -> Option<String> {
        let Some(origin) = frame.headers.as_ref().and_then(Headers::origin) else {
            return Some("no cn__origin".to_owned());
        };
        let under_peer = origin == peer.as_str()
            || origin
                .strip_prefix(peer.as_str())
                .is_some_and(|rest| rest.starts_with('.'));
        if !under_peer {
            return Some(format!(
                "it claims origin {}, outside its own branch",
                Bounded(origin)
            ));
        }
        let hosted = origin == self.own.as_str()
            || Fqcn::new(origin).is_ok_and(|o| self.local_cell(&o).is_some());
        hosted.then(|| format!("it claims origin {origin:?}, a cell hosted here"))
    }
}

/// The reply bookkeeping of a streamed request while its stream is being sent.
struct ExpectedReply<'a> {
    sender: &'a StreamSender,
    request_id: String,
    delivered: bool,
}

impl Drop for ExpectedReply<'_> {
    fn drop(&mut self) {
        if !self.delivered {
            self.sender.forget_reply(&self.request_id);
        }
    }
}

/// The cell return code for a failed send.
fn send_error_code(e: &WireError) -> CellReturnCode {
    match e {
        WireError::InvalidDestination(_) => CellReturnCode::InvalidTarget,
        WireError::NoRoute(_) => CellReturnCode::TargetUnreachable,
        WireError::SecureUnavailable | WireError::Secure { .. } | WireError::KeyExchange { .. } => {
            CellReturnCode::AuthenticationError
        }
        _ => CellReturnCode::CommError,
    }
}

/// Whether `name` is a hop of `h`'s `cn__route` (a list of `[fqcn, time]`; a hop of another
/// shape is skipped, never trusted blindly nor a reason to fail).
fn route_contains(h: &Headers, name: &str) -> bool {
    let Some(hops) = h.get(header::ROUTE).and_then(Value::as_array) else {
        return false;
    };
    hops.iter().any(|hop| {
        hop.as_array()
            .and_then(|pair| pair.first())
            .and_then(Value::as_str)
            == Some(name)
    })
}

/// Writes queued frames, control answers first, numbering them (sequence per connection, stream
/// id per peer), until both queues close or the connection is cancelled. A write that fails or
/// takes longer than `send_timeout` closes the connection.
/// Frames whose payload has at least this many bytes are written from the payload's own buffer
/// (prefix and headers, then the payload, in vectored writes) instead of being copied into the
/// writer's buffer first: one copy less for every byte of a big message or stream chunk.
const DIRECT_WRITE_MIN: usize = 64 * 1024;

/// Writes one frame (its payload is `body` when set): small ones through the codec, big ones
/// without copying their payload.
async fn write_frame(
    writer: &mut Writer,
    mut frame: Frame,
    body: Option<Body>,
) -> Result<(), WireError> {
    let body = match body {
        Some(body) if body.len() < DIRECT_WRITE_MIN => {
            frame.payload = body.slice_bytes(0, body.len());
            return writer.send(frame).await;
        }
        Some(body) => body,
        None if frame.payload.len() < DIRECT_WRITE_MIN => return writer.send(frame).await,
        None => Body::from(std::mem::take(&mut frame.payload)),
    };
    let head = frame.encode_head_for(writer.encoder().max_frame_size(), body.len())?;
    // `send` flushes, so nothing is buffered here; flushing keeps the order if that changes
    SinkExt::<Frame>::flush(writer).await?;
    let mut buf = head.chain(body);
    writer.get_mut().write_all_buf(&mut buf).await?;
    Ok(())
}

/// What a connection's writer applies to every frame.
struct WriteOptions {
    /// How long writing one frame may take.
    send_timeout: Duration,
    /// Headers stamped on every DATA frame ([`WireConfig::outgoing_headers`]).
    outgoing_headers: Arc<[(String, String)]>,
}

async fn write_loop(
    own: Fqcn,
    peer: Fqcn,
    mut writer: Writer,
    mut rx: mpsc::Receiver<Outbound>,
    mut control: mpsc::Receiver<Outbound>,
    cancel: CancellationToken,
    options: WriteOptions,
) {
    let WriteOptions {
        send_timeout,
        outgoing_headers,
    } = options;
    // The handshake frame was sequence 1.
    let mut sequence: u16 = 1;
    let mut stream_id: u16 = STREAM_ID_BASE;
    loop {
        let out = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            Some(out) = control.recv() => out,
            Some(out) = rx.recv() => out,
            else => break,
        };
        let Outbound {
            mut frame,
            body,
            done,
        } = out;
        if frame.frame_type == FrameType::Data && !outgoing_headers.is_empty() {
            let headers = frame.headers.get_or_insert_with(Headers::new);
            for (key, value) in outgoing_headers.iter() {
                headers.insert(key.as_str(), value.as_str());
            }
        }
        sequence = sequence.wrapping_add(1);
        stream_id = stream_id.wrapping_add(1);
        frame.sequence = sequence;
        frame.stream_id = stream_id;
        let result =
            match tokio::time::timeout(send_timeout, write_frame(&mut writer, frame, body)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(WireError::Io(e))) => Err(format!("write failed: {e}")),
                Ok(Err(e)) => {
                    // An encoding error writes nothing: the connection is still usable.
                    log::warn!("endpoint {own}: frame to {peer} not sent: {e}");
                    if let Some(done) = done {
                        let _ = done.send(Err(CellReturnCode::CommError));
                    }
                    continue;
                }
                Err(_) => Err(format!("write took longer than {send_timeout:?}")),
            };
        match result {
            Ok(()) => {
                if let Some(done) = done {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => {
                log::warn!("endpoint {own}: connection to {peer}: {e}; closing");
                if let Some(done) = done {
                    let _ = done.send(Err(CellReturnCode::CommError));
                }
                cancel.cancel();
                break;
            }
        }
    }
}

/// The HELLO/READY exchange on a fresh connection. `active`: this side connected (sends HELLO,
/// expects READY); otherwise it accepted (expects HELLO, answers READY).
async fn handshake(
    inner: &Inner,
    stream: TcpStream,
    tls: Option<&TlsSide>,
    active: bool,
) -> Result<(Fqcn, Reader, Writer), WireError> {
    // the TLS handshake and HELLO/READY share one deadline
    let deadline = tokio::time::Instant::now() + inner.config.handshake_timeout;
    let conn = tokio::time::timeout_at(deadline, Conn::establish(stream, tls))
        .await
        .map_err(|_| WireError::HandshakeTimeout(inner.config.handshake_timeout))??;
    let identity = conn.peer_identity();
    let (r, w) = conn.into_split();
    // Until the peer has said who it is, it may send no more than a HELLO/READY needs: a peer
    // that announces a bigger frame is refused at its prefix, before anything is buffered.
    let mut reader = FramedRead::new(
        r,
        SfmCodec::with_max_frame_size(HANDSHAKE_MAX_FRAME_SIZE.min(inner.config.max_frame_size)),
    );
    let mut writer = FramedWrite::new(
        w,
        SfmCodec::with_max_frame_size(inner.config.max_frame_size),
    );
    let me = HandshakeInfo::now(&inner.own);
    let exchange = async {
        if active {
            let mut hello = Frame::hello(&me)?;
            hello.sequence = 1;
            writer.send(hello).await?;
        }
        let first = reader.next().await.ok_or(WireError::ConnectionClosed)??;
        let expected = if active {
            FrameType::Ready
        } else {
            FrameType::Hello
        };
        if first.frame_type != expected {
            return Err(WireError::UnexpectedFrame {
                expected: expected.name(),
                got: first.frame_type.name(),
            });
        }
        // NVFlare's name rules and a length bound, before the name is used or logged
        let peer = check_endpoint_name(&HandshakeInfo::decode(&first.payload)?.endpoint_name)?;
        if peer == inner.own {
            return Err(WireError::SelfConnection(peer.to_string()));
        }
        // mTLS: the name must belong to the certificate (checked before READY is sent)
        identity.check(tls, &peer)?;
        if !active {
            let mut ready = Frame::ready(&me)?;
            ready.sequence = 1;
            writer.send(ready).await?;
        }
        Ok(peer)
    };
    let peer = tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| WireError::HandshakeTimeout(inner.config.handshake_timeout))??;
    reader
        .decoder_mut()
        .set_max_frame_size(inner.config.max_frame_size);
    Ok((peer, reader, writer))
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener, tls: Option<TlsSide>) {
    loop {
        let accepted = tokio::select! {
            () = inner.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, addr)) => {
                // a slot for every accepted socket, so that `accept` never runs out of
                // descriptors; `None` (logged) closes the newcomer
                let Some(slot) = inner.slots.admit(addr, &inner.shutdown) else {
                    drop(stream);
                    continue;
                };
                let inner = Arc::clone(&inner);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let handshaken = tokio::select! {
                        biased;
                        () = slot.cancel.cancelled() => return,
                        r = handshake(&inner, stream, tls.as_ref(), false) => r,
                    };
                    match handshaken {
                        Ok((peer, reader, writer)) => {
                            slot.handshaken(&peer);
                            let accepted = Accepted { slot, addr };
                            inner
                                .run_connection(peer, reader, writer, Some(accepted))
                                .await;
                        }
                        Err(e) => log::warn!(
                            "endpoint {}: handshake with {addr} failed, connection closed: {e}",
                            inner.own
                        ),
                    }
                });
            }
            Err(e) => {
                log::warn!("endpoint {}: accept failed: {e}", inner.own);
                tokio::select! {
                    () = inner.shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
    log::debug!("endpoint {}: listener closed", inner.own);
}

async fn connect_loop(inner: Arc<Inner>, url: TcpUrl, tls: Option<TlsSide>) {
    let initial = inner.config.reconnect_initial;
    let mut delay = initial;
    loop {
        if inner.shutdown.is_cancelled() {
            break;
        }
        let attempt = async {
            let stream = tokio::time::timeout(
                inner.config.handshake_timeout,
                TcpStream::connect((url.host.as_str(), url.port)),
            )
            .await
            .map_err(|_| WireError::HandshakeTimeout(inner.config.handshake_timeout))??;
            handshake(&inner, stream, tls.as_ref(), true).await
        };
        let outcome = tokio::select! {
            () = inner.shutdown.cancelled() => break,
            r = attempt => r,
        };
        match outcome {
            Ok((peer, reader, writer)) => {
                delay = initial;
                let connected = tokio::time::Instant::now();
                Arc::clone(&inner)
                    .run_connection(peer.clone(), reader, writer, None)
                    .await;
                if crate::tls_conn::refused_after_ready(tls.as_ref(), connected.elapsed())
                    && !inner.shutdown.is_cancelled()
                {
                    delay = inner.config.reconnect_max;
                    log::error!(
                        "endpoint {}: authentication with {url} failed: {peer} closed the mTLS \
                         connection right after READY, as NVFlare does when the registered name \
                         does not belong to the certificate; retrying in {delay:?}",
                        inner.own
                    );
                }
            }
            Err(e) => match auth_failure(&e) {
                // retrying fast would not help: the credentials must change
                Some(why) => {
                    delay = inner.config.reconnect_max;
                    log::error!(
                        "endpoint {}: authentication with {url} failed: {why}; retrying in \
                         {delay:?}",
                        inner.own
                    );
                }
                None => log::warn!(
                    "endpoint {}: cannot connect to {url}: {e}; retrying in {delay:?}",
                    inner.own
                ),
            },
        }
        tokio::select! {
            () = inner.shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(inner.config.reconnect_max);
    }
    log::debug!("endpoint {}: connector to {url} stopped", inner.own);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_other_than_tcp_host_port_are_refused() {
        for bad in [
            "http://a:1",
            "tcp://a",
            "tcp://:1",
            "tcp://a:port",
            "tcp://a:70000",
        ] {
            assert!(
                matches!(TcpUrl::parse(bad), Err(WireError::InvalidUrl { .. })),
                "{bad}"
            );
        }
        let v6 = TcpUrl::parse("tcp://[::1]:9").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "tcp://[::1]:9");
    }

    #[test]
    fn route_check_finds_hop_names_and_skips_malformed_hops() {
        let mut h = Headers::new();
        assert!(!route_contains(&h, "server"), "no route");
        h.set_route([("site-1.job1", 1.0), ("server", 2.0)]);
        assert!(route_contains(&h, "server"));
        assert!(route_contains(&h, "site-1.job1"));
        assert!(!route_contains(&h, "site-1"), "names, not prefixes");
        h.insert(
            header::ROUTE,
            Value::Array(vec![
                Value::from("server"),
                Value::Array(vec![]),
                Value::Array(vec![Value::from(3), Value::from("server")]),
                Value::Array(vec![Value::from("site-2"), Value::from(1.0)]),
            ]),
        );
        assert!(
            !route_contains(&h, "server"),
            "only [fqcn, time] hops count"
        );
        assert!(route_contains(&h, "site-2"));
        h.insert(header::ROUTE, "server");
        assert!(!route_contains(&h, "server"), "a route that is not a list");
    }

    #[test]
    fn route_picks_direct_peer_then_longest_prefix_then_server_then_parent() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let me = Fqcn::new("site-1.job1").unwrap();
        let t = TcpTransport::new(me, WireConfig::default());
        let add = |name: &str| {
            let (tx, _rx) = mpsc::channel(1);
            let link = Link {
                conn_id: 0,
                control: tx.clone(),
                tx,
                cancel: CancellationToken::new(),
                heard: Arc::new(Notify::new()),
            };
            t.inner
                .peers
                .write()
                .unwrap()
                .insert(Fqcn::new(name).unwrap(), link);
        };
        let pick = |dest: &str| {
            t.inner
                .pick_link(&Fqcn::new(dest).unwrap())
                .map(|(p, _)| p.to_string())
        };
        assert_eq!(pick("server.job1"), None);
        add("site-1");
        assert_eq!(pick("server.job1").as_deref(), Some("site-1"), "parent");
        add("server");
        assert_eq!(pick("server.job1").as_deref(), Some("server"), "prefix");
        assert_eq!(pick("site-2").as_deref(), Some("server"), "server");
        assert_eq!(pick("site-1").as_deref(), Some("site-1"), "direct");
        assert_eq!(pick("site-1.other").as_deref(), Some("site-1"), "prefix");
        add("server.job1");
        assert_eq!(pick("server.job1").as_deref(), Some("server.job1"));
    }
}
