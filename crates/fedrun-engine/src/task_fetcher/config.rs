//! What a [`TaskFetcher`](super::TaskFetcher) is built from, and where its tasks come from.
//!
//! Kept apart from the actor because it answers a question of its own: which cell serves this
//! site's tasks. A plain site pulls from and pushes to the server job (`server.<job>`); a site of
//! a hierarchical deployment (an FQSN with more than one component, e.g. `site-a.site-1`) talks
//! to its parent site's job cell (`<parent fqcn>.<job>`), the parent being the second-to-last
//! component of the FQSN, looked up among the job's clients. NVFlare resolves the parent on every
//! pull and fails each pull with "cannot find parent"; fedrun resolves it once, when the engine
//! starts, so an unknown parent is one clear start-up error ([`parent_site_name`],
//! [`EngineError::UnknownParent`](crate::EngineError::UnknownParent)).

use std::time::Duration;

use actix::{Addr, Recipient};
use fedrun_cell::{CellHandle, Fqcn};
use fedrun_core::constants::config_var;

use crate::registry::FireEvent;
use crate::run_info::RunInfo;

/// The default communication timeout: NVFlare's `communication_timeout` (300 s).
pub const DEFAULT_COMMUNICATION_TIMEOUT: Duration =
    Duration::from_secs(config_var::COMMUNICATION_TIMEOUT_DEFAULT as u64);

/// The default value of the `project_name` cell header on task traffic.
pub const DEFAULT_PROJECT_NAME: &str = "fedrun";

/// The default mailbox capacity of the [`TaskFetcher`](super::TaskFetcher) actor.
pub const DEFAULT_TASK_FETCHER_MAILBOX: usize = 64;

/// The name of the parent site of `fqsn`: its second-to-last `.`-component, or `None` for a
/// one-component (or empty) FQSN, whose tasks come from the server.
///
/// # Example
/// ```
/// use fedrun_engine::task_fetcher::parent_site_name;
///
/// assert_eq!(parent_site_name("site-1"), None);
/// assert_eq!(parent_site_name(""), None);
/// assert_eq!(parent_site_name("site-a.site-1"), Some("site-a"));
/// assert_eq!(parent_site_name("org.site-a.site-1"), Some("site-a"));
/// ```
pub fn parent_site_name(fqsn: &str) -> Option<&str> {
    let mut parts = fqsn.rsplit('.');
    let _own = parts.next()?;
    parts.next()
}

/// What a [`TaskFetcher`](super::TaskFetcher) is built from.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use actix::Actor;
/// use fedrun_cell::{Cell, Fqcn, Network};
/// use fedrun_engine::{RunInfo, RunInfoConfig, TaskFetcherConfig};
///
/// actix::System::new().block_on(async {
///     let run = RunInfo::new(RunInfoConfig::new("site-1", "job-1")).start();
///     let cell = Cell::start(Fqcn::job_cell("site-1", "job-1").unwrap(), Network::new()).unwrap();
///     let config = TaskFetcherConfig::new("site-1", "job-1", cell, run)
///         .with_communication_timeout(Duration::from_secs(30))
///         .with_ssid("NA");
///     assert_eq!(config.parent_fqcn.as_str(), "server");
///     assert_eq!(config.project_name, "fedrun");
///     assert_eq!(config.communication_timeout, Duration::from_secs(30));
///     assert_eq!(config.ssid.as_deref(), Some("NA"));
/// });
/// ```
#[derive(Clone, Debug)]
pub struct TaskFetcherConfig {
    /// This site's name (for logs).
    pub client_name: String,
    /// The job this engine runs: the task server's cell is `<parent_fqcn>.<job_id>`.
    pub job_id: String,
    /// The job's cell: task traffic leaves from it.
    pub cell: CellHandle,
    /// The run: new contexts, the current task name and the abort signal.
    pub run_info: Addr<RunInfo>,
    /// The starting communication timeout (default 300 s); replies may raise it.
    pub communication_timeout: Duration,
    /// The cell of the parent whose job serves the tasks (default `server`).
    pub parent_fqcn: Fqcn,
    /// The `project_name` cell header (default `"fedrun"`).
    pub project_name: String,
    /// The job's session id (NVFlare's job `ssid`, from `NVFLARE_JOB_SSID`); `None`: no session.
    /// A successful pull stamps it into the pull's context as `__ssid__`; a result whose context
    /// carries another one is refused with `invalid_session` without being sent.
    pub ssid: Option<String>,
    /// Where `_before_pull_task` / `_after_pull_task` are fired (the engine's registry); `None`:
    /// no events.
    pub events: Option<Recipient<FireEvent>>,
    /// The actor's mailbox capacity.
    pub mailbox_capacity: usize,
    /// Where result arrays are offered for download (NVFlare's numpy download references,
    /// when the job's client config sets `np_download_chunk_size` > 0); `None`: results carry
    /// their arrays inline, which NVFlare's server always accepts.
    pub downloads: Option<crate::download::DownloadHandle>,
}

impl TaskFetcherConfig {
    /// A config with the defaults: a 300 s communication timeout, parent `server`, project
    /// `"fedrun"`, no session id, no events, a mailbox of [`DEFAULT_TASK_FETCHER_MAILBOX`].
    pub fn new(
        client_name: impl Into<String>,
        job_id: impl Into<String>,
        cell: CellHandle,
        run_info: Addr<RunInfo>,
    ) -> Self {
        TaskFetcherConfig {
            client_name: client_name.into(),
            job_id: job_id.into(),
            cell,
            run_info,
            communication_timeout: DEFAULT_COMMUNICATION_TIMEOUT,
            parent_fqcn: Fqcn::SERVER,
            project_name: DEFAULT_PROJECT_NAME.to_owned(),
            ssid: None,
            events: None,
            mailbox_capacity: DEFAULT_TASK_FETCHER_MAILBOX,
            downloads: None,
        }
    }

    /// Results leave with their arrays as download references served by `downloads`.
    pub fn with_downloads(mut self, downloads: crate::download::DownloadHandle) -> Self {
        self.downloads = Some(downloads);
        self
    }

    /// Sets the starting communication timeout.
    pub fn with_communication_timeout(mut self, timeout: Duration) -> Self {
        self.communication_timeout = timeout;
        self
    }

    /// Sets the parent cell (the task server's job cell is `<parent>.<job_id>`).
    pub fn with_parent_fqcn(mut self, parent: Fqcn) -> Self {
        self.parent_fqcn = parent;
        self
    }

    /// Sets the `project_name` cell header.
    pub fn with_project_name(mut self, project_name: impl Into<String>) -> Self {
        self.project_name = project_name.into();
        self
    }

    /// Sets the job's session id.
    pub fn with_ssid(mut self, ssid: impl Into<String>) -> Self {
        self.ssid = Some(ssid.into());
        self
    }

    /// Fires `_before_pull_task` / `_after_pull_task` through `events` around every pull.
    pub fn with_events(mut self, events: Recipient<FireEvent>) -> Self {
        self.events = Some(events);
        self
    }

    /// Sets the mailbox capacity (at least 1).
    pub fn with_mailbox_capacity(mut self, capacity: usize) -> Self {
        self.mailbox_capacity = capacity;
        self
    }
}
