//! Relaying: an endpoint passes on what is addressed to a cell it does
//! not host. The fixture is NVFlare's star on loopback: a listener named `server` that hosts no
//! cell and only relays, and two client jobs `site-1.job1` and `site-2.job1` that each connect
//! to it (their own endpoints, so every message between them crosses the relay). A raw socket
//! plays a scripted peer where the headers on the wire matter. Every wait is on the event
//! itself, bounded by a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_cell::{
    header, request_handler, Cell, CellHandle, CellMessage, FireAndForget, Fqcn, Headers, MsgType,
    Payload, RequestHandler, SendRequest,
};
use fedrun_core::{CellReturnCode, Value};
use fedrun_wire::{
    message_from_frame, Frame, FrameType, HandshakeInfo, SfmCodec, StreamSendConfig, TcpTransport,
    WireConfig,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::Framed;

/// Upper bound for any single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(20);

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn fast(config: WireConfig) -> WireConfig {
    WireConfig {
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        ..config
    }
}

/// Answers every request with its own payload and reports the request.
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

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn hops(h: &Headers) -> Vec<String> {
    h.route()
        .expect("a well-formed route")
        .iter()
        .map(|(f, _)| (*f).to_owned())
        .collect()
}

fn request(target: &str, payload: impl Into<Payload>) -> SendRequest {
    SendRequest::new(
        "test",
        "echo",
        fqcn(target),
        CellMessage::new(payload.into()),
        DEADLINE,
    )
}

/// A job endpoint connected to the relay, with its cell.
struct Job {
    net: TcpTransport,
    cell: CellHandle,
}

/// The relay and two jobs; `site-2.job1` echoes on `test/*`.
struct Star {
    relay: TcpTransport,
    addr: SocketAddr,
    site1: Job,
    site2: Job,
    /// Requests seen by site-2's handler.
    seen: mpsc::Receiver<CellMessage>,
}

impl Star {
    async fn shutdown(self) {
        for job in [&self.site1, &self.site2] {
            job.cell.stop().await;
            job.net.shutdown().await;
        }
        self.relay.shutdown().await;
    }
}

async fn job(name: &str, addr: SocketAddr, config: WireConfig) -> Job {
    let me = fqcn(name);
    let net = TcpTransport::new(me.clone(), fast(config));
    net.add_connector(&format!("tcp://{addr}")).unwrap();
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    let cell = Cell::start(me, net.clone()).unwrap();
    Job { net, cell }
}

async fn star_with(relay_config: WireConfig, job_config: WireConfig) -> Star {
    init_log();
    let relay = TcpTransport::new(Fqcn::SERVER, fast(relay_config));
    let addr = relay.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let site1 = job("site-1.job1", addr, job_config.clone()).await;
    let site2 = job("site-2.job1", addr, job_config).await;
    for name in ["site-1.job1", "site-2.job1"] {
        assert!(relay.wait_for_peer(&fqcn(name), DEADLINE).await);
    }
    let (tx, seen) = mpsc::channel(16);
    site2
        .cell
        .register_request_handler("test", "*", echo(tx))
        .await
        .unwrap();
    Star {
        relay,
        addr,
        site1,
        site2,
        seen,
    }
}

async fn star() -> Star {
    star_with(WireConfig::default(), WireConfig::default()).await
}

#[actix::test]
async fn request_between_two_client_jobs_is_relayed_by_the_server_and_so_is_its_reply() {
    let mut s = star().await;
    assert_eq!(s.site1.net.peers(), vec![Fqcn::SERVER], "no direct link");
    let body = Bytes::from_static(b"hello site-2");
    let reply = s
        .site1
        .cell
        .send_request(request("site-2.job1", body.clone()))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.payload, Payload::Bytes(body));
    assert_eq!(reply.headers.origin(), Some("site-2.job1"));
    assert_eq!(reply.headers.from(), Some("server"), "this hop's sender");
    assert_eq!(reply.headers.to(), Some("site-1.job1"));
    assert_eq!(hops(&reply.headers), ["site-2.job1", "server"]);

    let seen = timeout(DEADLINE, s.seen.recv()).await.unwrap().unwrap();
    let h = &seen.headers;
    assert_eq!(h.origin(), Some("site-1.job1"));
    assert_eq!(h.destination(), Some("site-2.job1"));
    assert_eq!(h.from(), Some("server"));
    assert_eq!(h.to(), Some("site-2.job1"));
    assert_eq!(hops(h), ["site-1.job1", "server"]);
    s.shutdown().await;
}

#[actix::test]
async fn fire_and_forget_between_client_jobs_is_relayed() {
    let mut s = star().await;
    let msg = CellMessage::new(Bytes::from_static(b"note")).with_header("project_name", "demo");
    let sent = s
        .site1
        .cell
        .fire_and_forget(FireAndForget::new(
            "test",
            "note",
            vec![fqcn("site-2.job1")],
            msg,
        ))
        .await
        .unwrap();
    assert_eq!(sent.get(&fqcn("site-2.job1")), Some(&CellReturnCode::Ok));
    let seen = timeout(DEADLINE, s.seen.recv()).await.unwrap().unwrap();
    assert_eq!(seen.headers.reply_expected(), Some(false));
    assert_eq!(
        seen.headers.get("project_name").and_then(Value::as_str),
        Some("demo")
    );
    assert_eq!(seen.headers.from(), Some("server"));
    s.shutdown().await;
}

#[actix::test]
async fn streamed_request_of_12_mib_is_relayed_chunk_by_chunk_with_end_to_end_acks_and_its_streamed_reply_comes_back(
) {
    // The relay could not reassemble even one of these streams: it only passes chunks on.
    let relay_config = WireConfig {
        max_stream_blob: 1024,
        ..WireConfig::default()
    };
    // A 5 MiB window over a 12 MiB blob: the sender must wait for ACKs from site-2 (every
    // 4 MiB), which only reach it through the relay.
    let job_config = WireConfig {
        stream_send: StreamSendConfig {
            window_size: 5 * 1024 * 1024,
            ..StreamSendConfig::default()
        },
        ..WireConfig::default()
    };
    let mut s = star_with(relay_config, job_config).await;
    let body = pattern(12 * 1024 * 1024 + 17);
    let reply = s
        .site1
        .cell
        .send_request(request("site-2.job1", body.clone()))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.headers.origin(), Some("site-2.job1"));
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Reply));
    assert!(
        reply.payload == Payload::Bytes(body.clone()),
        "reply intact"
    );
    let seen = timeout(DEADLINE, s.seen.recv()).await.unwrap().unwrap();
    assert!(seen.payload == Payload::Bytes(body), "request intact");
    assert_eq!(seen.headers.origin(), Some("site-1.job1"));
    assert_eq!(seen.headers.from(), Some("server"));
    s.shutdown().await;
}

#[actix::test]
async fn request_no_connection_leads_to_comes_back_as_a_return_from_the_relay() {
    let s = star().await;
    let reply = s
        .site1
        .cell
        .send_request(request("site-3.job1", Payload::None))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Return));
    assert_eq!(reply.headers.origin(), Some("server"), "the relay answered");
    assert_eq!(
        reply
            .headers
            .get(header::RETURN_REASON)
            .and_then(Value::as_str),
        Some("cant_forward")
    );
    let original = reply
        .headers
        .get(header::ORIGINAL_HEADERS)
        .and_then(Value::as_map)
        .unwrap();
    assert_eq!(
        original.get(header::DESTINATION).and_then(Value::as_str),
        Some("site-3.job1")
    );
    s.shutdown().await;
}

#[actix::test]
async fn streamed_request_no_connection_leads_to_fails_at_once_with_comm_error_not_after_the_ack_timeout(
) {
    let s = star().await;
    let started = Instant::now();
    let req = SendRequest::new(
        "test",
        "echo",
        fqcn("site-3.job1"),
        CellMessage::new(pattern(3 * 1024 * 1024)),
        Duration::from_secs(120),
    );
    let reply = timeout(DEADLINE, s.site1.cell.send_request(req))
        .await
        .expect("answered before the deadline")
        .unwrap();
    // the relay's sm__ERROR ends the stream: a comm_error, long before the 60 s ACK timeout
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    assert!(started.elapsed() < Duration::from_secs(30));
    // and site-1's connection is still fine
    let ok = s
        .site1
        .cell
        .send_request(request("site-2.job1", Payload::None))
        .await
        .unwrap();
    assert_eq!(ok.return_code(), CellReturnCode::Ok);
    s.shutdown().await;
}

#[actix::test]
async fn bounce_between_two_relays_is_refused_as_a_loop_and_answered_with_a_return() {
    init_log();
    // server <- site-1 (a relay, like a client parent) <- site-1.job1
    let server = TcpTransport::new(Fqcn::SERVER, fast(WireConfig::default()));
    let server_addr = server.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let parent = TcpTransport::new(fqcn("site-1"), fast(WireConfig::default()));
    let parent_addr = parent.add_listener("tcp://127.0.0.1:0").await.unwrap();
    parent
        .add_connector(&format!("tcp://{server_addr}"))
        .unwrap();
    assert!(parent.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    let j = job_via("site-1.job1", parent_addr).await;
    // site-1 has no `site-1.other`: it passes it to `server` (the route rule's fallback), which
    // would hand it back to site-1 (the longest prefix): a loop, refused by the server.
    let reply = j
        .cell
        .send_request(request("site-1.other", Payload::None))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Return));
    assert_eq!(
        reply.headers.origin(),
        Some("server"),
        "refused by the server"
    );
    assert_eq!(hops(&reply.headers), ["server", "site-1"]);
    let original = reply
        .headers
        .get(header::ORIGINAL_HEADERS)
        .and_then(Value::as_map)
        .unwrap();
    let route = original
        .get(header::ROUTE)
        .and_then(Value::as_array)
        .unwrap();
    assert_eq!(route.len(), 2, "site-1.job1, then site-1: {route:?}");
    j.cell.stop().await;
    j.net.shutdown().await;
    parent.shutdown().await;
    server.shutdown().await;
}

/// A job endpoint (its name is not a child of `server`) connected to the listener at `addr`,
/// whatever that listener is called.
async fn job_via(name: &str, addr: SocketAddr) -> Job {
    let me = fqcn(name);
    let net = TcpTransport::new(me.clone(), fast(WireConfig::default()));
    net.add_connector(&format!("tcp://{addr}")).unwrap();
    let parent = me.parent().unwrap();
    assert!(net.wait_for_peer(&parent, DEADLINE).await);
    let cell = Cell::start(me, net.clone()).unwrap();
    Job { net, cell }
}

type Raw = Framed<TcpStream, SfmCodec>;

async fn raw_peer(addr: SocketAddr, name: &str) -> Raw {
    let stream = TcpStream::connect(addr).await.unwrap();
    let mut raw = Framed::new(stream, SfmCodec::new());
    let info = HandshakeInfo {
        endpoint_name: name.to_owned(),
        timestamp: Some(1.0),
        fqcn: Some(name.to_owned()),
    };
    raw.send(Frame::hello(&info).unwrap()).await.unwrap();
    let ready = next_frame(&mut raw).await;
    assert_eq!(ready.frame_type, FrameType::Ready);
    raw
}

async fn next_frame(raw: &mut Raw) -> Frame {
    timeout(DEADLINE, raw.next())
        .await
        .expect("no frame before the deadline")
        .expect("connection closed")
        .expect("bad frame")
}

/// The next DATA frame's message, PINGs answered on the way.
async fn next_message(raw: &mut Raw) -> CellMessage {
    loop {
        let frame = next_frame(raw).await;
        match frame.frame_type {
            FrameType::Data => return message_from_frame(frame).unwrap(),
            FrameType::Ping => raw.send(Frame::pong()).await.unwrap(),
            _ => {}
        }
    }
}

fn raw_request(origin: &str, dest: &str, req_id: &str, route: &[&str]) -> Frame {
    let mut h = Headers::new();
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("echo");
    h.set_origin(origin);
    h.set_destination(dest);
    h.set_from(origin);
    h.set_to("server");
    h.set_req_id(req_id);
    h.set_reply_expected(true);
    h.set_route(route.iter().map(|n| (*n, 1.0)));
    h.insert(header::PAYLOAD_ENCODING, "bytes");
    Frame::data(h, Bytes::from_static(b"raw"))
}

#[actix::test]
async fn next_hop_already_on_the_route_is_refused_unless_it_is_the_destination() {
    let mut s = star().await;
    let mut raw = raw_peer(s.addr, "site-9").await;
    assert!(s.relay.wait_for_peer(&fqcn("site-9"), DEADLINE).await);

    // site-2.job1 is on the route but it is the destination itself: delivered
    raw.send(raw_request(
        "site-9",
        "site-2.job1",
        "r1",
        &["site-9", "site-2.job1"],
    ))
    .await
    .unwrap();
    let reply = next_message(&mut raw).await;
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Reply));
    assert_eq!(reply.headers.req_id(), Some("r1"));
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.headers.from(), Some("server"));
    assert_eq!(reply.headers.to(), Some("site-9"));
    assert_eq!(hops(&reply.headers), ["site-2.job1", "server"]);
    let seen = timeout(DEADLINE, s.seen.recv()).await.unwrap().unwrap();
    assert_eq!(hops(&seen.headers), ["site-9", "site-2.job1", "server"]);

    // site-2.job1 is the next hop towards site-2.job1.sub and already on the route: a loop
    raw.send(raw_request(
        "site-9",
        "site-2.job1.sub",
        "r2",
        &["site-9", "site-2.job1"],
    ))
    .await
    .unwrap();
    let ret = next_message(&mut raw).await;
    assert_eq!(ret.headers.msg_type(), Some(MsgType::Return));
    assert_eq!(ret.headers.req_ids(), ["r2"]);
    assert_eq!(ret.headers.error(), Some("cannot forward"));
    assert_eq!(ret.headers.origin(), Some("server"), "refused by the relay");
    assert_eq!(ret.headers.destination(), Some("site-9"));
    assert!(
        s.seen.try_recv().is_err(),
        "the looping request reached no handler"
    );
    s.shutdown().await;
}

#[actix::test]
async fn relay_with_forwarding_off_answers_like_a_leaf_with_a_return() {
    let relay_config = WireConfig {
        forwarding: false,
        ..WireConfig::default()
    };
    let s = star_with(relay_config, WireConfig::default()).await;
    let reply = s
        .site1
        .cell
        .send_request(request("site-2.job1", Payload::None))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Return));
    assert_eq!(reply.headers.origin(), Some("server"));
    s.shutdown().await;
}
