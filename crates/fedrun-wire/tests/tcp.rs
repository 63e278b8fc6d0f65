//! fedrun cells over TCP on loopback: two endpoints of one process (a listener named `server`
//! and a connector named `site-1.job1`), and raw sockets that play a misbehaving or scripted
//! peer. Every wait is on the event itself, bounded by a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedrun_cell::{
    header, request_handler, Cell, CellHandle, CellMessage, FireAndForget, Fqcn, Headers, MsgType,
    Payload, SendRequest, Transport,
};
use fedrun_core::{CellReturnCode, Shareable};
use fedrun_wire::{
    frame_from_message, message_from_frame, Frame, FrameType, HandshakeInfo, SfmCodec,
    TcpTransport, WireConfig, APP_ID_CELLNET, BYE_TOPIC, CELLNET_CHANNEL, HANDSHAKE_STREAM_ID,
    HEARTBEAT_PAYLOAD, STREAM_ID_BASE,
};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::Framed;

/// Upper bound for any single wait in these tests.
const DEADLINE: Duration = Duration::from_secs(10);

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

fn job() -> Fqcn {
    fqcn("site-1.job1")
}

fn fast_config() -> WireConfig {
    WireConfig {
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        ..WireConfig::default()
    }
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// A handler that answers every request with its own payload and reports the request (the
/// first 16, unless the test reads them).
fn echo(seen: mpsc::Sender<CellMessage>) -> fedrun_cell::RequestHandler {
    request_handler(move |req: CellMessage| {
        let seen = seen.clone();
        async move {
            let payload = req.payload.clone();
            // reported only while the test has room for it: never blocks the handler
            let _ = seen.try_send(req);
            Ok(Some(CellMessage::new(payload)))
        }
    })
}

struct Pair {
    server_net: TcpTransport,
    addr: SocketAddr,
    server: CellHandle,
    job_net: TcpTransport,
    job: CellHandle,
    /// Requests seen by the server's `test/*` handler.
    seen: mpsc::Receiver<CellMessage>,
}

impl Pair {
    async fn shutdown(self) {
        self.job.stop().await;
        self.server.stop().await;
        self.job_net.shutdown().await;
        self.server_net.shutdown().await;
    }
}

/// A `server` listener with an echo handler on `test/*`, and `site-1.job1` connected to it.
async fn pair() -> Pair {
    init_log();
    let server_net = TcpTransport::new(Fqcn::SERVER, fast_config());
    let addr = server_net.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let server = Cell::start(Fqcn::SERVER, server_net.clone()).unwrap();
    let (tx, seen) = mpsc::channel(16);
    server
        .register_request_handler("test", "*", echo(tx))
        .await
        .unwrap();
    let job_net = TcpTransport::new(job(), fast_config());
    job_net.add_connector(&format!("tcp://{addr}")).unwrap();
    assert!(job_net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    assert!(server_net.wait_for_peer(&job(), DEADLINE).await);
    let job = Cell::start(job(), job_net.clone()).unwrap();
    Pair {
        server_net,
        addr,
        server,
        job_net,
        job,
        seen,
    }
}

fn shareable(round: i64) -> Shareable {
    let mut s = Shareable::new();
    s.set_header("__task_name__", "train");
    s.insert("round", round);
    s.insert("blob", Bytes::from(vec![7u8; 3000]));
    s
}

fn request(target: Fqcn, payload: impl Into<Payload>, wait: Duration) -> SendRequest {
    SendRequest::new(
        "test",
        "echo",
        target,
        CellMessage::new(payload.into()),
        wait,
    )
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

/// Sends HELLO as `name` and returns the READY.
async fn raw_hello(raw: &mut Raw, name: &str) -> Frame {
    let info = HandshakeInfo {
        endpoint_name: name.to_owned(),
        timestamp: Some(1.0),
        fqcn: Some(name.to_owned()),
    };
    let mut hello = Frame::hello(&info).unwrap();
    hello.sequence = 1;
    raw.send(hello).await.unwrap();
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

#[actix::test]
async fn request_over_tcp_gets_the_reply_with_the_shareable_payload() {
    let mut p = pair().await;
    let body = shareable(3);
    let reply = p
        .job
        .send_request(request(Fqcn::SERVER, body.clone(), DEADLINE))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.payload.as_shareable(), Some(&body));
    assert_eq!(reply.headers.origin(), Some("server"));
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Reply));
    let seen = timeout(DEADLINE, p.seen.recv()).await.unwrap().unwrap();
    let h = &seen.headers;
    assert_eq!(h.origin(), Some("site-1.job1"));
    assert_eq!(h.from(), Some("site-1.job1"));
    assert_eq!(h.to(), Some("server"));
    assert_eq!(h.reply_expected(), Some(true));
    assert!(h.req_id().is_some());
    // the encoding header is consumed by decoding, the length stays
    assert!(h.get(header::PAYLOAD_ENCODING).is_none());
    assert!(h.payload_len().is_some_and(|n| n > 3000));
    p.shutdown().await;
}

#[actix::test]
async fn listener_side_cell_reaches_the_connected_cell_too() {
    let p = pair().await;
    let (tx, mut seen) = mpsc::channel(4);
    p.job
        .register_request_handler("test", "echo", echo(tx))
        .await
        .unwrap();
    let reply = p
        .server
        .send_request(request(job(), Bytes::from_static(b"raw bytes"), DEADLINE))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(
        reply.payload,
        Payload::Bytes(Bytes::from_static(b"raw bytes"))
    );
    let req = timeout(DEADLINE, seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.headers.origin(), Some("server"));
    p.shutdown().await;
}

#[actix::test]
async fn fire_and_forget_reaches_the_handler_without_req_id() {
    let mut p = pair().await;
    let msg = CellMessage::new(shareable(1)).with_header("project_name", "demo");
    let sent = p
        .job
        .fire_and_forget(FireAndForget::new("test", "note", vec![Fqcn::SERVER], msg))
        .await
        .unwrap();
    assert_eq!(sent.get(&Fqcn::SERVER), Some(&CellReturnCode::Ok));
    let seen = timeout(DEADLINE, p.seen.recv()).await.unwrap().unwrap();
    assert_eq!(seen.headers.reply_expected(), Some(false));
    assert!(seen.headers.get(header::REQ_ID).is_none());
    assert_eq!(
        seen.headers.get("project_name").and_then(|v| v.as_str()),
        Some("demo")
    );
    assert_eq!(seen.payload.as_shareable(), Some(&shareable(1)));
    p.shutdown().await;
}

#[actix::test]
async fn unknown_target_answers_target_unreachable() {
    let p = pair().await;
    // the server has no connection that leads to site-9
    let reply = p
        .server
        .send_request(request(fqcn("site-9"), Payload::None, DEADLINE))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::TargetUnreachable);
    p.shutdown().await;
}

#[actix::test]
async fn request_for_a_cell_the_peer_does_not_host_comes_back_as_return_comm_error() {
    let p = pair().await;
    // site-9 is routed via `server`, which has no such cell and no connection that leads to it
    let reply = p
        .job
        .send_request(request(fqcn("site-9"), Payload::None, DEADLINE))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Return));
    assert_eq!(
        reply
            .headers
            .get(header::RETURN_REASON)
            .and_then(|v| v.as_str()),
        Some("cant_forward")
    );
    let original = reply.headers.get(header::ORIGINAL_HEADERS).unwrap();
    assert_eq!(
        original
            .as_map()
            .and_then(|m| m.get(header::DESTINATION))
            .and_then(|v| v.as_str()),
        Some("site-9")
    );
    p.shutdown().await;
}

#[actix::test]
async fn silent_handler_makes_the_request_time_out() {
    let p = pair().await;
    p.server
        .register_request_handler(
            "quiet",
            "*",
            request_handler(|_req: CellMessage| async { Ok(None) }),
        )
        .await
        .unwrap();
    let req = SendRequest::new(
        "quiet",
        "x",
        Fqcn::SERVER,
        CellMessage::empty(),
        Duration::from_millis(300),
    );
    let reply = p.job.send_request(req).await.unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Timeout);
    // the connection is still fine afterwards
    let reply = p
        .job
        .send_request(request(Fqcn::SERVER, Payload::None, DEADLINE))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    p.shutdown().await;
}

#[actix::test]
async fn request_to_server_job_cell_is_routed_via_the_server_connection() {
    let p = pair().await;
    // the server endpoint also hosts the server job cell (as the server parent forwards to it)
    let sj_name = fqcn("server.job1");
    let sj = Cell::start(sj_name.clone(), p.server_net.clone()).unwrap();
    let (tx, mut seen) = mpsc::channel(4);
    sj.register_request_handler("aux_communication", "*", echo(tx))
        .await
        .unwrap();
    assert_eq!(p.job_net.peers(), vec![Fqcn::SERVER]);
    let req = SendRequest::new(
        "aux_communication",
        "ping",
        sj_name.clone(),
        CellMessage::new(shareable(5)),
        DEADLINE,
    );
    let reply = p.job.send_request(req).await.unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.headers.origin(), Some("server.job1"));
    // the server job cell's reply left through the server endpoint: a forward hop
    assert_eq!(reply.headers.from(), Some("server"));
    let hops: Vec<String> = reply
        .headers
        .route()
        .unwrap()
        .iter()
        .map(|(f, _)| (*f).to_owned())
        .collect();
    assert_eq!(hops, ["server.job1", "server"]);
    let got = timeout(DEADLINE, seen.recv()).await.unwrap().unwrap();
    assert_eq!(got.headers.destination(), Some("server.job1"));
    assert_eq!(got.headers.to(), Some("server"));
    assert_eq!(got.payload.as_shareable(), Some(&shareable(5)));
    sj.stop().await;
    p.shutdown().await;
}

#[actix::test]
async fn ping_is_answered_with_pong() {
    let p = pair().await;
    let mut raw = raw_connect(p.addr).await;
    let ready = raw_hello(&mut raw, "site-2").await;
    assert_eq!(ready.frame_type, FrameType::Ready);
    assert_eq!(ready.stream_id, HANDSHAKE_STREAM_ID);
    assert_eq!(
        HandshakeInfo::decode(&ready.payload).unwrap().endpoint_name,
        "server"
    );
    raw.send(Frame::ping()).await.unwrap();
    let pong = next_frame(&mut raw).await;
    assert_eq!(pong.frame_type, FrameType::Pong);
    assert_eq!(&pong.payload[..], HEARTBEAT_PAYLOAD);
    assert_eq!(pong.app_id, 0);
    assert_eq!(pong.sequence, 2, "READY was 1");
    assert_eq!(pong.stream_id, STREAM_ID_BASE + 1);
    p.shutdown().await;
}

#[actix::test]
async fn garbage_frame_closes_only_that_connection_and_the_listener_keeps_accepting() {
    let p = pair().await;
    let mut raw = raw_connect(p.addr).await;
    raw_hello(&mut raw, "site-2").await;
    assert!(p.server_net.wait_for_peer(&fqcn("site-2"), DEADLINE).await);
    // a prefix whose length (3) is shorter than the prefix itself
    let garbage = [0u8, 0, 0, 3, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0];
    raw.get_mut().try_write(&garbage).unwrap();
    expect_closed(&mut raw).await;
    assert!(
        p.server_net
            .wait_for_peer_gone(&fqcn("site-2"), DEADLINE)
            .await
    );
    // the other connection is untouched
    let reply = p
        .job
        .send_request(request(Fqcn::SERVER, shareable(2), DEADLINE))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    // and the listener still accepts
    let mut again = raw_connect(p.addr).await;
    assert_eq!(
        raw_hello(&mut again, "site-2").await.frame_type,
        FrameType::Ready
    );
    p.shutdown().await;
}

#[actix::test]
async fn undecodable_payload_closes_the_connection() {
    let p = pair().await;
    let mut raw = raw_connect(p.addr).await;
    raw_hello(&mut raw, "site-3").await;
    let mut h = Headers::new();
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("echo");
    h.set_origin("site-3");
    h.set_destination("server");
    h.set_req_id("r1");
    h.set_reply_expected(true);
    h.insert(header::PAYLOAD_ENCODING, "fobs");
    raw.send(Frame::data(h, Bytes::from_static(b"not a lobs container")))
        .await
        .unwrap();
    expect_closed(&mut raw).await;
    assert!(
        p.server_net
            .wait_for_peer_gone(&fqcn("site-3"), DEADLINE)
            .await
    );
    let reply = p
        .job
        .send_request(request(Fqcn::SERVER, Payload::None, DEADLINE))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    p.shutdown().await;
}

#[actix::test]
async fn a_newcomer_claiming_a_live_peers_name_is_refused_and_only_a_half_open_one_is_replaced() {
    let p = pair().await;
    let mut first = raw_connect(p.addr).await;
    raw_hello(&mut first, "site-4").await;
    // the first connection answers PINGs until told to stop, then goes quiet (half open)
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let responder = tokio::spawn(async move {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped => return first,
                f = first.next() => match f {
                    Some(Ok(f)) if f.frame_type == FrameType::Ping => {
                        first.send(Frame::pong()).await.unwrap();
                    }
                    Some(Ok(_)) => {}
                    _ => panic!("the live connection was closed"),
                },
            }
        }
    });
    let mut second = raw_connect(p.addr).await;
    raw_hello(&mut second, "site-4").await;
    expect_closed(&mut second).await;
    assert!(!responder.is_finished(), "the live connection is kept");

    stop.send(()).unwrap();
    let mut first = responder.await.unwrap();
    let mut third = raw_connect(p.addr).await;
    assert_eq!(
        raw_hello(&mut third, "site-4").await.frame_type,
        FrameType::Ready
    );
    // the silent one is taken for half open and replaced by the newcomer
    expect_closed(&mut first).await;
    third.send(Frame::ping()).await.unwrap();
    loop {
        if next_frame(&mut third).await.frame_type == FrameType::Pong {
            break;
        }
    }
    assert!(p.server_net.is_connected(&fqcn("site-4")));
    p.shutdown().await;
}

#[actix::test]
async fn handshake_with_the_listeners_own_name_or_an_invalid_name_is_refused() {
    let p = pair().await;
    for name in ["server", "bad..name", "sp ace"] {
        let mut raw = raw_connect(p.addr).await;
        let info = HandshakeInfo {
            endpoint_name: name.to_owned(),
            timestamp: None,
            fqcn: None,
        };
        raw.send(Frame::hello(&info).unwrap()).await.unwrap();
        expect_closed(&mut raw).await;
    }
    // a DATA frame instead of HELLO is refused too
    let mut raw = raw_connect(p.addr).await;
    raw.send(Frame::ping()).await.unwrap();
    expect_closed(&mut raw).await;
    assert_eq!(p.server_net.peers(), vec![job()]);
    p.shutdown().await;
}

#[actix::test]
async fn incoming_bye_is_answered_ok_with_an_empty_payload() {
    let p = pair().await;
    let mut raw = raw_connect(p.addr).await;
    raw_hello(&mut raw, "site-5").await;
    let mut h = Headers::new();
    h.set_msg_type(MsgType::Req);
    h.set_channel(CELLNET_CHANNEL);
    h.set_topic(BYE_TOPIC);
    h.set_origin("site-5");
    h.set_destination("server");
    h.set_req_id("bye-1");
    h.set_reply_expected(true);
    h.set_optional(true);
    let frame = frame_from_message(CellMessage {
        headers: h,
        payload: Payload::None,
    })
    .unwrap();
    raw.send(frame).await.unwrap();
    let answer = next_frame(&mut raw).await;
    assert_eq!(answer.frame_type, FrameType::Data);
    assert_eq!(answer.app_id, APP_ID_CELLNET);
    assert!(answer.payload.is_empty());
    let h = answer.headers.clone().unwrap();
    assert_eq!(
        h.get(header::PAYLOAD_ENCODING).and_then(|v| v.as_str()),
        Some("none")
    );
    let reply = message_from_frame(answer).unwrap();
    let h = &reply.headers;
    assert_eq!(h.msg_type(), Some(MsgType::Reply));
    assert_eq!(h.return_code().unwrap().as_str(), "ok");
    assert_eq!(h.req_id(), Some("bye-1"));
    assert_eq!(h.destination(), Some("site-5"));
    assert_eq!(h.to(), Some("site-5"));
    assert_eq!(h.optional(), Some(true));
    p.shutdown().await;
}

/// A raw listener playing `server`: accepts one connection and answers its HELLO.
async fn raw_accept(listener: &TcpListener) -> (Raw, HandshakeInfo) {
    let (stream, _) = timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
    let mut raw = Framed::new(stream, SfmCodec::new());
    let hello = next_frame(&mut raw).await;
    assert_eq!(hello.frame_type, FrameType::Hello);
    assert_eq!((hello.sequence, hello.stream_id), (1, HANDSHAKE_STREAM_ID));
    let info = HandshakeInfo::decode(&hello.payload).unwrap();
    let mut ready = Frame::ready(&HandshakeInfo::now(&Fqcn::SERVER)).unwrap();
    ready.sequence = 1;
    raw.send(ready).await.unwrap();
    (raw, info)
}

#[actix::test]
async fn outgoing_data_frames_carry_nvflare_counters_and_cellnet_headers() {
    init_log();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let net = TcpTransport::new(job(), fast_config());
    net.add_connector(&format!("tcp://{addr}")).unwrap();
    let (mut raw, info) = raw_accept(&listener).await;
    assert_eq!(info.endpoint_name, "site-1.job1");
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    let cell = Cell::start(job(), net.clone()).unwrap();
    for _ in 0..2 {
        let sent = cell
            .fire_and_forget(FireAndForget::new(
                "aux_communication",
                "note",
                vec![fqcn("server.job1")],
                CellMessage::new(shareable(9)),
            ))
            .await
            .unwrap();
        assert_eq!(sent.get(&fqcn("server.job1")), Some(&CellReturnCode::Ok));
    }
    let first = next_frame(&mut raw).await;
    let second = next_frame(&mut raw).await;
    assert_eq!((first.sequence, first.stream_id), (2, 17));
    assert_eq!((second.sequence, second.stream_id), (3, 18));
    assert_eq!(first.app_id, APP_ID_CELLNET);
    let h = first.headers.clone().unwrap();
    assert_eq!(
        h.get(header::PAYLOAD_ENCODING).and_then(|v| v.as_str()),
        Some("fobs")
    );
    assert_eq!(h.payload_len(), Some(first.payload.len() as u64));
    assert_eq!(h.from(), Some("site-1.job1"));
    assert_eq!(h.to(), Some("server"), "next hop, not the destination");
    assert_eq!(h.destination(), Some("server.job1"));
    let msg = message_from_frame(first).unwrap();
    assert_eq!(msg.payload.as_shareable(), Some(&shareable(9)));
    cell.stop().await;
    net.shutdown().await;
}

#[actix::test]
async fn connector_reconnects_after_the_connection_drops() {
    init_log();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let net = TcpTransport::new(job(), fast_config());
    net.add_connector(&format!("tcp://{addr}")).unwrap();
    let (raw, _) = raw_accept(&listener).await;
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    drop(raw);
    assert!(net.wait_for_peer_gone(&Fqcn::SERVER, DEADLINE).await);
    let (_raw, info) = raw_accept(&listener).await;
    assert_eq!(info.endpoint_name, "site-1.job1");
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    net.shutdown().await;
}

#[actix::test]
async fn idle_connection_gets_a_ping() {
    init_log();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = WireConfig {
        heartbeat_interval: Duration::from_millis(100),
        ..fast_config()
    };
    let net = TcpTransport::new(job(), config);
    net.add_connector(&format!("tcp://{addr}")).unwrap();
    let (mut raw, _) = raw_accept(&listener).await;
    let ping = next_frame(&mut raw).await;
    assert_eq!(ping.frame_type, FrameType::Ping);
    assert_eq!(&ping.payload[..], HEARTBEAT_PAYLOAD);
    net.shutdown().await;
}

#[actix::test]
async fn shutdown_says_bye_to_every_peer_then_closes() {
    init_log();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let net = TcpTransport::new(job(), fast_config());
    net.add_connector(&format!("tcp://{addr}")).unwrap();
    let (mut raw, _) = raw_accept(&listener).await;
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    net.shutdown().await;
    let bye = message_from_frame(next_frame(&mut raw).await).unwrap();
    assert_eq!(bye.headers.channel(), Some(CELLNET_CHANNEL));
    assert_eq!(bye.headers.topic(), Some(BYE_TOPIC));
    assert_eq!(bye.headers.reply_expected(), Some(true));
    assert!(bye.payload.is_none());
    expect_closed(&mut raw).await;
    assert!(net.peers().is_empty() || net.wait_for_peer_gone(&Fqcn::SERVER, DEADLINE).await);
    assert!(net.add_connector(&format!("tcp://{addr}")).is_err());
}

#[actix::test]
async fn many_concurrent_requests_share_one_connection() {
    let p = pair().await;
    let job = Arc::new(p.job.clone());
    let calls = (0..50).map(|i| {
        let job = Arc::clone(&job);
        async move {
            job.send_request(request(Fqcn::SERVER, shareable(i), DEADLINE))
                .await
                .unwrap()
        }
    });
    let replies = futures::future::join_all(calls).await;
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.return_code(), CellReturnCode::Ok);
        assert_eq!(r.payload.as_shareable(), Some(&shareable(i as i64)));
    }
    p.shutdown().await;
}

#[actix::test]
async fn message_for_the_endpoints_own_name_without_a_cell_never_leaves() {
    let p = pair().await;
    let net = TcpTransport::new(fqcn("site-1.job2"), fast_config());
    net.add_connector(&format!("tcp://{}", p.addr)).unwrap();
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    // without the rule it would leave on the `server` fallback connection
    let to_self = CellMessage::empty().with_header(header::DESTINATION, "site-1.job2");
    assert_eq!(
        Transport::route(&net, to_self).await,
        Err(CellReturnCode::TargetUnreachable)
    );
    assert_eq!(
        Transport::route(&net, CellMessage::empty()).await,
        Err(CellReturnCode::InvalidTarget)
    );
    net.shutdown().await;
    p.shutdown().await;
}

/// The credentials of a client job, as its `WireConfig::outgoing_headers`.
fn credentials() -> Vec<(String, String)> {
    [
        ("client_name", "site-1"),
        ("ssid", "NA"),
        ("__token__", "tok-1"),
        ("__token_signature__", "sig-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn assert_has_credentials(frame: &Frame, what: &str) {
    let h = frame.headers.as_ref().expect("a DATA frame has headers");
    for (k, v) in credentials() {
        assert_eq!(
            h.get(&k).and_then(|x| x.as_str()),
            Some(v.as_str()),
            "{what}: header {k}"
        );
    }
}

#[actix::test]
async fn outgoing_headers_are_on_every_data_frame_requests_replies_and_bye() {
    init_log();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = WireConfig {
        outgoing_headers: credentials(),
        ..fast_config()
    };
    let net = TcpTransport::new(job(), config);
    net.add_connector(&format!("tcp://{addr}")).unwrap();
    let (mut raw, _) = raw_accept(&listener).await;
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    let cell = Cell::start(job(), net.clone()).unwrap();
    let (tx, _seen) = mpsc::channel(16);
    cell.register_request_handler("test", "*", echo(tx))
        .await
        .unwrap();

    // a request of the job cell
    cell.fire_and_forget(FireAndForget::new(
        "aux_communication",
        "note",
        vec![fqcn("server.job1")],
        CellMessage::new(shareable(1)),
    ))
    .await
    .unwrap();
    let sent = next_frame(&mut raw).await;
    assert_has_credentials(&sent, "fire-and-forget request");

    // the reply to a request from the peer
    let mut h = Headers::new();
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("echo");
    h.set_origin("server.job1");
    h.set_destination("site-1.job1");
    h.set_req_id("r-1");
    h.set_reply_expected(true);
    let req = frame_from_message(CellMessage {
        headers: h,
        payload: Payload::shareable(shareable(2)),
    })
    .unwrap();
    raw.send(req).await.unwrap();
    let reply = next_frame(&mut raw).await;
    assert_eq!(
        reply.headers.as_ref().unwrap().req_id(),
        Some("r-1"),
        "the reply to r-1"
    );
    assert_has_credentials(&reply, "reply");

    // the goodbye at shutdown
    cell.stop().await;
    let shutdown = tokio::spawn({
        let net = net.clone();
        async move { net.shutdown().await }
    });
    let bye = next_frame(&mut raw).await;
    assert_eq!(
        bye.headers.as_ref().unwrap().topic(),
        Some(BYE_TOPIC),
        "the goodbye"
    );
    assert_has_credentials(&bye, "bye");
    drop(raw);
    timeout(DEADLINE, shutdown).await.unwrap().unwrap();
}

#[actix::test]
async fn a_frame_bigger_than_a_hello_before_the_handshake_closes_the_connection_at_its_prefix() {
    let p = pair().await;
    // a HELLO whose prefix announces 1 GiB, followed by a little of it: refused at the prefix,
    // nothing is buffered for it
    let info = HandshakeInfo {
        endpoint_name: "site-7".to_owned(),
        timestamp: Some(1.0),
        fqcn: Some("site-7".to_owned()),
    };
    let mut hello = Frame::hello(&info).unwrap().encode().unwrap().to_vec();
    hello[..4].copy_from_slice(&(1u32 << 30).to_be_bytes());
    let mut stream = TcpStream::connect(p.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, &hello)
        .await
        .unwrap();
    let mut raw = Framed::new(stream, SfmCodec::new());
    expect_closed(&mut raw).await;

    // a HELLO over the handshake limit (an endpoint name of 10 KiB) is refused as well
    let mut raw = raw_connect(p.addr).await;
    let name = "s".repeat(10 * 1024);
    let info = HandshakeInfo {
        endpoint_name: name.clone(),
        timestamp: Some(1.0),
        fqcn: Some(name),
    };
    let mut big = Frame::hello(&info).unwrap();
    big.sequence = 1;
    assert!(big.encode().unwrap().len() > fedrun_wire::HANDSHAKE_MAX_FRAME_SIZE);
    raw.send(big).await.unwrap();
    expect_closed(&mut raw).await;

    // the listener goes on, and a handshaken connection still takes big frames
    let reply = p
        .job
        .send_request(request(
            Fqcn::SERVER,
            Bytes::from(vec![5u8; 256 * 1024]),
            DEADLINE,
        ))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.payload.as_bytes().map(|b| b.len()), Some(256 * 1024));
    let mut raw = raw_connect(p.addr).await;
    assert_eq!(
        raw_hello(&mut raw, "site-8").await.frame_type,
        FrameType::Ready
    );
    p.shutdown().await;
}

/// A request frame from a raw peer: `origin` is whatever the peer claims.
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

#[actix::test]
async fn a_peer_that_connected_cannot_speak_as_another_cell_and_is_neither_served_nor_relayed() {
    let mut p = pair().await;
    // the job cell records what reaches it
    let (job_tx, mut job_seen) = mpsc::channel(16);
    p.job
        .register_request_handler("test", "*", echo(job_tx))
        .await
        .unwrap();
    let mut raw = raw_connect(p.addr).await;
    raw_hello(&mut raw, "site-9").await;

    // as the server itself, as the server job (to be relayed to the job: NVFlare's
    // `__end_run__` forgery), and as another site's job: all refused
    for (i, forged) in ["server", "server.job1", "site-1.job1"]
        .into_iter()
        .enumerate()
    {
        raw.send(raw_request(forged, "server", &format!("f{i}")))
            .await
            .unwrap();
        raw.send(raw_request(forged, "site-1.job1", &format!("g{i}")))
            .await
            .unwrap();
    }
    // then the peer as itself, to the server and, relayed, to the job: served
    raw.send(raw_request("site-9", "server", "ok-1"))
        .await
        .unwrap();
    let reply = next_frame(&mut raw).await;
    let h = reply.headers.as_ref().unwrap();
    assert_eq!(
        h.req_id(),
        Some("ok-1"),
        "the forged requests got no answer"
    );
    let seen = timeout(DEADLINE, p.seen.recv()).await.unwrap().unwrap();
    assert_eq!(
        seen.headers.origin(),
        Some("site-9"),
        "no forged request was served"
    );
    raw.send(raw_request("site-9", "site-1.job1", "ok-2"))
        .await
        .unwrap();
    let relayed = timeout(DEADLINE, job_seen.recv()).await.unwrap().unwrap();
    assert_eq!(
        relayed.headers.origin(),
        Some("site-9"),
        "no forged request was relayed"
    );
    assert_eq!(relayed.headers.req_id(), Some("ok-2"));
    p.shutdown().await;
}
