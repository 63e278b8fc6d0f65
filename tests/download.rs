//! NVFlare's numpy download references between two fedrun cells: the producer offers the
//! arrays of an outgoing Shareable, the receiving cell's resolver pulls them before its handler
//! or waiter sees the message. On the in-process network and over TCP (where the refs travel as
//! dot-3 datums), with failures turning into error replies.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fedrun_cell::{
    header, request_handler, Cell, CellHandle, CellMessage, Fqcn, Network, SendRequest, Transport,
};
use fedrun_core::{CellReturnCode, NdArray, Shareable, Value};
use fedrun_engine::download::{ArrayResolver, DownloadConfig, DownloadHandle, DownloadService};
use fedrun_fobs::download_ref::{refs_to_value, DownloadRef, DOT_TENSOR_DOWNLOAD};
use fedrun_wire::{TcpTransport, WireConfig};

const DEADLINE: Duration = Duration::from_secs(20);

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("deadline exceeded")
}

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn config() -> DownloadConfig {
    // small batches: several requests per download
    DownloadConfig {
        chunk_size: 64 * 1024,
        ..DownloadConfig::default()
    }
}

/// Three arrays of different dtypes and sizes, one nested in a DXO-like map.
fn weights() -> Shareable {
    let mut s = Shareable::new();
    s.set_header("__task_name__", "train");
    let big: Vec<f32> = (0..50_000).map(|i| i as f32 * 0.5).collect();
    let mut data = fedrun_core::Map::new();
    data.insert("fc1", NdArray::from_f32(&[250, 200], &big).unwrap());
    data.insert("bias", NdArray::from_f64(&[3], &[1.0, -2.0, 3.5]).unwrap());
    s.insert("DXO", Value::Map(data));
    s.insert("ids", NdArray::from_i32(&[4], &[1, 2, 3, 4]).unwrap());
    s.insert("round", 3);
    s
}

struct Sites {
    producer: CellHandle,
    consumer: CellHandle,
    offers: DownloadHandle,
}

/// `site-1.J` serves downloads, `server` resolves what it receives; `site-1.J` answers
/// `test/get` with `weights()` sent as refs.
async fn sites(producer_net: impl Transport, consumer_net: impl Transport) -> Sites {
    init_log();
    let producer = Cell::start(Fqcn::job_cell("site-1", "J").unwrap(), producer_net).unwrap();
    let consumer = Cell::start(Fqcn::SERVER, consumer_net).unwrap();
    let resolver = ArrayResolver::new(consumer.clone(), "server", "J", config());
    consumer
        .set_payload_resolver(Some(Arc::new(resolver)))
        .await
        .unwrap();
    let offers = DownloadService::start(&producer, "site-1", "J", &config())
        .await
        .unwrap();
    let o = offers.clone();
    let get = request_handler(move |_req: CellMessage| {
        let o = o.clone();
        async move {
            let mut result = weights();
            let refs = o.offer(&mut result).expect("arrays to offer");
            Ok(Some(
                CellMessage::new(result).with_header(header::DOWNLOAD_REFS, refs),
            ))
        }
    });
    producer
        .register_request_handler("test", "get", get)
        .await
        .unwrap();
    Sites {
        producer,
        consumer,
        offers,
    }
}

async fn fetch(s: &Sites) -> CellMessage {
    let req = SendRequest::new(
        "test",
        "get",
        s.producer.fqcn().clone(),
        CellMessage::empty(),
        DEADLINE,
    );
    within(s.consumer.send_request(req)).await.unwrap()
}

fn assert_complete(reply: &CellMessage) {
    assert_eq!(
        reply.return_code(),
        CellReturnCode::Ok,
        "{:?}",
        reply.headers.error()
    );
    assert!(!reply.headers.contains_key(header::DOWNLOAD_REFS));
    assert_eq!(reply.payload.as_shareable(), Some(&weights()));
}

#[actix::test]
async fn in_process_reply_with_refs_reaches_the_waiter_with_its_arrays() {
    let net = Network::new();
    let s = sites(net.clone(), net).await;
    let reply = fetch(&s).await;
    assert_complete(&reply);
    assert_eq!(s.offers.pending(), 1, "finished batch keeps its tombstone");
    s.consumer.stop().await;
    s.producer.stop().await;
}

async fn tcp_pair() -> (TcpTransport, TcpTransport) {
    let server_net = TcpTransport::new(Fqcn::SERVER, WireConfig::default());
    let addr = server_net.add_listener("tcp://127.0.0.1:0").await.unwrap();
    let job = Fqcn::job_cell("site-1", "J").unwrap();
    let job_net = TcpTransport::new(job.clone(), WireConfig::default());
    job_net.add_connector(&format!("tcp://{addr}")).unwrap();
    assert!(job_net.wait_for_peer(&Fqcn::SERVER, DEADLINE).await);
    assert!(server_net.wait_for_peer(&job, DEADLINE).await);
    (job_net, server_net)
}

#[actix::test]
async fn tcp_reply_with_refs_is_resolved_in_several_batches() {
    let (job_net, server_net) = tcp_pair().await;
    let s = sites(job_net.clone(), server_net.clone()).await;
    let reply = fetch(&s).await;
    assert_complete(&reply);
    s.consumer.stop().await;
    s.producer.stop().await;
    job_net.shutdown().await;
    server_net.shutdown().await;
}

#[actix::test]
async fn tcp_request_with_refs_reaches_the_handler_resolved() {
    let (job_net, server_net) = tcp_pair().await;
    let s = sites(job_net.clone(), server_net.clone()).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let submit = request_handler(move |req: CellMessage| {
        let tx = tx.clone();
        async move {
            let _ = tx.try_send(req);
            Ok(Some(CellMessage::empty()))
        }
    });
    s.consumer
        .register_request_handler("test", "submit", submit)
        .await
        .unwrap();
    let mut result = weights();
    let refs = s.offers.offer(&mut result).unwrap();
    let msg = CellMessage::new(result).with_header(header::DOWNLOAD_REFS, refs);
    let req = SendRequest::new("test", "submit", Fqcn::SERVER, msg, DEADLINE);
    let reply = within(s.producer.send_request(req)).await.unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::Ok);
    let seen = within(rx.recv()).await.unwrap();
    assert!(!seen.headers.contains_key(header::DOWNLOAD_REFS));
    assert_eq!(seen.payload.as_shareable(), Some(&weights()));
    s.consumer.stop().await;
    s.producer.stop().await;
    job_net.shutdown().await;
    server_net.shutdown().await;
}

/// `site-1.J` answers `test/bad` with one placeholder and the given refs header.
async fn bad_reply(s: &Sites, refs: Vec<DownloadRef>) -> CellMessage {
    let bad = request_handler(move |_req: CellMessage| {
        let refs = refs.clone();
        async move {
            let mut result = Shareable::new();
            result.insert("w", fedrun_fobs::download_ref::array_ref(0));
            Ok(Some(
                CellMessage::new(result).with_header(header::DOWNLOAD_REFS, refs_to_value(&refs)),
            ))
        }
    });
    s.producer
        .register_request_handler("test", "bad", bad)
        .await
        .unwrap();
    let req = SendRequest::new(
        "test",
        "bad",
        s.producer.fqcn().clone(),
        CellMessage::empty(),
        DEADLINE,
    );
    within(s.consumer.send_request(req)).await.unwrap()
}

#[actix::test]
async fn unknown_ref_turns_the_reply_into_a_comm_error() {
    let (job_net, server_net) = tcp_pair().await;
    let s = sites(job_net.clone(), server_net.clone()).await;
    let r = DownloadRef {
        fqcn: "site-1.J".into(),
        ref_id: "never-offered".into(),
        dot: 3,
    };
    let reply = bad_reply(&s, vec![r]).await;
    assert_eq!(reply.return_code(), CellReturnCode::CommError);
    assert!(reply
        .headers
        .error()
        .is_some_and(|e| e.contains("invalid_request")));
    assert!(reply.payload.is_none());
    s.consumer.stop().await;
    s.producer.stop().await;
    job_net.shutdown().await;
    server_net.shutdown().await;
}

#[actix::test]
async fn tensor_refs_are_refused_loudly() {
    let net = Network::new();
    let s = sites(net.clone(), net).await;
    let r = DownloadRef {
        fqcn: "site-1.J".into(),
        ref_id: "t".into(),
        dot: DOT_TENSOR_DOWNLOAD,
    };
    let reply = bad_reply(&s, vec![r]).await;
    assert_eq!(reply.return_code(), CellReturnCode::ProcessException);
    assert!(reply.headers.error().is_some_and(|e| e.contains("tensors")));
    s.consumer.stop().await;
    s.producer.stop().await;
}

/// A task result offered once ([`fedrun_engine::EngineHandle::offer_task_result`]) keeps its
/// arrays for every push of it (a push may fail after the server pulled them) and lets them go
/// once a push is accepted; what the pushes carry is references only.
#[actix::test]
async fn an_offered_task_result_serves_every_push_and_is_released_once_one_is_accepted() {
    init_log();
    let net = Network::new();
    let job = "J";
    let engine = fedrun_engine::ClientEngine::builder("site-1", job)
        .np_download_chunk_size(64 * 1024)
        .start(&net)
        .await
        .unwrap();
    let server = Cell::start(Fqcn::job_cell("server", job).unwrap(), net.clone()).unwrap();
    let resolver = ArrayResolver::new(server.clone(), "server", job, config());
    server
        .set_payload_resolver(Some(Arc::new(resolver)))
        .await
        .unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<Shareable>();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let submit = {
        let calls = Arc::clone(&calls);
        request_handler(move |msg: CellMessage| {
            let first = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            let _ = seen_tx.send(msg.payload.as_shareable().cloned().unwrap());
            async move {
                if first {
                    // the arrays were pulled, then the push fails: it will be tried again
                    Err(fedrun_cell::HandlerError::Other("busy".into()))
                } else {
                    Ok(Some(CellMessage::new(Shareable::new())))
                }
            }
        })
    };
    server
        .register_request_handler("server_command", "submit_update", submit)
        .await
        .unwrap();

    let offered = engine.offer_task_result(weights()).await.unwrap();
    let refs = offered
        .header_or_none(fedrun_engine::OFFERED_REFS_HEADER)
        .cloned()
        .expect("the result carries its offered references");
    let ref_id = fedrun_fobs::download_ref::refs_from_value(&refs).unwrap()[0]
        .ref_id
        .clone();
    assert!(
        !format!("{offered:?}").contains("NdArray"),
        "no array is left in the offered result"
    );
    for expect_ok in [false, true] {
        let sent = engine
            .send_task_result(offered.clone(), Some(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(sent, expect_ok);
        let got = within(seen.recv()).await.unwrap();
        assert!(got
            .header_or_none(fedrun_engine::OFFERED_REFS_HEADER)
            .is_none());
        assert_eq!(got.get("DXO"), weights().get("DXO"), "arrays resolved");
        assert_eq!(got.get("ids"), weights().get("ids"));
    }
    // accepted: the service no longer holds the arrays
    let mut ask = Shareable::new();
    ask.insert("ref_id", ref_id.as_str());
    let reply = server
        .send_request(SendRequest::new(
            fedrun_engine::download::CHANNEL,
            fedrun_engine::download::TOPIC,
            Fqcn::job_cell("site-1", job).unwrap(),
            CellMessage::new(ask),
            DEADLINE,
        ))
        .await
        .unwrap();
    assert_eq!(reply.return_code(), CellReturnCode::InvalidRequest);
    engine.stop().await;
    server.stop().await;
}
