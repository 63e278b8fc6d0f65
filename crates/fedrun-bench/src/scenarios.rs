//! The measured side of each scenario, run inside the active child once the orchestrator says
//! `GO`. Each mirrors the scenario of the same name in `cellbench.py` (same counts, warm-ups,
//! deadlines and result fields), on fedrun's two paths:
//!
//! - **aux**: through the engine — `EngineHandle::send_aux_request` (a site) or the server job's
//!   `AuxRunner` (`SendAuxRequest`, multicast), aux fire-and-forget, and object streaming
//!   (`StreamObjects` with a `BytesProducer`, 4 MiB pieces by default) for large transfers;
//! - **core**: plain cells — `SendRequest`, `SendMultiRequest`, `FireAndForget`, one frame each.
//!
//! Every reply is checked; a failed one counts as an error in the result, never as a success.

use std::cell::{Cell as StdCell, RefCell};
use std::io::Read;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_cell::{CellMessage, FireAndForget, Fqcn, Payload, SendMultiRequest, SendRequest};
use fedrun_core::{CellReturnCode, Map, Shareable, Value};
use fedrun_engine::stream::{BytesProducer, StreamObjects};
use fedrun_engine::{AuxReplies, AuxTargets, SendAuxRequest};
use serde_json::{json, Value as Json};

use crate::args::{Options, PathKind, Scenario, Source};
use crate::error::BenchError;
use crate::measure::{epoch_secs, percentile, Memory, WordSum, MIB};
use crate::node::{
    Node, Side, SiteSide, BENCH_CHANNEL, BLOB_TOPIC, TOPIC_ECHO, TOPIC_FF, TOPIC_FF_RESET,
    TOPIC_FF_WAIT, TOPIC_SINK, TOPIC_STREAM_STATUS,
};

/// The timeout of one measured request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The timeout of a warm-up probe (retried until the peer answers).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two warm-up probes that failed (the peer may still be starting).
const PROBE_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// The timeout of one large transfer.
const LARGE_TIMEOUT: Duration = Duration::from_secs(120);

/// The ~100-byte request of `cellbench.py`: `{"task", "round", "site", "data": 48 × "x"}`.
fn small_entries(site: &str) -> [(&'static str, Value); 4] {
    [
        ("task", Value::from("train")),
        ("round", Value::from(7)),
        ("site", Value::from(site)),
        ("data", Value::from("x".repeat(48))),
    ]
}

/// The small request in both forms: a plain value (core) and a Shareable (aux).
struct Small {
    value: Arc<Value>,
    shareable: Shareable,
}

impl Small {
    fn new(site: &str) -> Small {
        let mut shareable = Shareable::new();
        for (k, v) in small_entries(site) {
            shareable.insert(k, v);
        }
        Small {
            value: Arc::new(Value::Map(Map::from_iter(small_entries(site)))),
            shareable,
        }
    }

    fn message(&self) -> CellMessage {
        CellMessage::new(Payload::Value(Arc::clone(&self.value)))
    }
}

/// Who a request goes to.
#[derive(Clone, Debug)]
enum Target {
    Server,
    Site(String),
}

impl Target {
    fn fqcn(&self) -> Result<Fqcn, BenchError> {
        match self {
            Target::Server => Ok(Fqcn::SERVER),
            Target::Site(name) => Ok(Fqcn::new(name.as_str())?),
        }
    }

    fn aux(&self) -> AuxTargets {
        match self {
            Target::Server => AuxTargets::Server,
            Target::Site(name) => AuxTargets::Site(name.clone()),
        }
    }

    fn reply_key(&self) -> &str {
        match self {
            Target::Server => "server",
            Target::Site(name) => name,
        }
    }
}

fn site_side(node: &Node) -> Result<&SiteSide, BenchError> {
    match &node.side {
        Side::Site(site) => Ok(site),
        Side::Server(_) => Err(BenchError::Scenario(
            "this scenario runs on a site, not on the server".into(),
        )),
    }
}

fn aux_ok(replies: &AuxReplies, key: &str) -> bool {
    replies.get(key).is_some_and(|r| r.return_code().is_ok())
}

/// An aux request through this process's engine side.
async fn aux_request(
    node: &Node,
    targets: AuxTargets,
    topic: &str,
    request: Shareable,
    timeout: Duration,
) -> Result<AuxReplies, BenchError> {
    match &node.side {
        Side::Site(site) => Ok(site
            .engine
            .send_aux_request(targets, topic, request, timeout)
            .await?),
        Side::Server(server) => Ok(server
            .aux
            .send(SendAuxRequest::new(targets, topic, request, timeout))
            .await??),
    }
}

/// One echo request; `true` when the reply says OK. Failures are logged and count as `false`.
async fn echo(
    node: &Node,
    path: PathKind,
    target: &Target,
    small: &Small,
    timeout: Duration,
) -> bool {
    let outcome = match path {
        PathKind::Core => match target.fqcn() {
            Ok(fqcn) => {
                let req =
                    SendRequest::new(BENCH_CHANNEL, TOPIC_ECHO, fqcn, small.message(), timeout);
                node.core
                    .send_request(req)
                    .await
                    .map(|reply| reply.return_code().is_ok())
                    .map_err(BenchError::from)
            }
            Err(e) => Err(e),
        },
        PathKind::Aux => aux_request(
            node,
            target.aux(),
            TOPIC_ECHO,
            small.shareable.clone(),
            timeout,
        )
        .await
        .map(|replies| aux_ok(&replies, target.reply_key())),
    };
    outcome.unwrap_or_else(|e| {
        log::warn!("{}: echo to {target:?} failed: {e}", node.name);
        false
    })
}

/// Retries until the peer answers (the deadline bounds it), then sends `n` more requests.
async fn warm_up(
    node: &Node,
    path: PathKind,
    target: &Target,
    small: &Small,
    n: usize,
    deadline: Instant,
) -> Result<(), BenchError> {
    loop {
        if Instant::now() > deadline {
            return Err(BenchError::Scenario(format!(
                "{target:?} never answered on the {} path",
                path.as_str()
            )));
        }
        if echo(node, path, target, small, PROBE_TIMEOUT).await {
            break;
        }
        tokio::time::sleep(PROBE_RETRY_PAUSE).await;
    }
    for _ in 0..n {
        echo(node, path, target, small, REQUEST_TIMEOUT).await;
    }
    Ok(())
}

fn micros(v: Option<f64>) -> Json {
    v.map_or(Json::Null, |s| json!(s * 1e6))
}

/// Runs the scenario of `opts` on this (active) node and returns its result fields.
///
/// # Errors
///
/// The peer never answered, or the scenario does not run on this side.
pub async fn run(node: &Node, opts: &Options) -> Result<Json, BenchError> {
    match opts.scenario {
        Scenario::Latency => latency(node, opts).await,
        Scenario::Throughput => throughput(node, opts).await,
        Scenario::Multicast => multicast(node, opts).await,
        Scenario::Large => large(node, opts).await,
        Scenario::Ff => fire_and_forget(node, opts).await,
    }
}

async fn latency(node: &Node, opts: &Options) -> Result<Json, BenchError> {
    site_side(node)?;
    let deadline = Instant::now() + opts.deadline;
    let small = Small::new(&node.name);
    warm_up(
        node,
        opts.path,
        &Target::Server,
        &small,
        opts.warmup,
        deadline,
    )
    .await?;
    let mut lat = Vec::with_capacity(opts.count);
    let mut errors = 0u64;
    let t0 = Instant::now();
    for _ in 0..opts.count {
        if Instant::now() > deadline {
            break;
        }
        let s = Instant::now();
        let ok = echo(node, opts.path, &Target::Server, &small, REQUEST_TIMEOUT).await;
        lat.push(s.elapsed().as_secs_f64());
        if !ok {
            errors += 1;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    Ok(json!({
        "n": lat.len(),
        "errors": errors,
        "p50_us": micros(percentile(&lat, 50.0)),
        "p90_us": micros(percentile(&lat, 90.0)),
        "p99_us": micros(percentile(&lat, 99.0)),
        "max_us": micros(lat.last().copied()),
        "mean_us": mean * 1e6,
        "seq_rps": lat.len() as f64 / wall,
    }))
}

async fn throughput(node: &Node, opts: &Options) -> Result<Json, BenchError> {
    site_side(node)?;
    let deadline = Instant::now() + opts.deadline;
    let small = Small::new(&node.name);
    warm_up(
        node,
        opts.path,
        &Target::Server,
        &small,
        opts.warmup,
        deadline,
    )
    .await?;
    // One thread runs every worker: plain cells are enough to share the counters.
    let issued = StdCell::new(0usize);
    let errors = StdCell::new(0u64);
    let lat = RefCell::new(Vec::with_capacity(opts.count));
    let worker = || async {
        loop {
            if issued.get() >= opts.count || Instant::now() > deadline {
                return;
            }
            issued.set(issued.get() + 1);
            let s = Instant::now();
            let ok = echo(node, opts.path, &Target::Server, &small, REQUEST_TIMEOUT).await;
            lat.borrow_mut().push(s.elapsed().as_secs_f64());
            if !ok {
                errors.set(errors.get() + 1);
            }
        }
    };
    let t0 = Instant::now();
    futures::future::join_all((0..opts.concurrency).map(|_| worker())).await;
    let wall = t0.elapsed().as_secs_f64();
    let mut lat = lat.into_inner();
    lat.sort_by(f64::total_cmp);
    Ok(json!({
        "concurrency": opts.concurrency,
        "n": lat.len(),
        "errors": errors.get(),
        "rps": lat.len() as f64 / wall,
        "p50_us": micros(percentile(&lat, 50.0)),
        "p99_us": micros(percentile(&lat, 99.0)),
    }))
}

async fn multicast(node: &Node, opts: &Options) -> Result<Json, BenchError> {
    let Side::Server(_) = &node.side else {
        return Err(BenchError::Scenario("multicast runs on the server".into()));
    };
    let deadline = Instant::now() + opts.deadline;
    let small = Small::new(&node.name);
    let names: Vec<String> = (1..=opts.clients).map(|i| format!("site-{i}")).collect();
    let fqcns = names
        .iter()
        .map(|n| Fqcn::new(n.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    for f in &fqcns {
        let left = deadline.saturating_duration_since(Instant::now());
        if !node.transport.wait_for_peer(f, left).await {
            return Err(BenchError::Scenario(format!("{f} never connected")));
        }
    }
    for name in &names {
        warm_up(
            node,
            opts.path,
            &Target::Site(name.clone()),
            &small,
            5,
            deadline,
        )
        .await?;
    }
    let broadcast = || async {
        match opts.path {
            PathKind::Core => {
                let requests = fqcns.iter().map(|f| (f.clone(), small.message())).collect();
                let req =
                    SendMultiRequest::new(BENCH_CHANNEL, TOPIC_ECHO, requests, REQUEST_TIMEOUT);
                match node.core.send_multi_request(req).await {
                    Ok(replies) => replies.values().filter(|r| r.return_code().is_ok()).count(),
                    Err(e) => {
                        log::warn!("server: multicast failed: {e}");
                        0
                    }
                }
            }
            PathKind::Aux => {
                let targets = AuxTargets::Sites(names.clone());
                let request = small.shareable.clone();
                match aux_request(node, targets, TOPIC_ECHO, request, REQUEST_TIMEOUT).await {
                    Ok(replies) => names.iter().filter(|n| aux_ok(&replies, n)).count(),
                    Err(e) => {
                        log::warn!("server: aux multicast failed: {e}");
                        0
                    }
                }
            }
        }
    };
    for _ in 0..opts.warmup {
        broadcast().await;
    }
    let mut lat = Vec::with_capacity(opts.count);
    let mut errors = 0usize;
    for _ in 0..opts.count {
        if Instant::now() > deadline {
            break;
        }
        let s = Instant::now();
        let good = broadcast().await;
        lat.push(s.elapsed().as_secs_f64());
        errors += names.len() - good.min(names.len());
    }
    lat.sort_by(f64::total_cmp);
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    Ok(json!({
        "clients": opts.clients,
        "n": lat.len(),
        "errors": errors,
        "p50_us": micros(percentile(&lat, 50.0)),
        "p99_us": micros(percentile(&lat, 99.0)),
        "mean_us": mean * 1e6,
    }))
}

/// Pseudo-random bytes (xorshift64), deterministic.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = vec![0u8; len];
    for word in out.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let b = state.to_le_bytes();
        word.copy_from_slice(&b[..word.len()]);
    }
    out
}

/// The length of the block a [`PatternReader`] repeats: a little over 1 MiB, so that no two
/// 1 MiB chunks of a transfer are alike.
const PATTERN_BLOCK: usize = (1 << 20) + 4099;

/// A lazy source of `remaining` bytes: a random block repeated, checksummed as it is read. The
/// object never exists in memory as a whole (like a file read chunk by chunk).
struct PatternReader {
    block: Arc<Vec<u8>>,
    pos: usize,
    remaining: u64,
    sum: Arc<Mutex<WordSum>>,
}

impl Read for PatternReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let mut filled = 0;
        while filled < want {
            let from = self.block.get(self.pos..).unwrap_or_default();
            let n = from.len().min(want - filled);
            buf[filled..filled + n].copy_from_slice(&from[..n]);
            filled += n;
            self.pos = (self.pos + n) % self.block.len().max(1);
        }
        self.sum
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update(&buf[..filled]);
        self.remaining -= filled as u64;
        Ok(filled)
    }
}

fn value_u64(v: Option<&Arc<Value>>, key: &str) -> Option<u64> {
    v.and_then(|v| v.as_map())
        .and_then(|m| m.get(key))
        .and_then(Value::as_u64)
}

/// A core request to the server with a value payload; the reply's value, if OK.
async fn core_call(
    node: &Node,
    topic: &str,
    payload: Payload,
    timeout: Duration,
) -> Option<Arc<Value>> {
    let req = SendRequest::new(
        BENCH_CHANNEL,
        topic,
        Fqcn::SERVER,
        CellMessage::new(payload),
        timeout,
    );
    match node.core.send_request(req).await {
        Ok(reply) if reply.return_code().is_ok() => reply.payload.as_value().cloned(),
        Ok(reply) => {
            log::warn!("{}: {topic} answered {}", node.name, reply.return_code());
            None
        }
        Err(e) => {
            log::warn!("{}: {topic} failed: {e}", node.name);
            None
        }
    }
}

async fn large(node: &Node, opts: &Options) -> Result<Json, BenchError> {
    let site = site_side(node)?;
    let deadline = Instant::now() + opts.deadline;
    let small = Small::new(&node.name);
    warm_up(node, PathKind::Core, &Target::Server, &small, 5, deadline).await?;
    warm_up(node, PathKind::Aux, &Target::Server, &small, 5, deadline).await?;
    let size = opts.size_bytes();
    let size_usize = usize::try_from(size)
        .map_err(|_| BenchError::Scenario(format!("{size} bytes do not fit in memory")))?;
    let in_memory = opts.path == PathKind::Core || opts.source == Source::Memory;
    let rss_before = Memory::of(None);
    let (payload, payload_sum) = if in_memory {
        let data = random_bytes(size_usize, 0x9E37_79B9_7F4A_7C15);
        let mut sum = WordSum::default();
        sum.update(&data);
        (Some(Bytes::from(data)), sum.finish())
    } else {
        (None, 0)
    };
    let block = Arc::new(random_bytes(PATTERN_BLOCK, 0x2545_F491_4F6C_DD1D));
    let rss_payload = Memory::of(None);
    let chunk = opts.chunk_kib * 1024;
    let mut times = Vec::with_capacity(opts.count);
    let mut errors = 0u64;
    // The first transfer is an untimed warm-up.
    for i in 0..=opts.count {
        if Instant::now() > deadline {
            break;
        }
        let reader_sum = Arc::new(Mutex::new(WordSum::default()));
        let s = Instant::now();
        let good = match (opts.path, &payload) {
            (PathKind::Core, Some(data)) => {
                let reply = core_call(
                    node,
                    TOPIC_SINK,
                    Payload::Bytes(data.clone()),
                    LARGE_TIMEOUT,
                )
                .await;
                value_u64(reply.as_ref(), "n") == Some(size)
                    && value_u64(reply.as_ref(), "sum") == Some(payload_sum)
            }
            (PathKind::Core, None) => false,
            (PathKind::Aux, _) => {
                let producer = match &payload {
                    Some(data) => BytesProducer::from_bytes(data.clone()).with_chunk_size(chunk),
                    None => BytesProducer::from_reader(
                        PatternReader {
                            block: Arc::clone(&block),
                            pos: 0,
                            remaining: size,
                            sum: Arc::clone(&reader_sum),
                        },
                        Some(size),
                    )
                    .with_chunk_size(chunk),
                };
                let msg =
                    StreamObjects::new(BENCH_CHANNEL, BLOB_TOPIC, AuxTargets::Server, producer);
                match site.engine.send(msg).await {
                    Ok(Ok(outcome)) => {
                        let got = outcome
                            .result
                            .as_ref()
                            .and_then(Value::as_map)
                            .and_then(|m| m.get("server"))
                            .and_then(Value::as_u64);
                        if !outcome.rc.is_ok() || got != Some(size) {
                            log::warn!(
                                "{}: stream ended {} with {:?}",
                                node.name,
                                outcome.rc,
                                outcome.result
                            );
                        }
                        outcome.rc.is_ok() && got == Some(size)
                    }
                    Ok(Err(e)) => {
                        log::warn!("{}: stream failed: {e}", node.name);
                        false
                    }
                    Err(e) => {
                        log::warn!("{}: stream failed: {e}", node.name);
                        false
                    }
                }
            }
        };
        let d = s.elapsed().as_secs_f64();
        // Outside the timed part: did the server see exactly these bytes?
        let intact = match opts.path {
            PathKind::Core => true,
            PathKind::Aux => {
                let expected = if payload.is_some() {
                    payload_sum
                } else {
                    reader_sum
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .finish()
                };
                let status =
                    core_call(node, TOPIC_STREAM_STATUS, Payload::None, REQUEST_TIMEOUT).await;
                value_u64(status.as_ref(), "size") == Some(size)
                    && value_u64(status.as_ref(), "sum") == Some(expected)
            }
        };
        if !(good && intact) {
            errors += 1;
        }
        if i > 0 {
            times.push(d);
        }
    }
    if times.is_empty() {
        return Err(BenchError::Scenario(
            "no timed transfer before the deadline".into(),
        ));
    }
    times.sort_by(f64::total_cmp);
    let med = crate::measure::median(&times).unwrap_or(f64::NAN);
    Ok(json!({
        "size_mib": opts.size_mib,
        "source": if in_memory { "memory" } else { "reader" },
        "chunk_kib": opts.chunk_kib,
        "n": times.len(),
        "errors": errors,
        "median_s": med,
        "min_s": times.first(),
        "max_s": times.last(),
        "mib_s": (size as f64 / MIB) / med,
        "sender_rss_before_payload": rss_before.rss,
        "sender_rss_with_payload": rss_payload.rss,
        "sender_hwm": Memory::of(None).hwm,
    }))
}

/// One fire-and-forget message; `true` when it was handed to the connection.
async fn fire(node: &Node, path: PathKind, site: &SiteSide, small: &Small) -> bool {
    match path {
        PathKind::Core => {
            let msg =
                FireAndForget::new(BENCH_CHANNEL, TOPIC_FF, vec![Fqcn::SERVER], small.message());
            match node.core.fire_and_forget(msg).await {
                Ok(codes) => codes.values().all(|c| *c == CellReturnCode::Ok),
                Err(e) => {
                    log::warn!("{}: fire-and-forget failed: {e}", node.name);
                    false
                }
            }
        }
        PathKind::Aux => match site
            .engine
            .fire_and_forget_aux_request(TOPIC_FF, small.shareable.clone())
            .await
        {
            Ok(()) => true,
            Err(e) => {
                log::warn!("{}: aux fire-and-forget failed: {e}", node.name);
                false
            }
        },
    }
}

/// Asks the server to wait until it counted `expected` messages (at most `timeout`) and
/// returns `(count, first, last)`.
async fn ff_wait(node: &Node, expected: u64, timeout: Duration) -> (u64, Option<f64>, Option<f64>) {
    let args = Value::Map(Map::from_iter([
        ("expected", Value::from(expected)),
        ("timeout_s", Value::from(timeout.as_secs_f64())),
    ]));
    let reply = core_call(
        node,
        TOPIC_FF_WAIT,
        Payload::value(args),
        timeout + Duration::from_secs(10),
    )
    .await;
    let map = reply.as_ref().and_then(|v| v.as_map());
    let get = |k: &str| map.and_then(|m| m.get(k));
    (
        get("count").and_then(Value::as_u64).unwrap_or(0),
        get("first").and_then(Value::as_f64),
        get("last").and_then(Value::as_f64),
    )
}

async fn fire_and_forget(node: &Node, opts: &Options) -> Result<Json, BenchError> {
    let site = site_side(node)?;
    let deadline = Instant::now() + opts.deadline;
    let small = Small::new(&node.name);
    warm_up(node, PathKind::Core, &Target::Server, &small, 20, deadline).await?;
    if opts.path == PathKind::Aux {
        warm_up(node, PathKind::Aux, &Target::Server, &small, 20, deadline).await?;
    }
    // Warm the path itself, and wait until the server has counted those messages.
    const WARM: u64 = 50;
    for _ in 0..WARM {
        fire(node, opts.path, site, &small).await;
    }
    ff_wait(node, WARM, Duration::from_secs(10)).await;
    if core_call(node, TOPIC_FF_RESET, Payload::None, Duration::from_secs(10))
        .await
        .is_none()
    {
        return Err(BenchError::Scenario("ff_reset failed".into()));
    }
    let t0 = epoch_secs();
    let mut sent = 0u64;
    let mut refused = 0u64;
    for _ in 0..opts.count {
        if Instant::now() > deadline {
            break;
        }
        if !fire(node, opts.path, site, &small).await {
            refused += 1;
        }
        sent += 1;
    }
    let t_sent = epoch_secs();
    let left = deadline.saturating_duration_since(Instant::now());
    let (received, _first, last) = ff_wait(node, sent, left.max(Duration::from_secs(1))).await;
    let t_last = last.unwrap_or(t_sent);
    Ok(json!({
        "sent": sent,
        "refused": refused,
        "errors": refused + sent.saturating_sub(received),
        "received": received,
        "send_s": t_sent - t0,
        "send_rate": sent as f64 / (t_sent - t0),
        "e2e_s": t_last - t0,
        "e2e_rate": received as f64 / (t_last - t0),
    }))
}
