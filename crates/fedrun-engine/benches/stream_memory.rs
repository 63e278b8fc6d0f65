//! Memory bound of object streaming: streams N bytes (default 1 GiB) in 1 MiB chunks from one
//! client to three receivers, in-process, and reports the throughput and the peak RSS above the
//! baseline, which must stay under 64 MiB whatever N is (see `docs/streaming.md`).
//!
//! A plain program (`harness = false`):
//!
//! ```text
//! cargo bench -p fedrun-engine --bench stream_memory -- --size 256MiB
//! STREAM_BYTES=1GiB cargo bench -p fedrun-engine --bench stream_memory
//! ```
//!
//! The source is a lazy pseudo-random reader (nothing is held in memory up front); each receiver
//! writes into a checksumming sink, and the checksums are compared with the sender's. Unknown
//! arguments (such as the `--bench` that `cargo bench` passes) are ignored. The process exits
//! with status 1 if the bound is exceeded or a receiver did not get the whole object.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::Actor;
use fedrun_cell::{Cell, Fqcn, Network};
use fedrun_core::{Map, Value};
use fedrun_engine::stream::{
    ByteSink, BytesConsumerFactory, BytesProducer, RegisterStreamProcessing, StreamConfig,
    StreamObjects, StreamProcessor, DEFAULT_CHUNK_SIZE,
};
use fedrun_engine::{AuxConfig, AuxRunner, AuxTargets, GetJobClients, RunInfo, RunInfoConfig};

const MIB: f64 = 1024.0 * 1024.0;
const BOUND_MIB: f64 = 64.0;
const JOB: &str = "bench-job";
const SENDER: &str = "site-1";
const RECEIVERS: [&str; 3] = ["site-2", "site-3", "site-4"];

/// Parses `256MiB`, `1GiB`, `512KiB` (binary), `1GB`, `10MB`, `1KB` (decimal), or plain bytes.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn requested_size() -> u64 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut size = std::env::var("STREAM_BYTES")
        .ok()
        .and_then(|s| parse_size(&s));
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        if let Some(v) = arg.strip_prefix("--size=") {
            size = Some(parse_size(v).unwrap_or_else(|| panic!("bad --size {v}")));
        } else if arg == "--size" {
            let v = args.get(i + 1).expect("--size needs a value");
            size = Some(parse_size(v).unwrap_or_else(|| panic!("bad --size {v}")));
            i += 1;
        }
        // anything else (e.g. cargo's --bench) is ignored
        i += 1;
    }
    size.unwrap_or(1 << 30)
}

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

/// A 64-bit checksum over a byte stream, in 8-byte words (the tail is zero-padded per write,
/// so both sides must write the same chunk boundaries: they do, chunk by chunk).
#[derive(Clone, Copy, Default)]
struct Checksum(u64);

impl Checksum {
    fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let v = u64::from_le_bytes(w.try_into().unwrap());
            h = (h ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
        }
        let mut tail = [0u8; 8];
        let rest = words.remainder();
        tail[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(tail) ^ bytes.len() as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
        self.0 = h;
    }
}

/// The lazy source: `remaining` pseudo-random bytes (xorshift64), checksummed as they are read
/// in chunk-sized reads.
struct Pattern {
    remaining: u64,
    state: u64,
    sum: Arc<Mutex<Checksum>>,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        for word in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let bytes = self.state.to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
        self.sum.lock().unwrap().update(&buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// A receiver's sink: counts and checksums, keeps nothing.
struct Sink {
    sum: Arc<Mutex<Checksum>>,
    bytes: Arc<AtomicU64>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sum.lock().unwrap().update(buf);
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn job_meta() -> Value {
    let clients: Vec<Value> = std::iter::once(SENDER)
        .chain(RECEIVERS)
        .map(|s| Value::from(Map::from_iter([("name", s)])))
        .collect();
    Value::from(Map::from_iter([("job_clients", clients)]))
}

async fn engine(net: &Network, site: &str) -> actix::Addr<StreamProcessor> {
    let run = RunInfo::new(RunInfoConfig::new(site, JOB).with_job_meta(job_meta())).start();
    let cell = Cell::start(Fqcn::job_cell(site, JOB).unwrap(), net.clone()).unwrap();
    let aux = AuxRunner::new(AuxConfig::new(site, JOB, cell, run.clone())).start();
    aux.send(GetJobClients { job_meta: None })
        .await
        .unwrap()
        .unwrap();
    StreamProcessor::start(StreamConfig::new(site, JOB, aux, run))
        .await
        .unwrap()
}

async fn run(size: u64) -> bool {
    println!(
        "stream_memory: {} bytes ({:.0} MiB) in {} MiB chunks from {SENDER} to {} receivers \
         ({}), in-process",
        size,
        mib(size),
        DEFAULT_CHUNK_SIZE >> 20,
        RECEIVERS.len(),
        RECEIVERS.join(", ")
    );
    let net = Network::new();
    let sender = engine(&net, SENDER).await;
    let mut sinks = Vec::new();
    let mut reports = Vec::new();
    for site in RECEIVERS {
        let streamer = engine(&net, site).await;
        let sum = Arc::new(Mutex::new(Checksum::default()));
        let bytes = Arc::new(AtomicU64::new(0));
        let (s, b) = (sum.clone(), bytes.clone());
        let (factory, received) = BytesConsumerFactory::new(move |_ctx| {
            Ok(ByteSink::Writer(Box::new(Sink {
                sum: s.clone(),
                bytes: b.clone(),
            })))
        });
        streamer
            .send(RegisterStreamProcessing::new("bench", "bytes", factory))
            .await
            .unwrap();
        sinks.push((site, sum, bytes, streamer));
        reports.push(received);
    }

    let (base_rss, base_hwm) = memory();
    println!(
        "baseline: VmRSS {:.1} MiB, VmHWM {:.1} MiB",
        mib(base_rss),
        mib(base_hwm)
    );

    // sample VmRSS while streaming (VmHWM is the kernel's own peak)
    let max_rss = Arc::new(AtomicU64::new(base_rss));
    let sampler = {
        let max_rss = max_rss.clone();
        actix::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            loop {
                tick.tick().await;
                max_rss.fetch_max(memory().0, Ordering::Relaxed);
            }
        })
    };

    let source_sum = Arc::new(Mutex::new(Checksum::default()));
    let source = Pattern {
        remaining: size,
        state: 0x2545_F491_4F6C_DD1D,
        sum: source_sum.clone(),
    };
    let producer = BytesProducer::from_reader(source, Some(size));
    let started = Instant::now();
    let outcome = sender
        .send(StreamObjects::new(
            "bench",
            "bytes",
            AuxTargets::from(RECEIVERS.to_vec()),
            producer,
        ))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    sampler.abort();
    let (end_rss, end_hwm) = memory();
    let mut ok = true;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            println!("stream failed: {e}");
            return false;
        }
    };
    let secs = elapsed.as_secs_f64();
    println!(
        "streamed: rc {} after {} pieces in {:.2} s = {:.1} MiB/s per receiver ({:.1} MiB/s \
         delivered in total)",
        outcome.rc,
        outcome.pieces,
        secs,
        mib(size) / secs,
        mib(size) * RECEIVERS.len() as f64 / secs
    );
    ok &= outcome.rc.is_ok();
    let expected = source_sum.lock().unwrap().0;
    for ((site, sum, bytes, _streamer), mut received) in sinks.into_iter().zip(reports) {
        let report = received.recv().await.unwrap();
        let got = sum.lock().unwrap().0;
        let n = bytes.load(Ordering::Relaxed);
        let good = report.rc.is_ok() && report.size == size && n == size && got == expected;
        println!(
            "  {site}: rc {} {} bytes, checksum {got:016x} {}",
            report.rc,
            n,
            if good { "matches" } else { "MISMATCH" }
        );
        ok &= good;
    }
    let peak = end_hwm.max(max_rss.load(Ordering::Relaxed));
    let above = peak.saturating_sub(base_rss);
    let within_bound = mib(above) < BOUND_MIB;
    println!(
        "memory: VmRSS now {:.1} MiB; peak VmHWM {:.1} MiB (sampled VmRSS max {:.1} MiB) = \
         {:.1} MiB above the baseline (bound {BOUND_MIB:.0} MiB): {}",
        mib(end_rss),
        mib(end_hwm),
        mib(max_rss.load(Ordering::Relaxed)),
        mib(above),
        if within_bound { "PASS" } else { "FAIL" }
    );
    ok && within_bound
}

fn main() {
    let size = requested_size();
    let ok = actix::System::new().block_on(run(size));
    if !ok {
        std::process::exit(1);
    }
}
