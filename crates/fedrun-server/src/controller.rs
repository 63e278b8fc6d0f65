//! The controller API: how a workflow sends tasks to clients and waits for their results.
//!
//! [`Controller`] is a cheap, cloneable handle a workflow receives from the server job. Its core
//! is [`Controller::broadcast_and_wait`], NVFlare's call of the same name: post one task to
//! several clients and wait until enough of them answered. The waiting runs in the workflow's
//! own future (never inside an actor), raced against the task timeout, the after-minimum wait
//! and the abort signals; the task manager only hands results over.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use fedrun_cell::AbortSignal;
use fedrun_engine::StreamProcessor;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::error::ServerError;
use crate::task::{Task, TaskResult};
use crate::task_manager::{CancelTask, PostTask, TaskManager};
use crate::workflow::WorkflowEvent;

/// A workflow's handle on the server job (see the module doc).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_cell::Network;
/// use fedrun_core::Shareable;
/// use fedrun_server::{ServerError, ServerJob, Task};
///
/// actix::System::new().block_on(async {
///     let network = Network::new();
///     let server = ServerJob::builder("job-1")
///         .job_clients(&["site-1"])
///         .start(&network)
///         .await
///         .unwrap();
///     let ctl = server.controller("demo");
///     assert_eq!(ctl.job_clients(), ["site-1"]);
///     // nobody runs site-1 here: the task times out without an answer
///     let task = Task::new("train", Shareable::new()).with_timeout(Duration::from_millis(50));
///     let err = ctl
///         .broadcast_and_wait(task, None, 1, Duration::ZERO, ctl.abort_signal())
///         .await
///         .unwrap_err();
///     assert!(matches!(err, ServerError::NotEnoughResponses { got: 0, needed: 1 }));
/// });
/// ```
#[derive(Clone)]
pub struct Controller {
    job_id: Arc<str>,
    workflow: Arc<str>,
    clients: Arc<[String]>,
    tasks: Addr<TaskManager>,
    run_abort: AbortSignal,
    events: Option<mpsc::UnboundedSender<WorkflowEvent>>,
    stream: Option<Addr<StreamProcessor>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("job_id", &self.job_id)
            .field("workflow", &self.workflow)
            .field("clients", &self.clients)
            .finish_non_exhaustive()
    }
}

/// Closes the task when the wait ends, however it ends (return, error, or the future dropped).
struct CloseOnDrop {
    tasks: Addr<TaskManager>,
    task_id: String,
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        // do_send: Drop cannot wait. Loss is acceptable: if the mailbox is closed the task
        // manager (and the task) are gone already; otherwise do_send always enqueues.
        self.tasks.do_send(CancelTask {
            task_id: std::mem::take(&mut self.task_id),
        });
    }
}

impl Controller {
    pub(crate) fn new(
        job_id: Arc<str>,
        workflow: &str,
        clients: Arc<[String]>,
        tasks: Addr<TaskManager>,
        run_abort: AbortSignal,
        events: Option<mpsc::UnboundedSender<WorkflowEvent>>,
        stream: Option<Addr<StreamProcessor>>,
    ) -> Self {
        Controller {
            job_id,
            workflow: Arc::from(workflow),
            clients,
            tasks,
            run_abort,
            events,
            stream,
        }
    }

    /// The server job's object streamer (large models travel through it), when it has one.
    pub fn stream_processor(&self) -> Option<&Addr<StreamProcessor>> {
        self.stream.as_ref()
    }

    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The id of the workflow this controller serves.
    pub fn workflow(&self) -> &str {
        &self.workflow
    }

    /// The job's clients, in job-meta order.
    pub fn job_clients(&self) -> &[String] {
        &self.clients
    }

    /// A new abort signal that fires when the run is aborted (a child of the run's signal:
    /// triggering it aborts only the waits it is given to).
    pub fn abort_signal(&self) -> AbortSignal {
        self.run_abort.child()
    }

    /// Publishes an event to the job's observers, if any (dropped when nobody listens).
    pub fn emit(&self, event: WorkflowEvent) {
        if let Some(tx) = &self.events {
            // An observer that went away is not the workflow's problem.
            let _ = tx.send(event);
        }
    }

    /// Posts `task` to `targets` (`None` = every job client) and waits for results.
    ///
    /// Returns when:
    /// - every target answered; or
    /// - `min_responses` targets answered **successfully** (result `__rc__` = `OK`) and then
    ///   `wait_time_after_min` passed (more results may arrive meanwhile); or
    /// - the task's timeout passed.
    ///
    /// The result is `Ok` with every answer received (failed ones included, in arrival order)
    /// when at least `min_responses` succeeded, and
    /// [`ServerError::NotEnoughResponses`] otherwise. A client whose result has an error code
    /// counts as *answered* (it will not answer again) but not as a *success*. A client job
    /// whose connection closed and is not back within the client grace is counted out: it
    /// answers `COMMUNICATION_ERROR` in its name (see
    /// [`ServerJob::client_connection`](crate::ServerJob::client_connection)). A client that
    /// stops asking for tasks while the server job does not learn that it is gone simply never
    /// answers: without a task timeout the wait then lasts until `min_responses` is reached or
    /// the abort fires.
    ///
    /// `min_responses = 0` means every target. The task is closed when this returns (later
    /// results are dropped, `__task_check__` says `TASK_UNKNOWN`).
    ///
    /// # Errors
    ///
    /// [`ServerError::InvalidTask`] when `min_responses` exceeds the number of targets or there
    /// is no target; [`ServerError::UnknownClient`]; [`ServerError::NotEnoughResponses`];
    /// [`ServerError::Aborted`] when `abort` or the run's abort signal fires;
    /// [`ServerError::RunEnded`]; [`ServerError::ActorGone`].
    pub async fn broadcast_and_wait(
        &self,
        task: Task,
        targets: Option<Vec<String>>,
        min_responses: usize,
        wait_time_after_min: Duration,
        abort: AbortSignal,
    ) -> Result<Vec<TaskResult>, ServerError> {
        self.broadcast_and_wait_with(
            task,
            targets,
            min_responses,
            wait_time_after_min,
            abort,
            |_| {},
        )
        .await
    }

    /// [`Controller::broadcast_and_wait`], calling `on_result` for each result as it arrives
    /// (e.g. to publish progress).
    ///
    /// # Errors
    ///
    /// As [`Controller::broadcast_and_wait`].
    pub async fn broadcast_and_wait_with(
        &self,
        task: Task,
        targets: Option<Vec<String>>,
        min_responses: usize,
        wait_time_after_min: Duration,
        abort: AbortSignal,
        on_result: impl FnMut(&TaskResult) + Send,
    ) -> Result<Vec<TaskResult>, ServerError> {
        self.broadcast_and_wait_notified(
            task,
            targets,
            min_responses,
            wait_time_after_min,
            abort,
            on_result,
            None::<fn(&str)>,
        )
        .await
    }

    /// [`Controller::broadcast_and_wait_with`], also calling `on_handed_out` with the client's
    /// name each time the task is handed to a client (its first `get_task` for it, and again
    /// when it asks again without having answered, e.g. after a reconnection) — for what must
    /// reach the client with the task, such as a streamed model. `on_handed_out` runs in the
    /// waiting future: it must not block.
    ///
    /// # Errors
    ///
    /// As [`Controller::broadcast_and_wait`].
    #[allow(clippy::too_many_arguments)]
    pub async fn broadcast_and_wait_notified(
        &self,
        task: Task,
        targets: Option<Vec<String>>,
        min_responses: usize,
        wait_time_after_min: Duration,
        abort: AbortSignal,
        mut on_result: impl FnMut(&TaskResult) + Send,
        mut on_handed_out: Option<impl FnMut(&str) + Send>,
    ) -> Result<Vec<TaskResult>, ServerError> {
        let targets = targets.unwrap_or_else(|| self.clients.to_vec());
        let mut distinct = targets.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let needed = if min_responses == 0 {
            distinct.len()
        } else {
            min_responses
        };
        if needed > distinct.len() {
            return Err(ServerError::InvalidTask(format!(
                "task {} needs {needed} response(s) but has only {} target(s)",
                task.name,
                distinct.len()
            )));
        }
        let timeout = task.timeout;
        let name = task.name.clone();
        let (handed_out, mut handed_out_rx) = match on_handed_out {
            Some(_) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let posted = self
            .tasks
            .send(PostTask {
                task,
                targets,
                workflow: self.workflow.to_string(),
                handed_out,
            })
            .await
            .map_err(ServerError::gone("TaskManager"))??;
        let mut results_rx = posted.results;
        let _close = CloseOnDrop {
            tasks: self.tasks.clone(),
            task_id: posted.id.clone(),
        };
        let task_deadline = timeout.map(|t| Instant::now() + t);
        let mut results: Vec<TaskResult> = Vec::with_capacity(distinct.len());
        let mut successes = 0usize;
        let mut min_deadline: Option<Instant> = None;
        loop {
            if results.len() == distinct.len() {
                break;
            }
            if successes >= needed && min_deadline.is_none() {
                min_deadline = Some(Instant::now() + wait_time_after_min);
            }
            let deadline = match (task_deadline, min_deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                biased;
                () = abort.triggered() => {
                    log::info!("[job={} site=server] {}: wait for task {name} aborted",
                        self.job_id, self.workflow);
                    return Err(ServerError::Aborted);
                }
                () = self.run_abort.triggered() => {
                    log::info!("[job={} site=server] {}: run aborted while waiting for task {name}",
                        self.job_id, self.workflow);
                    return Err(ServerError::Aborted);
                }
                Some(client) = async {
                    match handed_out_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(f) = on_handed_out.as_mut() {
                        f(&client);
                    }
                }
                received = results_rx.recv() => match received {
                    Some(result) => {
                        if result.is_success() {
                            successes += 1;
                        }
                        on_result(&result);
                        results.push(result);
                    }
                    None => return Err(ServerError::RunEnded),
                },
                () = sleep => {
                    if task_deadline.is_some_and(|d| Instant::now() >= d) {
                        log::info!(
                            "[job={} site=server] {}: task {name} timed out with {successes} \
                             successful result(s) of {} target(s)",
                            self.job_id, self.workflow, distinct.len()
                        );
                    }
                    break;
                }
            }
        }
        if successes < needed {
            log::warn!(
                "[job={} site=server] {}: task {name}: {successes} successful result(s), {needed} \
                 needed ({} answered of {} target(s))",
                self.job_id,
                self.workflow,
                results.len(),
                distinct.len()
            );
            return Err(ServerError::NotEnoughResponses {
                got: successes,
                needed,
            });
        }
        Ok(results)
    }
}
