//! Tasks as a workflow posts them, and results as clients send them back.
//!
//! A workflow hands the server a [`Task`] (a name, a Shareable of data, an optional timeout);
//! clients pull it with `get_task`, run it, and push a result with `submit_update`; the
//! workflow gets each result back as a [`TaskResult`]. These two types are all a workflow sees
//! of the task protocol.

use std::time::Duration;

use fedrun_core::{ReturnCode, Shareable};

/// A task for clients: what a workflow broadcasts.
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_core::Shareable;
/// use fedrun_server::Task;
///
/// let task = Task::new("train", Shareable::new()).with_timeout(Duration::from_secs(60));
/// assert_eq!(task.name, "train");
/// assert_eq!(task.timeout, Some(Duration::from_secs(60)));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// The task name clients dispatch on (`__task_name__`, e.g. `train`).
    pub name: String,
    /// The task data. Its headers travel with the task (e.g. `current_round`); a cookie jar in
    /// it is extended with `__workflow__` and `__task_id__` and echoed back by clients.
    pub data: Shareable,
    /// How long the task stays open after it is posted; `None` = until the wait ends for
    /// another reason (every target answered, enough answers, abort).
    pub timeout: Option<Duration>,
}

impl Task {
    /// A task without timeout.
    pub fn new(name: impl Into<String>, data: Shareable) -> Self {
        Task {
            name: name.into(),
            data,
            timeout: None,
        }
    }

    /// Sets the timeout; a zero duration means no timeout (NVFlare's `timeout=0`).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }
}

/// One client's answer to a task.
///
/// # Example
/// ```
/// use fedrun_core::{AppReturnCode, ReturnCode, Shareable};
/// use fedrun_server::TaskResult;
///
/// let failed = TaskResult {
///     client: "site-1".into(),
///     result: Shareable::make_reply(AppReturnCode::ExecutionException, None),
///     rc: ReturnCode::App(AppReturnCode::ExecutionException),
/// };
/// assert!(!failed.is_success());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    /// The client's name.
    pub client: String,
    /// The result Shareable, as the client sent it.
    pub result: Shareable,
    /// The result's return code (`__rc__`; `OK` when absent).
    pub rc: ReturnCode,
}

impl TaskResult {
    /// Whether the client succeeded (return code `OK`).
    pub fn is_success(&self) -> bool {
        self.rc.is_ok()
    }
}
