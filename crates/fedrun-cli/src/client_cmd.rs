//! `fedrun client`: one client job in its own process, connected to a `fedrun server` over TCP.
//!
//! The other half of [`crate::server_cmd`]. [`run_client`] loads the job (the same job the
//! server runs; its client config names the executors), opens an NVFlare endpoint named
//! `<site>.<job>` that connects to the server, starts the client job engine on it with the
//! job's executors, and runs a `ClientRunner` — the same client job `fedrun simulate` runs per
//! site — until the server ends the run (`__end_run__`).
//!
//! Nothing waits forever: the server must answer within [`ClientOptions::timeout`] (the
//! connector keeps retrying meanwhile, so the client may be started first), the whole run must
//! end within it, and a server that stays unreachable for [`ClientOptions::server_lost_grace`]
//! ends the run with an error.
//!
//! Exit status: `Ok` (exit 0) only when the server ended a run that completed. A run the server
//! failed or aborted (it says so with [`fedrun_server::RUN_FAILED_TOPIC`] before `__end_run__`),
//! a run aborted here, a lost server or a timeout are errors (exit 1, the reason on stderr).
//! This differs on purpose from `fedrun job`, which keeps NVFlare's client job exit codes (0
//! after an abort too: its client parent expects that).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedrun_cell::Fqcn;
use fedrun_core::constants::fl_ctx_key;
use fedrun_core::{AppReturnCode, Shareable, Value};
use fedrun_engine::{aux_handler, AuxRequest, ClientJobConfig, RunEnd, RunOutcome, RunnerConfig};
use fedrun_wire::TcpTransport;

use crate::error::CliError;
use crate::job::JobDefinition;
use crate::simulate::{start_client, SimulationSetup};
use crate::tls_opts::TlsOptions;
use crate::transport::{connect_client_with, JobTransport};

/// The default deadline of a whole client run (`--timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// The default time the server may stay unreachable during a run.
pub const DEFAULT_SERVER_LOST_GRACE: Duration = Duration::from_secs(30);

/// What `fedrun client` was asked to do.
///
/// # Example
/// ```
/// use fedrun_cli::client_cmd::ClientOptions;
///
/// let options = ClientOptions::new("tcp://127.0.0.1:8002", "site-1", "job-1");
/// assert_eq!(options.timeout.as_secs(), 600);
/// assert!(options.job.is_none());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ClientOptions {
    /// The server: `tcp://host:port`, `stcp://host:port` (TLS) or `host:port`.
    pub server: String,
    /// TLS credentials and mode (default: none, clear TCP).
    pub tls: TlsOptions,
    /// This client's site name.
    pub name: String,
    /// The job id the server runs.
    pub job_id: String,
    /// Job directory (`None`: the built-in logistic-regression job).
    pub job: Option<PathBuf>,
    /// Seed for the executors' `seed` argument (`None`: the job's own).
    pub seed: Option<u64>,
    /// Deadline of the whole run, connection included.
    pub timeout: Duration,
    /// How long the server may stay unreachable during the run.
    pub server_lost_grace: Duration,
    /// The runner's timing (NVFlare's defaults).
    pub runner: RunnerConfig,
}

impl ClientOptions {
    /// Options for site `name` of job `job_id` at `server`, everything else by default.
    pub fn new(server: &str, name: &str, job_id: &str) -> Self {
        Self {
            server: server.to_owned(),
            tls: TlsOptions::default(),
            name: name.to_owned(),
            job_id: job_id.to_owned(),
            job: None,
            seed: None,
            timeout: DEFAULT_TIMEOUT,
            server_lost_grace: DEFAULT_SERVER_LOST_GRACE,
            runner: RunnerConfig::default(),
        }
    }
}

/// Runs `fedrun client` (see the module doc). `Ok` with the runner's outcome when the server
/// ended the run; the engine and the connection are closed in every case. Must run inside an
/// actix `System`.
///
/// # Errors
///
/// [`CliError::BadOption`] for a bad server address, site name or job id,
/// [`CliError::BadJob`] for a job whose client config cannot be built,
/// [`CliError::Timeout`] when the server does not answer in time or the run outlives
/// [`ClientOptions::timeout`], [`CliError::Engine`] when the run could not start (e.g. the
/// server's runner never synced), [`CliError::RunFailed`] when the run was aborted, failed, or
/// the server was lost.
///
/// # Example
/// ```no_run
/// use fedrun_cli::client_cmd::{run_client, ClientOptions};
///
/// let options = ClientOptions::new("tcp://127.0.0.1:8002", "site-1", "job-1");
/// let outcome = actix::System::new().block_on(run_client(options)).unwrap();
/// println!("{} result(s) sent", outcome.results_sent);
/// ```
pub async fn run_client(options: ClientOptions) -> Result<RunOutcome, CliError> {
    let started = tokio::time::Instant::now();
    let deadline = started + options.timeout;
    let name = options.name.as_str();
    let job_id = options.job_id.as_str();
    let mut job = match &options.job {
        Some(dir) => JobDefinition::load(dir)?,
        None => JobDefinition::builtin_logreg()?,
    };
    if let Some(seed) = options.seed {
        if job.set_seed(seed) == 0 {
            log::warn!(
                "[job={job_id} site={name}] --seed {seed}: no executor of job {} takes a seed",
                job.name
            );
        }
    }
    let client_config =
        ClientJobConfig::from_value(&job.client_config).map_err(|e| CliError::BadJob {
            path: PathBuf::from(crate::job::CLIENT_CONFIG_FILE),
            reason: e.to_string(),
        })?;

    let transport =
        connect_client_with(&options.server, name, job_id, options.timeout, &options.tls).await?;
    // `start_client` reads the job id, the extra factories (none) and the runner's timing; a
    // client process has no workspace of its own.
    let mut setup = SimulationSetup::new(job, 0, PathBuf::new());
    setup.job_id = job_id.to_owned();
    setup.sites = vec![name.to_owned()];
    setup.timing.runner = options.runner.clone();
    let site = match start_client(
        &setup,
        JobTransport::Tcp(transport.clone()),
        name,
        &[name],
        &client_config,
    )
    .await
    {
        Ok(site) => site,
        Err(e) => {
            transport.shutdown().await;
            return Err(e);
        }
    };
    let run_failed = Arc::new(Mutex::new(None::<String>));
    if let Err(e) = listen_for_run_failed(&site.engine, Arc::clone(&run_failed)).await {
        site.engine.stop().await;
        transport.shutdown().await;
        return Err(CliError::Engine {
            site: name.to_owned(),
            source: e,
        });
    }
    log::info!("[job={job_id} site={name}] client job started; running until the end of the run");

    let control = site.runner.control();
    let mut run = site.runner.spawn();
    let grace = options.runner.task_abort_grace + Duration::from_secs(1);
    let ended = tokio::select! {
        result = &mut run => Ended::Run(result),
        () = tokio::time::sleep_until(deadline) => Ended::TimedOut,
        () = server_lost(&transport, options.server_lost_grace) => Ended::ServerLost,
    };
    if !matches!(ended, Ended::Run(_)) {
        control.end_run();
        if tokio::time::timeout(grace, &mut run).await.is_err() {
            log::error!("[job={job_id} site={name}] the runner did not end; dropping it");
            run.abort();
        }
    }
    site.engine.stop().await;
    transport.shutdown().await;

    let failed = |why: String| CliError::RunFailed(format!("client {name} of job {job_id}: {why}"));
    match ended {
        Ended::Run(Ok(Ok(outcome))) => match &outcome.ended_by {
            RunEnd::EndRun if server_failed(&run_failed).is_some() => Err(failed(format!(
                "the server ended the run as failed after {} task(s) here: {}",
                outcome.tasks_done,
                server_failed(&run_failed).unwrap_or_default()
            ))),
            RunEnd::EndRun => {
                log::info!(
                    "[job={job_id} site={name}] run ended by the server: {} task(s), {} \
                     result(s) sent",
                    outcome.tasks_done,
                    outcome.results_sent
                );
                Ok(outcome)
            }
            RunEnd::Aborted => Err(failed(format!(
                "the run was aborted after {} task(s)",
                outcome.tasks_done
            ))),
            RunEnd::Failed(e) => Err(failed(e.clone())),
        },
        Ended::Run(Ok(Err(source))) => Err(CliError::Engine {
            site: name.to_owned(),
            source,
        }),
        Ended::Run(Err(join)) => Err(failed(format!("the runner panicked: {join}"))),
        Ended::TimedOut => Err(CliError::Timeout {
            what: format!("client {name} of job {job_id}: the end of the run"),
            secs: options.timeout.as_secs(),
        }),
        Ended::ServerLost => Err(failed(format!(
            "lost the server at {} for more than {:.1} s",
            options.server,
            options.server_lost_grace.as_secs_f64()
        ))),
    }
}

/// Why the server said the run failed, if it did.
fn server_failed(reason: &Mutex<Option<String>>) -> Option<String> {
    reason
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Records the server job's notice that the run failed ([`fedrun_server::RUN_FAILED_TOPIC`]),
/// which it sends before `__end_run__`. Only the server's notice counts.
async fn listen_for_run_failed(
    engine: &fedrun_engine::EngineHandle,
    reason: Arc<Mutex<Option<String>>>,
) -> Result<(), fedrun_engine::EngineError> {
    let prefix = format!("[job={} site={}]", engine.job_id(), engine.site());
    let handler = aux_handler(move |req: AuxRequest| {
        let from = req
            .request
            .peer_prop(fl_ctx_key::IDENTITY_NAME)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let rc = if from == fedrun_server::SERVER_IDENTITY {
            let why = req
                .request
                .header_or_none(fedrun_server::RUN_FAILED_REASON)
                .and_then(Value::as_str)
                .unwrap_or("no reason given")
                .to_owned();
            log::error!("{prefix} the server says the run failed: {why}");
            *reason
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
            AppReturnCode::Ok
        } else {
            log::warn!("{prefix} a run-failed notice from {from:?}, not the server: ignored");
            AppReturnCode::BadPeerContext
        };
        async move { Ok(Shareable::make_reply(rc, None)) }
    });
    engine
        .register_aux_message_handler(fedrun_server::RUN_FAILED_TOPIC, handler)
        .await
}

/// How the wait for the runner ended.
enum Ended {
    Run(Result<Result<RunOutcome, fedrun_engine::EngineError>, tokio::task::JoinError>),
    TimedOut,
    ServerLost,
}

/// Resolves once the server endpoint has been unreachable for `grace` in one stretch (the
/// connector keeps reconnecting meanwhile).
async fn server_lost(transport: &TcpTransport, grace: Duration) {
    /// How long one wait for a disconnection lasts before it is simply renewed.
    const WATCH_SLICE: Duration = Duration::from_secs(3600);
    loop {
        if !transport
            .wait_for_peer_gone(&Fqcn::SERVER, WATCH_SLICE)
            .await
        {
            continue;
        }
        log::warn!(
            "{}: connection to the server lost; waiting up to {} s for it to come back",
            transport.own_fqcn(),
            grace.as_secs()
        );
        if !transport.wait_for_peer(&Fqcn::SERVER, grace).await {
            return;
        }
        log::info!("{}: reconnected to the server", transport.own_fqcn());
    }
}
