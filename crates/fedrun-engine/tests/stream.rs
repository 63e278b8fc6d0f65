//! Guarantees of the `StreamProcessor` actor (object streaming, with NVFlare's
//! `ObjectStreamer` bugs fixed), checked through actor mailboxes on a whole federation in one
//! in-process network: a server job (`server.<job>`, process type `SJ`) and three client jobs
//! (`site-N.<job>`), each with its own run, aux runner and stream processor, job clients loaded
//! from the job meta.
//!
//! Every wait has a deadline and waits on the event itself (a reply, or a message sent by a
//! consumer or callback); no test sleeps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, Context, Handler};
use bytes::Bytes;
use fedrun_cell::{request_handler, Cell, CellHandle, CellMessage, Fqcn, Network};
use fedrun_core::constants::{header_key, stream as keys};
use fedrun_core::{FlContext, Map, Shareable, StreamContext, Value};
use fedrun_engine::stream::{
    consumed_cb, stream_done_cb, ByteSink, BytesConsumerFactory, BytesProducer, ConsumeResult,
    ConsumerFactory, EndStream, GetOpenStreams, ObjectConsumer, ObjectProducer, Produced,
    RegisterStreamProcessing, StreamConfig, StreamObjects, StreamProcessor, StreamStep, WILDCARD,
};
use fedrun_engine::{
    AbortRun, AuxConfig, AuxRunner, AuxTargets, EngineError, GetJobClients, RunInfo, RunInfoConfig,
    SendAuxRequest,
};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

/// The deadline of every wait in these tests.
const DEADLINE: Duration = Duration::from_secs(10);
/// The reply timeout of pieces that are expected to be answered.
const PIECE_TIMEOUT: Duration = Duration::from_secs(5);
const SITES: [&str; 3] = ["site-1", "site-2", "site-3"];
const CHANNEL: &str = "test";
const TOPIC: &str = "objects";

async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("no answer before the deadline")
}

/// Sends `msg` to `addr` and waits for the reply, with a deadline.
async fn ask<A, M>(addr: &Addr<A>, msg: M) -> M::Result
where
    A: Actor<Context = Context<A>> + Handler<M>,
    M: actix::Message + Send + 'static,
    M::Result: Send,
{
    within(addr.send(msg)).await.expect("actor mailbox closed")
}

fn job_meta() -> Value {
    let clients: Vec<Value> = SITES
        .iter()
        .map(|s| {
            let mut d = Map::new();
            d.insert("name", *s);
            Value::Map(d)
        })
        .collect();
    let mut meta = Map::new();
    meta.insert("job_clients", clients);
    Value::Map(meta)
}

/// One job process: run, cell, aux runner and stream processor.
struct Engine {
    run: Addr<RunInfo>,
    cell: CellHandle,
    aux: Addr<AuxRunner>,
    streamer: Addr<StreamProcessor>,
}

async fn start_engine(
    net: &Network,
    name: &str,
    job: &str,
    process_type: &str,
    load_clients: bool,
    tune: fn(StreamConfig) -> StreamConfig,
) -> Engine {
    let run = RunInfo::new(RunInfoConfig::new(name, job).with_job_meta(job_meta())).start();
    let cell = Cell::start(Fqcn::job_cell(name, job).unwrap(), net.clone()).unwrap();
    let aux = AuxRunner::new(
        AuxConfig::new(name, job, cell.clone(), run.clone()).with_process_type(process_type),
    )
    .start();
    if load_clients {
        ask(&aux, GetJobClients { job_meta: None }).await.unwrap();
    }
    let config = tune(StreamConfig::new(name, job, aux.clone(), run.clone()));
    let streamer = within(StreamProcessor::start(config)).await.unwrap();
    Engine {
        run,
        cell,
        aux,
        streamer,
    }
}

struct Federation {
    server: Engine,
    sites: Vec<Engine>,
}

impl Federation {
    fn site(&self, name: &str) -> &Engine {
        if name == "server" {
            return &self.server;
        }
        let i = SITES.iter().position(|s| *s == name).unwrap();
        &self.sites[i]
    }
}

async fn federation_with(job: &str, tune: fn(StreamConfig) -> StreamConfig) -> Federation {
    let net = Network::new();
    let server = start_engine(&net, "server", job, "SJ", true, tune).await;
    let mut sites = Vec::new();
    for name in SITES {
        sites.push(start_engine(&net, name, job, "CJ", true, tune).await);
    }
    Federation { server, sites }
}

async fn federation(job: &str) -> Federation {
    federation_with(job, |c| c).await
}

// ---------------------------------------------------------------------------------------------
// A probe consumer: reports what happens to it on a channel.

#[derive(Debug, Clone, PartialEq)]
enum Ev {
    /// A piece was consumed: (site, stream name, piece index `i`).
    Got(String, String, i64),
    /// `finalize` ran: (site, stream name, rc, pieces consumed).
    Finalized(String, String, String, u64),
    /// `return_consumer` ran: (site, stream name).
    Returned(String, String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Go on until the piece marked `last`, then stop with OK.
    UntilLast,
    /// Stop (OK) after this many pieces.
    StopAt(u64),
    /// `consume` fails on this piece (1-based).
    FailAt(u64),
    /// `consume` panics on this piece (while building its future).
    PanicAt(u64),
    /// `consume` never answers on this piece.
    HangAt(u64),
    /// Calls its `EndStream` handle with TIMEOUT on this piece (and goes on).
    EndItselfAt(u64),
}

struct Probe {
    site: String,
    name: String,
    mode: Mode,
    pieces: u64,
    events: mpsc::UnboundedSender<Ev>,
    end: EndStream,
}

impl ObjectConsumer for Probe {
    fn consume<'a>(
        &'a mut self,
        request: Shareable,
        _stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<ConsumeResult, String>> {
        self.pieces += 1;
        let i = request.get("i").and_then(Value::as_i64).unwrap_or(-1);
        let _ = self
            .events
            .send(Ev::Got(self.site.clone(), self.name.clone(), i));
        if self.mode == Mode::PanicAt(self.pieces) {
            // before the future exists: the streamer must catch this one too
            panic!("the probe panics");
        }
        Box::pin(async move {
            let last = request
                .get("last")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            match self.mode {
                Mode::UntilLast if last => Ok(ConsumeResult::stop(None)),
                Mode::StopAt(n) if self.pieces == n => Ok(ConsumeResult::stop(None)),
                Mode::FailAt(n) if self.pieces == n => Err("the probe refuses this piece".into()),
                Mode::HangAt(n) if self.pieces == n => {
                    futures::future::pending::<()>().await;
                    Ok(ConsumeResult::keep_going(None))
                }
                Mode::EndItselfAt(n) if self.pieces == n => {
                    assert!(self.end.end(fedrun_core::AppReturnCode::Timeout));
                    Ok(ConsumeResult::keep_going(None))
                }
                _ => Ok(ConsumeResult::keep_going(None)),
            }
        })
    }

    fn finalize<'a>(
        &'a mut self,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        let _ = self.events.send(Ev::Finalized(
            self.site.clone(),
            self.name.clone(),
            stream_ctx.rc().unwrap_or("none").to_owned(),
            self.pieces,
        ));
        Box::pin(async { Ok(()) })
    }
}

struct ProbeFactory {
    site: String,
    mode: Mode,
    events: mpsc::UnboundedSender<Ev>,
    made: Arc<AtomicUsize>,
}

impl ConsumerFactory for ProbeFactory {
    fn get_consumer<'a>(
        &'a self,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
        end: EndStream,
    ) -> BoxFuture<'a, Result<Box<dyn ObjectConsumer>, String>> {
        self.made.fetch_add(1, Ordering::SeqCst);
        let name = stream_ctx
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let probe = Probe {
            site: self.site.clone(),
            name,
            mode: self.mode,
            pieces: 0,
            events: self.events.clone(),
            end,
        };
        Box::pin(async move { Ok(Box::new(probe) as Box<dyn ObjectConsumer>) })
    }

    fn return_consumer<'a>(
        &'a self,
        _consumer: Box<dyn ObjectConsumer>,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, ()> {
        let name = stream_ctx
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let _ = self.events.send(Ev::Returned(self.site.clone(), name));
        Box::pin(async {})
    }
}

/// What the tests observe of one site's registration.
struct Observed {
    events: mpsc::UnboundedReceiver<Ev>,
    made: Arc<AtomicUsize>,
    done_calls: Arc<AtomicUsize>,
}

impl Observed {
    async fn next(&mut self) -> Ev {
        within(self.events.recv()).await.expect("events closed")
    }

    /// Skips `Got` events up to the `Finalized` one, then expects `Returned`.
    async fn finalized(&mut self) -> (String, String, String, u64) {
        loop {
            match self.next().await {
                Ev::Got(..) => continue,
                Ev::Finalized(site, name, rc, pieces) => {
                    assert_eq!(self.next().await, Ev::Returned(site.clone(), name.clone()));
                    return (site, name, rc, pieces);
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
    }
}

/// Registers a probe factory for (channel, topic) on `engine`, with a stream-done callback that
/// counts its calls and answers `"<site> done <rc>"`.
async fn register_probe(
    engine: &Engine,
    site: &str,
    channel: &str,
    topic: &str,
    mode: Mode,
) -> Observed {
    let (tx, events) = mpsc::unbounded_channel();
    let made = Arc::new(AtomicUsize::new(0));
    let done_calls = Arc::new(AtomicUsize::new(0));
    let factory = ProbeFactory {
        site: site.to_owned(),
        mode,
        events: tx,
        made: made.clone(),
    };
    let calls = done_calls.clone();
    let site_name = site.to_owned();
    let done = stream_done_cb(move |stream_ctx, _ctx| {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok(Some(Value::from(format!(
            "{site_name} done {}",
            stream_ctx.rc().unwrap_or("none")
        ))))
    });
    ask(
        &engine.streamer,
        RegisterStreamProcessing::new(channel, topic, factory).with_stream_done_cb(done),
    )
    .await;
    Observed {
        events,
        made,
        done_calls,
    }
}

// ---------------------------------------------------------------------------------------------
// A counting producer: pieces `{i, last}`, with optional failures.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// `produce` fails when asked for piece `i` (0-based).
    FailAt(u64),
    /// `produce` panics when asked for piece `i`.
    PanicAt(u64),
    /// `produce` never answers when asked for piece `i`; it reports on `blocked` first.
    BlockAt(u64),
    /// `produce` returns a zero timeout for piece `i`.
    ZeroTimeoutAt(u64),
}

struct Counting {
    n: u64,
    sent: u64,
    timeout: Duration,
    fault: Fault,
    produced: Arc<AtomicUsize>,
    replies: mpsc::UnboundedSender<HashMap<String, Shareable>>,
    blocked: Option<mpsc::UnboundedSender<u64>>,
}

/// A producer of `n` pieces and the log of the reply maps it saw.
fn counting(
    n: u64,
    fault: Fault,
) -> (
    Counting,
    Arc<AtomicUsize>,
    mpsc::UnboundedReceiver<HashMap<String, Shareable>>,
) {
    let produced = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Counting {
            n,
            sent: 0,
            timeout: PIECE_TIMEOUT,
            fault,
            produced: produced.clone(),
            replies: tx,
            blocked: None,
        },
        produced,
        rx,
    )
}

impl ObjectProducer for Counting {
    fn produce<'a>(
        &'a mut self,
        _stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<Option<Produced>, String>> {
        Box::pin(async move {
            self.produced.fetch_add(1, Ordering::SeqCst);
            if self.sent == self.n {
                return Ok(None);
            }
            let mut timeout = self.timeout;
            match self.fault {
                Fault::FailAt(i) if i == self.sent => return Err("the source broke".into()),
                Fault::PanicAt(i) if i == self.sent => panic!("the producer panics"),
                Fault::BlockAt(i) if i == self.sent => {
                    if let Some(b) = &self.blocked {
                        let _ = b.send(i);
                    }
                    futures::future::pending::<()>().await;
                }
                Fault::ZeroTimeoutAt(i) if i == self.sent => timeout = Duration::ZERO,
                _ => {}
            }
            let mut piece = Shareable::new();
            piece.insert("i", self.sent);
            piece.insert("last", self.sent + 1 == self.n);
            self.sent += 1;
            Ok(Some(Produced::new(piece, timeout)))
        })
    }

    fn process_replies<'a>(
        &'a mut self,
        replies: &'a HashMap<String, Shareable>,
        _stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<StreamStep, String>> {
        Box::pin(async move {
            let _ = self.replies.send(replies.clone());
            let mut failed = Map::new();
            let mut ended = Map::new();
            for (site, reply) in replies {
                let rc = reply.return_code();
                if !rc.is_ok() {
                    failed.insert(site.as_str(), rc.as_str());
                } else if let Some(v) = reply.header_or_none(keys::HEADER_END_RESULT) {
                    ended.insert(site.as_str(), v.clone());
                }
            }
            Ok(if !failed.is_empty() {
                StreamStep::Failed(Value::Map(failed))
            } else if !ended.is_empty() && ended.len() == replies.len() {
                StreamStep::Done(Value::Map(ended))
            } else {
                StreamStep::Continue
            })
        })
    }
}

fn named(name: &str) -> StreamContext {
    let mut ctx = StreamContext::new();
    ctx.set("name", name);
    ctx
}

fn map_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.as_map().and_then(|m| m.get(key)).and_then(Value::as_str)
}

// ---------------------------------------------------------------------------------------------
// Raw stream messages, for the receiver's checks.

fn raw_piece(tx_id: &str, seq: i64, name: &str) -> Shareable {
    let mut piece = Shareable::new();
    piece.insert("i", seq);
    piece.set_header(keys::HEADER_TX_ID, tx_id);
    piece.set_header(keys::HEADER_SEQ, seq);
    piece.set_header(keys::HEADER_CHANNEL, CHANNEL);
    piece.set_header(keys::HEADER_TOPIC, TOPIC);
    if seq == 0 {
        piece.set_header(keys::HEADER_CTX, named(name));
    }
    piece
}

/// Sends a raw stream message from `from` to `to` and returns `to`'s reply.
async fn send_raw(from: &Engine, to: &str, topic: &str, msg: Shareable) -> Shareable {
    let mut replies = ask(
        &from.aux,
        SendAuxRequest::new(to, topic, msg, PIECE_TIMEOUT),
    )
    .await
    .unwrap();
    replies.remove(to).expect("a reply from the target")
}

fn error_text(reply: &Shareable) -> String {
    reply
        .header_or_none(header_key::ERROR)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[actix::test]
async fn normal_end_finalises_ok_calls_stream_done_once_and_returns_the_end_result() {
    let fed = federation("j-normal").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    let (producer, _, _) = counting(3, Fault::None);
    let mut stream_ctx = named("model");
    stream_ctx.set("mine", 7);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(stream_ctx),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok(), "rc {}", outcome.rc);
    assert_eq!(outcome.pieces, 3);
    let result = outcome.result.expect("the producer's result");
    assert_eq!(map_str(&result, "site-2"), Some("site-2 done OK"));
    // the caller's context comes back with the streamer's keys (#14)
    assert_eq!(outcome.stream_ctx.get("mine"), Some(&Value::from(7)));
    assert_eq!(outcome.stream_ctx.channel(), Some(CHANNEL));
    assert_eq!(outcome.stream_ctx.topic(), Some(TOPIC));

    for i in 0..3 {
        assert_eq!(
            site2.next().await,
            Ev::Got("site-2".into(), "model".into(), i)
        );
    }
    let (_, name, rc, pieces) = site2.finalized().await;
    assert_eq!((name.as_str(), rc.as_str(), pieces), ("model", "OK", 3));
    assert_eq!(site2.done_calls.load(Ordering::SeqCst), 1);
    assert_eq!(site2.made.load(Ordering::SeqCst), 1);
    assert!(ask(&fed.site("site-2").streamer, GetOpenStreams)
        .await
        .is_empty());
}

#[actix::test]
async fn normal_end_by_the_producer_is_finalised_ok_not_aborted() {
    // The consumer never stops by itself: the stream ends when the producer runs out, and the
    // end notice carries OK (#9), not NVFlare's TASK_ABORTED.
    let fed = federation("j-notice").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::StopAt(99),
    )
    .await;
    let (producer, produced, _) = counting(2, Fault::None);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("log")),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok());
    assert_eq!(outcome.result, None);
    assert_eq!(outcome.pieces, 2);
    assert_eq!(
        produced.load(Ordering::SeqCst),
        3,
        "the third call said: no more"
    );
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("OK", 2));
    assert_eq!(site2.done_calls.load(Ordering::SeqCst), 1);
}

#[actix::test]
async fn consumer_ending_early_ends_the_stream_and_the_producer_gets_its_result() {
    let fed = federation("j-early").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::StopAt(2),
    )
    .await;
    let (producer, produced, _) = counting(5, Fault::None);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("early")),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok());
    assert_eq!(outcome.pieces, 2, "nothing sent after the consumer stopped");
    assert_eq!(produced.load(Ordering::SeqCst), 2);
    assert_eq!(
        map_str(outcome.result.as_ref().unwrap(), "site-2"),
        Some("site-2 done OK")
    );
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("OK", 2));
    assert_eq!(site2.done_calls.load(Ordering::SeqCst), 1);
}

#[actix::test]
async fn producer_failure_tells_the_receiver_which_finalises_once() {
    let fed = federation("j-pfail").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    let sender = &fed.site("site-1").streamer;

    let (producer, _, _) = counting(5, Fault::FailAt(2));
    let err = ask(
        sender,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("fails")),
    )
    .await
    .unwrap_err();
    match err {
        EngineError::StreamProducerFailed { reason, .. } => {
            assert!(reason.contains("the source broke"), "{reason}")
        }
        other => panic!("unexpected error {other}"),
    }
    let (_, name, rc, pieces) = site2.finalized().await;
    assert_eq!(
        (name.as_str(), rc.as_str(), pieces),
        ("fails", "EXECUTION_EXCEPTION", 2)
    );

    // a panicking producer is caught, and the streamer keeps working
    let (producer, _, _) = counting(5, Fault::PanicAt(1));
    let err = ask(
        sender,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("panics")),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("the producer panics"), "{err}");
    let (_, name, rc, pieces) = site2.finalized().await;
    assert_eq!(
        (name.as_str(), rc.as_str(), pieces),
        ("panics", "EXECUTION_EXCEPTION", 1)
    );
    assert_eq!(
        site2.done_calls.load(Ordering::SeqCst),
        2,
        "once per stream"
    );
    assert!(ask(&fed.site("site-2").streamer, GetOpenStreams)
        .await
        .is_empty());
}

#[actix::test]
async fn zero_timeout_from_the_producer_fails_the_stream() {
    let fed = federation("j-zero").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    let (producer, _, _) = counting(3, Fault::ZeroTimeoutAt(1));
    let err = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("zero")),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("zero timeout"), "{err}");
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("EXECUTION_EXCEPTION", 1));
}

#[actix::test]
async fn consumer_failure_answers_execution_exception_and_finalises_once() {
    let fed = federation("j-cfail").await;
    let sender = &fed.site("site-1").streamer;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::FailAt(2),
    )
    .await;
    let (producer, _, mut replies) = counting(5, Fault::None);
    let outcome = ask(
        sender,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("c")),
    )
    .await
    .unwrap();
    assert_eq!(outcome.rc.as_str(), "ERROR");
    assert_eq!(
        map_str(outcome.result.as_ref().unwrap(), "site-2"),
        Some("EXECUTION_EXCEPTION")
    );
    assert_eq!(outcome.pieces, 2);
    let _first = replies.recv().await.unwrap();
    let second = replies.recv().await.unwrap();
    assert!(error_text(&second["site-2"]).contains("the probe refuses this piece"));
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("EXECUTION_EXCEPTION", 2));
    assert_eq!(site2.done_calls.load(Ordering::SeqCst), 1);

    // a panicking consumer too, and the receiver keeps serving
    let mut site3 = register_probe(
        fed.site("site-3"),
        "site-3",
        CHANNEL,
        TOPIC,
        Mode::PanicAt(1),
    )
    .await;
    let (producer, _, _) = counting(5, Fault::None);
    let outcome = ask(
        sender,
        StreamObjects::new(CHANNEL, TOPIC, "site-3", producer).with_stream_ctx(named("p")),
    )
    .await
    .unwrap();
    assert_eq!(outcome.rc.as_str(), "ERROR");
    let (_, _, rc, pieces) = site3.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("EXECUTION_EXCEPTION", 1));
    let mut again = register_probe(
        fed.site("site-3"),
        "site-3",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    let (producer, _, _) = counting(2, Fault::None);
    let outcome = ask(
        sender,
        StreamObjects::new(CHANNEL, TOPIC, "site-3", producer).with_stream_ctx(named("q")),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok());
    assert_eq!(again.finalized().await.2, "OK");
}

#[actix::test]
async fn consumed_callback_receives_the_whole_consume_result() {
    let fed = federation("j-consumed").await;
    let (tx, mut seen) = mpsc::unbounded_channel::<(bool, String)>();
    let (factory_events, _events) = mpsc::unbounded_channel();
    let factory = ProbeFactory {
        site: "site-2".into(),
        mode: Mode::UntilLast,
        events: factory_events,
        made: Arc::new(AtomicUsize::new(0)),
    };
    let cb = consumed_cb(move |result, _stream_ctx, _ctx| {
        let rc = result
            .reply
            .as_ref()
            .map_or("none".to_owned(), |r| r.return_code().to_string());
        let _ = tx.send((result.keep_going, rc));
        Ok(())
    });
    ask(
        &fed.site("site-2").streamer,
        RegisterStreamProcessing::new(CHANNEL, TOPIC, factory).with_consumed_cb(cb),
    )
    .await;
    let (producer, _, _) = counting(2, Fault::None);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("cb")),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok());
    assert_eq!(within(seen.recv()).await.unwrap(), (true, "none".into()));
    assert_eq!(within(seen.recv()).await.unwrap(), (false, "none".into()));

    // a failing callback ends the stream like a failing consume
    let (factory_events, events) = mpsc::unbounded_channel();
    let factory = ProbeFactory {
        site: "site-3".into(),
        mode: Mode::UntilLast,
        events: factory_events,
        made: Arc::new(AtomicUsize::new(0)),
    };
    ask(
        &fed.site("site-3").streamer,
        RegisterStreamProcessing::new(CHANNEL, TOPIC, factory)
            .with_consumed_cb(consumed_cb(|_, _, _| Err("callback says no".into()))),
    )
    .await;
    let (producer, _, _) = counting(3, Fault::None);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-3", producer).with_stream_ctx(named("cb2")),
    )
    .await
    .unwrap();
    assert_eq!(outcome.rc.as_str(), "ERROR");
    assert_eq!(outcome.pieces, 1);
    let mut observed = Observed {
        events,
        made: Arc::new(AtomicUsize::new(0)),
        done_calls: Arc::new(AtomicUsize::new(0)),
    };
    assert_eq!(observed.finalized().await.2, "EXECUTION_EXCEPTION");
}

#[actix::test]
async fn abort_on_the_sender_ends_both_sides_with_task_aborted() {
    let fed = federation("j-abort-s").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    let (mut producer, _, _) = counting(5, Fault::BlockAt(2));
    let (blocked_tx, mut blocked) = mpsc::unbounded_channel();
    producer.blocked = Some(blocked_tx);
    let sender = fed.site("site-1").streamer.clone();
    let stream = actix::spawn(async move {
        sender
            .send(
                StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("a")),
            )
            .await
    });
    assert_eq!(within(blocked.recv()).await, Some(2));
    assert!(
        ask(
            &fed.site("site-1").run,
            AbortRun {
                job_id: "j-abort-s".into(),
                reason: "test".into()
            }
        )
        .await
    );
    let outcome = within(stream).await.unwrap().unwrap().unwrap();
    assert_eq!(outcome.rc.as_str(), "TASK_ABORTED");
    assert_eq!(outcome.pieces, 2);
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("TASK_ABORTED", 2));

    // an aborted run starts no stream
    let (producer, produced, _) = counting(1, Fault::None);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer),
    )
    .await
    .unwrap();
    assert_eq!(outcome.rc.as_str(), "TASK_ABORTED");
    assert_eq!((outcome.pieces, produced.load(Ordering::SeqCst)), (0, 0));
}

#[actix::test]
async fn abort_on_the_receiver_ends_its_stream_with_task_aborted() {
    let fed = federation("j-abort-r").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::HangAt(2),
    )
    .await;
    let (producer, _, mut replies) = counting(5, Fault::None);
    let sender = fed.site("site-1").streamer.clone();
    let stream = actix::spawn(async move {
        sender
            .send(
                StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("r")),
            )
            .await
    });
    // the receiver is consuming piece 2 (and hangs) when its run is aborted
    assert_eq!(site2.next().await, Ev::Got("site-2".into(), "r".into(), 0));
    assert_eq!(site2.next().await, Ev::Got("site-2".into(), "r".into(), 1));
    assert!(
        ask(
            &fed.site("site-2").run,
            AbortRun {
                job_id: "j-abort-r".into(),
                reason: "test".into()
            }
        )
        .await
    );
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("TASK_ABORTED", 2));
    let outcome = within(stream).await.unwrap().unwrap().unwrap();
    assert_eq!(
        outcome.rc.as_str(),
        "ERROR",
        "the sender's run was not aborted"
    );
    let _first = replies.recv().await.unwrap();
    let second = replies.recv().await.unwrap();
    assert_eq!(second["site-2"].return_code().as_str(), "TASK_ABORTED");
}

#[actix::test]
async fn consumer_that_never_answers_makes_the_producer_see_timeout() {
    let fed = federation("j-timeout").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::HangAt(1),
    )
    .await;
    let (mut producer, _, mut replies) = counting(3, Fault::None);
    producer.timeout = Duration::from_millis(300);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("slow")),
    )
    .await
    .unwrap();
    assert_eq!(outcome.rc.as_str(), "ERROR");
    assert_eq!(
        map_str(outcome.result.as_ref().unwrap(), "site-2"),
        Some("TIMEOUT")
    );
    let seen = replies.recv().await.unwrap();
    assert_eq!(seen["site-2"].return_code().as_str(), "TIMEOUT");
    // the end notice (rc ERROR) ends the stuck session
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("ERROR", 1));
}

#[actix::test]
async fn unknown_factory_answers_execution_exception() {
    let fed = federation("j-nofactory").await;
    let (producer, _, mut replies) = counting(3, Fault::None);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new("nobody", "listens", "site-2", producer),
    )
    .await
    .unwrap();
    assert_eq!(outcome.rc.as_str(), "ERROR");
    let seen = replies.recv().await.unwrap();
    let reply = &seen["site-2"];
    assert_eq!(reply.return_code().as_str(), "EXECUTION_EXCEPTION");
    assert!(error_text(reply).contains("no consumer factory"));
    assert!(ask(&fed.site("site-2").streamer, GetOpenStreams)
        .await
        .is_empty());
}

#[actix::test]
async fn factory_lookup_tries_the_pair_then_the_channel_wildcard_then_both_wildcards() {
    let fed = federation("j-lookup").await;
    let site2 = fed.site("site-2");
    let mut exact = register_probe(site2, "exact", "ch", "tp", Mode::UntilLast).await;
    let mut channel_any =
        register_probe(site2, "channel-any", "ch", WILDCARD, Mode::UntilLast).await;
    let mut any = register_probe(site2, "any", WILDCARD, WILDCARD, Mode::UntilLast).await;
    // the pair is the key: ("a:b", "c") and ("a", "b:c") do not collide (#15)
    let mut colon1 = register_probe(site2, "colon-1", "a:b", "c", Mode::UntilLast).await;
    let mut colon2 = register_probe(site2, "colon-2", "a", "b:c", Mode::UntilLast).await;
    let cases: [(&str, &str, &mut Observed); 5] = [
        ("ch", "tp", &mut exact),
        ("ch", "other", &mut channel_any),
        ("other", "tp", &mut any),
        ("a:b", "c", &mut colon1),
        ("a", "b:c", &mut colon2),
    ];
    for (channel, topic, observed) in cases {
        let (producer, _, _) = counting(1, Fault::None);
        let outcome = ask(
            &fed.site("site-1").streamer,
            StreamObjects::new(channel, topic, "site-2", producer).with_stream_ctx(named(topic)),
        )
        .await
        .unwrap();
        assert!(outcome.rc.is_ok(), "{channel}/{topic}: {}", outcome.rc);
        let (_, name, rc, _) = observed.finalized().await;
        assert_eq!((name.as_str(), rc.as_str()), (topic, "OK"));
    }
    for o in [&exact, &channel_any, &any, &colon1, &colon2] {
        assert_eq!(o.made.load(Ordering::SeqCst), 1);
    }
}

#[actix::test]
async fn repeated_first_message_is_bad_request_without_deadlock_and_the_next_stream_works() {
    let fed = federation("j-repeat").await;
    let site1 = fed.site("site-1");
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    let first = send_raw(
        site1,
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-1", 0, "rep"),
    )
    .await;
    assert!(first.return_code().is_ok());
    let again = send_raw(
        site1,
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-1", 0, "rep"),
    )
    .await;
    assert_eq!(again.return_code().as_str(), "BAD_REQUEST_DATA");
    assert!(
        error_text(&again).contains("sequence error"),
        "{}",
        error_text(&again)
    );
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("BAD_REQUEST_DATA", 1));

    // no deadlock: the receiver serves the next stream
    let (producer, _, _) = counting(3, Fault::None);
    let outcome = ask(
        &site1.streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("next")),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok());
    let (_, name, rc, pieces) = site2.finalized().await;
    assert_eq!((name.as_str(), rc.as_str(), pieces), ("next", "OK", 3));
}

#[actix::test]
async fn sequence_gap_is_bad_request_and_ends_the_stream() {
    let fed = federation("j-gap").await;
    let site1 = fed.site("site-1");
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    assert!(send_raw(
        site1,
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-g", 0, "gap")
    )
    .await
    .return_code()
    .is_ok());
    assert!(send_raw(
        site1,
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-g", 1, "gap")
    )
    .await
    .return_code()
    .is_ok());
    let gap = send_raw(
        site1,
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-g", 3, "gap"),
    )
    .await;
    assert_eq!(gap.return_code().as_str(), "BAD_REQUEST_DATA");
    assert!(
        error_text(&gap).contains("expected seq 2, got 3"),
        "{}",
        error_text(&gap)
    );
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("BAD_REQUEST_DATA", 2));
    // the stream is gone: a late piece is refused too
    let late = send_raw(
        site1,
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-g", 2, "gap"),
    )
    .await;
    assert_eq!(late.return_code().as_str(), "BAD_REQUEST_DATA");
    assert!(
        error_text(&late).contains("expected 0"),
        "{}",
        error_text(&late)
    );
    // and a message without the stream's headers is refused
    let mut bare = Shareable::new();
    bare.set_header(keys::HEADER_TX_ID, "tx-x");
    let bare = send_raw(site1, "site-2", keys::TOPIC_REQUEST, bare).await;
    assert_eq!(bare.return_code().as_str(), "BAD_REQUEST_DATA");
    assert!(ask(&fed.site("site-2").streamer, GetOpenStreams)
        .await
        .is_empty());
}

#[actix::test]
async fn twenty_first_session_is_refused_with_a_clear_error() {
    let fed = federation("j-limit").await;
    let site1 = fed.site("site-1");
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    for k in 0..20 {
        let reply = send_raw(
            site1,
            "site-2",
            keys::TOPIC_REQUEST,
            raw_piece(&format!("tx-{k}"), 0, &format!("s{k}")),
        )
        .await;
        assert!(
            reply.return_code().is_ok(),
            "stream {k}: {}",
            reply.return_code()
        );
    }
    assert_eq!(
        ask(&fed.site("site-2").streamer, GetOpenStreams)
            .await
            .len(),
        20
    );
    let refused = send_raw(
        site1,
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-20", 0, "s20"),
    )
    .await;
    assert_eq!(refused.return_code().as_str(), "SERVICE_UNAVAILABLE");
    let text = error_text(&refused);
    assert!(
        text.contains("too many concurrent streaming sessions") && text.contains("20 of 20"),
        "{text}"
    );
    assert_eq!(
        site2.made.load(Ordering::SeqCst),
        20,
        "no consumer for the refused one"
    );

    // ending one (end notice with OK) frees a slot
    let mut notice = Shareable::make_reply(fedrun_core::ReturnCode::OK, None);
    notice.set_header(keys::HEADER_TX_ID, "tx-3");
    assert!(send_raw(site1, "site-2", keys::TOPIC_ABORT, notice)
        .await
        .return_code()
        .is_ok());
    let (_, name, rc, _) = site2.finalized().await;
    assert_eq!((name.as_str(), rc.as_str()), ("s3", "OK"));
    let admitted = send_raw(
        site1,
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-20", 0, "s20"),
    )
    .await;
    assert!(admitted.return_code().is_ok());
}

#[actix::test]
async fn concurrent_streams_to_one_receiver_keep_their_own_state() {
    let fed = federation("j-concurrent").await;
    let (factory, mut received) = BytesConsumerFactory::in_memory();
    ask(
        &fed.site("site-2").streamer,
        RegisterStreamProcessing::new(CHANNEL, TOPIC, factory),
    )
    .await;
    let mut streams = Vec::new();
    for (k, from) in ["site-1", "site-3", "site-1", "site-3", "server", "site-1"]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i as u8) ^ (k as u8 * 37)).collect();
        let producer = BytesProducer::from_bytes(Bytes::from(data)).with_chunk_size(999);
        let sender = fed.site(from).streamer.clone();
        streams.push(actix::spawn(async move {
            sender
                .send(
                    StreamObjects::new(CHANNEL, TOPIC, "site-2", producer)
                        .with_stream_ctx(named(&format!("obj-{k}"))),
                )
                .await
        }));
    }
    for s in streams {
        let outcome = within(s).await.unwrap().unwrap().unwrap();
        assert!(outcome.rc.is_ok(), "{:?}", outcome.result);
        assert_eq!(outcome.pieces, 11);
    }
    for _ in 0..6 {
        let got = within(received.recv()).await.unwrap();
        let name = got.stream_ctx.get("name").and_then(Value::as_str).unwrap();
        let k: u8 = name.trim_start_matches("obj-").parse().unwrap();
        let expected: Vec<u8> = (0..10_000u32).map(|i| (i as u8) ^ (k * 37)).collect();
        assert!(got.rc.is_ok());
        assert_eq!(got.data.as_deref(), Some(expected.as_slice()), "{name}");
    }
}

#[actix::test]
async fn three_receivers_each_get_the_whole_object() {
    let fed = federation("j-three").await;
    let data: Vec<u8> = (0..(2 * 1024 * 1024 + 12345u32))
        .map(|i| (i % 251) as u8)
        .collect();
    let dir = std::env::temp_dir().join(format!("fedrun-stream-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("source.bin");
    std::fs::write(&source, &data).unwrap();
    let mut receivers = Vec::new();
    for site in ["site-2", "site-3", "server"] {
        let target = dir.join(format!("{site}.bin"));
        let (factory, received) =
            BytesConsumerFactory::new(move |_ctx| Ok(ByteSink::File(target.clone())));
        ask(
            &fed.site(site).streamer,
            RegisterStreamProcessing::new("models", "global", factory),
        )
        .await;
        receivers.push((site, received));
    }
    let producer = BytesProducer::from_file(&source).unwrap();
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(
            "models",
            "global",
            AuxTargets::from(vec!["site-2", "site-3", "server"]),
            producer,
        ),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok(), "{:?}", outcome.result);
    assert_eq!(outcome.pieces, 3, "1 MiB chunks");
    let result = outcome.result.unwrap();
    for (site, mut received) in receivers {
        assert_eq!(
            result.as_map().unwrap().get(site).and_then(Value::as_u64),
            Some(data.len() as u64)
        );
        let got = within(received.recv()).await.unwrap();
        assert!(got.rc.is_ok(), "{site}: {}", got.rc);
        let path = got.path.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data, "{site}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[actix::test]
async fn all_sends_to_the_server_and_every_other_client() {
    let fed = federation("j-all").await;
    let mut seen = Vec::new();
    for site in ["server", "site-1", "site-2"] {
        let (factory, received) = BytesConsumerFactory::in_memory();
        ask(
            &fed.site(site).streamer,
            RegisterStreamProcessing::new(CHANNEL, TOPIC, factory),
        )
        .await;
        seen.push((site, received));
    }
    let data = Bytes::from_static(b"the whole object, to everyone");
    let producer = BytesProducer::from_bytes(data.clone()).with_chunk_size(8);
    let outcome = ask(
        &fed.site("site-3").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "@ALL", producer),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok(), "{:?}", outcome.result);
    let result = outcome.result.unwrap();
    let mut keys: Vec<&str> = result
        .as_map()
        .unwrap()
        .keys()
        .filter_map(Value::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["server", "site-1", "site-2"]);
    for (site, mut received) in seen {
        let got = within(received.recv()).await.unwrap();
        assert_eq!(got.data.as_ref(), Some(&data), "{site}");
    }
}

#[actix::test]
async fn idle_timeout_ends_an_orphaned_receiver_stream() {
    let fed = federation_with("j-idle", |c| {
        c.with_idle_timeout(Duration::from_millis(200))
    })
    .await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    // a sender that opens a stream and disappears (no more pieces, no end notice)
    let opened = send_raw(
        fed.site("site-1"),
        "site-2",
        keys::TOPIC_REQUEST,
        raw_piece("tx-orphan", 0, "orphan"),
    )
    .await;
    assert!(opened.return_code().is_ok());
    let (_, name, rc, pieces) = site2.finalized().await;
    assert_eq!(
        (name.as_str(), rc.as_str(), pieces),
        ("orphan", "TIMEOUT", 1)
    );
    assert_eq!(site2.done_calls.load(Ordering::SeqCst), 1);
    assert!(ask(&fed.site("site-2").streamer, GetOpenStreams)
        .await
        .is_empty());
}

#[actix::test]
async fn consumer_can_end_its_own_stream_with_its_handle() {
    let fed = federation("j-endself").await;
    let mut site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::EndItselfAt(1),
    )
    .await;
    let (producer, _, mut replies) = counting(3, Fault::None);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "site-2", producer).with_stream_ctx(named("self")),
    )
    .await
    .unwrap();
    // piece 0 is answered OK; the session then ends (TIMEOUT); piece 1 finds no stream
    let (_, _, rc, pieces) = site2.finalized().await;
    assert_eq!((rc.as_str(), pieces), ("TIMEOUT", 1));
    assert_eq!(outcome.rc.as_str(), "ERROR");
    assert!(replies.recv().await.unwrap()["site-2"]
        .return_code()
        .is_ok());
    assert_eq!(
        replies.recv().await.unwrap()["site-2"]
            .return_code()
            .as_str(),
        "BAD_REQUEST_DATA"
    );
}

#[actix::test]
async fn unknown_target_fails_before_anything_is_sent() {
    let fed = federation("j-unknown").await;
    let site2 = register_probe(
        fed.site("site-2"),
        "site-2",
        CHANNEL,
        TOPIC,
        Mode::UntilLast,
    )
    .await;
    for targets in [
        AuxTargets::from("site-9"),
        AuxTargets::from(vec!["site-2", "nobody"]),
    ] {
        let (producer, produced, _) = counting(3, Fault::None);
        let err = ask(
            &fed.site("site-1").streamer,
            StreamObjects::new(CHANNEL, TOPIC, targets, producer),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, EngineError::UnknownTarget(_)), "{err}");
        assert_eq!(
            produced.load(Ordering::SeqCst),
            0,
            "the producer was not asked"
        );
    }
    assert_eq!(
        site2.made.load(Ordering::SeqCst),
        0,
        "no receiver was called"
    );

    // @ALL before the job clients are known fails the same way
    let net = Network::new();
    let lonely = start_engine(&net, "site-1", "j-unknown", "CJ", false, |c| c).await;
    let (producer, produced, _) = counting(3, Fault::None);
    let err = ask(
        &lonely.streamer,
        StreamObjects::new(CHANNEL, TOPIC, AuxTargets::All, producer),
    )
    .await
    .unwrap_err();
    assert_eq!(err, EngineError::JobClientsNotLoaded);
    assert_eq!(produced.load(Ordering::SeqCst), 0);
}

/// Registers a raw handler on `cell` for one stream topic: reports (secure, rc of the payload)
/// and answers OK without ending the stream.
async fn stream_probe(
    cell: &CellHandle,
    topic: &str,
    seen: mpsc::UnboundedSender<(String, Option<bool>, String)>,
) {
    let topic_name = topic.to_owned();
    cell.register_request_handler(
        "aux_communication",
        topic,
        request_handler(move |req: CellMessage| {
            let rc = req
                .payload
                .as_shareable()
                .map(|s| s.return_code().to_string())
                .unwrap_or_default();
            let _ = seen.send((topic_name.clone(), req.headers.secure(), rc));
            async move { Ok(Some(CellMessage::new(Shareable::new()))) }
        }),
    )
    .await
    .unwrap();
}

#[actix::test]
async fn secure_is_kept_and_the_end_notice_carries_the_real_rc_on_the_wire() {
    let fed = federation("j-secure").await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    stream_probe(&fed.server.cell, keys::TOPIC_REQUEST, tx.clone()).await;
    stream_probe(&fed.server.cell, keys::TOPIC_ABORT, tx).await;
    let (producer, _, _) = counting(1, Fault::None);
    let outcome = ask(
        &fed.site("site-1").streamer,
        StreamObjects::new(CHANNEL, TOPIC, "server", producer).secure(true),
    )
    .await
    .unwrap();
    assert!(outcome.rc.is_ok());
    let (topic, secure, _) = within(seen.recv()).await.unwrap();
    assert_eq!((topic.as_str(), secure), (keys::TOPIC_REQUEST, Some(true)));
    let (topic, secure, rc) = within(seen.recv()).await.unwrap();
    assert_eq!(
        (topic.as_str(), secure, rc.as_str()),
        (keys::TOPIC_ABORT, Some(true), "OK")
    );
}

#[test]
fn stream_messages_and_replies_can_cross_threads() {
    // The facade forwards these messages across actors (and users may send them from other
    // threads): they and their replies must be Send; the factory is shared, so Sync too.
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<StreamObjects>();
    send::<RegisterStreamProcessing>();
    send::<Result<fedrun_engine::StreamOutcome, EngineError>>();
    send::<GetOpenStreams>();
    send_sync::<BytesConsumerFactory>();
    send_sync::<EndStream>();
    send::<BytesProducer>();
}
