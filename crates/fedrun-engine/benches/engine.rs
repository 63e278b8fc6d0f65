//! What the engine costs on top of the cells it talks through.
//!
//! Everything runs on the in-process network, inside one actix `System` per benchmark group
//! (built once, reused through `block_on` with criterion's `iter_custom`):
//!
//! - `cell_round_trip`: a plain cell request to a cell whose handler echoes the payload — the
//!   floor the engine builds on;
//! - `aux_round_trip`: `EngineHandle::send_aux_request` from a client job engine to the job's
//!   server (`AuxTargets::Server`), whose aux handler echoes the ~100 B request; sequential, so
//!   the time per iteration is the latency of one request;
//! - `aux_64_in_flight`: 64 such requests in flight at once (`join_all`), reported as requests/s;
//! - `facade_run_info_hop`: `EngineHandle::get_run_info()`, i.e. facade → `RunInfo` → reply.
//!
//! Every reply is checked, so a broken path fails the bench instead of timing errors.
//!
//! ```text
//! cargo bench -p fedrun-engine --bench engine
//! ```

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use actix::{Actor, SystemRunner};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fedrun_cell::{request_handler, Cell, CellHandle, CellMessage, Fqcn, Network, SendRequest};
use fedrun_core::{Map, Shareable, Value};
use fedrun_engine::{
    aux_handler, AuxConfig, AuxReplies, AuxRequest, AuxRunner, AuxTargets, ClientEngine,
    EngineHandle, GetJobClients, RegisterAuxMessageHandler, RunInfo, RunInfoConfig,
};

const JOB: &str = "bench-job";
const SITES: [&str; 2] = ["site-1", "site-2"];
const TIMEOUT: Duration = Duration::from_secs(5);
const IN_FLIGHT: usize = 64;
const TOPIC: &str = "echo";

/// The request: one ~100-byte string entry (plus the Shareable's own headers).
fn small_request() -> Shareable {
    let mut s = Shareable::new();
    s.insert("data", "x".repeat(96));
    s
}

fn job_meta() -> Value {
    let clients = SITES
        .iter()
        .map(|n| Value::Map([("name", Value::from(*n))].into_iter().collect()))
        .collect::<Vec<_>>();
    let meta: Map = [("job_clients", Value::Array(clients))]
        .into_iter()
        .collect();
    Value::Map(meta)
}

/// The job's server side: a server-job (`SJ`) aux runner on `server.<job>` whose `echo`
/// handler returns the request unchanged. Returns its runner (kept alive by the caller).
async fn start_server_job(net: &Network) -> (actix::Addr<AuxRunner>, CellHandle) {
    let run = RunInfo::new(RunInfoConfig::new("server", JOB).with_job_meta(job_meta())).start();
    let cell = Cell::start(Fqcn::job_cell("server", JOB).unwrap(), net.clone()).unwrap();
    let config = AuxConfig::new("server", JOB, cell.clone(), run).with_process_type("SJ");
    let aux = AuxRunner::new(config).start();
    let echo = aux_handler(|req: AuxRequest| async move { Ok::<_, String>(req.request) });
    aux.send(RegisterAuxMessageHandler::new(TOPIC, echo))
        .await
        .unwrap()
        .unwrap();
    aux.send(GetJobClients { job_meta: None })
        .await
        .unwrap()
        .unwrap();
    (aux, cell)
}

/// A client job engine (`site-1.<job>`) on the same network.
async fn start_client(net: &Network) -> EngineHandle {
    ClientEngine::builder(SITES[0], JOB)
        .job_clients(&SITES)
        .start(net)
        .await
        .unwrap()
}

async fn aux_to_server(engine: &EngineHandle, request: Shareable) -> AuxReplies {
    engine
        .send_aux_request(AuxTargets::Server, TOPIC, request, TIMEOUT)
        .await
        .unwrap()
}

fn check_echo(replies: &AuxReplies) {
    let reply = replies.get("server").expect("a reply keyed `server`");
    assert!(
        reply.return_code().as_str() == "OK",
        "server replied {}",
        reply.return_code().as_str()
    );
    assert!(reply.get("data").is_some(), "the echo lost the request");
}

/// Runs `iters` sequential calls of `one` inside the System and returns the elapsed time.
fn timed<F, Fut>(sys: &SystemRunner, iters: u64, mut one: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    sys.block_on(async {
        let began = Instant::now();
        for _ in 0..iters {
            one().await;
        }
        began.elapsed()
    })
}

fn latency(c: &mut Criterion) {
    let sys = actix::System::new();
    let net = Network::new();
    let (_server_aux, _server_cell) = sys.block_on(start_server_job(&net));
    let engine = sys.block_on(start_client(&net));

    // Two plain cells for the floor: `echo-a` asks, `echo-b` echoes the payload.
    let (asker, answerer) = sys.block_on(async {
        let asker = Cell::start(Fqcn::job_cell("echo-a", JOB).unwrap(), net.clone()).unwrap();
        let answerer = Cell::start(Fqcn::job_cell("echo-b", JOB).unwrap(), net.clone()).unwrap();
        answerer
            .register_request_handler(
                "bench",
                TOPIC,
                request_handler(|req: CellMessage| async move {
                    Ok(Some(CellMessage::new(req.payload)))
                }),
            )
            .await
            .unwrap();
        (asker, answerer)
    });

    let request = small_request();
    let mut g = c.benchmark_group("engine_latency");
    g.sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    g.bench_function("cell_round_trip", |b| {
        b.iter_custom(|iters| {
            timed(&sys, iters, || async {
                let req = SendRequest::new(
                    "bench",
                    TOPIC,
                    answerer.fqcn().clone(),
                    CellMessage::new(request.clone()),
                    TIMEOUT,
                );
                let reply = asker.send_request(req).await.unwrap();
                assert!(
                    reply.return_code().is_ok(),
                    "cell code {}",
                    reply.return_code()
                );
                black_box(reply);
            })
        })
    });

    g.bench_function("aux_round_trip", |b| {
        b.iter_custom(|iters| {
            timed(&sys, iters, || async {
                let replies = aux_to_server(&engine, request.clone()).await;
                check_echo(&replies);
                black_box(replies);
            })
        })
    });

    g.bench_function("facade_run_info_hop", |b| {
        b.iter_custom(|iters| {
            timed(&sys, iters, || async {
                let info = engine.get_run_info().await.unwrap();
                assert_eq!(info.job_id, JOB);
                black_box(info);
            })
        })
    });
    g.finish();
    sys.block_on(async {
        engine.stop().await;
        asker.stop().await;
        answerer.stop().await;
    });
}

fn throughput(c: &mut Criterion) {
    let sys = actix::System::new();
    let net = Network::new();
    let (_server_aux, _server_cell) = sys.block_on(start_server_job(&net));
    let engine = sys.block_on(start_client(&net));
    let request = small_request();

    let mut g = c.benchmark_group("engine_throughput");
    g.sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(IN_FLIGHT as u64));
    g.bench_function("aux_64_in_flight", |b| {
        b.iter_custom(|iters| {
            timed(&sys, iters, || async {
                let all = futures::future::join_all(
                    (0..IN_FLIGHT).map(|_| aux_to_server(&engine, request.clone())),
                )
                .await;
                all.iter().for_each(check_echo);
                black_box(all);
            })
        })
    });
    g.finish();
    sys.block_on(engine.stop());
}

criterion_group!(benches, latency, throughput);
criterion_main!(benches);
