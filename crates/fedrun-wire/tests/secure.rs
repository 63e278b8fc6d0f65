//! Secure messages (`cn__secure`) on the wire: sealed for the destination after a key
//! exchange, opened before delivery, never sent in clear. Fixtures: NVFlare's star on
//! loopback (a relay `server` without credentials, client jobs with the generated test kit of
//! `fedrun-secure/tests/data/kit`), and a raw socket playing an NVFlare job cell where the
//! bytes on the wire matter. Every wait is on the event itself, bounded by a deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedrun_cell::{
    header, request_handler, Cell, CellHandle, CellMessage, Fqcn, Headers, MsgType, Payload,
    RequestHandler, SendRequest,
};
use fedrun_core::{CellReturnCode, Map, Shareable, Value};
use fedrun_secure::{CellCipher, CellCredentials, VerifyTime};
use fedrun_wire::{
    frame_from_message, message_from_frame, Frame, FrameType, HandshakeInfo, SfmCodec,
    TcpTransport, WireConfig,
};
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::Framed;

const DEADLINE: Duration = Duration::from_secs(20);
/// Inside the test kit's validity (2026-11-29 .. 2027-11-24): the tests never expire.
const KIT_TIME: VerifyTime = VerifyTime::Fixed(1_796_083_200);

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn kit(participant: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fedrun-secure/tests/data/kit")
        .join(participant)
}

fn creds(participant: &str) -> Arc<CellCredentials> {
    Arc::new(
        CellCredentials::from_startup_kit(kit(participant))
            .unwrap()
            .with_verify_time(KIT_TIME),
    )
}

fn config(participant: Option<&str>) -> WireConfig {
    WireConfig {
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        secure: participant.map(creds),
        ..WireConfig::default()
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

fn secure_request(target: &str, payload: impl Into<Payload>) -> SendRequest {
    secure_request_on("test", target, payload)
}

fn secure_request_on(channel: &str, target: &str, payload: impl Into<Payload>) -> SendRequest {
    SendRequest::new(
        channel,
        "echo",
        fqcn(target),
        CellMessage::new(payload.into()),
        DEADLINE,
    )
    .with_secure(true)
}

fn shareable(n: i64, blob_len: usize) -> Shareable {
    let mut s = Shareable::new();
    s.insert("n", n);
    let blob: Vec<u8> = (0..blob_len).map(|i| (i % 251) as u8).collect();
    s.insert("blob", Value::Bin(Bytes::from(blob)));
    s
}

struct Job {
    net: TcpTransport,
    cell: CellHandle,
}

async fn job(name: &str, addr: SocketAddr, config: WireConfig) -> Job {
    let net = TcpTransport::new(fqcn(name), config);
    net.add_connector(&format!("tcp://{addr}")).unwrap();
    assert!(net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    let cell = Cell::start(fqcn(name), net.clone()).unwrap();
    Job { net, cell }
}

#[actix::test]
async fn secure_requests_between_jobs_cross_the_relay_sealed_and_their_replies_come_back_opened() {
    init_log();
    // the relay has no credentials: it never needs to open anything
    let relay = TcpTransport::new(Fqcn::SERVER, config(None));
    let addr = relay.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let site1 = job("site-1.J1", addr, config(Some("site-1"))).await;
    let site2 = job("site-2.J1", addr, config(Some("site-2"))).await;
    assert!(relay.wait_for_peer(&fqcn("site-2.J1"), DEADLINE).await);
    let (tx, mut seen) = mpsc::channel(16);
    site2
        .cell
        .register_request_handler("test", "*", echo(tx))
        .await
        .unwrap();
    // small (one frame, after the key exchange), then 3 MiB (streamed, sealed chunk by chunk,
    // with a streamed sealed reply)
    for (n, blob) in [(1, 16), (2, 16), (3, 3 * 1024 * 1024)] {
        let body = shareable(n, blob);
        let reply = site1
            .cell
            .send_request(secure_request("site-2.J1", body.clone()))
            .await
            .unwrap();
        assert_eq!(reply.return_code(), CellReturnCode::Ok, "request {n}");
        assert_eq!(reply.payload.as_shareable(), Some(&body), "request {n}");
        assert_eq!(reply.headers.secure(), Some(true));
        let req = timeout(DEADLINE, seen.recv()).await.unwrap().unwrap();
        assert_eq!(req.headers.secure(), Some(true));
        assert!(!req.headers.contains_key(header::ENCRYPTED));
    }
    for j in [&site1, &site2] {
        j.cell.stop().await;
        j.net.shutdown().await;
    }
    relay.shutdown().await;
}

type Raw = Framed<TcpStream, SfmCodec>;

/// A raw NVFlare job cell `name` connected to `addr`.
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

/// The next DATA frame, PINGs answered on the way.
async fn next_data(raw: &mut Raw) -> Frame {
    loop {
        let frame = next_frame(raw).await;
        match frame.frame_type {
            FrameType::Data => return frame,
            FrameType::Ping => raw.send(Frame::pong()).await.unwrap(),
            _ => {}
        }
    }
}

/// A fedrun endpoint `site-1.J1` listening, with an echo cell, and the raw `site-2.J1`.
struct Pair {
    net: TcpTransport,
    cell: CellHandle,
    raw: Raw,
    seen: mpsc::Receiver<CellMessage>,
}

async fn pair(with_credentials: bool) -> Pair {
    init_log();
    let cfg = config(with_credentials.then_some("site-1"));
    let net = TcpTransport::new(fqcn("site-1.J1"), cfg);
    let addr = net.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let cell = Cell::start(fqcn("site-1.J1"), net.clone()).unwrap();
    let (tx, seen) = mpsc::channel(16);
    cell.register_request_handler("test", "*", echo(tx))
        .await
        .unwrap();
    let raw = raw_peer(addr, "site-2.J1").await;
    assert!(net.wait_for_peer(&fqcn("site-2.J1"), DEADLINE).await);
    Pair {
        net,
        cell,
        raw,
        seen,
    }
}

fn cert_map(cipher: &CellCipher) -> Payload {
    let c = cipher.credentials();
    let map: Map = [
        (
            Value::from("cert_content"),
            Value::Bin(Bytes::copy_from_slice(c.cert().pem())),
        ),
        (
            Value::from("cert_ca_content"),
            Value::Bin(Bytes::copy_from_slice(c.roots().pem())),
        ),
    ]
    .into_iter()
    .collect();
    Payload::value(Value::Map(map))
}

/// Headers of a message from the raw `site-2.J1` to `site-1.J1`.
fn raw_headers(channel: &str, topic: &str, msg_type: MsgType, req_id: &str) -> Headers {
    let mut h = Headers::new();
    h.set_msg_type(msg_type);
    h.set_channel(channel);
    h.set_topic(topic);
    h.set_origin("site-2.J1");
    h.set_destination("site-1.J1");
    h.set_from("site-2.J1");
    h.set_to("site-1.J1");
    h.set_req_id(req_id);
    h.set_route([("site-2.J1", 1.0)]);
    h
}

fn raw_cipher() -> CellCipher {
    CellCipher::new(creds("site-2"))
}

/// Answers the key-exchange request `req` with the raw peer's certificate.
async fn answer_key_exchange(raw: &mut Raw, cipher: &CellCipher, req: &CellMessage) {
    let mut h = raw_headers(
        "credential_manager",
        "key_exchange",
        MsgType::Reply,
        req.headers.req_id().unwrap(),
    );
    h.set_destination(req.headers.origin().unwrap());
    h.set_return_code(CellReturnCode::Ok);
    let frame = frame_from_message(CellMessage {
        headers: h,
        payload: cert_map(cipher),
    })
    .unwrap();
    raw.send(frame).await.unwrap();
}

#[actix::test]
async fn a_secure_request_leaves_as_an_envelope_that_only_its_destination_opens() {
    let mut p = pair(true).await;
    let cipher = raw_cipher();
    let body = shareable(7, 100);
    let cell = p.cell.clone();
    let sent = body.clone();
    // on `task`, a channel NVFlare never streams: one frame
    let asking = tokio::spawn(async move {
        cell.send_request(secure_request_on("task", "site-2.J1", sent))
            .await
    });
    // 1. the key exchange: plain, FOBS, site-1's certificate offered
    let kx = message_from_frame(next_data(&mut p.raw).await).unwrap();
    assert_eq!(kx.headers.channel(), Some("credential_manager"));
    assert_eq!(kx.headers.topic(), Some("key_exchange"));
    assert_eq!(kx.headers.secure(), Some(false));
    assert_eq!(kx.headers.origin(), Some("site-1.J1"));
    let offered = kx.payload.as_value().unwrap().as_map().unwrap();
    let pem = offered.get("cert_content").unwrap().as_bin().unwrap();
    cipher.accept_peer("site-1.J1", pem).unwrap();
    answer_key_exchange(&mut p.raw, &cipher, &kx).await;
    // 2. the request itself: an envelope, the cleartext's encoding and length in the headers
    let frame = next_data(&mut p.raw).await;
    let h = frame.headers.clone().unwrap();
    assert_eq!(h.secure(), Some(true));
    assert_eq!(
        h.get(header::ENCRYPTED).and_then(Value::as_bool),
        Some(true)
    );
    assert_eq!(
        h.get(header::PAYLOAD_ENCODING).and_then(Value::as_str),
        Some("fobs")
    );
    let clear_len = h
        .get(header::CLEAR_PAYLOAD_LEN)
        .and_then(Value::as_u64)
        .unwrap();
    assert_eq!(frame.payload.len() as u64, clear_len + 541);
    assert_eq!(h.payload_len(), Some(frame.payload.len() as u64));
    let clear = cipher.decrypt_from("site-1.J1", &frame.payload).unwrap();
    let decoded = fedrun_wire::decode_payload(Some("fobs"), Bytes::from(clear)).unwrap();
    assert_eq!(decoded.as_shareable(), Some(&body));
    // 3. a sealed reply from the raw cell is opened for the waiting request
    let mut r = raw_headers("task", "echo", MsgType::Reply, h.req_id().unwrap());
    r.set_return_code(CellReturnCode::Ok);
    r.set_secure(true);
    let answer = b"sealed answer";
    r.insert(header::CLEAR_PAYLOAD_LEN, answer.len() as u64);
    r.insert(header::ENCRYPTED, true);
    r.insert(header::PAYLOAD_ENCODING, "bytes");
    let env = cipher.encrypt_for("site-1.J1", answer).unwrap();
    p.raw.send(Frame::data(r, Bytes::from(env))).await.unwrap();
    let reply = timeout(DEADLINE, asking).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.payload.as_bytes().map(|b| &b[..]), Some(&answer[..]));
    p.cell.stop().await;
    p.net.shutdown().await;
}

#[actix::test]
async fn a_secure_send_without_credentials_fails_with_authentication_error_and_nothing_leaves() {
    let mut p = pair(false).await;
    let reply = p
        .cell
        .send_request(secure_request("site-2.J1", shareable(1, 8)))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::AuthenticationError);
    // the next frame the peer sees is a later plain message: the secure one never left
    let plain = SendRequest::new(
        "test",
        "marker",
        fqcn("site-2.J1"),
        CellMessage::new(Payload::Bytes(Bytes::from_static(b"plain"))),
        Duration::from_millis(1),
    );
    let _ = p.cell.send_request(plain).await;
    let first = message_from_frame(next_data(&mut p.raw).await).unwrap();
    assert_eq!(first.headers.topic(), Some("marker"));
    p.cell.stop().await;
    p.net.shutdown().await;
}

#[actix::test]
async fn a_key_exchange_is_answered_at_once_with_the_certificate_or_a_cert_error() {
    for with_credentials in [true, false] {
        let mut p = pair(with_credentials).await;
        let cipher = raw_cipher();
        let mut h = raw_headers("credential_manager", "key_exchange", MsgType::Req, "kx-1");
        h.set_reply_expected(true);
        let frame = frame_from_message(CellMessage {
            headers: h,
            payload: cert_map(&cipher),
        })
        .unwrap();
        p.raw.send(frame).await.unwrap();
        let reply = message_from_frame(next_data(&mut p.raw).await).unwrap();
        assert_eq!(reply.headers.req_id(), Some("kx-1"));
        assert_eq!(reply.headers.destination(), Some("site-2.J1"));
        assert_eq!(reply.return_code(), CellReturnCode::Ok);
        let map = reply.payload.as_value().unwrap().as_map().unwrap();
        if with_credentials {
            let pem = map.get("cert_content").unwrap().as_bin().unwrap();
            assert_eq!(cipher.accept_peer("site-1.J1", pem).unwrap().cn(), "site-1");
        } else {
            assert!(map.get("cert_error").is_some());
        }
        p.cell.stop().await;
        p.net.shutdown().await;
    }
}

#[actix::test]
async fn a_certificate_not_bound_to_its_cell_is_refused_with_process_exception() {
    let mut p = pair(true).await;
    // site-1's certificate offered by site-2.J1
    let impostor = CellCipher::new(creds("site-1"));
    let mut h = raw_headers("credential_manager", "key_exchange", MsgType::Req, "kx-2");
    h.set_reply_expected(true);
    let frame = frame_from_message(CellMessage {
        headers: h,
        payload: cert_map(&impostor),
    })
    .unwrap();
    p.raw.send(frame).await.unwrap();
    let reply = message_from_frame(next_data(&mut p.raw).await).unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::ProcessException);
    p.cell.stop().await;
    p.net.shutdown().await;
}

/// A sealed `test/echo` request from the raw `site-2.J1`.
fn sealed_request(cipher: &CellCipher, req_id: &str, clear: &[u8]) -> Frame {
    let mut h = raw_headers("test", "echo", MsgType::Req, req_id);
    h.set_reply_expected(true);
    h.set_secure(true);
    h.insert(header::PAYLOAD_ENCODING, "bytes");
    h.insert(header::CLEAR_PAYLOAD_LEN, clear.len() as u64);
    h.insert(header::ENCRYPTED, true);
    let env = cipher.encrypt_for("site-1.J1", clear).unwrap();
    Frame::data(h, Bytes::from(env))
}

#[actix::test]
async fn a_sealed_request_from_an_unknown_origin_waits_for_its_certificate_then_is_answered_sealed()
{
    let mut p = pair(true).await;
    let cipher = raw_cipher();
    cipher
        .accept_peer("site-1.J1", creds("site-1").cert().pem())
        .unwrap();
    // no key exchange first: site-1 must ask for site-2.J1's certificate itself
    p.raw
        .send(sealed_request(&cipher, "r-1", b"first"))
        .await
        .unwrap();
    p.raw
        .send(sealed_request(&cipher, "r-2", b"second"))
        .await
        .unwrap();
    let kx = message_from_frame(next_data(&mut p.raw).await).unwrap();
    assert_eq!(kx.headers.topic(), Some("key_exchange"));
    assert_eq!(kx.headers.destination(), Some("site-2.J1"));
    answer_key_exchange(&mut p.raw, &cipher, &kx).await;
    // both requests reach the handler in their order, and are answered sealed
    for (id, clear) in [("r-1", &b"first"[..]), ("r-2", b"second")] {
        let req = timeout(DEADLINE, p.seen.recv()).await.unwrap().unwrap();
        assert_eq!(req.payload.as_bytes().map(|b| &b[..]), Some(clear));
        let frame = next_data(&mut p.raw).await;
        let h = frame.headers.clone().unwrap();
        assert_eq!(h.req_id(), Some(id));
        assert_eq!(
            h.get(header::ENCRYPTED).and_then(Value::as_bool),
            Some(true)
        );
        assert_eq!(
            cipher.decrypt_from("site-1.J1", &frame.payload).unwrap(),
            clear
        );
    }
    p.cell.stop().await;
    p.net.shutdown().await;
}

#[actix::test]
async fn a_tampered_envelope_is_dropped_and_its_request_answered_authentication_error() {
    let mut p = pair(true).await;
    let cipher = raw_cipher();
    // exchange first, as NVFlare's senders do
    let mut h = raw_headers("credential_manager", "key_exchange", MsgType::Req, "kx-3");
    h.set_reply_expected(true);
    let frame = frame_from_message(CellMessage {
        headers: h,
        payload: cert_map(&cipher),
    })
    .unwrap();
    p.raw.send(frame).await.unwrap();
    let kx = message_from_frame(next_data(&mut p.raw).await).unwrap();
    let pem = kx.payload.as_value().unwrap().as_map().unwrap();
    cipher
        .accept_peer(
            "site-1.J1",
            pem.get("cert_content").unwrap().as_bin().unwrap(),
        )
        .unwrap();
    let mut bad = sealed_request(&cipher, "t-1", b"tampered");
    let mut payload = bad.payload.to_vec();
    let last = payload.len() - 1;
    payload[last] ^= 1;
    bad.payload = Bytes::from(payload);
    p.raw.send(bad).await.unwrap();
    let reply = message_from_frame(next_data(&mut p.raw).await).unwrap();
    assert_eq!(reply.headers.req_id(), Some("t-1"));
    assert_eq!(reply.return_code(), CellReturnCode::AuthenticationError);
    // the connection goes on: a good one is served
    p.raw
        .send(sealed_request(&cipher, "t-2", b"good"))
        .await
        .unwrap();
    let req = timeout(DEADLINE, p.seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.payload.as_bytes().map(|b| &b[..]), Some(&b"good"[..]));
    p.cell.stop().await;
    p.net.shutdown().await;
}

#[actix::test]
async fn a_key_exchange_for_a_cell_not_hosted_here_is_not_answered_with_this_cells_certificate() {
    init_log();
    // a leaf (forwarding off, as a client job): what is not for its cells is answered `return`
    let cfg = WireConfig {
        forwarding: false,
        ..config(Some("site-1"))
    };
    let net = TcpTransport::new(fqcn("site-1.J1"), cfg);
    let addr = net.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let cell = Cell::start(fqcn("site-1.J1"), net.clone()).unwrap();
    let mut raw = raw_peer(addr, "site-2.J1").await;
    let mut h = raw_headers("credential_manager", "key_exchange", MsgType::Req, "kx-9");
    h.set_destination("site-1.J9");
    h.set_reply_expected(true);
    let frame = frame_from_message(CellMessage {
        headers: h,
        payload: cert_map(&raw_cipher()),
    })
    .unwrap();
    raw.send(frame).await.unwrap();
    let answer = message_from_frame(next_data(&mut raw).await).unwrap();
    assert_eq!(answer.headers.msg_type(), Some(MsgType::Return));
    assert_eq!(answer.return_code(), CellReturnCode::CommError);
    assert!(answer.payload.as_value().is_none(), "no certificate given");
    cell.stop().await;
    net.shutdown().await;
}

#[actix::test]
async fn a_secure_object_request_on_a_channel_nvflare_streams_leaves_as_sealed_chunks() {
    // NVFlare 2.9 can only seal object payloads chunk by chunk: fedrun streams them as NVFlare
    // does, whatever their size (default stream settings: by size only)
    let mut p = pair(true).await;
    let cipher = raw_cipher();
    let body = shareable(9, 100);
    let cell = p.cell.clone();
    let sent = body.clone();
    let _asking = tokio::spawn(async move {
        cell.send_request(secure_request_on("aux_communication", "site-2.J1", sent))
            .await
    });
    let kx = message_from_frame(next_data(&mut p.raw).await).unwrap();
    assert_eq!(kx.headers.topic(), Some("key_exchange"));
    let pem = kx.payload.as_value().unwrap().as_map().unwrap();
    cipher
        .accept_peer(
            "site-1.J1",
            pem.get("cert_content").unwrap().as_bin().unwrap(),
        )
        .unwrap();
    answer_key_exchange(&mut p.raw, &cipher, &kx).await;
    let chunk = next_data(&mut p.raw).await;
    let h = chunk.headers.clone().unwrap();
    assert_eq!(h.channel(), Some("sm__STREAM"));
    assert_eq!(
        h.get("sm__ch").and_then(Value::as_str),
        Some("aux_communication")
    );
    assert_eq!(h.get("sm__pe").and_then(Value::as_str), Some("fobs"));
    assert_eq!(
        h.get(header::ENCRYPTED).and_then(Value::as_bool),
        Some(true)
    );
    assert_eq!(
        h.get(header::PAYLOAD_ENCODING).and_then(Value::as_str),
        Some("bytes")
    );
    let clear = cipher.decrypt_from("site-1.J1", &chunk.payload).unwrap();
    assert_eq!(
        h.get(header::CLEAR_PAYLOAD_LEN).and_then(Value::as_u64),
        Some(clear.len() as u64)
    );
    let decoded = fedrun_wire::decode_payload(Some("fobs"), Bytes::from(clear)).unwrap();
    assert_eq!(decoded.as_shareable(), Some(&body));
    p.cell.stop().await;
    p.net.shutdown().await;
}
