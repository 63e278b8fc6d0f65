//! The simulation: one server job and N client jobs on one in-process network, run to the end.
//!
//! [`simulate`] is what `fedrun simulate` runs: it turns [`SimulateOptions`] into a
//! [`SimulationSetup`] (job, job id, sites, workspace, timing), starts a [`Simulation`], runs it
//! and writes the results. Tests and benchmarks use the same pieces with their own setup (their
//! own executors through [`SimulationSetup::client_factories`], their own persistors through
//! [`SimulationSetup::server_factories`]), and steer a running simulation through
//! [`SimulationControl`] (abort the server, abort or stop a client).
//!
//! What [`Simulation::run`] does:
//!
//! 1. spawns the server job's workflows (built from `config_fed_server.json`) and one
//!    [`ClientRunner`] per site (its executors built from `config_fed_client.json`);
//! 2. follows the server's [`WorkflowEvent`]s, reporting each completed round to the
//!    [`RunObserver`];
//! 3. watches the client runners: a client whose run ends before the server ended it (aborted,
//!    engine stopped) has left; when fewer clients are left than the workflow's `min_clients`,
//!    no round can complete any more, so the server run is aborted with that reason instead of
//!    waiting forever;
//! 4. once the workflows are done (the server then ends the run: `__end_run__` to every client),
//!    waits — with a deadline — for every client runner to end, ends the stragglers' runs, and
//!    stops every engine and the server job.
//!
//! The outcome is a [`SimulationReport`]: the status ([`RunStatus`]), the rounds, the final
//! model and how each client's run ended. [`simulate`] writes it into the workspace
//! (`metrics.json`, `model.json`, the persistor's `models/`) and fails with
//! [`CliError::RunFailed`] unless the run completed.
//!
//! [`SimulationSetup::transport`] picks what carries the messages: one in-process network
//! (default), or loopback TCP with one NVFlare endpoint per job ([`crate::transport`]).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedrun_engine::{
    ClientEngine, ClientJobConfig, ClientRunner, ComponentFactory, EngineError, EngineHandle,
    RegisterComponentFactory, RunEnd, RunOutcome, RunnerConfig, RunnerControl, SetBuildAuthorizer,
};
use fedrun_server::{
    ModelWeights, RoundMetrics, ServerError, ServerJob, ServerJobConfig, Workflow, WorkflowEvent,
    WorkflowOutcome,
};
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::json;
use tokio::sync::mpsc;

use crate::error::CliError;
use crate::factories::{register_builtin_client_factories, server_factories, SiteFactory};
use crate::job::JobDefinition;
use crate::output::{write_metrics, write_model, RoundRecord};
use crate::trainer::{META_ACCURACY, META_LOSS};
use crate::transport::{SimNetwork, TransportKind};

/// The default number of client sites.
pub const DEFAULT_CLIENTS: usize = 4;
/// The default number of rounds (when neither the option nor the job says).
pub const DEFAULT_ROUNDS: u64 = 5;
/// The most client sites one simulation runs.
pub const MAX_CLIENTS: usize = 10_000;
/// The directory, under the current one, where default workspaces go.
pub const DEFAULT_WORKSPACE_ROOT: &str = "fedrun-workspace";

/// What `fedrun simulate` was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulateOptions {
    /// Number of client sites (`site-1` ..), also the workflow's `min_clients`.
    pub clients: usize,
    /// Number of rounds (`None`: the job's `num_rounds`, else [`DEFAULT_ROUNDS`]).
    pub rounds: Option<u64>,
    /// Workspace directory (`None`: `./fedrun-workspace/<job-id>`, or the temp dir).
    pub workspace: Option<PathBuf>,
    /// Job directory (`None`: the built-in logistic-regression job).
    pub job: Option<PathBuf>,
    /// Seed for the executors' `seed` argument (`None`: the job's own).
    pub seed: Option<u64>,
}

impl Default for SimulateOptions {
    fn default() -> Self {
        Self {
            clients: DEFAULT_CLIENTS,
            rounds: None,
            workspace: None,
            job: None,
            seed: None,
        }
    }
}

/// Hears about a simulation's progress (the CLI draws its progress bar with it).
pub trait RunObserver {
    /// The run is about to start: `rounds` rounds are planned.
    fn run_started(&mut self, _job_id: &str, _rounds: u64) {}
    /// A round completed.
    fn round_completed(&mut self, _record: &RoundRecord) {}
}

/// An observer that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl RunObserver for NoObserver {}

/// How fast the simulated parties poll and how long they wait.
///
/// In-process polling is cheap, so the defaults poll much faster than NVFlare's (which polls
/// over the network every few seconds): a round then costs milliseconds, not seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// The server's `__wait_time__`: how long a client waits before asking for a task again.
    pub poll_interval: Duration,
    /// The client runners' timing.
    pub runner: RunnerConfig,
    /// How long, after the server ended the run, the client runners get to end.
    pub end_of_run_deadline: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(10),
            runner: RunnerConfig {
                default_interval: Duration::from_millis(10),
                task_check_interval: Duration::from_millis(100),
                max_runner_sync_timeout: Duration::from_secs(30),
                task_abort_grace: Duration::from_secs(2),
                ..RunnerConfig::default()
            },
            end_of_run_deadline: Duration::from_secs(30),
        }
    }
}

/// Everything a simulation needs before it starts.
#[derive(Clone)]
pub struct SimulationSetup {
    /// The job (configs already overridden as wanted).
    pub job: JobDefinition,
    /// The job id (names every job cell: `server.<id>`, `<site>.<id>`).
    pub job_id: String,
    /// The client sites.
    pub sites: Vec<String>,
    /// Where the server writes models (relative paths of the server config resolve here) and
    /// [`simulate`] writes its results.
    pub workspace: PathBuf,
    /// Polling and deadlines.
    pub timing: Timing,
    /// Extra client component classes (on top of the built-in ones of
    /// [`register_builtin_client_factories`]: NVFlare's numpy executors, whose local models go
    /// to `<workspace>/<site>`, and the [`LogRegTrainer`](crate::trainer::LogRegTrainer)), by
    /// class; an extra class replaces a built-in one of the same name.
    pub client_factories: Vec<(String, SiteFactory)>,
    /// Extra server component classes (on top of the server crate's and
    /// [`ZeroModelPersistor`](crate::factories::ZERO_MODEL_PERSISTOR_CLASS)), by class.
    pub server_factories: Vec<(String, ComponentFactory)>,
    /// What carries the messages (default: the in-process network).
    pub transport: TransportKind,
}

impl fmt::Debug for SimulationSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let client: Vec<&str> = self
            .client_factories
            .iter()
            .map(|(c, _)| c.as_str())
            .collect();
        let server: Vec<&str> = self
            .server_factories
            .iter()
            .map(|(c, _)| c.as_str())
            .collect();
        f.debug_struct("SimulationSetup")
            .field("job", &self.job.name)
            .field("job_id", &self.job_id)
            .field("sites", &self.sites)
            .field("workspace", &self.workspace)
            .field("timing", &self.timing)
            .field("client_factories", &client)
            .field("server_factories", &server)
            .field("transport", &self.transport)
            .finish()
    }
}

/// `site-1` .. `site-<n>`.
pub fn site_names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("site-{i}")).collect()
}

impl SimulationSetup {
    /// A setup for `job` with `clients` sites (`site-1` ..), a fresh job id and default timing.
    pub fn new(job: JobDefinition, clients: usize, workspace: impl Into<PathBuf>) -> Self {
        Self {
            job,
            job_id: uuid::Uuid::new_v4().to_string(),
            sites: site_names(clients),
            workspace: workspace.into(),
            timing: Timing::default(),
            client_factories: Vec::new(),
            server_factories: Vec::new(),
            transport: TransportKind::default(),
        }
    }

    /// The setup `fedrun simulate` uses for `options`: the job loaded (or the built-in one),
    /// `min_clients` = clients, the rounds and seed applied, the workspace created.
    pub fn from_options(options: &SimulateOptions) -> Result<Self, CliError> {
        if options.clients == 0 || options.clients > MAX_CLIENTS {
            return Err(CliError::BadOption {
                option: "clients",
                reason: format!("must be between 1 and {MAX_CLIENTS}"),
            });
        }
        if options.rounds == Some(0) {
            return Err(CliError::BadOption {
                option: "rounds",
                reason: "must be at least 1".to_owned(),
            });
        }
        let mut job = match &options.job {
            Some(dir) => JobDefinition::load(dir)?,
            None => JobDefinition::builtin_logreg()?,
        };
        job.set_min_clients(options.clients)?;
        let rounds = options
            .rounds
            .or_else(|| job.num_rounds())
            .unwrap_or(DEFAULT_ROUNDS);
        job.set_num_rounds(rounds)?;
        if let Some(seed) = options.seed {
            if job.set_seed(seed) == 0 {
                log::warn!(
                    "--seed {seed}: no executor of job {} takes a seed",
                    job.name
                );
            }
        }
        let job_id = uuid::Uuid::new_v4().to_string();
        let workspace = prepare_workspace(options.workspace.as_deref(), &job_id)?;
        let mut setup = Self::new(job, options.clients, workspace);
        setup.job_id = job_id;
        Ok(setup)
    }
}

/// Creates the workspace: `dir` if given, else `./fedrun-workspace/<job_id>`, else (when that
/// cannot be created) `<temp>/fedrun-workspace/<job_id>`.
pub(crate) fn prepare_workspace(dir: Option<&Path>, job_id: &str) -> Result<PathBuf, CliError> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| CliError::io("cannot create", dir, e))?;
        return Ok(dir.to_owned());
    }
    let local = Path::new(DEFAULT_WORKSPACE_ROOT).join(job_id);
    match std::fs::create_dir_all(&local) {
        Ok(()) => Ok(local),
        Err(e) => {
            let temp = std::env::temp_dir()
                .join(DEFAULT_WORKSPACE_ROOT)
                .join(job_id);
            log::warn!(
                "cannot create workspace {} ({e}); using {}",
                local.display(),
                temp.display()
            );
            std::fs::create_dir_all(&temp).map_err(|e| CliError::io("cannot create", &temp, e))?;
            Ok(temp)
        }
    }
}

/// How a simulation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Every workflow finished.
    Completed,
    /// The run was aborted: by [`SimulationControl::abort_server`], or because too few clients
    /// were left to complete a round. The text says why.
    Aborted(String),
    /// A workflow failed (e.g. a round without enough successful results). The text says why.
    Failed(String),
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunStatus::Completed => f.write_str("completed"),
            RunStatus::Aborted(why) => write!(f, "aborted: {why}"),
            RunStatus::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

/// How one client's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEnd {
    /// The runner's loop ran and ended (see [`RunOutcome::ended_by`]).
    Finished(RunOutcome),
    /// The runner could not start (e.g. it could not sync with the server's runner).
    NotStarted(String),
    /// The runner panicked.
    Panicked(String),
    /// The runner did not end before the end-of-run deadline, even after being told to.
    TimedOut,
    /// The site was stopped by [`SimulationControl::stop_client`] (its engine and its runner);
    /// the runner's own outcome.
    Stopped(RunOutcome),
}

impl ClientEnd {
    /// Did the server end this client's run (`__end_run__`)?
    pub fn ended_by_end_run(&self) -> bool {
        matches!(self, ClientEnd::Finished(o) if o.ended_by == RunEnd::EndRun)
    }
}

impl fmt::Display for ClientEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientEnd::Finished(o) => {
                let why = match &o.ended_by {
                    RunEnd::EndRun => "end of run".to_owned(),
                    RunEnd::Aborted => "aborted".to_owned(),
                    RunEnd::Failed(e) => format!("failed ({e})"),
                };
                write!(
                    f,
                    "{why}; {} task(s), {} result(s) sent",
                    o.tasks_done, o.results_sent
                )
            }
            ClientEnd::NotStarted(e) => write!(f, "did not start: {e}"),
            ClientEnd::Panicked(e) => write!(f, "panicked: {e}"),
            ClientEnd::TimedOut => f.write_str("did not end in time"),
            ClientEnd::Stopped(o) => write!(
                f,
                "stopped; {} task(s), {} result(s) sent",
                o.tasks_done, o.results_sent
            ),
        }
    }
}

/// One client's part of a [`SimulationReport`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientReport {
    /// The site.
    pub site: String,
    /// How its run ended.
    pub end: ClientEnd,
}

/// What a simulation did.
#[derive(Clone, Debug)]
pub struct SimulationReport {
    /// The job id.
    pub job_id: String,
    /// The job's name.
    pub job_name: String,
    /// The client sites.
    pub sites: Vec<String>,
    /// The workspace.
    pub workspace: PathBuf,
    /// The workflow's `min_clients`.
    pub min_clients: usize,
    /// The rounds planned.
    pub num_rounds: u64,
    /// How the run ended.
    pub status: RunStatus,
    /// The completed rounds, in order, as the server reported them.
    pub round_metrics: Vec<RoundMetrics>,
    /// The final global model (when the workflow completed).
    pub model: Option<ModelWeights>,
    /// How each client's run ended, in site order.
    pub clients: Vec<ClientReport>,
    /// Wall-clock time of the run (from the first task to the last engine stopped).
    pub elapsed: Duration,
    /// The files [`SimulationReport::write_outputs`] wrote.
    pub files: Vec<PathBuf>,
}

impl SimulationReport {
    /// Did every workflow finish?
    pub fn is_completed(&self) -> bool {
        self.status == RunStatus::Completed
    }

    /// The rounds as the table and `metrics.json` show them (`loss` and `accuracy` are the
    /// server's weighted means of the clients' DXO meta).
    pub fn rounds(&self) -> Vec<RoundRecord> {
        self.round_metrics.iter().map(record_of).collect()
    }

    fn summary(&self) -> serde_json::Value {
        json!({
            "job_id": self.job_id,
            "job_name": self.job_name,
            "clients": self.sites.len(),
            "min_clients": self.min_clients,
            "num_rounds": self.num_rounds,
            "outcome": self.status.to_string(),
            "elapsed_seconds": self.elapsed.as_secs_f64(),
        })
    }

    /// Writes `metrics.json` (always) and `model.json` (when there is a final model) into the
    /// workspace; the model's `.npy` files are the persistor's, under `models/` (written here
    /// if the persistor keeps them elsewhere). Records and returns the paths.
    pub fn write_outputs(&mut self) -> Result<Vec<PathBuf>, CliError> {
        let mut files = vec![write_metrics(
            &self.workspace,
            &self.summary(),
            &self.rounds(),
        )?];
        if let Some(model) = &self.model {
            let arrays: Vec<(String, fedrun_core::NdArray)> =
                model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let mut summary = self.summary();
            summary["round"] = json!(self.round_metrics.last().map(|m| m.round));
            let model_dir = self.workspace.join("models");
            files.push(write_model(&self.workspace, &model_dir, &summary, &arrays)?);
            files.push(model_dir);
        }
        self.files = files.clone();
        Ok(files)
    }
}

pub(crate) fn record_of(m: &RoundMetrics) -> RoundRecord {
    RoundRecord {
        round: m.round,
        clients: m.clients.len(),
        loss: m.metrics.get(META_LOSS).copied(),
        accuracy: m.metrics.get(META_ACCURACY).copied(),
        seconds: m.duration.as_secs_f64(),
    }
}

/// One client site of a started simulation.
pub(crate) struct Site {
    pub(crate) name: String,
    pub(crate) engine: EngineHandle,
    pub(crate) runner: ClientRunner,
}

/// Steers a running simulation (cloneable; get it with [`Simulation::control`] before
/// [`Simulation::run`]).
#[derive(Clone)]
pub struct SimulationControl {
    job_id: String,
    server: ServerJob,
    engines: Vec<EngineHandle>,
    runners: Vec<(String, RunnerControl)>,
    abort_reason: Arc<Mutex<Option<String>>>,
    stopped: Arc<Mutex<HashSet<String>>>,
}

impl fmt::Debug for SimulationControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulationControl")
            .field("job_id", &self.job_id)
            .finish_non_exhaustive()
    }
}

impl SimulationControl {
    /// Aborts the server's run (every workflow wait ends; the run then ends for every client).
    pub fn abort_server(&self, reason: &str) {
        if let Ok(mut r) = self.abort_reason.lock() {
            r.get_or_insert_with(|| reason.to_owned());
        }
        self.server.abort();
    }

    /// Aborts `site`'s run, as NVFlare's `abort` admin command does (`AbortApp`); false when
    /// the engine refused (another job id).
    pub async fn abort_client(&self, site: &str) -> Result<bool, CliError> {
        let engine = self.engine(site)?;
        engine
            .abort_app(&self.job_id)
            .await
            .map_err(|source| CliError::Engine {
                site: site.to_owned(),
                source,
            })
    }

    /// Stops `site` as if its process died: its engine stops (its cell leaves the network) and
    /// its runner ends at once (a running task is cut short, nothing more is sent). The server
    /// then never hears from it again; the site's end is reported as [`ClientEnd::Stopped`].
    pub async fn stop_client(&self, site: &str) -> Result<(), CliError> {
        let engine = self.engine(site)?;
        if let Ok(mut stopped) = self.stopped.lock() {
            stopped.insert(site.to_owned());
        }
        engine.stop().await;
        for (_, runner) in self.runners.iter().filter(|(s, _)| s == site) {
            runner.end_run();
        }
        Ok(())
    }

    fn was_stopped(&self, site: &str) -> bool {
        self.stopped.lock().is_ok_and(|s| s.contains(site))
    }

    /// `site`'s engine.
    pub fn engine(&self, site: &str) -> Result<&EngineHandle, CliError> {
        self.engines
            .iter()
            .find(|e| e.site() == site)
            .ok_or_else(|| CliError::BadOption {
                option: "site",
                reason: format!("no client site {site} in this simulation"),
            })
    }

    /// The server job.
    pub fn server(&self) -> &ServerJob {
        &self.server
    }

    /// The names of the tasks `site`'s runner is executing now.
    pub fn running_tasks(&self, site: &str) -> Vec<String> {
        self.runners
            .iter()
            .filter(|(s, _)| s == site)
            .flat_map(|(_, c)| c.running_tasks())
            .map(|t| t.name)
            .collect()
    }
}

/// A started simulation: the server job and every client engine are up, nothing runs yet.
pub struct Simulation {
    setup: SimulationSetup,
    server: ServerJob,
    workflows: Vec<Box<dyn Workflow>>,
    events: mpsc::UnboundedReceiver<WorkflowEvent>,
    sites: Vec<Site>,
    min_clients: usize,
    num_rounds: u64,
    control: SimulationControl,
    network: SimNetwork,
}

impl fmt::Debug for Simulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulation")
            .field("setup", &self.setup)
            .finish_non_exhaustive()
    }
}

impl Simulation {
    /// Builds the server config's components and workflows, starts the server job and, for
    /// every site, a client engine with the job's executors and a runner (not running yet).
    /// Must run inside an actix `System`. On error, whatever was started is stopped.
    pub async fn start(setup: SimulationSetup) -> Result<Self, CliError> {
        if setup.sites.is_empty() {
            return Err(CliError::BadOption {
                option: "clients",
                reason: "a simulation needs at least one client site".to_owned(),
            });
        }
        let server_config = ServerJobConfig::from_value(setup.job.server_config.clone())?;
        let client_config = ClientJobConfig::from_value(&setup.job.client_config).map_err(|e| {
            CliError::BadJob {
                path: PathBuf::from(crate::job::CLIENT_CONFIG_FILE),
                reason: e.to_string(),
            }
        })?;
        let factories = server_factories(&setup.workspace, &setup.server_factories);
        let built = server_config.build(&factories).await?;
        if built.workflows.is_empty() {
            return Err(CliError::BadJob {
                path: PathBuf::from(crate::job::SERVER_CONFIG_FILE),
                reason: "no workflow to run".to_owned(),
            });
        }
        let sites: Vec<&str> = setup.sites.iter().map(String::as_str).collect();
        let min_clients = setup
            .job
            .min_clients()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(sites.len());
        let num_rounds = setup.job.num_rounds().unwrap_or(DEFAULT_ROUNDS);

        let network = SimNetwork::start(setup.transport).await?;
        let (events_tx, events) = mpsc::unbounded_channel();
        let server = match ServerJob::builder(&setup.job_id)
            .job_clients(&sites)
            .poll_interval(setup.timing.poll_interval)
            .events(events_tx)
            .start_on(network.server_transport())
            .await
        {
            Ok(server) => server,
            Err(e) => {
                network.shutdown().await;
                return Err(e.into());
            }
        };
        let mut started: Vec<Site> = Vec::with_capacity(sites.len());
        for site in &sites {
            let client = async {
                let transport = network.client_transport(site, &setup.job_id).await?;
                start_client(&setup, transport, site, &sites, &client_config).await
            };
            match client.await {
                Ok(s) => started.push(s),
                Err(e) => {
                    for s in &started {
                        s.engine.stop().await;
                    }
                    server.stop().await;
                    network.shutdown().await;
                    return Err(e);
                }
            }
        }
        log::info!(
            "[job={}] simulation of job {} started: server and {} client(s) {:?}",
            setup.job_id,
            setup.job.name,
            started.len(),
            setup.sites
        );
        let control = SimulationControl {
            job_id: setup.job_id.clone(),
            server: server.clone(),
            engines: started.iter().map(|s| s.engine.clone()).collect(),
            runners: started
                .iter()
                .map(|s| (s.name.clone(), s.runner.control()))
                .collect(),
            abort_reason: Arc::new(Mutex::new(None)),
            stopped: Arc::new(Mutex::new(HashSet::new())),
        };
        Ok(Self {
            setup,
            server,
            workflows: built.workflows,
            events,
            sites: started,
            min_clients,
            num_rounds,
            control,
            network,
        })
    }

    /// A control to steer the run from outside (abort, stop a client).
    pub fn control(&self) -> SimulationControl {
        self.control.clone()
    }

    /// Runs the federation to its end (see the module doc) and stops everything.
    pub async fn run(self, observer: &mut dyn RunObserver) -> SimulationReport {
        let Simulation {
            setup,
            server,
            mut workflows,
            mut events,
            sites,
            min_clients,
            num_rounds,
            control,
            network,
        } = self;
        let job_id = setup.job_id.clone();
        let started = Instant::now();
        observer.run_started(&job_id, num_rounds);

        let server_for_run = server.clone();
        let mut server_run = actix::spawn(async move {
            let result = server_for_run.run_workflows(&mut workflows).await;
            drop(workflows);
            result
        });
        let engines: Vec<(String, EngineHandle)> = sites
            .iter()
            .map(|s| (s.name.clone(), s.engine.clone()))
            .collect();
        let mut runs: FuturesUnordered<_> = sites
            .into_iter()
            .map(|s| {
                let handle = s.runner.spawn();
                let name = s.name;
                let control = control.clone();
                async move {
                    let end = match handle.await {
                        Ok(Ok(outcome)) if control.was_stopped(&name) => {
                            ClientEnd::Stopped(outcome)
                        }
                        Ok(Ok(outcome)) => ClientEnd::Finished(outcome),
                        Ok(Err(e)) => ClientEnd::NotStarted(e.to_string()),
                        Err(join) => ClientEnd::Panicked(join.to_string()),
                    };
                    (name, end)
                }
            })
            .collect();

        let mut progress = Progress::default();
        let mut ended: Vec<ClientReport> = Vec::new();
        let mut alive = engines.len();
        let mut left_reason: Option<String> = None;

        // Phase 1: until the server's workflows are done.
        let server_result = loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => progress.on_event(event, observer),
                Some((site, end)) = runs.next() => {
                    if !end.ended_by_end_run() {
                        alive = alive.saturating_sub(1);
                        let round = progress.current_round();
                        log::warn!(
                            "[job={job_id} site={site}] client left the run during round \
                             {round}: {end}"
                        );
                        if alive < min_clients && left_reason.is_none() {
                            let why = format!(
                                "{site} left during round {round} ({end}); {alive} client(s) \
                                 left, fewer than min_clients {min_clients}"
                            );
                            log::error!("[job={job_id}] aborting the server run: {why}");
                            left_reason = Some(why);
                            server.abort();
                        }
                    }
                    ended.push(ClientReport { site, end });
                }
                result = &mut server_run => break result,
            }
        };
        while let Ok(event) = events.try_recv() {
            progress.on_event(event, observer);
        }

        // Phase 2: every client runner ends (the server ended the run), with a deadline.
        let deadline = setup.timing.end_of_run_deadline;
        let collect = async {
            while let Some((site, end)) = runs.next().await {
                ended.push(ClientReport { site, end });
            }
        };
        if tokio::time::timeout(deadline, collect).await.is_err() {
            let done: HashSet<String> = ended.iter().map(|c| c.site.clone()).collect();
            for (site, runner) in &control.runners {
                if !done.contains(site) {
                    log::error!(
                        "[job={job_id} site={site}] runner still running {deadline:?} after the \
                         end of the run; ending it"
                    );
                    runner.end_run();
                }
            }
            let grace = setup.timing.runner.task_abort_grace + Duration::from_secs(1);
            let collect = async {
                while let Some((site, end)) = runs.next().await {
                    ended.push(ClientReport { site, end });
                }
            };
            let _ = tokio::time::timeout(grace, collect).await;
        }
        drop(runs);
        for (site, _) in &engines {
            if !ended.iter().any(|c| &c.site == site) {
                ended.push(ClientReport {
                    site: site.clone(),
                    end: ClientEnd::TimedOut,
                });
            }
        }
        for (_, engine) in &engines {
            engine.stop().await;
        }
        server.stop().await;
        network.shutdown().await;

        let requested = control.abort_reason.lock().ok().and_then(|r| r.clone());
        let (status, model) = status_of(server_result, left_reason, requested);
        ended.sort_by_key(|c| site_index(&setup.sites, &c.site));
        log::info!("[job={job_id}] simulation ended: {status}");
        SimulationReport {
            job_id,
            job_name: setup.job.name.clone(),
            sites: setup.sites.clone(),
            workspace: setup.workspace.clone(),
            min_clients,
            num_rounds,
            status,
            round_metrics: progress.rounds,
            model,
            clients: ended,
            elapsed: started.elapsed(),
            files: Vec::new(),
        }
    }
}

/// What the run loop learns from the server's events.
#[derive(Default)]
struct Progress {
    rounds: Vec<RoundMetrics>,
    current_round: Option<u32>,
}

impl Progress {
    fn on_event(&mut self, event: WorkflowEvent, observer: &mut dyn RunObserver) {
        match event {
            WorkflowEvent::RoundStarted { round, .. } => self.current_round = Some(round),
            WorkflowEvent::RoundCompleted { metrics, .. } => {
                observer.round_completed(&record_of(&metrics));
                self.rounds.push(metrics);
            }
            _ => {}
        }
    }

    fn current_round(&self) -> String {
        self.current_round
            .map_or_else(|| "-".to_owned(), |r| r.to_string())
    }
}

fn site_index(sites: &[String], site: &str) -> usize {
    sites.iter().position(|s| s == site).unwrap_or(usize::MAX)
}

/// The run's status and final model from the server's result and the reasons for an abort.
pub(crate) fn status_of(
    server_result: Result<Result<Vec<WorkflowOutcome>, ServerError>, tokio::task::JoinError>,
    left_reason: Option<String>,
    requested: Option<String>,
) -> (RunStatus, Option<ModelWeights>) {
    match server_result {
        Ok(Ok(outcomes)) => {
            let model = outcomes.into_iter().rev().find_map(|o| o.model);
            (RunStatus::Completed, model)
        }
        Ok(Err(e)) => {
            let status = match (left_reason, requested) {
                (Some(left), _) => RunStatus::Aborted(format!("{left}; server: {e}")),
                (None, Some(asked)) => RunStatus::Aborted(format!("{asked}; server: {e}")),
                (None, None) => RunStatus::Failed(e.to_string()),
            };
            (status, None)
        }
        Err(join) => (
            RunStatus::Failed(format!("the server job's task failed: {join}")),
            None,
        ),
    }
}

/// Starts `site`'s engine, registers the factories, builds the job's executors and makes the
/// runner.
pub(crate) async fn start_client(
    setup: &SimulationSetup,
    transport: crate::transport::JobTransport,
    site: &str,
    sites: &[&str],
    client_config: &ClientJobConfig,
) -> Result<Site, CliError> {
    let engine_err = |source: EngineError| CliError::Engine {
        site: site.to_owned(),
        source,
    };
    let engine = ClientEngine::builder(site, &setup.job_id)
        .job_clients(sites)
        .start_on(transport)
        .await
        .map_err(engine_err)?;
    let prepared = async {
        register_builtin_client_factories(&engine, &setup.workspace.join(site)).await?;
        for (class, make) in &setup.client_factories {
            engine
                .send(RegisterComponentFactory {
                    class: class.clone(),
                    factory: make(site),
                })
                .await??;
        }
        // Every class the engine can build was registered on purpose by this process: the
        // simulator allows them all (NVFlare's authorizer guards against job-supplied classes,
        // which fedrun cannot load anyway).
        engine
            .send(SetBuildAuthorizer {
                authorizer: Arc::new(|_node: &serde_json::Value, _path: &str| Ok(())),
            })
            .await?;
        client_config.build(&engine).await
    };
    match prepared.await {
        Ok(router) => {
            let runner = ClientRunner::new(engine.clone(), router, setup.timing.runner.clone());
            Ok(Site {
                name: site.to_owned(),
                engine,
                runner,
            })
        }
        Err(e) => {
            engine.stop().await;
            Err(engine_err(e))
        }
    }
}

/// Runs `fedrun simulate`: set up from `options`, start, run, write the results into the
/// workspace. `Err` unless the run completed (the results are written in every case where the
/// run started).
///
/// # Example
/// ```no_run
/// use fedrun_cli::{simulate, NoObserver, SimulateOptions};
///
/// let options = SimulateOptions { clients: 2, rounds: Some(1), ..SimulateOptions::default() };
/// let report = actix::System::new()
///     .block_on(simulate(options, &mut NoObserver))
///     .unwrap();
/// assert!(report.is_completed());
/// ```
pub async fn simulate(
    options: SimulateOptions,
    observer: &mut dyn RunObserver,
) -> Result<SimulationReport, CliError> {
    simulate_setup(SimulationSetup::from_options(&options)?, observer).await
}

/// [`simulate`] from a prepared setup (e.g. [`SimulationSetup::from_options`] with another
/// [`SimulationSetup::transport`]): start, run, write the results into the workspace. `Err`
/// unless the run completed.
pub async fn simulate_setup(
    setup: SimulationSetup,
    observer: &mut dyn RunObserver,
) -> Result<SimulationReport, CliError> {
    let simulation = Simulation::start(setup).await?;
    let mut report = simulation.run(observer).await;
    report.write_outputs()?;
    match &report.status {
        RunStatus::Completed => Ok(report),
        other => Err(CliError::RunFailed(format!(
            "{other} (results so far in {})",
            report.workspace.display()
        ))),
    }
}
