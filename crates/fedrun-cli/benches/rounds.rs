//! Rounds per second of a whole simulated federation, and its memory.
//!
//! Plain `main` (harness = false): `cargo bench -p fedrun-cli --bench rounds`. Each scenario
//! runs `fedrun simulate`'s machinery (server job with ScatterAndGather + FedAvg, N client jobs
//! with ClientRunners, one in-process network) with a stand-in executor that adds 1.0 to every
//! weight (no training), and an in-memory persistor (no disk). The model travels as the engine
//! sends it today: inside the `get_task` reply and the `submit_update` request (fedrun-server's
//! task protocol does not stream; on the in-process network a payload is passed by reference,
//! never encoded).
//!
//! Printed per scenario: rounds per second (rounds / sum of round times, each round timed by
//! the server from posting its task to the new global model), the same with the executors' time
//! taken out, round time median/min/max, and the process RSS before the scenario (baseline) and
//! at its peak (VmHWM, reset before each scenario through `/proc/self/clear_refs`).
//!
//! Options: `--quick` runs fewer rounds; `--only small|large` runs one scenario.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedrun_cell::AbortSignal;
use fedrun_cli::factories::{zero_model, SiteFactory};
use fedrun_cli::job::JobDefinition;
use fedrun_cli::{NoObserver, RunStatus, Simulation, SimulationSetup};
use fedrun_core::{DataKind, Dxo, FlContext, Map, NdArray, Shareable, Value};
use fedrun_engine::{executor_factory, factory, Component, ComponentFactory, Executor};
use fedrun_server::{ModelPersistor, ModelWeights, ServerError, SharedPersistor};
use futures::future::BoxFuture;
use serde_json::json;

/// Adds 1.0 to every weight; counts its own time.
struct AddOne {
    busy_nanos: Arc<AtomicU64>,
}

impl Component for AddOne {}

impl Executor for AddOne {
    fn execute<'a>(
        &'a self,
        _task_name: &'a str,
        task: Shareable,
        _ctx: &'a FlContext,
        _abort: AbortSignal,
    ) -> BoxFuture<'a, Result<Shareable, String>> {
        Box::pin(async move {
            let started = Instant::now();
            let dxo = Dxo::from_shareable(&task).map_err(|e| e.to_string())?;
            let w = dxo
                .data
                .get("w")
                .and_then(Value::as_ndarray)
                .ok_or("no w")?;
            // no intermediate Vec: the new array is written straight from the old one's bytes
            let data = w.data();
            let w = NdArray::from_f32_iter(
                &[w.len()],
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) + 1.0),
            )
            .map_err(|e| e.to_string())?;
            drop(data);
            let mut data = Map::with_capacity(1);
            data.insert("w", w);
            let mut out = Dxo::new(DataKind::Weights, data);
            out.meta.insert("NUM_STEPS_CURRENT_ROUND", 1);
            let out = out.to_shareable();
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
            Ok(out)
        })
    }
}

/// Keeps the model in memory: the initial one, then the last saved.
struct MemoryPersistor {
    model: Mutex<ModelWeights>,
}

impl ModelPersistor for MemoryPersistor {
    fn load(&self) -> Result<ModelWeights, ServerError> {
        self.model
            .lock()
            .map(|m| m.clone())
            .map_err(|_| ServerError::NoInitialModel("poisoned".to_owned()))
    }

    fn save(&self, model: &ModelWeights) -> Result<(), ServerError> {
        if let Ok(mut m) = self.model.lock() {
            m.clone_from(model);
        }
        Ok(())
    }
}

struct Scenario {
    name: &'static str,
    clients: usize,
    len: usize,
    rounds: u64,
    poll: Duration,
}

struct Figures {
    rounds: usize,
    round_times: Vec<Duration>,
    executor_time: Duration,
    wall: Duration,
    check: Result<(), String>,
}

fn job(len: usize, min_clients: usize, rounds: u64) -> JobDefinition {
    let client = json!({
        "format_version": 2,
        "executors": [{"tasks": ["train"], "executor": {"id": "add", "path": "bench.AddOne", "args": {}}}]
    });
    let server = json!({
        "format_version": 2,
        "components": [
            {"id": "persistor", "path": "bench.MemoryPersistor", "args": {"arrays": {"w": [len]}}},
            {"id": "shareable_generator", "name": "FullModelShareableGenerator", "args": {}},
            {"id": "aggregator", "name": "InTimeAccumulateWeightedAggregator",
             "args": {"expected_data_kind": "WEIGHTS"}}
        ],
        "workflows": [{"id": "sag", "name": "ScatterAndGather", "args": {
            "min_clients": min_clients, "num_rounds": rounds, "wait_time_after_min_received": 0,
            "aggregator_id": "aggregator", "persistor_id": "persistor", "train_task_name": "train",
            "stream_threshold": 64u64 << 20
        }}]
    });
    match JobDefinition::from_configs("bench", json!({}), client, server) {
        Ok(job) => job,
        Err(e) => panic!("bench job: {e}"),
    }
}

fn memory_persistor() -> ComponentFactory {
    factory(|args| {
        let arrays = args
            .args
            .get("arrays")
            .and_then(|a| a.as_object())
            .ok_or("missing arrays")?;
        let model = zero_model(arrays)?;
        Ok(SharedPersistor(Arc::new(MemoryPersistor {
            model: Mutex::new(model),
        })))
    })
}

async fn run_scenario(s: &Scenario) -> Figures {
    let busy = Arc::new(AtomicU64::new(0));
    let workspace = std::env::temp_dir().join(format!("fedrun-bench-{}", uuid::Uuid::new_v4()));
    let mut setup = SimulationSetup::new(job(s.len, s.clients, s.rounds), s.clients, &workspace);
    setup.timing.poll_interval = s.poll;
    setup.timing.runner.default_interval = s.poll;
    let counter = Arc::clone(&busy);
    let make: SiteFactory = Arc::new(move |_site: &str| {
        let counter = Arc::clone(&counter);
        executor_factory(move |_args| {
            Ok(AddOne {
                busy_nanos: Arc::clone(&counter),
            })
        })
    });
    setup
        .client_factories
        .push(("bench.AddOne".to_owned(), make));
    setup
        .server_factories
        .push(("bench.MemoryPersistor".to_owned(), memory_persistor()));
    let started = Instant::now();
    let simulation = match Simulation::start(setup).await {
        Ok(sim) => sim,
        Err(e) => panic!("{}: cannot start: {e}", s.name),
    };
    let report = simulation.run(&mut NoObserver).await;
    let wall = started.elapsed();
    let check = match (&report.status, &report.model) {
        (RunStatus::Completed, Some(model)) => match model.get("w").map(NdArray::to_f32_vec) {
            Some(Ok(w)) if w.len() == s.len && w.iter().all(|v| *v == s.rounds as f32) => Ok(()),
            Some(Ok(w)) => Err(format!(
                "final model has {} values, first {:?}; expected {} x {}",
                w.len(),
                w.first(),
                s.len,
                s.rounds
            )),
            _ => Err("final model has no float32 'w'".to_owned()),
        },
        (status, _) => Err(format!("run {status}")),
    };
    let _ = std::fs::remove_dir_all(&workspace);
    Figures {
        rounds: report.round_metrics.len(),
        round_times: report.round_metrics.iter().map(|m| m.duration).collect(),
        executor_time: Duration::from_nanos(busy.load(Ordering::Relaxed)),
        wall,
        check,
    }
}

/// A `kB` field of `/proc/self/status`, in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let scale = |n: u64| if quick { (n / 5).max(2) } else { n };
    let scenarios = [
        (
            "small",
            Scenario {
                name: "8 clients, 1 MiB model (262,144 f32), poll 10 ms (simulate's default)",
                clients: 8,
                len: 262_144,
                rounds: scale(100),
                poll: Duration::from_millis(10),
            },
        ),
        (
            "small",
            Scenario {
                name: "8 clients, 1 MiB model (262,144 f32), poll 1 ms",
                clients: 8,
                len: 262_144,
                rounds: scale(200),
                poll: Duration::from_millis(1),
            },
        ),
        (
            "large",
            Scenario {
                name: "2 clients, 256 MiB model (67,108,864 f32), STREAMED in 1 MiB chunks (stream_threshold 64 MiB), poll 10 ms",
                clients: 2,
                len: 67_108_864,
                rounds: scale(10),
                poll: Duration::from_millis(10),
            },
        ),
    ];
    println!(
        "fedrun-cli bench rounds: ScatterAndGather + FedAvg, in-process network, model inside \
         the task below the stream threshold and streamed in 1 MiB chunks at or above it, \
         executor adds 1.0 (no training), in-memory persistor"
    );
    let mut failed = false;
    for (tag, s) in &scenarios {
        if only.as_deref().is_some_and(|o| o != *tag) {
            continue;
        }
        // Resets VmHWM to the current RSS (Linux >= 4.0), so each scenario has its own peak.
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        let baseline = status_mib("VmRSS:").unwrap_or(f64::NAN);
        let figures = actix::System::new().block_on(run_scenario(s));
        let peak = status_mib("VmHWM:").unwrap_or(f64::NAN);
        let mut times = figures.round_times.clone();
        times.sort_unstable();
        let total: Duration = times.iter().sum();
        let median = times.get(times.len() / 2).copied().unwrap_or_default();
        let protocol = total.saturating_sub(figures.executor_time);
        println!("\nscenario: {}", s.name);
        println!(
            "  rounds {} in {:.3} s of rounds ({:.3} s wall incl. start/stop): {:.1} rounds/s",
            figures.rounds,
            total.as_secs_f64(),
            figures.wall.as_secs_f64(),
            figures.rounds as f64 / total.as_secs_f64()
        );
        println!(
            "  executor time {:.3} s in all; without it {:.1} rounds/s",
            figures.executor_time.as_secs_f64(),
            figures.rounds as f64 / protocol.as_secs_f64()
        );
        println!(
            "  round time median {:.2} ms, min {:.2} ms, max {:.2} ms",
            ms(median),
            ms(times.first().copied().unwrap_or_default()),
            ms(times.last().copied().unwrap_or_default())
        );
        println!(
            "  RSS baseline {baseline:.1} MiB, peak (VmHWM) {peak:.1} MiB, peak above baseline \
             {:.1} MiB{}",
            peak - baseline,
            if reset {
                ""
            } else {
                " (VmHWM could not be reset: the peak may be an earlier scenario's)"
            }
        );
        match &figures.check {
            Ok(()) => println!("  final model checked: every weight = number of rounds"),
            Err(e) => {
                println!("  FINAL MODEL CHECK FAILED: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
