//! Sending NVFlare streams over loopback TCP: fedrun → fedrun through a frame-counting tap (a
//! relay that decodes, records and forwards every frame), and fedrun → a raw-socket peer that
//! plays the receiver (withholding ACKs, rejecting, hanging up). Every wait is on the event
//! itself, bounded by a deadline; the only fixed waits are the "nothing more arrives" checks of
//! the window test, which assert an absence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_cell::{
    request_handler, Cell, CellHandle, CellMessage, FireAndForget, Fqcn, Headers, MsgType, Payload,
    RequestHandler, SendRequest,
};
use fedrun_core::{CellReturnCode, Shareable, Value};
use fedrun_wire::stream::{
    key, StreamMessage, RETURN_ONLY_CHANNEL, STREAM_CHANNEL, TOPIC_ACK, TOPIC_DATA, TOPIC_ERROR,
};
use fedrun_wire::{
    frame_from_message, message_from_frame, Frame, FrameType, HandshakeInfo, SfmCodec,
    StreamChannels, StreamSendConfig, TcpTransport, WireConfig, WireError, STREAM_THRESHOLD,
};
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::codec::Framed;

/// Upper bound for any single wait.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
const MIB: usize = 1024 * 1024;

type Raw = Framed<TcpStream, SfmCodec>;

fn fqcn(s: &str) -> Fqcn {
    Fqcn::new(s).unwrap()
}

fn job() -> Fqcn {
    fqcn("site-1.job1")
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

/// A blob whose every byte depends on its position, so any misplaced chunk shows.
fn pattern(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// A handler that reports each request and answers with its payload.
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

fn request(payload: impl Into<Payload>) -> SendRequest {
    SendRequest::new(
        "test",
        "echo",
        Fqcn::SERVER,
        CellMessage::new(payload.into()),
        DEADLINE,
    )
}

/// One DATA frame the tap saw.
#[derive(Clone, Debug)]
struct Seen {
    /// `true`: from the job side to the server side.
    up: bool,
    headers: Headers,
    payload_len: usize,
}

impl Seen {
    fn is_chunk(&self) -> bool {
        self.headers.channel() == Some(STREAM_CHANNEL) && self.headers.topic() == Some(TOPIC_DATA)
    }

    fn sm_u64(&self, k: &str) -> Option<u64> {
        self.headers.get(k).and_then(Value::as_u64)
    }

    fn sm_str(&self, k: &str) -> Option<&str> {
        self.headers.get(k).and_then(Value::as_str)
    }
}

/// A relay between one client connection and `server`, recording every DATA frame.
struct Tap {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Tap {
    async fn start(server: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let upstream = TcpStream::connect(server).await.unwrap();
            let (mut c_tx, mut c_rx) = Framed::new(client, SfmCodec::new()).split();
            let (mut s_tx, mut s_rx) = Framed::new(upstream, SfmCodec::new()).split();
            let rec_up = Arc::clone(&record);
            let up = async move {
                while let Some(Ok(frame)) = c_rx.next().await {
                    note(&rec_up, true, &frame);
                    if s_tx.send(frame).await.is_err() {
                        break;
                    }
                }
            };
            let down = async move {
                while let Some(Ok(frame)) = s_rx.next().await {
                    note(&record, false, &frame);
                    if c_tx.send(frame).await.is_err() {
                        break;
                    }
                }
            };
            tokio::join!(up, down);
        });
        Tap { addr, seen }
    }

    fn frames(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn note(record: &Mutex<Vec<Seen>>, up: bool, frame: &Frame) {
    if frame.frame_type == FrameType::Data {
        record.lock().unwrap().push(Seen {
            up,
            headers: frame.headers.clone().unwrap_or_default(),
            payload_len: frame.payload.len(),
        });
    }
}

struct Pair {
    server_net: TcpTransport,
    server: CellHandle,
    job_net: TcpTransport,
    job: CellHandle,
    seen: mpsc::Receiver<CellMessage>,
    tap: Tap,
}

impl Pair {
    async fn shutdown(self) {
        self.job.stop().await;
        self.server.stop().await;
        self.job_net.shutdown().await;
        self.server_net.shutdown().await;
    }
}

/// A `server` endpoint with an echo handler on `test/*`, and `site-1.job1` connected to it
/// through a tap.
async fn pair(server_config: WireConfig, job_config: WireConfig) -> Pair {
    init_log();
    let server_net = TcpTransport::new(Fqcn::SERVER, server_config);
    let addr = server_net.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let server = Cell::start(Fqcn::SERVER, server_net.clone()).unwrap();
    let (tx, seen) = mpsc::channel(16);
    server
        .register_request_handler("test", "*", echo(tx))
        .await
        .unwrap();
    let tap = Tap::start(addr).await;
    let job_net = TcpTransport::new(job(), job_config);
    job_net
        .add_connector(&format!("tcp://{}", tap.addr))
        .unwrap();
    assert!(job_net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    assert!(server_net.wait_for_peer(&job(), DEADLINE).await);
    let job = Cell::start(job(), job_net.clone()).unwrap();
    Pair {
        server_net,
        server,
        job_net,
        job,
        seen,
        tap,
    }
}

fn small_streams(chunk_size: usize, window_size: u64) -> WireConfig {
    WireConfig {
        stream_send: StreamSendConfig {
            chunk_size,
            window_size,
            threshold: chunk_size,
            ..StreamSendConfig::default()
        },
        ..WireConfig::default()
    }
}

#[actix::test]
async fn five_mib_request_leaves_as_five_1_mib_chunks_and_is_reassembled_exactly() {
    let mut p = pair(WireConfig::default(), WireConfig::default()).await;
    let blob = pattern(5 * MIB);
    let reply = p
        .job
        .send_request(request(Payload::Bytes(blob.clone())))
        .await
        .unwrap();
    assert_eq!(
        reply.return_code(),
        CellReturnCode::Ok,
        "{:?}",
        reply.headers
    );
    assert_eq!(reply.headers.msg_type(), Some(MsgType::Reply));
    assert!(
        reply.payload.as_bytes() == Some(&blob),
        "echoed blob differs"
    );

    let req = timeout(DEADLINE, p.seen.recv()).await.unwrap().unwrap();
    assert!(
        req.payload.as_bytes() == Some(&blob),
        "reassembled blob differs"
    );
    assert_eq!(req.headers.origin(), Some("site-1.job1"));
    assert_eq!(req.headers.reply_expected(), Some(true));

    let frames = p.tap.frames();
    let up: Vec<&Seen> = frames.iter().filter(|f| f.up && f.is_chunk()).collect();
    assert_eq!(up.len(), 5, "request chunks");
    assert!(
        frames
            .iter()
            .filter(|f| f.up)
            .all(|f| f.headers.channel() != Some("test")),
        "the request also left unstreamed"
    );
    let stream_id = up[0].sm_u64(key::ID).unwrap();
    let ri = up[0].sm_str(key::REQUEST_ID).unwrap().to_owned();
    for (i, c) in up.iter().enumerate() {
        assert_eq!(c.payload_len, MIB, "chunk {i} size");
        assert_eq!(c.sm_u64(key::SEQ), Some(i as u64));
        assert_eq!(c.sm_u64(key::OFFSET), Some((i * MIB) as u64));
        assert_eq!(c.sm_u64(key::SIZE), Some(5 * MIB as u64));
        assert_eq!(c.sm_u64(key::DATA_TYPE), Some(if i == 4 { 2 } else { 1 }));
        assert_eq!(c.sm_u64(key::ID), Some(stream_id));
        assert_eq!(c.sm_str(key::REQUEST_ID), Some(ri.as_str()));
        assert_eq!(c.sm_str(key::CHANNEL), Some("test"));
        assert_eq!(c.sm_str(key::TOPIC), Some("echo"));
        assert_eq!(c.sm_str(key::PAYLOAD_ENCODING), Some("bytes"));
        assert_eq!(c.sm_u64(key::CHUNK_SIZE), Some(MIB as u64));
        assert_eq!(c.sm_u64(key::WINDOW_SIZE), Some(64 * MIB as u64));
        assert_eq!(c.sm_u64(key::ACK_INTERVAL).is_some(), i == 0);
        assert_eq!(c.headers.destination(), Some("server"));
        assert_eq!(c.headers.origin(), Some("site-1.job1"));
    }
    // the receiver acknowledged at 4 MiB and after the final chunk
    let acks: Vec<(u64, u64)> = frames
        .iter()
        .filter(|f| !f.up && f.headers.topic() == Some(TOPIC_ACK))
        .filter(|f| f.sm_u64(key::ID) == Some(stream_id))
        .map(|f| (f.sm_u64(key::OFFSET).unwrap(), f.sm_u64(key::SEQ).unwrap()))
        .collect();
    assert_eq!(acks, [(4 * MIB as u64, 3), (5 * MIB as u64, 4)]);
    // the 5 MiB echo came back as a stream on return_only with the same sm__ri
    let down: Vec<&Seen> = frames.iter().filter(|f| !f.up && f.is_chunk()).collect();
    assert_eq!(down.len(), 5, "reply chunks");
    assert!(down.iter().all(|c| c.payload_len == MIB
        && c.sm_str(key::CHANNEL) == Some(RETURN_ONLY_CHANNEL)
        && c.sm_str(key::TOPIC) == Some("test:echo")
        && c.sm_str(key::REQUEST_ID) == Some(ri.as_str())));
    p.shutdown().await;
}

#[actix::test]
async fn streamed_reply_to_a_streamed_request_on_a_chosen_channel_reaches_the_waiting_request() {
    let job_config = WireConfig {
        stream_send: StreamSendConfig {
            channels: StreamChannels::only(["test"]),
            ..StreamSendConfig::default()
        },
        ..WireConfig::default()
    };
    let mut p = pair(WireConfig::default(), job_config).await;
    let mut body = Shareable::new();
    body.insert("round", 4);
    let reply = p.job.send_request(request(body.clone())).await.unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.payload.as_shareable(), Some(&body));
    assert_eq!(reply.headers.channel(), Some("test"));
    assert_eq!(reply.headers.topic(), Some("echo"));
    let req = timeout(DEADLINE, p.seen.recv()).await.unwrap().unwrap();
    assert_eq!(req.payload.as_shareable(), Some(&body));

    let frames = p.tap.frames();
    let up: Vec<&Seen> = frames.iter().filter(|f| f.up && f.is_chunk()).collect();
    assert_eq!(up.len(), 1, "one chunk for a small request");
    assert_eq!(up[0].sm_str(key::PAYLOAD_ENCODING), Some("fobs"));
    let ri = up[0]
        .sm_str(key::REQUEST_ID)
        .expect("sm__ri on a streamed request");
    let down: Vec<&Seen> = frames.iter().filter(|f| !f.up && f.is_chunk()).collect();
    assert_eq!(down.len(), 1);
    assert_eq!(down[0].sm_str(key::REQUEST_ID), Some(ri));
    assert_eq!(down[0].sm_str(key::CHANNEL), Some(RETURN_ONLY_CHANNEL));
    assert_eq!(down[0].sm_str(key::TOPIC), Some("test:echo"));
    assert!(
        frames
            .iter()
            .all(|f| f.headers.msg_type() != Some(MsgType::Reply)),
        "an unstreamed reply went over the wire"
    );
    p.shutdown().await;
}

#[actix::test]
async fn big_fire_and_forget_is_streamed_without_a_stream_request_id() {
    let mut p = pair(WireConfig::default(), WireConfig::default()).await;
    let blob = pattern(STREAM_THRESHOLD + 1);
    let msg = CellMessage::new(Payload::Bytes(blob.clone()));
    let sent = p
        .job
        .fire_and_forget(FireAndForget::new("test", "note", vec![Fqcn::SERVER], msg))
        .await
        .unwrap();
    assert_eq!(sent.get(&Fqcn::SERVER), Some(&CellReturnCode::Ok));
    let req = timeout(DEADLINE, p.seen.recv()).await.unwrap().unwrap();
    assert!(req.payload.as_bytes() == Some(&blob));
    assert_eq!(req.headers.reply_expected(), Some(false));
    let up: Vec<Seen> = p
        .tap
        .frames()
        .into_iter()
        .filter(|f| f.up && f.is_chunk())
        .collect();
    assert_eq!(
        up.iter().map(|c| c.payload_len).collect::<Vec<_>>(),
        [MIB, STREAM_THRESHOLD + 1 - MIB]
    );
    assert!(up.iter().all(|c| c.sm_str(key::REQUEST_ID).is_none()));
    p.shutdown().await;
}

#[actix::test]
async fn receiver_error_aborts_the_send_with_a_typed_error_and_the_request_gets_comm_error() {
    let server_config = WireConfig {
        max_stream_blob: 4096,
        ..WireConfig::default()
    };
    // a window of 2 KiB: the sender is still sending when the rejection comes
    let mut p = pair(server_config, small_streams(1024, 2048)).await;
    let started = Instant::now();
    let reply = p
        .job
        .send_request(request(Payload::Bytes(pattern(64 * 1024))))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::CommError);

    let mut msg = CellMessage::new(Payload::Bytes(pattern(64 * 1024)));
    let h = &mut msg.headers;
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("note");
    h.set_origin("site-1.job1");
    h.set_destination("server");
    h.set_reply_expected(false);
    match p.job_net.send_streamed(msg).await {
        Err(WireError::StreamRejected {
            receiver,
            error_type,
            message,
            ..
        }) => {
            assert_eq!(receiver, "server");
            assert_eq!(error_type.as_deref(), Some("BlobSizeError"));
            assert!(message.contains("4096"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // rejected, not timed out (the ACK timeout is 60 s)
    assert!(started.elapsed() < DEADLINE);
    assert!(p.seen.try_recv().is_err(), "a refused blob was delivered");
    p.shutdown().await;
}

/// A raw peer named `server` that `site-1.job1` connects to.
struct RawServer {
    raw: Raw,
    job_net: TcpTransport,
    job: CellHandle,
}

async fn raw_server(job_config: WireConfig) -> RawServer {
    init_log();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let job_net = TcpTransport::new(job(), job_config);
    job_net.add_connector(&format!("tcp://{addr}")).unwrap();
    let (stream, _) = timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
    let mut raw = Framed::new(stream, SfmCodec::new());
    let hello = next_frame(&mut raw).await;
    assert_eq!(hello.frame_type, FrameType::Hello);
    let mut ready = Frame::ready(&HandshakeInfo::now(&Fqcn::SERVER)).unwrap();
    ready.sequence = 1;
    raw.send(ready).await.unwrap();
    assert!(job_net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    let job = Cell::start(job(), job_net.clone()).unwrap();
    RawServer { raw, job_net, job }
}

async fn next_frame(raw: &mut Raw) -> Frame {
    timeout(DEADLINE, raw.next())
        .await
        .expect("no frame before the deadline")
        .expect("connection closed")
        .expect("bad frame")
}

/// The next stream chunk (or sender abort) from the job; other frames are skipped.
async fn next_chunk(raw: &mut Raw) -> CellMessage {
    loop {
        let f = next_frame(raw).await;
        if f.frame_type != FrameType::Data {
            continue;
        }
        let msg = message_from_frame(f).unwrap();
        if msg.headers.channel() == Some(STREAM_CHANNEL) && msg.headers.topic() == Some(TOPIC_DATA)
        {
            return msg;
        }
    }
}

/// Asserts that no DATA frame arrives for a while.
async fn assert_quiet(raw: &mut Raw) {
    let more = timeout(QUIET, async {
        loop {
            match raw.next().await {
                Some(Ok(f)) if f.frame_type == FrameType::Data => return Some(f),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await;
    if let Ok(Some(f)) = more {
        panic!("the sender went on: {:?}", f.headers);
    }
}

fn chunk_of(msg: &CellMessage) -> fedrun_wire::stream::Chunk {
    match StreamMessage::parse(&msg.headers).unwrap() {
        StreamMessage::Chunk(c) => c,
        other => panic!("not a chunk: {other:?}"),
    }
}

/// A stream control message from `origin` to the job about stream `stream_id`.
fn control(origin: &str, topic: &str, sm: &[(&str, Value)]) -> Frame {
    let mut h = Headers::new();
    for (k, v) in sm {
        h.insert(*k, v.clone());
    }
    h.set_reply_expected(false);
    h.set_optional(true);
    h.set_topic(topic);
    h.set_channel(STREAM_CHANNEL);
    h.set_destination("site-1.job1");
    h.set_from("server");
    h.set_to("site-1.job1");
    h.set_origin(origin);
    h.set_msg_type(MsgType::Req);
    frame_from_message(CellMessage {
        headers: h,
        payload: Payload::None,
    })
    .unwrap()
}

fn ack(origin: &str, stream_id: u64, offset: u64, seq: u64) -> Frame {
    control(
        origin,
        TOPIC_ACK,
        &[
            (key::ID, Value::from(stream_id)),
            (key::DATA_TYPE, Value::from(3u64)),
            (key::OFFSET, Value::from(offset)),
            (key::SEQ, Value::from(seq)),
        ],
    )
}

/// Reads `n` chunks, checks they continue the stream at `seq`, and returns their bytes.
async fn read_chunks(raw: &mut Raw, stream_id: u64, seq: u64, n: u64, into: &mut Vec<u8>) {
    for i in 0..n {
        let msg = next_chunk(raw).await;
        let c = chunk_of(&msg);
        assert_eq!((c.stream_id, c.seq), (stream_id, seq + i));
        assert_eq!(c.offset, into.len() as u64);
        into.extend_from_slice(msg.payload.as_bytes().unwrap());
    }
}

#[actix::test]
async fn sender_stops_at_the_window_and_resumes_after_each_ack() {
    // 1 KiB chunks, 2 KiB window, an 8 KiB request: the sender pauses while sent - acked > 2 KiB
    let mut s = raw_server(small_streams(1024, 2048)).await;
    let blob = pattern(8 * 1024);
    let job = s.job.clone();
    let body = blob.clone();
    let pending =
        actix::spawn(async move { job.send_request(request(Payload::Bytes(body))).await });

    let first = next_chunk(&mut s.raw).await;
    let c0 = chunk_of(&first);
    let (id, ri) = (c0.stream_id, c0.request_id.clone().expect("sm__ri"));
    assert_eq!((c0.seq, c0.size, c0.window_size), (0, 8192, Some(2048)));
    let mut got = first.payload.as_bytes().unwrap().to_vec();
    // 0, 1, 2 leave (after 2: 3 KiB sent, 0 acked), then nothing
    read_chunks(&mut s.raw, id, 1, 2, &mut got).await;
    assert_quiet(&mut s.raw).await;
    // an ACK from a cell the stream does not go to moves nothing
    s.raw.send(ack("site-2", id, 8192, 7)).await.unwrap();
    assert_quiet(&mut s.raw).await;
    // 1 KiB acknowledged: exactly one more chunk
    s.raw.send(ack("server", id, 1024, 0)).await.unwrap();
    read_chunks(&mut s.raw, id, 3, 1, &mut got).await;
    assert_quiet(&mut s.raw).await;
    // everything so far acknowledged: three more (4, 5, 6), then a pause again
    s.raw.send(ack("server", id, 4096, 3)).await.unwrap();
    read_chunks(&mut s.raw, id, 4, 3, &mut got).await;
    assert_quiet(&mut s.raw).await;
    s.raw.send(ack("server", id, 7168, 6)).await.unwrap();
    let last = next_chunk(&mut s.raw).await;
    assert!(chunk_of(&last).is_final);
    got.extend_from_slice(last.payload.as_bytes().unwrap());
    assert_eq!(got, blob.to_vec(), "chunks reassemble to the blob");
    s.raw.send(ack("server", id, 8192, 7)).await.unwrap();

    // the reply, streamed as Python does it: return_only, same sm__ri, cn__req_id ""
    let mut h = Headers::new();
    h.insert("cn__return_code", "ok");
    h.set_req_id("");
    h.insert(key::REQUEST_ID, ri.as_str());
    h.insert(key::PAYLOAD_ENCODING, "bytes");
    h.insert(key::CHANNEL, RETURN_ONLY_CHANNEL);
    h.insert(key::TOPIC, "test:echo");
    h.insert(key::SIZE, 4u64);
    h.insert(key::ID, 99u64);
    h.insert(key::DATA_TYPE, 2u64);
    h.insert(key::SEQ, 0u64);
    h.insert(key::OFFSET, 0u64);
    h.insert(key::RELIABLE, true);
    h.set_channel(STREAM_CHANNEL);
    h.set_topic(TOPIC_DATA);
    h.set_origin("server");
    h.set_destination("site-1.job1");
    h.set_from("server");
    h.set_to("site-1.job1");
    h.set_msg_type(MsgType::Req);
    h.set_reply_expected(false);
    let reply_chunk = CellMessage {
        headers: h,
        payload: Payload::Bytes(Bytes::from_static(b"pong")),
    };
    s.raw
        .send(frame_from_message(reply_chunk).unwrap())
        .await
        .unwrap();
    let reply = timeout(DEADLINE, pending).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(reply.payload.as_bytes().map(|b| &b[..]), Some(&b"pong"[..]));
    // and the job acknowledged the reply stream
    let ack_back = loop {
        let f = next_frame(&mut s.raw).await;
        if f.frame_type == FrameType::Data {
            break message_from_frame(f).unwrap();
        }
    };
    assert_eq!(ack_back.headers.topic(), Some(TOPIC_ACK));
    match StreamMessage::parse(&ack_back.headers).unwrap() {
        StreamMessage::Ack(a) => assert_eq!((a.stream_id, a.offset, a.seq), (99, 4, Some(0))),
        other => panic!("{other:?}"),
    }
    s.job.stop().await;
    s.job_net.shutdown().await;
}

#[actix::test]
async fn ack_silence_past_the_timeout_fails_the_request_with_comm_error_and_aborts_the_stream() {
    let config = WireConfig {
        stream_send: StreamSendConfig {
            ack_timeout: Duration::from_millis(300),
            ..small_streams(1024, 2048).stream_send
        },
        ..WireConfig::default()
    };
    let mut s = raw_server(config).await;
    let job = s.job.clone();
    let pending = actix::spawn(async move {
        job.send_request(request(Payload::Bytes(pattern(8 * 1024))))
            .await
    });
    let mut got = Vec::new();
    let first = next_chunk(&mut s.raw).await;
    let id = chunk_of(&first).stream_id;
    got.extend_from_slice(first.payload.as_bytes().unwrap());
    read_chunks(&mut s.raw, id, 1, 2, &mut got).await;
    let reply = timeout(DEADLINE, pending).await.unwrap().unwrap().unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    // the sender told the receiver it gave up: sm__DATA with sm__dt 6 at offset 3 KiB
    let abort = next_chunk(&mut s.raw).await;
    match StreamMessage::parse(&abort.headers).unwrap() {
        StreamMessage::Error(e) => {
            assert_eq!(e.stream_id, id);
            assert!(e.message.unwrap().contains("no ACK progress"));
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    assert_eq!(
        abort.headers.get(key::OFFSET).and_then(Value::as_u64),
        Some(3072)
    );

    // the same through the typed API
    let mut msg = CellMessage::new(Payload::Bytes(pattern(4 * 1024)));
    let h = &mut msg.headers;
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("note");
    h.set_origin("site-1.job1");
    h.set_destination("server");
    let result = s.job_net.send_streamed(msg).await;
    assert!(
        matches!(result, Err(WireError::StreamAckTimeout { acked: 0, .. })),
        "{result:?}"
    );
    s.job.stop().await;
    s.job_net.shutdown().await;
}

#[actix::test]
async fn error_on_the_ack_topic_aborts_the_send_with_its_text_and_class() {
    let mut s = raw_server(small_streams(1024, 2048)).await;
    let net = s.job_net.clone();
    let mut msg = CellMessage::new(Payload::Bytes(pattern(8 * 1024)));
    let h = &mut msg.headers;
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("note");
    h.set_origin("site-1.job1");
    h.set_destination("server");
    let pending = actix::spawn(async move { net.send_streamed(msg).await });
    let id = chunk_of(&next_chunk(&mut s.raw).await).stream_id;
    // an older receiver's rejection: dt 6 on sm__ACK
    let error = control(
        "server",
        TOPIC_ACK,
        &[
            (key::ID, Value::from(id)),
            (key::DATA_TYPE, Value::from(6u64)),
            (key::ERROR_MESSAGE, Value::from("no callback for test/note")),
            (key::ERROR_TYPE, Value::from("StreamError")),
        ],
    );
    s.raw.send(error).await.unwrap();
    match timeout(DEADLINE, pending).await.unwrap().unwrap() {
        Err(WireError::StreamRejected {
            stream_id,
            message,
            error_type,
            ..
        }) => {
            assert_eq!(stream_id, id);
            assert_eq!(message, "no callback for test/note");
            assert_eq!(error_type.as_deref(), Some("StreamError"));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // a rejected stream is not aborted back (the receiver already dropped it); an sm__ERROR
    // topic message for an unknown stream is ignored
    s.raw
        .send(control(
            "server",
            TOPIC_ERROR,
            &[
                (key::ID, Value::from(id)),
                (key::DATA_TYPE, Value::from(6u64)),
            ],
        ))
        .await
        .unwrap();
    s.raw.send(Frame::ping()).await.unwrap();
    loop {
        let f = next_frame(&mut s.raw).await;
        match f.frame_type {
            FrameType::Pong => break,
            FrameType::Data => {
                let msg = message_from_frame(f).unwrap();
                assert!(
                    !matches!(
                        StreamMessage::parse(&msg.headers),
                        Ok(StreamMessage::Error(_))
                    ),
                    "abort sent for a rejected stream"
                );
            }
            _ => {}
        }
    }
    s.job.stop().await;
    s.job_net.shutdown().await;
}

#[actix::test]
async fn connection_loss_mid_stream_ends_the_send_at_once_not_after_the_ack_timeout() {
    let mut s = raw_server(small_streams(1024, 2048)).await;
    let net = s.job_net.clone();
    let mut msg = CellMessage::new(Payload::Bytes(pattern(8 * 1024)));
    let h = &mut msg.headers;
    h.set_msg_type(MsgType::Req);
    h.set_channel("test");
    h.set_topic("note");
    h.set_origin("site-1.job1");
    h.set_destination("server");
    let pending = actix::spawn(async move { net.send_streamed(msg).await });
    let _ = next_chunk(&mut s.raw).await;
    drop(s.raw);
    // the ACK timeout is 60 s; the deadline is far shorter
    let result = timeout(DEADLINE, pending).await.unwrap().unwrap();
    assert!(
        matches!(result, Err(WireError::StreamInterrupted { .. })),
        "{result:?}"
    );
    s.job.stop().await;
    s.job_net.shutdown().await;
}

#[actix::test]
async fn send_streamed_refuses_bad_or_unreachable_destinations() {
    init_log();
    let net = TcpTransport::new(job(), WireConfig::default());
    let mut msg = CellMessage::new(Payload::Bytes(pattern(10)));
    msg.headers.set_msg_type(MsgType::Req);
    msg.headers.set_channel("test");
    msg.headers.set_topic("note");
    msg.headers.set_origin("site-1.job1");
    msg.headers.set_destination("not a name");
    assert!(matches!(
        net.send_streamed(msg.clone()).await,
        Err(WireError::InvalidDestination(_))
    ));
    msg.headers.set_destination("server");
    assert!(matches!(
        net.send_streamed(msg).await,
        Err(WireError::NoRoute(_))
    ));
}

#[actix::test]
async fn big_streams_in_both_directions_at_once_both_arrive_intact() {
    // tiny writer queues: the connection's writers are full most of the time, and each side's
    // ACKs must get through while its own chunks wait
    let config = |queue_capacity| WireConfig {
        queue_capacity,
        ..WireConfig::default()
    };
    let p = pair(config(1), config(1)).await;
    let (tx, mut seen_by_job) = mpsc::channel(4);
    p.job
        .register_request_handler("test", "*", echo(tx))
        .await
        .unwrap();
    let up = pattern(48 * MIB);
    let down = pattern(40 * MIB);
    let job_cell = p.job.clone();
    let server = p.server.clone();
    let (up_body, down_body) = (up.clone(), down.clone());
    let to_server = actix::spawn(async move {
        job_cell
            .send_request(request(Payload::Bytes(up_body)))
            .await
    });
    let to_job = actix::spawn(async move {
        server
            .send_request(SendRequest::new(
                "test",
                "echo",
                job(),
                CellMessage::new(Payload::Bytes(down_body)),
                DEADLINE,
            ))
            .await
    });
    let (a, b) = futures::join!(to_server, to_job);
    let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
    assert_eq!(a.return_code(), CellReturnCode::Ok, "{:?}", a.headers);
    assert_eq!(b.return_code(), CellReturnCode::Ok, "{:?}", b.headers);
    assert!(a.payload.as_bytes() == Some(&up));
    assert!(b.payload.as_bytes() == Some(&down));
    assert!(timeout(DEADLINE, seen_by_job.recv())
        .await
        .unwrap()
        .is_some());
    p.shutdown().await;
}

#[actix::test]
async fn request_timing_out_mid_stream_tells_the_receiver_the_stream_is_abandoned() {
    // the ACK timeout (60 s) is far away; the cell's own request timeout ends the send
    let mut s = raw_server(small_streams(1024, 2048)).await;
    let reply = s.job.send_request(SendRequest::new(
        "test",
        "echo",
        Fqcn::SERVER,
        CellMessage::new(Payload::Bytes(pattern(8 * 1024))),
        Duration::from_millis(300),
    ));
    let reply = timeout(DEADLINE, reply).await.unwrap().unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Timeout);
    let first = next_chunk(&mut s.raw).await;
    let id = chunk_of(&first).stream_id;
    let mut got = first.payload.as_bytes().unwrap().to_vec();
    read_chunks(&mut s.raw, id, 1, 2, &mut got).await;
    let abort = next_chunk(&mut s.raw).await;
    match StreamMessage::parse(&abort.headers).unwrap() {
        StreamMessage::Error(e) => {
            assert_eq!(e.stream_id, id);
            assert_eq!(e.message.as_deref(), Some("sender cancelled"));
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    s.job.stop().await;
    s.job_net.shutdown().await;
}

/// Regression (live NVFlare 2.9, tests/nvflare_download.rs): an NVFlare receiver resolves
/// download references only while decoding a streamed message, so a small request whose
/// payload carries them must leave as a stream on every channel NVFlare streams; on a channel
/// NVFlare never streams (`task`) it stays one frame.
#[actix::test]
async fn small_request_with_download_refs_leaves_as_a_stream_on_a_channel_nvflare_streams() {
    use fedrun_cell::header;
    use fedrun_fobs::download_ref::{array_ref, refs_to_value, DownloadRef};

    let p = pair(WireConfig::default(), WireConfig::default()).await;
    let with_refs = |channel: &str| {
        let mut s = Shareable::new();
        s.insert("w", array_ref(0));
        let refs = refs_to_value(&[DownloadRef {
            fqcn: job().to_string(),
            ref_id: "r-1".into(),
            dot: 3,
        }]);
        let msg = CellMessage::new(s).with_header(header::DOWNLOAD_REFS, refs);
        SendRequest::new(channel, "echo", Fqcn::SERVER, msg, DEADLINE)
    };
    let plain_requests = |channel: &str| {
        p.tap
            .frames()
            .into_iter()
            .filter(|f| f.up && f.headers.channel() == Some(channel))
            .count()
    };
    let chunks = || {
        p.tap
            .frames()
            .into_iter()
            .filter(|f| f.up && f.is_chunk())
            .collect::<Vec<_>>()
    };

    // the server cell has no resolver: it answers with an error, which proves the refs arrived
    let reply = p.job.send_request(with_refs("test")).await.unwrap();
    assert_ne!(reply.return_code(), CellReturnCode::Ok);
    let up = chunks();
    assert_eq!(up.len(), 1, "one small chunk: {up:?}");
    assert!(up[0].payload_len < 1024);
    assert_eq!(plain_requests("test"), 0);

    let reply = p.job.send_request(with_refs("task")).await.unwrap();
    assert_ne!(reply.return_code(), CellReturnCode::Ok);
    assert_eq!(chunks().len(), 1, "task must not be streamed");
    assert_eq!(plain_requests("task"), 1);
    p.shutdown().await;
}
