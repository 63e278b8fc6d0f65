//! `fedrun job`: a fedrun client job in a site's seat of a real NVFlare deployment.
//!
//! In NVFlare every client site runs each job in a child process (the "CJ") that its client
//! parent (CP) launches with a fixed command line ([`args`]). `fedrun job` accepts exactly that
//! command line, so a site-local launcher component can start fedrun instead of NVFlare's
//! Python worker (see the README, "Run a fedrun client job in your NVFlare deployment"). One
//! [`run_job`]:
//!
//! 1. takes the credentials out of the environment (done by `main` before anything starts),
//!    reads the startup kit ([`startup`]) and the job as the parent deployed it
//!    (`<ws>/<job>/app_<site>/config/`, `<ws>/<job>/meta.json`);
//! 2. opens an NVFlare endpoint `<site>.<job>` that connects to its parent and, when the kit
//!    allows it, to the server ([`startup::ServerRoute`]); every frame it writes carries the
//!    job's credentials (`client_name`, `ssid`, `__token__`, `__token_signature__`), as NVFlare's
//!    job process stamps them;
//! 3. starts the client job engine and the task loop, answers the parent's commands
//!    ([`parent`]) and tells the parent it started;
//! 4. runs until the server ends the run (`__end_run__`, a task or an aux message), the run is
//!    aborted (`client_command/abort`), the parent process goes away, or the server job is
//!    gone after the last task; then tells the parent it stopped, says goodbye and returns.
//!
//! The process exits 0 when the run ended (normally or by an abort the admin asked for), 1
//! otherwise, as NVFlare's worker does: the parent turns an early non-zero exit into a failed
//! job.

pub mod args;
pub mod engine;
pub mod parent;
pub mod startup;

use std::time::Duration;

use fedrun_cell::Fqcn;
use fedrun_core::{Map, Value};
use fedrun_engine::{ClientRunner, RunEnd, RunOutcome, RunnerConfig};
use fedrun_wire::{TcpTransport, WireConfig};

use crate::error::CliError;
use args::WorkerArgs;
use parent::{JobStatus, SharedStatus};
use startup::{ServerRoute, StartupConfig};

/// How long `fedrun job` waits for its parent (and the server, when direct) to accept it.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The environment variable that sets [`JobOptions::connect_timeout`], in seconds (the site
/// launcher's `env` argument can set it; NVFlare's command line has no room for it).
pub const ENV_CONNECT_TIMEOUT: &str = "FEDRUN_JOB_CONNECT_TIMEOUT";

/// Timing of `fedrun job` beyond the task loop's own.
///
/// # Example
/// ```
/// use fedrun_cli::cj::JobOptions;
///
/// let options = JobOptions::default();
/// assert_eq!(options.notify_retry.as_secs(), 15);
/// ```
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// How long to wait for the parent (and the server) connection (60 s).
    pub connect_timeout: Duration,
    /// How long to keep telling the parent the job started (15 s, NVFlare's
    /// `notify_cp_retry_timeout`).
    pub notify_retry: Duration,
    /// The timeout of one status notification (5 s, `notify_cp_msg_timeout`).
    pub notify_timeout: Duration,
    /// How often the parent process is checked (1 s).
    pub parent_check_interval: Duration,
    /// The task loop's timing.
    pub runner: RunnerConfig,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            notify_retry: Duration::from_secs(15),
            notify_timeout: Duration::from_secs(5),
            parent_check_interval: Duration::from_secs(1),
            runner: RunnerConfig {
                // the end-of-run race: a server job that exits before this job's next pull
                end_run_after_failed_pulls: Some(Duration::from_secs(20)),
                ..RunnerConfig::default()
            },
        }
    }
}

impl JobOptions {
    /// The defaults, with [`ENV_CONNECT_TIMEOUT`] applied when it is set.
    ///
    /// # Errors
    ///
    /// [`CliError::BadOption`] when the variable is not a positive number of seconds.
    pub fn from_env() -> Result<JobOptions, CliError> {
        let mut options = JobOptions::default();
        if let Ok(text) = std::env::var(ENV_CONNECT_TIMEOUT) {
            let secs = text
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s > 0.0)
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .ok_or_else(|| {
                    bad_option(
                        ENV_CONNECT_TIMEOUT,
                        format!("{text:?} is not a positive number of seconds"),
                    )
                })?;
            options.connect_timeout = secs;
        }
        Ok(options)
    }
}

/// How a `fedrun job` run ended.
#[derive(Clone, Debug)]
pub struct JobReport {
    /// The task loop's outcome.
    pub outcome: RunOutcome,
    /// How the server job was reached.
    pub route: ServerRoute,
}

impl JobReport {
    /// The exit code NVFlare's parent expects: 0 for a run that ended, normally or by abort.
    pub fn exit_code(&self) -> i32 {
        match self.outcome.ended_by {
            RunEnd::EndRun | RunEnd::Aborted => 0,
            RunEnd::Failed(_) => 1,
        }
    }
}

/// The credentials every frame of the job carries.
fn auth_headers(args: &WorkerArgs) -> Vec<(String, String)> {
    [
        ("client_name", args.client_name.as_str()),
        ("ssid", args.ssid.as_str()),
        ("__token__", args.token.as_str()),
        ("__token_signature__", args.token_signature.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn bad_option(option: &'static str, reason: impl std::fmt::Display) -> CliError {
    CliError::BadOption {
        option,
        reason: reason.to_string(),
    }
}

/// Runs one client job as NVFlare's client parent launched it (see the module doc). Must run
/// inside an actix `System`.
///
/// # Errors
///
/// A [`CliError`] naming what failed: the options or the startup kit, the deployed job (a
/// class without a fedrun factory is named), a parent or server that does not accept the
/// connection in time, an engine that does not start, or a run that failed.
pub async fn run_job(args: WorkerArgs, options: JobOptions) -> Result<JobReport, CliError> {
    let site = args.client_name.clone();
    let job_id = args.job_id.clone();
    let prefix = format!("[job={job_id} site={site}]");
    startup::check_parent(&args.parent_url, &args.parent_conn_sec)?;
    let startup = StartupConfig::load(&args)?;
    let conn_gen = std::env::var(startup::ENV_BACKBONE_CONN_GEN).ok();
    let route = startup.server_route(
        &args.sp_scheme,
        &args.sp_target,
        args.set_flag("secure_train").unwrap_or(true),
        conn_gen.as_deref(),
    )?;
    let deploy = crate::deployed::DeployOptions {
        set: args.set.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        ..Default::default()
    };
    let job = crate::deployed::DeployedJob::load_with(&args.workspace, &job_id, &site, &deploy)?;
    let me = Fqcn::job_cell(&site, &job_id).map_err(|e| bad_option("-c/-n", e))?;
    let parent = Fqcn::new(&site).map_err(|e| bad_option("-c", e))?;

    let config = WireConfig {
        outgoing_headers: auth_headers(&args),
        secure: startup::secure_credentials(&args.startup, &args.fed_client)?,
        // a client job is a leaf: it relays nothing
        forwarding: false,
        ..WireConfig::default()
    };
    let transport = TcpTransport::new(me, config);
    let result = run_on(&args, &options, &startup, &route, job, &transport, &parent).await;
    transport.shutdown().await;
    match &result {
        Ok(report) => log::info!(
            "{prefix} client job ended: {:?} after {} task(s)",
            report.outcome.ended_by,
            report.outcome.tasks_done
        ),
        Err(e) => log::error!("{prefix} client job failed: {e}"),
    }
    result
}

async fn run_on(
    args: &WorkerArgs,
    options: &JobOptions,
    startup: &StartupConfig,
    route: &ServerRoute,
    job: crate::deployed::DeployedJob,
    transport: &TcpTransport,
    parent: &Fqcn,
) -> Result<JobReport, CliError> {
    let site = args.client_name.as_str();
    let job_id = args.job_id.as_str();
    let prefix = format!("[job={job_id} site={site}]");
    transport
        .add_connector(&args.parent_url)
        .map_err(|e| bad_option("-p/--parent_url", e))?;
    match route {
        ServerRoute::Direct(url) => {
            log::info!(
                "{prefix} connecting to the server at {url} and to the parent at {}",
                args.parent_url
            );
            transport
                .add_connector(url)
                .map_err(|e| bad_option("-g/--sp_target", e))?;
        }
        ServerRoute::DirectTls { url, security } => {
            log::info!(
                "{prefix} connecting to the server at {url} over {security} (startup kit {}) \
                 and to the parent at {}",
                args.startup.display(),
                args.parent_url
            );
            let creds = startup.tls_credentials(&args.startup)?;
            let connector = fedrun_wire::tls::TlsConnector::new(
                &creds,
                *security,
                startup.server_identity.as_deref(),
            )
            .map_err(|e| bad_option("-w/--startup", e))?;
            transport
                .add_tls_connector(url, connector)
                .map_err(|e| bad_option("-g/--sp_target", e))?;
        }
        ServerRoute::ViaParent(why) => {
            log::info!(
                "{prefix} reaching the server through the parent at {} only: {why}",
                args.parent_url
            );
        }
    }
    let timeout_secs = options.connect_timeout.as_secs();
    if !transport
        .wait_for_peer(parent, options.connect_timeout)
        .await
    {
        return Err(CliError::Timeout {
            what: format!("the client parent at {}", args.parent_url),
            secs: timeout_secs,
        });
    }
    if let ServerRoute::Direct(url) | ServerRoute::DirectTls { url, .. } = route {
        if !transport
            .wait_for_peer(&Fqcn::SERVER, options.connect_timeout)
            .await
        {
            return Err(CliError::Timeout {
                what: format!("the server at {url}"),
                secs: timeout_secs,
            });
        }
    }

    let status = SharedStatus::default();
    status.set(JobStatus::Starting);
    let client_args: Map = startup
        .client
        .iter()
        .map(|(k, v)| (Value::from(k.clone()), engine::json_to_value(v)))
        .collect();
    let started = engine::start_engine(
        &job,
        transport,
        client_args,
        &startup.project_name,
        &args.ssid,
    )
    .await?;
    let engine = started.engine;
    let runner = ClientRunner::new(engine.clone(), started.router, options.runner.clone());
    let control = runner.control();
    parent::register_command_handler(parent::CommandTarget {
        engine: engine.clone(),
        runner: control.clone(),
        status: status.clone(),
    })
    .await
    .map_err(|e| CliError::RunFailed(format!("cannot answer the parent's commands: {e}")))?;

    status.set(JobStatus::Started);
    if let Err(e) = parent::notify_job_status(
        engine.cell(),
        parent,
        job_id,
        JobStatus::Started,
        options.notify_retry,
        options.notify_timeout,
    )
    .await
    {
        log::warn!("{prefix} the parent was not told the job started: {e}");
    }

    let mut run = runner.spawn();
    let ended = tokio::select! {
        result = &mut run => Some(result),
        () = parent_gone(options.parent_check_interval) => None,
    };
    let result = match ended {
        Some(Ok(Ok(outcome))) => Ok(outcome),
        Some(Ok(Err(source))) => Err(CliError::Engine {
            site: site.to_owned(),
            source,
        }),
        Some(Err(join)) => Err(CliError::RunFailed(format!(
            "the task loop panicked: {join}"
        ))),
        None => {
            log::error!("{prefix} the client parent process is gone; ending the run");
            control.end_run();
            let grace = options.runner.task_abort_grace + Duration::from_secs(1);
            if tokio::time::timeout(grace, &mut run).await.is_err() {
                run.abort();
            }
            Err(CliError::RunFailed(
                "the client parent process went away".to_owned(),
            ))
        }
    };
    status.set(match &result {
        Ok(_) => JobStatus::Stopped,
        Err(_) => JobStatus::Exception,
    });
    if let Err(e) = parent::notify_job_status(
        engine.cell(),
        parent,
        job_id,
        JobStatus::Stopped,
        options.notify_timeout,
        options.notify_timeout,
    )
    .await
    {
        log::warn!("{prefix} the parent was not told the job stopped: {e}");
    }
    engine.stop().await;
    result.map(|outcome| JobReport {
        outcome,
        route: route.clone(),
    })
}

/// Resolves when this process's parent has gone away (it was re-parented), checking every
/// `interval`, as NVFlare's job process watches its parent.
async fn parent_gone(interval: Duration) {
    let original = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(interval).await;
        if std::os::unix::process::parent_id() != original {
            return;
        }
    }
}
