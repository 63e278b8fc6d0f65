//! Hostile connections against a fedrun listener, over real sockets on loopback: silent
//! connections that hold slots, absurd or invalid endpoint names, an impostor that keeps
//! claiming a live peer's name, a peer that floods requests at a slow handler, and a stream
//! left half sent. Each test is named after the guarantee it checks. Small limits are set in
//! [`WireConfig`] so that the caps are reached with a few dozen sockets. Every wait is on the
//! event itself, bounded by a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedrun_cell::{
    request_handler, Cell, CellHandle, CellMessage, Fqcn, Headers, MsgType, Payload,
    RequestHandler, SendRequest,
};
use fedrun_core::{CellReturnCode, Shareable};
use fedrun_wire::stream::{key, StreamMessage, STREAM_CHANNEL, TOPIC_DATA};
use fedrun_wire::{
    frame_from_message, message_from_frame, Frame, FrameType, HandshakeInfo, SfmCodec,
    TcpTransport, WireConfig,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::timeout;
use tokio_util::codec::Framed;

/// Upper bound for any single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(10);

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// A handler that answers every request with its own payload and reports the request.
fn echo(seen: mpsc::Sender<CellMessage>) -> RequestHandler {
    request_handler(move |req: CellMessage| {
        let seen = seen.clone();
        async move {
            let payload = req.payload.clone();
            let _ = seen.try_send(req);
            Ok(Some(CellMessage::new(payload)))
        }
    })
}

struct Server {
    net: TcpTransport,
    addr: SocketAddr,
    cell: CellHandle,
    seen: mpsc::Receiver<CellMessage>,
}

impl Server {
    async fn shutdown(self) {
        self.cell.stop().await;
        self.net.shutdown().await;
    }
}

/// A `server` listener whose cell answers `test/*` with `handler` (an echo when `None`).
async fn server(config: WireConfig, handler: Option<RequestHandler>) -> Server {
    init_log();
    let net = TcpTransport::new(Fqcn::SERVER, config);
    let addr = net.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let cell = Cell::start(Fqcn::SERVER, net.clone()).unwrap();
    let (tx, seen) = mpsc::channel(64);
    cell.register_request_handler("test", "*", handler.unwrap_or_else(|| echo(tx)))
        .await
        .unwrap();
    Server {
        net,
        addr,
        cell,
        seen,
    }
}

fn shareable(round: i64) -> Shareable {
    let mut s = Shareable::new();
    s.insert("round", round);
    s.insert("blob", Bytes::from(vec![7u8; 3000]));
    s
}

/// A scripted peer on a raw socket.
type Raw = Framed<TcpStream, SfmCodec>;

async fn raw_connect(addr: SocketAddr) -> Raw {
    let stream = TcpStream::connect(addr).await.unwrap();
    Framed::new(stream, SfmCodec::new())
}

async fn next_frame(raw: &mut Raw) -> Frame {
    timeout(DEADLINE, raw.next())
        .await
        .expect("no frame before the deadline")
        .expect("connection closed")
        .expect("bad frame")
}

/// The next DATA frame as a cell message (PINGs are answered, other frames skipped).
async fn next_message(raw: &mut Raw) -> CellMessage {
    loop {
        let f = next_frame(raw).await;
        match f.frame_type {
            FrameType::Data => return message_from_frame(f).unwrap(),
            FrameType::Ping => raw.send(Frame::pong()).await.unwrap(),
            _ => {}
        }
    }
}

fn hello(name: &str) -> Frame {
    let info = HandshakeInfo {
        endpoint_name: name.to_owned(),
        timestamp: Some(1.0),
        fqcn: Some(name.to_owned()),
    };
    let mut hello = Frame::hello(&info).unwrap();
    hello.sequence = 1;
    hello
}

/// Sends HELLO as `name` and returns the frame that answers it.
async fn raw_hello(raw: &mut Raw, name: &str) -> Frame {
    raw.send(hello(name)).await.unwrap();
    next_frame(raw).await
}

/// Reads until the peer closes the connection; panics if it does not within the deadline.
async fn expect_closed(raw: &mut Raw) {
    let closed = timeout(DEADLINE, async {
        loop {
            match raw.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection still open after the deadline");
}

/// A request frame from a raw peer.
fn raw_request(origin: &str, dest: &str, req_id: &str) -> Frame {
    let mut h = Headers::new();
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("echo");
    h.set_origin(origin);
    h.set_destination(dest);
    h.set_req_id(req_id);
    h.set_reply_expected(true);
    let mut frame = frame_from_message(CellMessage {
        headers: h,
        payload: Payload::shareable(shareable(1)),
    })
    .unwrap();
    frame.sequence = 2;
    frame
}

/// A stream chunk from `site-2` to `server` on `test/echo`.
fn chunk(id: u64, seq: u64, offset: u64, size: u64, last: bool, data: &[u8]) -> Frame {
    let mut h = Headers::new();
    h.insert(key::PAYLOAD_ENCODING, "bytes");
    h.insert(key::CHANNEL, "test");
    h.insert(key::TOPIC, "echo");
    h.insert(key::SIZE, size);
    h.insert(key::ID, id);
    h.insert(key::DATA_TYPE, if last { 2 } else { 1 });
    h.insert(key::SEQ, seq);
    h.insert(key::OFFSET, offset);
    h.set_channel(STREAM_CHANNEL);
    h.set_topic(TOPIC_DATA);
    h.set_origin("site-2");
    h.set_destination("server");
    h.set_msg_type(MsgType::Req);
    h.set_reply_expected(false);
    frame_from_message(CellMessage {
        headers: h,
        payload: Payload::Bytes(Bytes::copy_from_slice(data)),
    })
    .unwrap()
}

/// Sends request `req_id` as `origin` to the server and waits for its reply.
async fn round_trip(raw: &mut Raw, origin: &str, req_id: &str) {
    raw.send(raw_request(origin, "server", req_id))
        .await
        .unwrap();
    let reply = next_message(raw).await;
    assert_eq!(reply.headers.req_id(), Some(req_id));
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
}

/// Opens `n` connections that say HELLO (as `<prefix>-<i>`) and then nothing, and `n` that do
/// not even say HELLO; returns them (kept open by the caller).
async fn silent_flood(addr: SocketAddr, prefix: &str, n: usize) -> (Vec<Raw>, Vec<Raw>) {
    let mut handshaken = Vec::new();
    for i in 0..n {
        let mut raw = raw_connect(addr).await;
        raw.send(hello(&format!("{prefix}-{i}"))).await.unwrap();
        handshaken.push(raw);
    }
    let mut mute = Vec::new();
    for _ in 0..n {
        mute.push(raw_connect(addr).await);
    }
    (handshaken, mute)
}

#[actix::test]
async fn silent_connections_beyond_the_cap_do_not_lock_out_a_real_peer() {
    let config = WireConfig {
        max_connections: 8,
        max_silent_connections: 4,
        ..WireConfig::default()
    };
    let s = server(config, None).await;
    let (mut first_silent, _first_mute) = silent_flood(s.addr, "idle", 12).await;

    // a real client: HELLO, then a request at once
    let mut real = raw_connect(s.addr).await;
    assert_eq!(
        raw_hello(&mut real, "site-1").await.frame_type,
        FrameType::Ready,
        "the real peer is let in"
    );
    round_trip(&mut real, "site-1", "r1").await;

    // more silent connections: the real (active) peer keeps its connection
    let (_more_silent, _more_mute) = silent_flood(s.addr, "idle2", 12).await;
    round_trip(&mut real, "site-1", "r2").await;

    // the oldest silent connections were closed to make room
    for raw in &mut first_silent {
        expect_closed(raw).await;
    }
    assert!(s.net.is_connected(&fqcn("site-1")));
    s.shutdown().await;
}

#[actix::test]
async fn a_hello_with_a_10_mib_or_an_invalid_endpoint_name_is_refused() {
    let s = server(WireConfig::default(), None).await;
    let huge = "x".repeat(10 * 1024 * 1024);
    let long = "s".repeat(300);
    for name in [
        huge.as_str(),
        long.as_str(),
        "site/1",
        "site-1.site-1",
        "a..b",
        "",
    ] {
        let mut raw = raw_connect(s.addr).await;
        // the listener may close before it has read all of a huge HELLO
        let _ = raw.send(hello(name)).await;
        expect_closed(&mut raw).await;
    }
    assert!(s.net.peers().is_empty(), "no name was registered");
    // a valid name still gets in
    let mut raw = raw_connect(s.addr).await;
    assert_eq!(
        raw_hello(&mut raw, "site-1").await.frame_type,
        FrameType::Ready
    );
    s.shutdown().await;
}

#[actix::test]
async fn an_impostor_hello_loop_does_not_evict_the_live_peer_and_requests_round_trip_throughout() {
    let s = server(WireConfig::default(), None).await;
    let me = fqcn("site-1.job1");
    let job_net = TcpTransport::new(me.clone(), WireConfig::default());
    job_net.add_connector(&format!("tcp://{}", s.addr)).unwrap();
    assert!(job_net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    assert!(s.net.wait_for_peer(&me, DEADLINE).await);
    let job = Cell::start(me.clone(), job_net.clone()).unwrap();

    let addr = s.addr;
    let impostor = tokio::spawn(async move {
        for _ in 0..8 {
            let mut raw = raw_connect(addr).await;
            raw.send(hello("site-1.job1")).await.unwrap();
            // refused: closed once the live peer has answered the probe
            expect_closed(&mut raw).await;
        }
    });
    let mut rounds = 0;
    while !impostor.is_finished() || rounds < 3 {
        let reply = job
            .send_request(SendRequest::new(
                "test",
                "echo",
                Fqcn::SERVER,
                CellMessage::new(shareable(rounds)),
                DEADLINE,
            ))
            .await
            .unwrap();
        assert_eq!(reply.return_code(), CellReturnCode::Ok, "round {rounds}");
        rounds += 1;
    }
    impostor.await.unwrap();
    assert!(s.net.is_connected(&me), "the live peer kept its name");
    job.stop().await;
    job_net.shutdown().await;
    s.shutdown().await;
}

/// What a gated handler observed.
#[derive(Default)]
struct Gauge {
    current: AtomicUsize,
    max: AtomicUsize,
}

/// A handler that counts the requests inside it, reports each entry, and answers only when
/// the test lets one through `gate`.
fn gated(gauge: Arc<Gauge>, gate: Arc<Semaphore>, entered: mpsc::Sender<()>) -> RequestHandler {
    request_handler(move |req: CellMessage| {
        let (gauge, gate, entered) = (gauge.clone(), gate.clone(), entered.clone());
        async move {
            let now = gauge.current.fetch_add(1, Ordering::SeqCst) + 1;
            gauge.max.fetch_max(now, Ordering::SeqCst);
            let _ = entered.send(()).await;
            gate.acquire().await.unwrap().forget();
            gauge.current.fetch_sub(1, Ordering::SeqCst);
            Ok(Some(CellMessage::new(req.payload)))
        }
    })
}

/// Floods `n` requests at a gated handler that holds the first `hold` and then lets one out
/// for each one that enters, and returns the most requests that were ever inside the handler
/// at once; every request must be answered.
async fn flood_a_slow_handler(config: WireConfig, n: usize, hold: usize) -> usize {
    let gauge = Arc::new(Gauge::default());
    let gate = Arc::new(Semaphore::new(0));
    let (entered_tx, mut entered) = mpsc::channel(n);
    let handler = gated(gauge.clone(), gate.clone(), entered_tx);
    let s = server(config, Some(handler)).await;
    let mut raw = raw_connect(s.addr).await;
    assert_eq!(
        raw_hello(&mut raw, "site-9").await.frame_type,
        FrameType::Ready
    );
    let (mut sink, mut stream) = raw.split();
    let writer = tokio::spawn(async move {
        for i in 0..n {
            sink.send(raw_request("site-9", "server", &format!("q{i}")))
                .await
                .unwrap();
        }
        // answered only once the endpoint has read every request before it
        sink.send(Frame::ping()).await.unwrap();
        sink
    });
    for i in 0..hold {
        timeout(DEADLINE, entered.recv())
            .await
            .unwrap_or_else(|_| panic!("request {i} never reached the handler"));
    }
    // While the budget is spent the endpoint must not read on: no PONG may come back. This
    // looks for a while and can only miss a fault (a slow reader), never invent one.
    let early = timeout(Duration::from_millis(500), async {
        while let Some(Ok(f)) = stream.next().await {
            if f.frame_type == FrameType::Pong {
                return;
            }
        }
    })
    .await;
    assert!(
        early.is_err(),
        "the endpoint read past a spent in-flight budget"
    );
    // then each one let out lets one more in
    for i in hold..n {
        if i >= hold {
            gate.add_permits(1);
        }
        timeout(DEADLINE, entered.recv())
            .await
            .unwrap_or_else(|_| panic!("request {i} never reached the handler"));
    }
    gate.add_permits(hold);
    let mut answered = std::collections::HashSet::new();
    while answered.len() < n {
        let f = timeout(DEADLINE, stream.next())
            .await
            .expect("a reply is missing")
            .expect("closed")
            .expect("bad frame");
        if f.frame_type == FrameType::Data {
            let reply = message_from_frame(f).unwrap();
            assert_eq!(reply.return_code(), CellReturnCode::Ok);
            answered.insert(reply.headers.req_id().unwrap().to_owned());
        }
    }
    drop(writer.await.unwrap());
    s.shutdown().await;
    gauge.max.load(Ordering::SeqCst)
}

#[actix::test]
async fn a_peer_flooding_requests_at_a_slow_handler_never_has_more_than_the_cap_in_flight_and_loses_nothing(
) {
    let config = WireConfig {
        max_inflight_requests: 4,
        ..WireConfig::default()
    };
    let most = flood_a_slow_handler(config, 40, 4).await;
    assert_eq!(most, 4, "the cap is reached, never passed");
}

#[actix::test]
async fn requests_beyond_the_in_flight_byte_budget_wait_for_room_and_are_all_served() {
    // each request is ~3 KB: a 4 KB budget lets one in at a time
    let config = WireConfig {
        max_inflight_bytes: 4 * 1024,
        ..WireConfig::default()
    };
    let most = flood_a_slow_handler(config, 12, 1).await;
    assert_eq!(most, 1);
}

/// Whether the endpoint acknowledged stream `id` (true) or refused it with an error (false);
/// answers about other streams (the ACK-topic copies of earlier errors) are skipped.
async fn answer_about(raw: &mut Raw, id: u64) -> bool {
    loop {
        let m = next_message(raw).await;
        match StreamMessage::parse(&m.headers).unwrap() {
            StreamMessage::Ack(a) if a.stream_id == id => return true,
            StreamMessage::Error(e) if e.stream_id == id => return false,
            _ => {}
        }
    }
}

#[actix::test]
async fn a_half_received_stream_is_dropped_after_the_idle_expiry() {
    let config = WireConfig {
        max_open_streams: 1,
        stream_idle_timeout: Duration::from_secs(1),
        ..WireConfig::default()
    };
    let mut s = server(config, None).await;
    let mut raw = raw_connect(s.addr).await;
    assert_eq!(
        raw_hello(&mut raw, "site-2").await.frame_type,
        FrameType::Ready
    );
    // stream 1: the first half, then nothing
    raw.send(chunk(1, 0, 0, 6, false, b"abc")).await.unwrap();
    // while it is open, the one stream allowed is taken
    raw.send(chunk(2, 0, 0, 3, true, b"xyz")).await.unwrap();
    assert!(
        !answer_about(&mut raw, 2).await,
        "refused while stream 1 is open"
    );
    // once it has expired, a new stream is taken (tried on a steady beat until accepted)
    let mut beat = tokio::time::interval(Duration::from_millis(50));
    let accepted_id = timeout(DEADLINE, async {
        let mut id = 3;
        loop {
            beat.tick().await;
            raw.send(chunk(id, 0, 0, 3, true, b"xyz")).await.unwrap();
            if answer_about(&mut raw, id).await {
                return id;
            }
            id += 1;
        }
    })
    .await
    .expect("the idle stream was never dropped");
    assert!(accepted_id >= 3);
    let req = timeout(DEADLINE, s.seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.payload, Payload::Bytes(Bytes::from_static(b"xyz")));
    s.shutdown().await;
}
