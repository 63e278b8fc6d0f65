//! Small records the engine passes around: run info, task assignments, stream
//! contexts, aux-message targets and error-log entries.
//!
//! They are plain data with no behaviour beyond construction and lookup, kept here so that the
//! engine, the streamer and the task fetcher share one definition.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::Client;
use crate::constants::{header_key, site_type, special_task, stream};
use crate::shareable::Shareable;
use crate::value::{Map, Value};

/// What the engine knows about the current run (NVFlare's `ClientRunInfo`).
///
/// NVFlare never updates these fields; fedrun's engine keeps them current: it calls
/// [`ClientRunInfo::mark_started`] at run start and [`ClientRunInfo::set_current_task`] /
/// [`ClientRunInfo::clear_current_task`] as assignments come and go.
///
/// # Example
/// ```
/// use fedrun_core::ClientRunInfo;
///
/// let mut info = ClientRunInfo::new("job-1");
/// assert_eq!(info.current_task_name, "");
/// info.mark_started();
/// info.set_current_task("train");
/// assert_eq!(info.current_task_name, "train");
/// assert!(info.start_time.is_some());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientRunInfo {
    /// The job id.
    pub job_id: String,
    /// The task being worked on, `""` when none.
    pub current_task_name: String,
    /// When the run started, `None` before it started.
    pub start_time: Option<SystemTime>,
}

impl ClientRunInfo {
    /// Run info of a job that has not started and has no task.
    pub fn new(job_id: &str) -> Self {
        ClientRunInfo {
            job_id: job_id.to_owned(),
            current_task_name: String::new(),
            start_time: None,
        }
    }

    /// Record the run's start as now (a second call keeps the first time).
    pub fn mark_started(&mut self) {
        self.start_time.get_or_insert_with(SystemTime::now);
    }

    /// Record the task being worked on.
    pub fn set_current_task(&mut self, name: &str) {
        name.clone_into(&mut self.current_task_name);
    }

    /// Record that no task is being worked on.
    pub fn clear_current_task(&mut self) {
        self.current_task_name.clear();
    }
}

/// A task fetched from the server (NVFlare's `TaskAssignment`).
///
/// # Example
/// ```
/// use fedrun_core::{Shareable, TaskAssignment};
///
/// let mut data = Shareable::new();
/// data.set_header("__task_id__", "t-1");
/// let task = TaskAssignment::from_task("train", data);
/// assert_eq!(task.task_id.as_deref(), Some("t-1"));
/// assert!(!task.is_try_again() && !task.is_end_run());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TaskAssignment {
    /// The task name (may be one of the special names `__try_again__`, `__end_run__`).
    pub name: String,
    /// The task id, when the server sent one.
    pub task_id: Option<String>,
    /// The task data.
    pub data: Shareable,
    /// When the assignment was received (built).
    pub receive_time: SystemTime,
}

impl TaskAssignment {
    /// An assignment received now.
    pub fn new(name: &str, task_id: Option<String>, data: Shareable) -> Self {
        TaskAssignment {
            name: name.to_owned(),
            task_id,
            data,
            receive_time: SystemTime::now(),
        }
    }

    /// An assignment received now whose task id is the data's `__task_id__` header (when it is a
    /// string), as the engine builds it after a fetch.
    pub fn from_task(name: &str, data: Shareable) -> Self {
        let task_id = data
            .header_or_none(header_key::TASK_ID)
            .and_then(Value::as_str)
            .map(str::to_owned);
        Self::new(name, task_id, data)
    }

    /// True when the server said "no task now, ask again later".
    pub fn is_try_again(&self) -> bool {
        self.name == special_task::TRY_AGAIN
    }

    /// True when the server said the run is over.
    pub fn is_end_run(&self) -> bool {
        self.name == special_task::END_RUN
    }
}

/// The context of one object stream, shared by its producer or consumer and the streamer: a
/// string-keyed map. The streamer sets `__channel__` and `__topic__`; the final return code goes
/// under `__RC__`.
///
/// # Example
/// ```
/// use fedrun_core::{StreamContext, Value};
///
/// let mut ctx = StreamContext::new();
/// ctx.set("file_name", "log.txt");
/// ctx.set_channel_topic("log", "job_log");
/// assert_eq!(ctx.topic(), Some("job_log"));
/// assert_eq!(ctx.get("file_name"), Some(&Value::from("log.txt")));
/// ```
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StreamContext(Map);

impl StreamContext {
    /// An empty stream context.
    pub fn new() -> Self {
        Self::default()
    }

    /// A value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// Set a value (replacing in place). Returns the old value.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) -> Option<Value> {
        self.0.insert(key, value)
    }

    /// Remove a value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    /// True when the key is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// The stream's channel (`__channel__`).
    pub fn channel(&self) -> Option<&str> {
        self.get(stream::CTX_CHANNEL).and_then(Value::as_str)
    }

    /// The stream's topic (`__topic__`).
    pub fn topic(&self) -> Option<&str> {
        self.get(stream::CTX_TOPIC).and_then(Value::as_str)
    }

    /// Record the stream's channel and topic.
    pub fn set_channel_topic(&mut self, channel: &str, topic: &str) {
        self.set(stream::CTX_CHANNEL, channel);
        self.set(stream::CTX_TOPIC, topic);
    }

    /// The stream's final return code (`__RC__`), when set.
    pub fn rc(&self) -> Option<&str> {
        self.get(stream::CTX_RC).and_then(Value::as_str)
    }

    /// Record the stream's final return code.
    pub fn set_rc(&mut self, rc: &str) {
        self.set(stream::CTX_RC, rc);
    }

    /// The map.
    pub fn as_map(&self) -> &Map {
        &self.0
    }

    /// The map, consumed (what travels in the `ObjectStreamer.CTX` header).
    pub fn into_map(self) -> Map {
        self.0
    }
}

impl From<Map> for StreamContext {
    fn from(m: Map) -> Self {
        StreamContext(m)
    }
}

impl From<StreamContext> for Value {
    fn from(c: StreamContext) -> Self {
        Value::Map(c.0)
    }
}

/// Where an aux message goes (NVFlare's `AuxMsgTarget`): the target's name (the key of its reply),
/// its cell name, and whether the cell name gets the job id appended (job-scoped).
///
/// # Example
/// ```
/// use fedrun_core::{AuxMsgTarget, Client};
///
/// assert!(AuxMsgTarget::server().job_scoped);
/// assert!(!AuxMsgTarget::server_parent().job_scoped);
/// let t = AuxMsgTarget::client(&Client::new("site-2", ""));
/// assert_eq!((t.name.as_str(), t.fqcn.as_str()), ("site-2", "site-2"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AuxMsgTarget {
    /// The target's name: the key of its reply.
    pub name: String,
    /// The target's cell name.
    pub fqcn: String,
    /// Whether the message goes to the target's job cell (`fqcn.job_id`).
    pub job_scoped: bool,
}

impl AuxMsgTarget {
    /// A target.
    pub fn new(name: &str, fqcn: &str, job_scoped: bool) -> Self {
        AuxMsgTarget {
            name: name.to_owned(),
            fqcn: fqcn.to_owned(),
            job_scoped,
        }
    }

    /// The server's job process: `("server", "server", job-scoped)`.
    pub fn server() -> Self {
        Self::new(site_type::SERVER, site_type::SERVER, true)
    }

    /// The server's parent process: `("server", "server", not job-scoped)`. Its reply is keyed
    /// `"server"` too, as in NVFlare.
    pub fn server_parent() -> Self {
        Self::new(site_type::SERVER, site_type::SERVER, false)
    }

    /// A job client's job process: `(name, fqcn, job-scoped)`.
    pub fn client(client: &Client) -> Self {
        Self::new(&client.name, &client.fqcn, true)
    }
}

/// One entry of the engine's error log (what NVFlare's info collector records on
/// `_error_log_available`): the group (usually the component that logged it), a key, when, and
/// the message.
///
/// # Example
/// ```
/// use fedrun_core::ErrorRecord;
///
/// let e = ErrorRecord::new("trainer", "train", "out of memory");
/// assert_eq!(e.message, "out of memory");
/// assert!(e.timestamp_secs() > 0.0);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorRecord {
    /// The group (e.g. the origin component's name).
    pub group: String,
    /// The key within the group.
    pub key: String,
    /// When the error was recorded.
    pub time: SystemTime,
    /// The message.
    pub message: String,
}

impl ErrorRecord {
    /// A record made now.
    pub fn new(group: &str, key: &str, message: &str) -> Self {
        ErrorRecord {
            group: group.to_owned(),
            key: key.to_owned(),
            time: SystemTime::now(),
            message: message.to_owned(),
        }
    }

    /// Seconds since the Unix epoch (0 for a time before it), like Python's `time.time()`.
    pub fn timestamp_secs(&self) -> f64 {
        self.time
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn run_info_starts_empty_and_follows_the_engine() {
        let mut info = ClientRunInfo::new("job-1");
        assert_eq!(info.job_id, "job-1");
        assert_eq!(info.current_task_name, "");
        assert_eq!(info.start_time, None);
        info.mark_started();
        let first = info.start_time;
        assert!(first.is_some());
        info.mark_started();
        assert_eq!(info.start_time, first);
        info.set_current_task("train");
        assert_eq!(info.current_task_name, "train");
        info.clear_current_task();
        assert_eq!(info.current_task_name, "");
    }

    #[test]
    fn assignment_takes_its_task_id_from_the_header_and_its_time_from_the_clock() {
        let before = SystemTime::now();
        let mut data = Shareable::new();
        data.set_header(header_key::TASK_ID, "t-9");
        let task = TaskAssignment::from_task("train", data.clone());
        assert_eq!(task.task_id.as_deref(), Some("t-9"));
        assert_eq!(task.data, data);
        assert!(task.receive_time >= before);
        let mut bad = Shareable::new();
        bad.set_header(header_key::TASK_ID, 5);
        assert_eq!(TaskAssignment::from_task("train", bad).task_id, None);
        assert_eq!(
            TaskAssignment::from_task("x", Shareable::new()).task_id,
            None
        );
    }

    #[test]
    fn special_task_names_are_recognised() {
        assert!(TaskAssignment::new("__try_again__", None, Shareable::new()).is_try_again());
        assert!(TaskAssignment::new("__end_run__", None, Shareable::new()).is_end_run());
        let t = TaskAssignment::new("train", None, Shareable::new());
        assert!(!t.is_try_again() && !t.is_end_run());
    }

    #[test]
    fn stream_context_keeps_caller_keys_and_the_reserved_ones() {
        let mut ctx = StreamContext::from(Map::new());
        assert_eq!(ctx.channel(), None);
        ctx.set("mine", 1);
        ctx.set_channel_topic("ch", "tp");
        ctx.set_rc("OK");
        assert_eq!(ctx.channel(), Some("ch"));
        assert_eq!(ctx.topic(), Some("tp"));
        assert_eq!(ctx.rc(), Some("OK"));
        assert_eq!(ctx.get("__channel__"), Some(&Value::from("ch")));
        assert_eq!(ctx.remove("mine"), Some(Value::from(1)));
        assert!(!ctx.contains_key("mine"));
        let v = Value::from(ctx.clone());
        assert_eq!(v.as_map(), Some(ctx.as_map()));
        assert_eq!(ctx.into_map().len(), 3);
    }

    #[test]
    fn server_targets_differ_only_in_job_scope() {
        let s = AuxMsgTarget::server();
        let p = AuxMsgTarget::server_parent();
        assert_eq!(
            (s.name.as_str(), s.fqcn.as_str(), s.job_scoped),
            ("server", "server", true)
        );
        assert_eq!(
            (p.name.as_str(), p.fqcn.as_str(), p.job_scoped),
            ("server", "server", false)
        );
    }

    #[test]
    fn client_target_uses_the_client_name_and_fqcn() {
        let mut c = Client::new("site-2", "");
        c.fqcn = "site-1.site-2".into();
        let t = AuxMsgTarget::client(&c);
        assert_eq!(t, AuxMsgTarget::new("site-2", "site-1.site-2", true));
    }

    #[test]
    fn error_record_time_is_now_in_epoch_seconds() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let e = ErrorRecord::new("g", "k", "m");
        assert!(e.timestamp_secs() >= before);
        assert_eq!((e.group.as_str(), e.key.as_str()), ("g", "k"));
        let old = ErrorRecord {
            time: UNIX_EPOCH - Duration::from_secs(1),
            ..e
        };
        assert_eq!(old.timestamp_secs(), 0.0);
    }
}
