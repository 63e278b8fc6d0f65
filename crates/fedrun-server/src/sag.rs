//! Scatter and gather: NVFlare's federated-averaging workflow (`ScatterAndGather`).
//!
//! Each round the global model goes to every job client as a `train` task (a DXO of kind
//! `WEIGHTS`, headers `current_round` and `num_rounds`, cookie `contribution_round`); once at
//! least `min_clients` clients answered successfully (and the after-minimum wait passed, or
//! everyone answered) the results are aggregated and the aggregate becomes the new global model
//! (`WEIGHTS` replace it, `WEIGHT_DIFF` are added to it). The numeric DXO meta the clients send
//! (`loss`, `accuracy`, ...) is averaged into per-round metrics, published as
//! [`WorkflowEvent`]s and returned in the [`WorkflowOutcome`]. A round with fewer than
//! `min_clients` usable results fails the workflow: there is never a silent partial model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedrun_core::constants::header_key;
use fedrun_core::ndarray::NpyHeader;
use fedrun_core::{DataKind, Dxo, FlContext, Map, Shareable, StreamContext, Value};
use fedrun_engine::stream::arrays::{CTX_KIND, CTX_META, CTX_SITE, CTX_STREAM_ID};
use fedrun_engine::stream::{
    ArrayPiece, ArraysProducer, ConsumeResult, ConsumerFactory, EndStream, ObjectConsumer,
    MODEL_CHANNEL, MODEL_STREAM_HEADER, TOPIC_RESULT, TOPIC_WEIGHTS,
};
use fedrun_engine::{AuxTargets, RegisterStreamProcessing, StreamObjects};
use futures::future::BoxFuture;

use crate::aggregator::WeightedSum;
use crate::aggregator::{
    contribution_weight, local_steps, Aggregator, Contribution, FedAvg, NUM_STEPS_CURRENT_ROUND,
};
use crate::controller::Controller;
use crate::error::ServerError;
use crate::model::{weights_from_dxo, weights_to_dxo, ModelWeights};
use crate::persistor::ModelPersistor;
use crate::protocol::{seconds, BROADCAST_METHOD};
use crate::task::{Task, TaskResult};
use crate::workflow::{RoundMetrics, Workflow, WorkflowEvent, WorkflowOutcome};

/// The task header carrying the round number.
pub const CURRENT_ROUND: &str = "current_round";
/// The task header carrying the number of rounds.
pub const NUM_ROUNDS: &str = "num_rounds";
/// The cookie carrying the round a result contributes to.
pub const CONTRIBUTION_ROUND: &str = "contribution_round";

/// The settings of a [`ScatterAndGather`] (NVFlare's constructor arguments).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_server::SagConfig;
///
/// let config = SagConfig::new(2, 5).with_train_timeout(Duration::from_secs(600));
/// assert_eq!(config.train_task_name, "train");
/// assert_eq!(config.start_round, 0);
/// assert_eq!(config.train_timeout, Some(Duration::from_secs(600)));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SagConfig {
    /// Successful results needed per round (0: every job client must succeed). More than the
    /// number of job clients fails the first round at once (NVFlare would wait forever).
    pub min_clients: usize,
    /// How many rounds to run.
    pub num_rounds: u32,
    /// The first round's number.
    pub start_round: u32,
    /// How long to keep collecting results once `min_clients` succeeded.
    pub wait_time_after_min_received: Duration,
    /// The task name clients train on.
    pub train_task_name: String,
    /// The task timeout (`None`: no timeout).
    pub train_timeout: Option<Duration>,
    /// Save the global model every this many rounds (0: only at the end; the final model is
    /// always saved).
    pub persist_every_n_rounds: u32,
    /// The aggregator's component id, sent in the task operator header.
    pub aggregator_id: String,
    /// Models of at least this many `.npy` bytes are streamed (0: never); see
    /// "Large models in ScatterAndGather" in `docs/streaming.md`. Default
    /// [`DEFAULT_STREAM_THRESHOLD`].
    pub stream_threshold: u64,
}

/// The default [`SagConfig::stream_threshold`]: 64 MiB.
pub const DEFAULT_STREAM_THRESHOLD: u64 = 64 << 20;

impl SagConfig {
    /// `min_clients` and `num_rounds`, with NVFlare's defaults for the rest: start at round 0,
    /// no wait after the minimum, task `train` without timeout, persist every round, aggregator
    /// id `aggregator`.
    pub fn new(min_clients: usize, num_rounds: u32) -> Self {
        SagConfig {
            min_clients,
            num_rounds,
            start_round: 0,
            wait_time_after_min_received: Duration::ZERO,
            train_task_name: "train".to_owned(),
            train_timeout: None,
            persist_every_n_rounds: 1,
            aggregator_id: "aggregator".to_owned(),
            stream_threshold: DEFAULT_STREAM_THRESHOLD,
        }
    }

    /// Sets the size from which the model is streamed (0: never).
    pub fn with_stream_threshold(mut self, bytes: u64) -> Self {
        self.stream_threshold = bytes;
        self
    }

    /// Sets the first round's number.
    pub fn with_start_round(mut self, round: u32) -> Self {
        self.start_round = round;
        self
    }

    /// Sets the wait after `min_clients` results.
    pub fn with_wait_time_after_min_received(mut self, wait: Duration) -> Self {
        self.wait_time_after_min_received = wait;
        self
    }

    /// Sets the task name.
    pub fn with_train_task_name(mut self, name: impl Into<String>) -> Self {
        self.train_task_name = name.into();
        self
    }

    /// Sets the task timeout; zero means none.
    pub fn with_train_timeout(mut self, timeout: Duration) -> Self {
        self.train_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// Sets how often the model is saved.
    pub fn with_persist_every_n_rounds(mut self, n: u32) -> Self {
        self.persist_every_n_rounds = n;
        self
    }
}

/// NVFlare's scatter-and-gather workflow (see the module doc).
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use fedrun_core::NdArray;
/// use fedrun_server::{FedAvg, ModelWeights, NpyPersistor, SagConfig, ScatterAndGather, Workflow};
///
/// let mut initial = ModelWeights::new();
/// initial.insert("w".into(), NdArray::from_f32(&[3], &[0.0; 3]).unwrap());
/// let persistor = NpyPersistor::new(std::env::temp_dir().join("fedrun-sag-doc"))
///     .with_initial_weights(initial);
/// let sag = ScatterAndGather::new(SagConfig::new(2, 3), Arc::new(FedAvg::default()),
///                                 Arc::new(persistor));
/// assert_eq!(sag.name(), "scatter_and_gather");
/// // server.run_workflow(&mut sag).await runs it (see ServerJob).
/// ```
pub struct ScatterAndGather {
    id: String,
    config: SagConfig,
    aggregator: Arc<dyn Aggregator>,
    persistor: Arc<dyn ModelPersistor>,
    streamed: Option<RoundSlot>,
}

impl std::fmt::Debug for ScatterAndGather {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScatterAndGather")
            .field("id", &self.id)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ScatterAndGather {
    /// A workflow with id `scatter_and_gather`.
    pub fn new(
        config: SagConfig,
        aggregator: Arc<dyn Aggregator>,
        persistor: Arc<dyn ModelPersistor>,
    ) -> Self {
        ScatterAndGather {
            id: "scatter_and_gather".to_owned(),
            config,
            aggregator,
            persistor,
            streamed: None,
        }
    }

    /// Sets the workflow id (the config's `id`, sent as the `__workflow__` cookie).
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// The settings.
    pub fn config(&self) -> &SagConfig {
        &self.config
    }

    /// The task of `round`: the global model as a `WEIGHTS` DXO with the round headers.
    fn round_task(&self, round: u32, global: &ModelWeights) -> Task {
        let mut data = weights_to_dxo(global, DataKind::Weights).to_shareable();
        data.set_header(CURRENT_ROUND, round);
        data.set_header(NUM_ROUNDS, self.config.num_rounds);
        data.add_cookie(CONTRIBUTION_ROUND, round);
        let mut op = Map::new();
        op.insert("op_id", self.config.train_task_name.as_str());
        op.insert("method", BROADCAST_METHOD);
        op.insert(
            "timeout",
            self.config.train_timeout.map_or(Value::from(0), seconds),
        );
        op.insert("aggregator", self.config.aggregator_id.as_str());
        data.set_header(header_key::TASK_OPERATOR, op);
        let task = Task::new(self.config.train_task_name.as_str(), data);
        match self.config.train_timeout {
            Some(t) => task.with_timeout(t),
            None => task,
        }
    }

    async fn save(&self, model: &ModelWeights) -> Result<(), ServerError> {
        let persistor = Arc::clone(&self.persistor);
        let model = model.clone();
        blocking("model persistence", move || persistor.save(&model)).await
    }

    async fn run_rounds(&mut self, ctl: &Controller) -> Result<WorkflowOutcome, ServerError> {
        let persistor = Arc::clone(&self.persistor);
        let mut global = blocking("model loading", move || persistor.load()).await?;
        if global.is_empty() {
            return Err(ServerError::NoInitialModel(
                "the persistor's initial model has no array".to_owned(),
            ));
        }
        let first = self.config.start_round;
        let end = first.saturating_add(self.config.num_rounds);
        let mut outcome = WorkflowOutcome::new(self.id.as_str());
        let mut saved_last = false;
        log::info!(
            "[job={} site=server] {}: rounds {first}..{end}, min_clients {}",
            ctl.job_id(),
            self.id,
            self.config.min_clients
        );
        for round in first..end {
            let started = Instant::now();
            ctl.emit(WorkflowEvent::RoundStarted {
                workflow: self.id.clone(),
                round,
                end_round: end,
                targets: ctl.job_clients().len(),
            });
            let failed = |source: ServerError| ServerError::RoundFailed {
                round,
                source: Box::new(source),
            };
            let stream_id = self.stream_round(ctl, round, &global).await?;
            let mut task = self.round_task(round, &global);
            let model_sender = match &stream_id {
                Some(sid) => {
                    task = self.round_task(round, &ModelWeights::new());
                    task.data.set_header(MODEL_STREAM_HEADER, sid.as_str());
                    Some(self.model_sender(ctl, sid, round, &global)?)
                }
                None => None,
            };
            let id = self.id.clone();
            let results = ctl
                .broadcast_and_wait_notified(
                    task,
                    None,
                    self.config.min_clients,
                    self.config.wait_time_after_min_received,
                    ctl.abort_signal(),
                    |r: &TaskResult| {
                        ctl.emit(WorkflowEvent::ResultReceived {
                            workflow: id.clone(),
                            round,
                            client: r.client.clone(),
                            success: r.is_success(),
                        })
                    },
                    model_sender
                        .as_ref()
                        .map(|sender| move |site: &str| sender.send_to(site)),
                )
                .await
                .map_err(failed)?;
            let (contributions, mut failed_clients) = self.usable(ctl, round, results);
            let metrics = round_metrics(&contributions);
            let (aggregate, mut clients) = if stream_id.is_some() {
                let (aggregate, clients) = self
                    .streamed_aggregate(ctl, round, &contributions)
                    .await
                    .map_err(failed)?;
                failed_clients.retain(|c| !clients.contains(c));
                (aggregate, clients)
            } else {
                if contributions.len() < self.config.min_clients {
                    return Err(failed(ServerError::NotEnoughResponses {
                        got: contributions.len(),
                        needed: self.config.min_clients,
                    }));
                }
                let clients: Vec<String> = contributions.iter().map(|c| c.client.clone()).collect();
                let aggregator = Arc::clone(&self.aggregator);
                let aggregate =
                    blocking("aggregation", move || aggregator.aggregate(&contributions))
                        .await
                        .map_err(failed)?;
                (aggregate, clients)
            };
            clients.sort_unstable();
            failed_clients.sort_unstable();
            apply(&mut global, &aggregate).map_err(failed)?;
            let every = self.config.persist_every_n_rounds;
            saved_last = every > 0 && (round - first + 1).is_multiple_of(every);
            if saved_last {
                self.save(&global).await.map_err(failed)?;
            }
            let done = RoundMetrics {
                round,
                clients,
                failed_clients,
                metrics,
                duration: started.elapsed(),
            };
            log::info!(
                "[job={} site=server] {}: round {round} done in {:?} with {} client(s); metrics \
                 {:?}",
                ctl.job_id(),
                self.id,
                done.duration,
                done.clients.len(),
                done.metrics
            );
            ctl.emit(WorkflowEvent::RoundCompleted {
                workflow: self.id.clone(),
                metrics: done.clone(),
            });
            outcome.rounds.push(done);
        }
        if !saved_last {
            self.save(&global).await?;
        }
        outcome.model = Some(global);
        Ok(outcome)
    }

    /// Whether this round streams the model; if so, prepares the round's incremental FedAvg
    /// (registering the result consumer once) and returns the stream id.
    async fn stream_round(
        &mut self,
        ctl: &Controller,
        round: u32,
        global: &ModelWeights,
    ) -> Result<Option<String>, ServerError> {
        let threshold = self.config.stream_threshold;
        let size: u64 = global.values().map(|a| a.npy().len() as u64).sum();
        if threshold == 0 || size < threshold {
            return Ok(None);
        }
        let (Some(avg), Some(streamer)) = (self.aggregator.fed_avg(), ctl.stream_processor())
        else {
            log::warn!(
                "[job={} site=server] {}: the model ({size} bytes) is above stream_threshold \
                 but the aggregator is not FedAvg (or no streamer): sent inside the task",
                ctl.job_id(),
                self.id
            );
            return Ok(None);
        };
        let slot = match &self.streamed {
            Some(slot) => Arc::clone(slot),
            None => {
                let slot: RoundSlot = Arc::new(RoundShared::default());
                streamer
                    .send(RegisterStreamProcessing::new(
                        MODEL_CHANNEL,
                        TOPIC_RESULT,
                        ResultConsumerFactory {
                            round: Arc::clone(&slot),
                        },
                    ))
                    .await
                    .map_err(|_| ServerError::ActorGone {
                        actor: "StreamProcessor",
                    })?;
                self.streamed = Some(Arc::clone(&slot));
                slot
            }
        };
        let id = format!("{}:{round}:{}", self.id, uuid::Uuid::new_v4());
        let state = StreamedRound {
            id: id.clone(),
            avg: avg.clone(),
            kind: avg.expected_kind.clone(),
            sums: BTreeMap::new(),
            done: BTreeMap::new(),
            receiving: BTreeSet::new(),
            broken: Vec::new(),
        };
        *lock(&slot) = Some(state);
        log::info!(
            "[job={} site=server] {}: round {round}: model of {size} bytes streamed ({id})",
            ctl.job_id(),
            self.id
        );
        Ok(Some(id))
    }

    /// What streams `global` to each client that is handed the round's task (see
    /// [`ModelSender`]).
    fn model_sender(
        &self,
        ctl: &Controller,
        id: &str,
        round: u32,
        global: &ModelWeights,
    ) -> Result<ModelSender, ServerError> {
        let Some(streamer) = ctl.stream_processor().cloned() else {
            return Err(ServerError::ActorGone {
                actor: "StreamProcessor",
            });
        };
        Ok(ModelSender {
            streamer,
            arrays: global.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            id: id.to_owned(),
            prefix: format!(
                "[job={} site=server] {}: round {round}",
                ctl.job_id(),
                self.id
            ),
        })
    }

    /// The round's aggregate from the incremental sums, and the clients whose streams
    /// completed. A result stream that already added to the sums but has not ended yet (its
    /// client is slower than the `min_clients` that closed the round) is waited for — the
    /// sums cannot be used half-way — until it completes (it then counts), breaks off, or the
    /// run is aborted; the receiver's idle timeout bounds a stream that stalls. A stream that
    /// broke off mid-way fails the round: what it added cannot be taken out of the sums
    /// exactly.
    async fn streamed_aggregate(
        &self,
        ctl: &Controller,
        round: u32,
        contributions: &[Contribution],
    ) -> Result<(Dxo, Vec<String>), ServerError> {
        let Some(slot) = self.streamed.as_ref() else {
            return Err(ServerError::Aggregation(
                "no streamed round state".to_owned(),
            ));
        };
        let abort = ctl.abort_signal();
        let mut logged = false;
        let state = loop {
            // registered before the check, so that no change between the two is missed
            let changed = slot.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut guard = lock(slot);
                match guard.as_ref() {
                    None => break None,
                    Some(r) if r.receiving.is_empty() => break guard.take(),
                    Some(r) if !logged => {
                        logged = true;
                        log::info!(
                            "[job={} site=server] {}: round {round}: waiting for the result \
                             stream(s) of {} already adding to the sums",
                            ctl.job_id(),
                            self.id,
                            r.receiving.iter().cloned().collect::<Vec<_>>().join(", ")
                        );
                    }
                    Some(_) => {}
                }
            }
            tokio::select! {
                biased;
                _ = abort.triggered() => return Err(ServerError::Aborted),
                _ = &mut changed => {}
            }
        };
        let Some(state) = state else {
            return Err(ServerError::Aggregation(
                "no streamed round state".to_owned(),
            ));
        };
        if !state.broken.is_empty() {
            return Err(ServerError::Aggregation(format!(
                "streamed result(s) broke off: {}; the incremental sum cannot be undone",
                state.broken.join("; ")
            )));
        }
        let clients: Vec<String> = state.done.keys().cloned().collect();
        for c in contributions {
            if !state.done.contains_key(&c.client) {
                log::warn!(
                    "{}: result from {} names no completed stream; not aggregated",
                    self.id,
                    c.client
                );
            }
        }
        if clients.len() < self.config.min_clients || clients.is_empty() {
            return Err(ServerError::NotEnoughResponses {
                got: clients.len(),
                needed: self.config.min_clients.max(1),
            });
        }
        let kind = state.kind.clone().unwrap_or(DataKind::Weights);
        let sums = state.sums;
        let aggregate = blocking("aggregation", move || {
            let mut data = Map::with_capacity(sums.len());
            for (name, sum) in sums {
                data.insert(name, sum.finish()?);
            }
            Ok(Dxo::new(kind, data))
        })
        .await?;
        Ok((aggregate, clients))
    }

    /// The successful results as contributions, and the names of the clients that failed or
    /// sent something unusable (logged).
    fn usable(
        &self,
        ctl: &Controller,
        round: u32,
        results: Vec<TaskResult>,
    ) -> (Vec<Contribution>, Vec<String>) {
        let mut contributions = Vec::with_capacity(results.len());
        let mut failed = Vec::new();
        for r in results {
            if !r.is_success() {
                log::warn!(
                    "[job={} site={}] {}: round {round}: client failed with {}; result ignored",
                    ctl.job_id(),
                    r.client,
                    self.id,
                    r.rc
                );
                failed.push(r.client);
                continue;
            }
            match Dxo::from_shareable(&r.result) {
                Ok(dxo) => contributions.push(Contribution {
                    client: r.client,
                    dxo,
                }),
                Err(e) => {
                    log::error!(
                        "[job={} site={}] {}: round {round}: result is not a usable DXO ({e}); \
                         ignored",
                        ctl.job_id(),
                        r.client,
                        self.id
                    );
                    failed.push(r.client);
                }
            }
        }
        (contributions, failed)
    }
}

/// Streams a round's global model to one client each time the round's task is handed to it
/// (on `fedrun.model`/`weights`, the round's stream id in the context): a client that joins
/// after the round started, or asks again after a reconnection, gets its own copy, and a
/// client that is gone fails only its own stream. The arrays are shared, not copied (`Bytes`).
struct ModelSender {
    streamer: actix::Addr<fedrun_engine::StreamProcessor>,
    arrays: Vec<(String, fedrun_core::NdArray)>,
    id: String,
    prefix: String,
}

impl ModelSender {
    /// Starts the stream to `site` in the background; its outcome is logged (a client that
    /// does not get its copy fails its task, which the round counts as a failed client).
    fn send_to(&self, site: &str) {
        let producer = match ArraysProducer::new(self.arrays.clone()) {
            Ok(p) => p,
            Err(e) => {
                log::error!("{} model stream to {site} not started: {e}", self.prefix);
                return;
            }
        };
        let mut stream_ctx = StreamContext::new();
        stream_ctx.set(CTX_STREAM_ID, self.id.as_str());
        let msg = StreamObjects::new(
            MODEL_CHANNEL,
            TOPIC_WEIGHTS,
            AuxTargets::Site(site.to_owned()),
            producer,
        )
        .with_stream_ctx(stream_ctx);
        let streamer = self.streamer.clone();
        let (prefix, site) = (self.prefix.clone(), site.to_owned());
        log::info!("{prefix}: model stream to {site} starts ({})", self.id);
        actix::spawn(async move {
            match streamer.send(msg).await {
                Ok(Ok(outcome)) if outcome.rc.is_ok() => {
                    log::info!("{prefix}: model stream to {site} complete");
                }
                Ok(Ok(outcome)) => log::error!(
                    "{prefix}: model stream to {site} ended with {}: {:?}",
                    outcome.rc,
                    outcome.result
                ),
                Ok(Err(e)) => log::error!("{prefix}: model stream to {site} failed: {e}"),
                Err(_) => log::error!(
                    "{prefix}: model stream to {site} failed: the stream processor is gone"
                ),
            }
        });
    }
}

/// The incremental FedAvg of one streamed round.
struct StreamedRound {
    id: String,
    avg: FedAvg,
    kind: Option<DataKind>,
    sums: BTreeMap<String, WeightedSum>,
    /// Clients whose result stream completed, with their weight.
    done: BTreeMap<String, f64>,
    /// Clients whose result stream added to the sums and has not ended yet.
    receiving: BTreeSet<String>,
    /// Streams that broke off after adding to the sums.
    broken: Vec<String>,
}

/// The current streamed round, shared with the result consumers, and the signal that a
/// result stream ended (completed or broke off).
#[derive(Default)]
struct RoundShared {
    state: Mutex<Option<StreamedRound>>,
    changed: tokio::sync::Notify,
}

/// See [`RoundShared`].
type RoundSlot = Arc<RoundShared>;

fn lock(slot: &RoundSlot) -> std::sync::MutexGuard<'_, Option<StreamedRound>> {
    slot.state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Makes one [`ResultConsumer`] per client result stream of the current round.
struct ResultConsumerFactory {
    round: RoundSlot,
}

impl ConsumerFactory for ResultConsumerFactory {
    fn get_consumer<'a>(
        &'a self,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
        _end: EndStream,
    ) -> BoxFuture<'a, Result<Box<dyn ObjectConsumer>, String>> {
        Box::pin(async move {
            let id = stream_ctx.get(CTX_STREAM_ID).and_then(Value::as_str);
            let site = stream_ctx.get(CTX_SITE).and_then(Value::as_str);
            let (Some(id), Some(site)) = (id, site) else {
                return Err(format!(
                    "a result stream needs {CTX_STREAM_ID} and {CTX_SITE}"
                ));
            };
            let kind = stream_ctx
                .get(CTX_KIND)
                .map(DataKind::from_value)
                .transpose()
                .map_err(|e| e.to_string())?
                .unwrap_or(DataKind::Weights);
            let meta = stream_ctx
                .get(CTX_META)
                .and_then(Value::as_map)
                .cloned()
                .unwrap_or_default();
            let mut guard = lock(&self.round);
            let Some(round) = guard.as_mut().filter(|r| r.id == id) else {
                return Err(format!(
                    "result stream {id} from {site} is not for the current round"
                ));
            };
            if round.done.contains_key(site) {
                return Err(format!("{site} already streamed its result for {id}"));
            }
            match &round.kind {
                Some(k) if *k != kind => {
                    return Err(format!("{site} sent a {kind} DXO, expected {k}"));
                }
                Some(_) => {}
                None => round.kind = Some(kind.clone()),
            }
            let mut dxo = Dxo::new(kind, Map::new());
            dxo.meta = meta;
            let contribution = Contribution {
                client: site.to_owned(),
                dxo,
            };
            let steps = if round.avg.weigh_by_local_iter {
                local_steps(&contribution).map_err(|e| e.to_string())?
            } else {
                1.0
            };
            let weight = contribution_weight(&round.avg, site, steps);
            Ok(Box::new(ResultConsumer {
                round: Arc::clone(&self.round),
                id: id.to_owned(),
                site: site.to_owned(),
                weight,
                array: None,
                carry: Vec::new(),
                touched: false,
                finished: false,
                settled: false,
            }) as Box<dyn ObjectConsumer>)
        })
    }
}

/// The array a [`ResultConsumer`] is receiving.
struct Receiving {
    name: String,
    header: NpyHeader,
    item: usize,
    /// Data bytes received so far.
    received: usize,
}

/// Adds one client's streamed result arrays to the round's sums, chunk by chunk.
struct ResultConsumer {
    round: RoundSlot,
    id: String,
    site: String,
    weight: f64,
    array: Option<Receiving>,
    /// Bytes of an element cut by a chunk boundary (less than one item).
    carry: Vec<u8>,
    touched: bool,
    finished: bool,
    /// The round was told how this stream ended.
    settled: bool,
}

impl ResultConsumer {
    /// Tells the round, once, how this stream ended — completed (`None`: its weight counts)
    /// or broken off (`Some(why)`; a failure only if it added to the sums) — and wakes an
    /// aggregation waiting for it.
    fn settle(&mut self, broken: Option<String>) {
        if self.settled {
            return;
        }
        self.settled = true;
        if let Some(round) = lock(&self.round).as_mut().filter(|r| r.id == self.id) {
            round.receiving.remove(&self.site);
            match broken {
                None => {
                    round.done.insert(self.site.clone(), self.weight);
                }
                Some(why) if self.touched => {
                    round.broken.push(format!("{} ({why})", self.site));
                }
                Some(_) => {}
            }
        }
        self.round.changed.notify_waiters();
    }

    fn add(&mut self, piece: &ArrayPiece) -> Result<(), String> {
        if piece.total == 0 {
            return Ok(());
        }
        let mut guard = lock(&self.round);
        let Some(round) = guard.as_mut().filter(|r| r.id == self.id) else {
            return Err(format!("round {} is over", self.id));
        };
        let mut data: &[u8] = &piece.data;
        if piece.offset == 0 {
            let header = NpyHeader::parse(data).map_err(|e| {
                format!(
                    "'{}': the first chunk must hold the .npy header: {e}",
                    piece.name
                )
            })?;
            if header.fortran_order && header.shape.len() > 1 {
                return Err(format!("'{}' is in Fortran order", piece.name));
            }
            if header.data_offset + header.data_len != piece.total {
                return Err(format!("'{}': header and size disagree", piece.name));
            }
            let sum = match round.sums.entry(piece.name.clone()) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(
                    WeightedSum::new(&piece.name, &self.site, &header.dtype, &header.shape)
                        .map_err(|e| e.to_string())?,
                ),
            };
            sum.check(&self.site, &header.dtype, &header.shape)
                .map_err(|e| e.to_string())?;
            data = &data[header.data_offset.min(data.len())..];
            let item = header.item_size().unwrap_or(1);
            self.array = Some(Receiving {
                name: piece.name.clone(),
                header,
                item,
                received: 0,
            });
            self.carry.clear();
        }
        let Some(rx) = self.array.as_mut() else {
            return Err(format!("'{}' does not start at offset 0", piece.name));
        };
        if rx.name != piece.name {
            return Err(format!(
                "'{}' started before '{}' ended",
                piece.name, rx.name
            ));
        }
        let Some(sum) = round.sums.get_mut(&rx.name) else {
            return Err(format!("no sum for '{}'", rx.name));
        };
        if !self.touched {
            // from now on the round cannot be aggregated before this stream ends
            round.receiving.insert(self.site.clone());
            self.touched = true;
        }
        // `pos`: the data position of data[0]
        let mut pos = rx.received;
        rx.received += data.len();
        if !self.carry.is_empty() {
            let need = (rx.item - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..need]);
            data = &data[need..];
            pos += need;
            if self.carry.len() == rx.item {
                sum.add_bytes(
                    pos - rx.item,
                    &self.carry,
                    rx.header.byte_order,
                    self.weight,
                )
                .map_err(|e| e.to_string())?;
                self.carry.clear();
            }
        }
        let aligned = data.len() / rx.item * rx.item;
        sum.add_bytes(pos, &data[..aligned], rx.header.byte_order, self.weight)
            .map_err(|e| e.to_string())?;
        self.carry.extend_from_slice(&data[aligned..]);
        if piece.offset + piece.data.len() == piece.total {
            if !self.carry.is_empty() {
                return Err(format!("'{}' ends inside an element", piece.name));
            }
            sum.add_weight(self.weight);
            self.array = None;
        }
        Ok(())
    }
}

impl ObjectConsumer for ResultConsumer {
    fn consume<'a>(
        &'a mut self,
        request: Shareable,
        _stream_ctx: &'a mut StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<ConsumeResult, String>> {
        Box::pin(async move {
            let piece = ArrayPiece::read(&request)?;
            self.add(&piece)?;
            if piece.last {
                if self.array.is_some() {
                    return Err("the stream ended inside an array".to_owned());
                }
                self.finished = true;
                self.settle(None);
                return Ok(ConsumeResult::stop(None));
            }
            Ok(ConsumeResult::keep_going(None))
        })
    }

    fn finalize<'a>(
        &'a mut self,
        stream_ctx: &'a StreamContext,
        _ctx: &'a FlContext,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if !self.finished {
                self.settle(Some(stream_ctx.rc().unwrap_or("ended early").to_owned()));
            }
            Ok(())
        })
    }
}

impl Drop for ResultConsumer {
    fn drop(&mut self) {
        // a consumer dropped without finalize must not leave an aggregation waiting
        if !self.finished {
            self.settle(Some("dropped before its end".to_owned()));
        }
    }
}

impl Workflow for ScatterAndGather {
    fn name(&self) -> &str {
        &self.id
    }

    fn run<'a>(
        &'a mut self,
        ctl: Controller,
    ) -> BoxFuture<'a, Result<WorkflowOutcome, ServerError>> {
        Box::pin(async move { self.run_rounds(&ctl).await })
    }
}

/// Runs a synchronous job on the blocking pool; a panic becomes [`ServerError::BlockingJob`].
async fn blocking<T, F>(what: &'static str, f: F) -> Result<T, ServerError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ServerError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServerError::BlockingJob {
            what,
            reason: e.to_string(),
        })?
}

/// Makes `aggregate` the new global model: `WEIGHTS` replace the arrays they name,
/// `WEIGHT_DIFF` are added to them.
fn apply(global: &mut ModelWeights, aggregate: &Dxo) -> Result<(), ServerError> {
    let update = weights_from_dxo(aggregate)?;
    match aggregate.kind {
        DataKind::Weights => {
            global.extend(update);
            Ok(())
        }
        DataKind::WeightDiff => {
            for (name, diff) in update {
                let Some(current) = global.get(&name) else {
                    return Err(ServerError::InvalidModel(format!(
                        "the aggregated difference has '{name}', which the global model lacks"
                    )));
                };
                if diff.shape() != current.shape() {
                    return Err(ServerError::InvalidModel(format!(
                        "the difference of '{name}' has shape {:?}, the model {:?}",
                        diff.shape(),
                        current.shape()
                    )));
                }
                // one buffer: the model, then the difference added in place
                let mut sum = WeightedSum::new(&name, "server", current.dtype(), current.shape())?;
                sum.add_array("server", current, 1.0)?;
                sum.add_array("aggregate", &diff.to_c_order()?, 1.0)
                    .map_err(|e| ServerError::InvalidModel(e.to_string()))?;
                global.insert(name, sum.into_sum()?);
            }
            Ok(())
        }
        ref other => Err(ServerError::Aggregation(format!(
            "the aggregate is a {other} DXO; only WEIGHTS and WEIGHT_DIFF update a model"
        ))),
    }
}

/// The weighted mean of every numeric meta entry (bools and `NUM_STEPS_CURRENT_ROUND`
/// excluded) over the contributions that carry it, weighted by local steps (1 when absent or
/// invalid).
fn round_metrics(contributions: &[Contribution]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for c in contributions {
        let weight = local_steps(c).unwrap_or(1.0);
        for (key, value) in c.dxo.meta.iter() {
            let Some(name) = key.as_str() else { continue };
            if name == NUM_STEPS_CURRENT_ROUND {
                continue;
            }
            let number = match value {
                Value::Int(_) | Value::F32(_) | Value::F64(_) => value.as_f64(),
                _ => None,
            };
            let Some(v) = number.filter(|v| v.is_finite()) else {
                continue;
            };
            let entry = sums.entry(name.to_owned()).or_insert((0.0, 0.0));
            entry.0 += v * weight;
            entry.1 += weight;
        }
    }
    sums.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedrun_core::NdArray;

    fn contribution(client: &str, steps: i64, meta: &[(&str, Value)]) -> Contribution {
        let mut dxo = Dxo::new(DataKind::Weights, Map::new());
        dxo.meta.insert(NUM_STEPS_CURRENT_ROUND, steps);
        for (k, v) in meta {
            dxo.meta.insert(*k, v.clone());
        }
        Contribution {
            client: client.into(),
            dxo,
        }
    }

    #[test]
    fn metrics_are_step_weighted_means_of_numeric_meta() {
        let a = contribution(
            "a",
            1,
            &[("loss", Value::from(1.0)), ("note", Value::from("x"))],
        );
        let b = contribution(
            "b",
            3,
            &[("loss", Value::from(3.0)), ("accuracy", Value::from(0.5))],
        );
        let m = round_metrics(&[a, b]);
        assert_eq!(m.len(), 2);
        assert_eq!(m["loss"], 2.5);
        assert_eq!(m["accuracy"], 0.5);
    }

    #[test]
    fn weight_diffs_are_added_and_weights_replace() {
        let mut global = ModelWeights::new();
        global.insert("w".into(), NdArray::from_f32(&[2], &[1.0, 2.0]).unwrap());
        let mut diff = ModelWeights::new();
        diff.insert("w".into(), NdArray::from_f32(&[2], &[0.5, -1.0]).unwrap());
        apply(&mut global, &weights_to_dxo(&diff, DataKind::WeightDiff)).unwrap();
        assert_eq!(global["w"].to_f32_vec().unwrap(), vec![1.5, 1.0]);
        apply(&mut global, &weights_to_dxo(&diff, DataKind::Weights)).unwrap();
        assert_eq!(global["w"].to_f32_vec().unwrap(), vec![0.5, -1.0]);
        let mut unknown = ModelWeights::new();
        unknown.insert("x".into(), NdArray::from_f32(&[1], &[0.0]).unwrap());
        assert!(apply(&mut global, &weights_to_dxo(&unknown, DataKind::WeightDiff)).is_err());
        assert!(apply(&mut global, &weights_to_dxo(&diff, DataKind::Metrics)).is_err());
    }
}
