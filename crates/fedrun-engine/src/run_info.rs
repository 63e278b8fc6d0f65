//! The `RunInfo` actor: what the engine knows about the run it serves.
//!
//! NVFlare's `ClientRunManager` keeps a `ClientRunInfo` that it never updates, a context manager,
//! and no error log of its own (`show_errors`/`reset_errors` are stubs). fedrun gives
//! these one owner:
//!
//! - the [`ClientRunInfo`], kept current: [`MarkRunStarted`] sets `start_time`, [`SetCurrentTask`]
//!   sets `current_task_name`;
//! - the [`FlContextManager`], built as NVFlare's constructor builds it:
//!   public stickers `__fqsn__`/`__is_leaf__`, private stickers = the job context props, the
//!   process type `CJ` and the client config; every [`NewContext`] comes from it;
//! - the run's error log: every actor reports with [`ReportError`]; [`ShowErrors`] groups the
//!   records by group and key, [`ResetErrors`] clears them; the log is bounded (oldest dropped,
//!   where NVFlare's grows without bound);
//! - the run's [`AbortSignal`]; [`AbortRun`] triggers it when the job id is this run's (NVFlare's
//!   `abort_app` ignores the job id).

use std::collections::{BTreeMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use actix::{Actor, Context, Handler, Message, MessageResult};
use fedrun_cell::AbortSignal;
use fedrun_core::constants::{fl_ctx_key, process_type};
use fedrun_core::{ClientRunInfo, ErrorRecord, FlContext, FlContextManager, Map, Value};

/// The default bound of the error log (records, all groups together).
pub const DEFAULT_MAX_ERROR_RECORDS: usize = 1000;

/// The default mailbox capacity of the [`RunInfo`] actor.
pub const DEFAULT_RUN_INFO_MAILBOX: usize = 256;

/// What a [`RunInfo`] actor is built from (the run-related arguments of NVFlare's constructor).
///
/// `fqsn` and `is_leaf` are read from the client config (keys `fqsn` and `is_leaf`) and default to
/// the client name and `true`.
///
/// # Example
/// ```
/// use fedrun_core::{Map, Value};
/// use fedrun_engine::RunInfoConfig;
///
/// let mut client_args = Map::new();
/// client_args.insert("fqsn", "org.site-1");
/// let config = RunInfoConfig::new("site-1", "job-1")
///     .with_client_config(client_args)
///     .with_max_error_records(10);
/// assert_eq!(config.fqsn(), "org.site-1");
/// assert!(config.is_leaf());
/// ```
#[derive(Clone, Debug)]
pub struct RunInfoConfig {
    /// The site's (client's) name: the identity of every context.
    pub client_name: String,
    /// The job this engine runs.
    pub job_id: String,
    /// The client's start-up arguments (`client.client_args`); a private sticker
    /// `__client_config__`.
    pub client_config: Map,
    /// The job's meta (`meta.json`), a private sticker `__job_meta__` when present.
    pub job_meta: Option<Value>,
    /// Further job context props (scope name, scope props, ...), private stickers in this order.
    pub job_context_props: Vec<(String, Value)>,
    /// The bound of the error log (records, all groups together).
    pub max_error_records: usize,
    /// The actor's mailbox capacity.
    pub mailbox_capacity: usize,
    /// The process type (`CJ` for a client job, `SJ` for a server job); a private sticker
    /// `__process_type__`.
    pub process_type: String,
}

impl RunInfoConfig {
    /// A config for `client_name` running `job_id`, with an empty client config and no job meta.
    pub fn new(client_name: impl Into<String>, job_id: impl Into<String>) -> Self {
        Self {
            client_name: client_name.into(),
            job_id: job_id.into(),
            client_config: Map::new(),
            job_meta: None,
            job_context_props: Vec::new(),
            max_error_records: DEFAULT_MAX_ERROR_RECORDS,
            mailbox_capacity: DEFAULT_RUN_INFO_MAILBOX,
            process_type: process_type::CLIENT_JOB.to_owned(),
        }
    }

    /// Sets the process type (default `CJ`; a server job uses `SJ`).
    pub fn with_process_type(mut self, process_type: impl Into<String>) -> Self {
        self.process_type = process_type.into();
        self
    }

    /// Sets the client config.
    pub fn with_client_config(mut self, client_config: Map) -> Self {
        self.client_config = client_config;
        self
    }

    /// Sets the job meta.
    pub fn with_job_meta(mut self, job_meta: Value) -> Self {
        self.job_meta = Some(job_meta);
        self
    }

    /// Adds one job context prop (a private sticker).
    pub fn with_job_context_prop(mut self, key: impl Into<String>, value: Value) -> Self {
        self.job_context_props.push((key.into(), value));
        self
    }

    /// Sets the bound of the error log (at least 1 is kept).
    pub fn with_max_error_records(mut self, max: usize) -> Self {
        self.max_error_records = max;
        self
    }

    /// The site's FQSN: the client config's `fqsn` when it is a string, else the client name.
    pub fn fqsn(&self) -> String {
        self.client_config
            .get("fqsn")
            .and_then(Value::as_str)
            .map_or_else(|| self.client_name.clone(), str::to_owned)
    }

    /// Whether the site is a leaf: the client config's `is_leaf` when it is a bool, else `true`.
    pub fn is_leaf(&self) -> bool {
        self.client_config
            .get("is_leaf")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }

    fn context_manager(&self) -> FlContextManager {
        let public = vec![
            (fl_ctx_key::FQSN.to_owned(), Value::from(self.fqsn())),
            (fl_ctx_key::IS_LEAF.to_owned(), Value::from(self.is_leaf())),
        ];
        let mut private = Vec::with_capacity(self.job_context_props.len() + 3);
        if let Some(meta) = &self.job_meta {
            private.push((fl_ctx_key::JOB_META.to_owned(), meta.clone()));
        }
        private.extend(self.job_context_props.iter().cloned());
        private.push((
            fl_ctx_key::PROCESS_TYPE.to_owned(),
            Value::from(self.process_type.as_str()),
        ));
        private.push((
            fl_ctx_key::CLIENT_CONFIG.to_owned(),
            Value::Map(self.client_config.clone()),
        ));
        FlContextManager::new(&self.client_name, &self.job_id, public, private)
    }
}

/// The errors reported during the run, grouped by group then key, oldest first in each list.
///
/// # Example
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use fedrun_core::ErrorRecord;
/// use fedrun_engine::run_info::format_error_line;
///
/// let r = ErrorRecord {
///     group: "aux".into(),
///     key: "send".into(),
///     time: UNIX_EPOCH + Duration::from_secs(86_400 + 3_661),
///     message: "peer gone".into(),
/// };
/// assert_eq!(format_error_line(&r), "1970-01-02 01:01:01: peer gone");
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ErrorReport {
    /// group → key → records.
    pub groups: BTreeMap<String, BTreeMap<String, Vec<ErrorRecord>>>,
}

impl ErrorReport {
    /// The number of records in the report.
    pub fn len(&self) -> usize {
        self.groups
            .values()
            .flat_map(BTreeMap::values)
            .map(Vec::len)
            .sum()
    }

    /// Is the report empty?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The records of one group and key, oldest first.
    pub fn records(&self, group: &str, key: &str) -> &[ErrorRecord] {
        self.groups
            .get(group)
            .and_then(|keys| keys.get(key))
            .map_or(&[], Vec::as_slice)
    }

    /// The report as text lines, `"<YYYY-mm-dd HH:MM:SS>: <message>"` (UTC), by group then key.
    pub fn lines(&self) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
        self.groups
            .iter()
            .map(|(group, keys)| {
                let keys = keys
                    .iter()
                    .map(|(key, records)| {
                        (key.clone(), records.iter().map(format_error_line).collect())
                    })
                    .collect();
                (group.clone(), keys)
            })
            .collect()
    }

    /// The report in NVFlare's `show_errors` shape: group → key → the latest line only.
    ///
    /// # Example
    /// ```
    /// use std::time::UNIX_EPOCH;
    /// use fedrun_core::{ErrorRecord, Value};
    /// use fedrun_engine::ErrorReport;
    ///
    /// let record = |m: &str| ErrorRecord {
    ///     group: "AuxRunner".into(),
    ///     key: "error".into(),
    ///     time: UNIX_EPOCH,
    ///     message: m.into(),
    /// };
    /// let mut report = ErrorReport::default();
    /// report.groups.entry("AuxRunner".into()).or_default().insert(
    ///     "error".into(),
    ///     vec![record("first"), record("second")],
    /// );
    /// let value = report.latest_value();
    /// let group = value.as_map().and_then(|m| m.get("AuxRunner")).and_then(Value::as_map);
    /// let line = group.and_then(|g| g.get("error")).and_then(Value::as_str);
    /// assert_eq!(line, Some("1970-01-01 00:00:00: second"));
    /// ```
    pub fn latest_value(&self) -> Value {
        let groups: Map = self
            .groups
            .iter()
            .map(|(group, keys)| {
                let keys: Map = keys
                    .iter()
                    .filter_map(|(key, records)| {
                        records
                            .last()
                            .map(|r| (key.as_str(), Value::from(format_error_line(r))))
                    })
                    .collect();
                (group.as_str(), keys)
            })
            .collect();
        Value::Map(groups)
    }

    /// The report as a value (group → key → list of lines), e.g. for an admin command reply.
    pub fn to_value(&self) -> Value {
        let groups: Map = self
            .lines()
            .into_iter()
            .map(|(group, keys)| {
                let keys: Map = keys
                    .into_iter()
                    .map(|(key, lines)| {
                        let lines: Vec<Value> = lines.into_iter().map(Value::from).collect();
                        (key, Value::from(lines))
                    })
                    .collect();
                (group, keys)
            })
            .collect();
        Value::Map(groups)
    }
}

/// One error record as a line: `"<YYYY-mm-dd HH:MM:SS>: <message>"`, the time in UTC.
pub fn format_error_line(record: &ErrorRecord) -> String {
    format!("{}: {}", format_utc(record.time), record.message)
}

/// `YYYY-mm-dd HH:MM:SS` (UTC) of a wall-clock time; times before 1970 print as 1970-01-01.
fn format_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The actor that owns the run's info, context manager, error log and abort signal.
///
/// # Example
/// ```
/// use actix::Actor;
/// use fedrun_engine::{GetRunInfo, NewContext, RunInfo, RunInfoConfig};
///
/// actix::System::new().block_on(async {
///     let run = RunInfo::new(RunInfoConfig::new("site-1", "job-1")).start();
///     let info = run.send(GetRunInfo).await.unwrap();
///     assert_eq!(info.job_id, "job-1");
///     let ctx = run.send(NewContext).await.unwrap();
///     assert_eq!(ctx.job_id().as_deref(), Some("job-1"));
/// });
/// ```
pub struct RunInfo {
    info: ClientRunInfo,
    site: String,
    ctx_mgr: FlContextManager,
    errors: VecDeque<ErrorRecord>,
    max_errors: usize,
    abort: AbortSignal,
    mailbox_capacity: usize,
}

impl RunInfo {
    /// A run-info actor for `config` (not started; call `.start()`).
    pub fn new(config: RunInfoConfig) -> Self {
        let ctx_mgr = config.context_manager();
        Self {
            info: ClientRunInfo::new(&config.job_id),
            site: config.client_name,
            ctx_mgr,
            errors: VecDeque::new(),
            max_errors: config.max_error_records.max(1),
            abort: AbortSignal::new(),
            mailbox_capacity: config.mailbox_capacity.max(1),
        }
    }

    fn log_handling(&self, msg: &str) {
        log::debug!(
            "[job={} site={}] RunInfo handles {msg}",
            self.info.job_id,
            self.site
        );
    }
}

impl Actor for RunInfo {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

/// Asks for the run info (job id, current task name, start time).
#[derive(Debug, Clone, Message)]
#[rtype(result = "ClientRunInfo")]
pub struct GetRunInfo;

impl Handler<GetRunInfo> for RunInfo {
    type Result = MessageResult<GetRunInfo>;

    fn handle(&mut self, _msg: GetRunInfo, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetRunInfo");
        MessageResult(self.info.clone())
    }
}

/// Asks for a new context of the run's context manager.
#[derive(Debug, Clone, Message)]
#[rtype(result = "FlContext")]
pub struct NewContext;

impl Handler<NewContext> for RunInfo {
    type Result = MessageResult<NewContext>;

    fn handle(&mut self, _msg: NewContext, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("NewContext");
        MessageResult(self.ctx_mgr.new_context())
    }
}

/// Adds a record to the run's error log (time = now).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ReportError {
    /// The error's group (e.g. the reporting part: `aux`, `event`, `task`).
    pub group: String,
    /// The error's key inside the group.
    pub key: String,
    /// What went wrong.
    pub message: String,
}

impl Handler<ReportError> for RunInfo {
    type Result = ();

    fn handle(&mut self, msg: ReportError, _ctx: &mut Context<Self>) {
        self.log_handling("ReportError");
        while self.errors.len() >= self.max_errors {
            if let Some(dropped) = self.errors.pop_front() {
                log::debug!(
                    "[job={} site={}] error log full ({} records): dropping the oldest ({}/{}: {})",
                    self.info.job_id,
                    self.site,
                    self.max_errors,
                    dropped.group,
                    dropped.key,
                    dropped.message
                );
            }
        }
        self.errors.push_back(ErrorRecord {
            group: msg.group,
            key: msg.key,
            time: SystemTime::now(),
            message: msg.message,
        });
    }
}

/// Asks for the error log: `None` when no error was reported (or since the last reset).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Option<ErrorReport>")]
pub struct ShowErrors;

impl Handler<ShowErrors> for RunInfo {
    type Result = Option<ErrorReport>;

    fn handle(&mut self, _msg: ShowErrors, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("ShowErrors");
        if self.errors.is_empty() {
            return None;
        }
        let mut report = ErrorReport::default();
        for record in &self.errors {
            report
                .groups
                .entry(record.group.clone())
                .or_default()
                .entry(record.key.clone())
                .or_default()
                .push(record.clone());
        }
        Some(report)
    }
}

/// Clears the error log.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct ResetErrors;

impl Handler<ResetErrors> for RunInfo {
    type Result = ();

    fn handle(&mut self, _msg: ResetErrors, _ctx: &mut Context<Self>) {
        self.log_handling("ResetErrors");
        self.errors.clear();
    }
}

/// Sets (`Some`) or clears (`None`, back to `""`) the name of the task being worked on.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SetCurrentTask {
    /// The task's name, or `None` when no task is running.
    pub name: Option<String>,
}

impl Handler<SetCurrentTask> for RunInfo {
    type Result = ();

    fn handle(&mut self, msg: SetCurrentTask, _ctx: &mut Context<Self>) {
        self.log_handling("SetCurrentTask");
        self.info.current_task_name = msg.name.unwrap_or_default();
    }
}

/// Records that the run started (sets `start_time` to now, the first time only).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct MarkRunStarted;

impl Handler<MarkRunStarted> for RunInfo {
    type Result = ();

    fn handle(&mut self, _msg: MarkRunStarted, _ctx: &mut Context<Self>) {
        self.log_handling("MarkRunStarted");
        if self.info.start_time.is_none() {
            self.info.start_time = Some(SystemTime::now());
        } else {
            log::debug!(
                "[job={} site={}] run already marked as started; start time kept",
                self.info.job_id,
                self.site
            );
        }
    }
}

/// Asks for the run's abort signal (a clone: triggering it aborts the run).
#[derive(Debug, Clone, Message)]
#[rtype(result = "AbortSignal")]
pub struct GetAbortSignal;

impl Handler<GetAbortSignal> for RunInfo {
    type Result = MessageResult<GetAbortSignal>;

    fn handle(&mut self, _msg: GetAbortSignal, _ctx: &mut Context<Self>) -> Self::Result {
        self.log_handling("GetAbortSignal");
        MessageResult(self.abort.clone())
    }
}

/// Aborts the run if `job_id` is this run's job (NVFlare's `abort_app`).
///
/// Replies `true` when the abort signal was triggered, `false` (with a warning log) when the job
/// id is another job's.
#[derive(Debug, Clone, Message)]
#[rtype(result = "bool")]
pub struct AbortRun {
    /// The job to abort.
    pub job_id: String,
    /// Why (logged).
    pub reason: String,
}

impl Handler<AbortRun> for RunInfo {
    type Result = bool;

    fn handle(&mut self, msg: AbortRun, _ctx: &mut Context<Self>) -> bool {
        self.log_handling("AbortRun");
        if msg.job_id == self.info.job_id {
            log::info!(
                "[job={} site={}] aborting the run: {}",
                self.info.job_id,
                self.site,
                msg.reason
            );
            self.abort.trigger();
            true
        } else {
            log::warn!(
                "[job={} site={}] abort_app for job {} ignored: this engine runs job {}",
                self.info.job_id,
                self.site,
                msg.job_id,
                self.info.job_id
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_formatting_handles_leap_years_and_month_ends() {
        // 2024-02-29 23:59:59 UTC
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199);
        assert_eq!(format_utc(t), "2024-02-29 23:59:59");
        // 2000-03-01 00:00:00 UTC
        let t = UNIX_EPOCH + Duration::from_secs(951_868_800);
        assert_eq!(format_utc(t), "2000-03-01 00:00:00");
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01 00:00:00");
    }
}
