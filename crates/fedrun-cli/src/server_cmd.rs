//! `fedrun server`: the server job of one run, alone in its process, serving client jobs that
//! connect over TCP (`fedrun client`).
//!
//! `fedrun simulate` runs every party in one process; a real federation has one process per
//! party. This module is the server's side of that: [`ServerRun::start`] loads the job (the
//! same jobs `fedrun simulate` runs), builds the server config's workflows, opens an NVFlare
//! endpoint named `server` on the `--listen` address and starts the server job's cell
//! `server.<job>` on it. [`ServerRun::run`] then runs the workflows (ScatterAndGather rounds
//! wait until enough clients have connected and answered), ends the run (every client job is
//! told `__end_run__`), waits — with a deadline — for the client jobs to hang up, stops, and
//! writes `metrics.json`, `model.json` and the model's `.npy` files into the workspace, as
//! `fedrun simulate` does.
//!
//! With [`ServerOptions::tls`] (a startup kit or CA/certificate/key files) the endpoint
//! listens with TLS or mTLS as NVFlare's server does, and [`ServerRun::url`] says `stcp://`.
//!
//! Nothing waits forever: past [`ServerOptions::timeout`] the run is aborted and the command
//! fails with [`CliError::Timeout`]. A client job whose connection closed and that is not back
//! within [`ServerOptions::client_grace`] is counted out of the round at once (the round goes
//! on with the others if `min_clients` still can be met, else the run fails then).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedrun_cell::Fqcn;
use fedrun_server::{
    RoundMetrics, ServerJob, ServerJobConfig, Workflow, WorkflowEvent, SERVER_IDENTITY,
};
use fedrun_wire::TcpTransport;
use tokio::sync::mpsc;

use crate::error::CliError;
use crate::factories::server_factories;
use crate::simulate::{
    prepare_workspace, record_of, status_of, RunObserver, RunStatus, SimulateOptions,
    SimulationReport, SimulationSetup, MAX_CLIENTS,
};
use crate::tls_opts::TlsOptions;
use crate::transport::listen_server_with;

/// The default deadline of a whole run (`--timeout`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// The default `__wait_time__` of the server's replies: how long a client waits before it asks
/// for a task again (`--poll-interval-ms`).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long, after the run ended, the server waits for the client jobs to hang up.
pub const DEFAULT_END_OF_RUN_DEADLINE: Duration = Duration::from_secs(30);
/// How long an aborted workflow gets to return before its task is cancelled.
const ABORT_GRACE: Duration = Duration::from_secs(10);

/// What `fedrun server` was asked to do.
///
/// # Example
/// ```
/// use fedrun_cli::server_cmd::ServerOptions;
///
/// let options = ServerOptions::new("127.0.0.1:0", &["site-1", "site-2"]);
/// assert_eq!(options.clients, ["site-1", "site-2"]);
/// assert_eq!(options.timeout.as_secs(), 600);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerOptions {
    /// Where to listen: `host:port`, `tcp://host:port` or `stcp://host:port` (port 0: any
    /// free port).
    pub listen: String,
    /// TLS credentials and mode (default: none, clear TCP).
    pub tls: TlsOptions,
    /// The client sites of the job; also the workflow's `min_clients`.
    pub clients: Vec<String>,
    /// Number of rounds (`None`: the job's `num_rounds`, else the simulator's default).
    pub rounds: Option<u64>,
    /// Job directory (`None`: the built-in logistic-regression job).
    pub job: Option<PathBuf>,
    /// Workspace directory (`None`: `./fedrun-workspace/<job-id>`, or the temp dir).
    pub workspace: Option<PathBuf>,
    /// The job id (`None`: a fresh UUID); clients must be given the same.
    pub job_id: Option<String>,
    /// Deadline of the whole run.
    pub timeout: Duration,
    /// `__wait_time__` of the server's replies.
    pub poll_interval: Duration,
    /// How long the client jobs get to hang up after the run ended.
    pub end_of_run_deadline: Duration,
    /// How long a client job whose connection closed may take to come back before it is
    /// counted out of the round (`--client-grace`).
    pub client_grace: Duration,
}

impl ServerOptions {
    /// Options for `clients` on `listen`, everything else by default.
    pub fn new(listen: &str, clients: &[&str]) -> Self {
        Self {
            listen: listen.to_owned(),
            tls: TlsOptions::default(),
            clients: clients.iter().map(|c| (*c).to_owned()).collect(),
            rounds: None,
            job: None,
            workspace: None,
            job_id: None,
            timeout: DEFAULT_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            end_of_run_deadline: DEFAULT_END_OF_RUN_DEADLINE,
            client_grace: fedrun_server::DEFAULT_CLIENT_GRACE,
        }
    }
}

/// Checks a job id and the client list: names that can name cells, no duplicates, not
/// `server`.
fn check_names(job_id: &str, clients: &[String]) -> Result<(), CliError> {
    Fqcn::job_cell(SERVER_IDENTITY, job_id).map_err(|e| CliError::BadOption {
        option: "job-id",
        reason: e.to_string(),
    })?;
    if clients.is_empty() || clients.len() > MAX_CLIENTS {
        return Err(CliError::BadOption {
            option: "clients",
            reason: format!("give between 1 and {MAX_CLIENTS} client site names"),
        });
    }
    for (i, site) in clients.iter().enumerate() {
        let bad = |reason: String| CliError::BadOption {
            option: "clients",
            reason,
        };
        if site == SERVER_IDENTITY {
            return Err(bad(
                "'server' is the server's name, not a client site's".into()
            ));
        }
        Fqcn::job_cell(site, job_id).map_err(|e| bad(e.to_string()))?;
        if clients[..i].contains(site) {
            return Err(bad(format!("'{site}' is listed twice")));
        }
    }
    Ok(())
}

/// A server job listening for its clients, not running yet (see the module doc).
pub struct ServerRun {
    setup: SimulationSetup,
    transport: TcpTransport,
    addr: SocketAddr,
    /// `stcp` when listening with TLS, else `tcp`.
    scheme: &'static str,
    server: ServerJob,
    workflows: Vec<Box<dyn Workflow>>,
    events: mpsc::UnboundedReceiver<WorkflowEvent>,
    min_clients: usize,
    num_rounds: u64,
    timeout: Duration,
    end_of_run_deadline: Duration,
}

impl std::fmt::Debug for ServerRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerRun")
            .field("job_id", &self.setup.job_id)
            .field("addr", &self.addr)
            .field("clients", &self.setup.sites)
            .finish_non_exhaustive()
    }
}

impl ServerRun {
    /// Loads the job, builds the server config's workflows, listens and starts the server job.
    /// Must run inside an actix `System`. Clients may connect as soon as this returns.
    ///
    /// # Errors
    ///
    /// [`CliError::BadOption`] for bad names, rounds or listen address (a port in use
    /// included), [`CliError::BadJob`] / [`CliError::Server`] for a job that cannot be built,
    /// [`CliError::Io`] when the workspace cannot be created.
    pub async fn start(options: ServerOptions) -> Result<Self, CliError> {
        let job_id = options
            .job_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        check_names(&job_id, &options.clients)?;
        let workspace = prepare_workspace(options.workspace.as_deref(), &job_id)?;
        let mut setup = SimulationSetup::from_options(&SimulateOptions {
            clients: options.clients.len(),
            rounds: options.rounds,
            workspace: Some(workspace),
            job: options.job.clone(),
            seed: None,
        })?;
        setup.job_id = job_id;
        setup.sites = options.clients.clone();
        setup.timing.poll_interval = options.poll_interval;

        let server_config = ServerJobConfig::from_value(setup.job.server_config.clone())?;
        let factories = server_factories(&setup.workspace, &setup.server_factories);
        let built = server_config.build(&factories).await?;
        if built.workflows.is_empty() {
            return Err(CliError::BadJob {
                path: PathBuf::from(crate::job::SERVER_CONFIG_FILE),
                reason: "no workflow to run".to_owned(),
            });
        }
        let min_clients = setup
            .job
            .min_clients()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(setup.sites.len());
        let num_rounds = setup
            .job
            .num_rounds()
            .unwrap_or(crate::simulate::DEFAULT_ROUNDS);

        let (transport, addr) = listen_server_with(&options.listen, &options.tls).await?;
        let tls = options.listen.starts_with("stcp://")
            || options.tls.tls_kit.is_some()
            || options.tls.ca.is_some();
        let clear = options.tls.connection_security.as_deref() == Some("clear");
        let scheme = if tls && !clear { "stcp" } else { "tcp" };
        let sites: Vec<&str> = setup.sites.iter().map(String::as_str).collect();
        let (events_tx, events) = mpsc::unbounded_channel();
        let started = ServerJob::builder(&setup.job_id)
            .job_clients(&sites)
            .poll_interval(options.poll_interval)
            .client_grace(options.client_grace)
            .events(events_tx)
            .start_on(transport.clone())
            .await;
        let server = match started {
            Ok(server) => server,
            Err(e) => {
                transport.shutdown().await;
                return Err(e.into());
            }
        };
        log::info!(
            "[job={} site=server] job {} listening on {scheme}://{addr} for {:?}",
            setup.job_id,
            setup.job.name,
            setup.sites
        );
        Ok(Self {
            setup,
            transport,
            addr,
            scheme,
            server,
            workflows: built.workflows,
            events,
            min_clients,
            num_rounds,
            timeout: options.timeout,
            end_of_run_deadline: options.end_of_run_deadline,
        })
    }

    /// The address the server listens on (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `tcp://<local_addr>` (`stcp://` with TLS), what `fedrun client --server` takes.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// The job id (clients need it: their cells are `<site>.<job id>`).
    pub fn job_id(&self) -> &str {
        &self.setup.job_id
    }

    /// The workspace where the results go.
    pub fn workspace(&self) -> &Path {
        &self.setup.workspace
    }

    /// The server job (e.g. to abort the run from outside).
    pub fn server(&self) -> &ServerJob {
        &self.server
    }

    /// Runs the workflows to their end (or the deadline), waits for the clients to hang up,
    /// stops, and writes the results into the workspace. The report's `clients` is empty: how
    /// each client's run ended is known to the client processes only.
    ///
    /// # Errors
    ///
    /// [`CliError::Timeout`] when the run was aborted at the deadline,
    /// [`CliError::RunFailed`] when it did not complete otherwise, [`CliError::Io`] when the
    /// results cannot be written (the results so far are written in every case).
    pub async fn run(self, observer: &mut dyn RunObserver) -> Result<SimulationReport, CliError> {
        let ServerRun {
            setup,
            transport,
            addr,
            scheme: _,
            server,
            mut workflows,
            mut events,
            min_clients,
            num_rounds,
            timeout,
            end_of_run_deadline,
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
        // A client job is connected when its job cell (or its site's parent, which relays it)
        // is a peer of this endpoint.
        let follower = {
            let (t, job) = (transport.clone(), job_id.clone());
            server.follow_connections(transport.peer_changes(), move |site| {
                [Fqcn::job_cell(site, &job), Fqcn::new(site)]
                    .into_iter()
                    .any(|f| f.is_ok_and(|f| t.is_connected(&f)))
            })
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rounds: Vec<RoundMetrics> = Vec::new();
        let mut timed_out = false;
        let mut cancelled = false;
        let server_result = loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => on_event(&job_id, event, &mut rounds, observer),
                result = &mut server_run => break result,
                () = tokio::time::sleep_until(deadline), if !timed_out => {
                    log::error!(
                        "[job={job_id} site=server] the run did not end within {} s; aborting it",
                        timeout.as_secs()
                    );
                    timed_out = true;
                    server.abort();
                }
                () = tokio::time::sleep_until(deadline + ABORT_GRACE), if timed_out && !cancelled => {
                    log::error!(
                        "[job={job_id} site=server] the workflows ignored the abort for {} s; \
                         cancelling them",
                        ABORT_GRACE.as_secs()
                    );
                    cancelled = true;
                    server_run.abort();
                }
            }
        };
        while let Ok(event) = events.try_recv() {
            on_event(&job_id, event, &mut rounds, observer);
        }
        // The run is over (every client was told `__end_run__`); the clients hang up once
        // their runners ended. Stopping before would cut the goodbye of a client still busy.
        let leaving = setup.sites.iter().filter_map(|site| {
            let peer = Fqcn::job_cell(site, &job_id).ok()?;
            let transport = transport.clone();
            Some(async move {
                let gone = transport
                    .wait_for_peer_gone(&peer, end_of_run_deadline)
                    .await;
                (site, gone)
            })
        });
        for (site, gone) in futures::future::join_all(leaving).await {
            if !gone {
                log::warn!(
                    "[job={job_id} site=server] {site} still connected {} s after the end of \
                     the run; stopping anyway",
                    end_of_run_deadline.as_secs()
                );
            }
        }
        follower.abort();
        server.stop().await;
        transport.shutdown().await;

        let requested = timed_out.then(|| format!("timed out after {} s", timeout.as_secs()));
        let (status, model) = status_of(server_result, None, requested);
        log::info!("[job={job_id} site=server] run ended on tcp://{addr}: {status}");
        let mut report = SimulationReport {
            job_id,
            job_name: setup.job.name.clone(),
            sites: setup.sites.clone(),
            workspace: setup.workspace.clone(),
            min_clients,
            num_rounds,
            status,
            round_metrics: rounds,
            model,
            clients: Vec::new(),
            elapsed: started.elapsed(),
            files: Vec::new(),
        };
        report.write_outputs()?;
        match &report.status {
            RunStatus::Completed => Ok(report),
            _ if timed_out => Err(CliError::Timeout {
                what: format!(
                    "the run to end ({} of {num_rounds} round(s) completed; results so far in {})",
                    report.round_metrics.len(),
                    report.workspace.display()
                ),
                secs: timeout.as_secs(),
            }),
            other => Err(CliError::RunFailed(format!(
                "{other} (results so far in {})",
                report.workspace.display()
            ))),
        }
    }
}

fn on_event(
    job_id: &str,
    event: WorkflowEvent,
    rounds: &mut Vec<RoundMetrics>,
    observer: &mut dyn RunObserver,
) {
    match event {
        WorkflowEvent::RoundStarted { round, .. } => {
            log::info!("[job={job_id} site=server] round {round} started");
        }
        WorkflowEvent::RoundCompleted { metrics, .. } => {
            log::info!(
                "[job={job_id} site=server] round {} completed with {:?}",
                metrics.round,
                metrics.clients
            );
            observer.round_completed(&record_of(&metrics));
            rounds.push(metrics);
        }
        _ => {}
    }
}

/// Runs `fedrun server`: start (then `listening` is told the running server, e.g. to print its
/// address), run, write the results. `Err` unless the run completed.
///
/// # Example
/// ```no_run
/// use fedrun_cli::server_cmd::{serve, ServerOptions};
/// use fedrun_cli::NoObserver;
///
/// let options = ServerOptions::new("127.0.0.1:8002", &["site-1", "site-2"]);
/// let report = actix::System::new()
///     .block_on(serve(options, &mut NoObserver, |s| println!("listening {}", s.url())))
///     .unwrap();
/// assert!(report.is_completed());
/// ```
pub async fn serve(
    options: ServerOptions,
    observer: &mut dyn RunObserver,
    listening: impl FnOnce(&ServerRun),
) -> Result<SimulationReport, CliError> {
    let run = ServerRun::start(options).await?;
    listening(&run);
    run.run(observer).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn client_lists_must_be_valid_unique_site_names() {
        assert!(check_names("job-1", &names(&["site-1", "site-2"])).is_ok());
        let err = |c: &[&str]| check_names("job-1", &names(c)).unwrap_err().to_string();
        assert!(err(&[]).contains("--clients"));
        assert!(err(&["site-1", "site-1"]).contains("'site-1' is listed twice"));
        assert!(err(&["server"]).contains("server's name"));
        assert!(err(&["site 1"]).contains("--clients"));
        let bad_id = check_names("a.b", &names(&["site-1"])).unwrap_err();
        assert!(bad_id.to_string().contains("--job-id"), "{bad_id}");
    }
}
