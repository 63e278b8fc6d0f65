//! Workflows: the server-side logic of a job (NVFlare's controllers), and what they report.
//!
//! A workflow drives the clients through a [`Controller`]: it posts tasks, waits for results and
//! decides what comes next. The server job runs workflows one after the other
//! ([`ServerJob::run_workflow`](crate::ServerJob::run_workflow)) and ends the run after the last.
//! While it runs, a workflow may publish [`WorkflowEvent`]s (e.g. one per round) for observers
//! such as a progress bar; when it ends it returns a [`WorkflowOutcome`].

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::controller::Controller;
use crate::error::ServerError;
use crate::model::ModelWeights;

/// The server-side logic of a job.
///
/// # Example
/// ```
/// use fedrun_core::Shareable;
/// use fedrun_server::{Controller, ServerError, Task, Workflow, WorkflowOutcome};
/// use futures::future::BoxFuture;
///
/// /// Asks every client to say hello once.
/// struct Hello;
///
/// impl Workflow for Hello {
///     fn name(&self) -> &str {
///         "hello"
///     }
///     fn run<'a>(&'a mut self, ctl: Controller) -> BoxFuture<'a, Result<WorkflowOutcome, ServerError>> {
///         Box::pin(async move {
///             let task = Task::new("hello", Shareable::new());
///             let results = ctl
///                 .broadcast_and_wait(task, None, 0, std::time::Duration::ZERO, ctl.abort_signal())
///                 .await?;
///             log::info!("{} client(s) said hello", results.len());
///             Ok(WorkflowOutcome::new(self.name()))
///         })
///     }
/// }
/// ```
pub trait Workflow: Send {
    /// The workflow's id: its `id` in the job config, sent to clients as the `__workflow__`
    /// cookie of its tasks.
    fn name(&self) -> &str {
        "workflow"
    }

    /// Runs the workflow to its end.
    fn run<'a>(
        &'a mut self,
        ctl: Controller,
    ) -> BoxFuture<'a, Result<WorkflowOutcome, ServerError>>;
}

/// What a finished workflow reports.
///
/// # Example
/// ```
/// use fedrun_server::WorkflowOutcome;
///
/// let outcome = WorkflowOutcome::new("sag");
/// assert!(outcome.rounds.is_empty() && outcome.model.is_none());
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct WorkflowOutcome {
    /// The workflow's id.
    pub workflow: String,
    /// The metrics of each completed round, in order (empty for workflows without rounds).
    pub rounds: Vec<RoundMetrics>,
    /// The final global model, for workflows that train one.
    pub model: Option<ModelWeights>,
}

impl WorkflowOutcome {
    /// An outcome with no rounds and no model.
    pub fn new(workflow: impl Into<String>) -> Self {
        WorkflowOutcome {
            workflow: workflow.into(),
            rounds: Vec::new(),
            model: None,
        }
    }
}

/// What one round of a training workflow produced.
///
/// `metrics` holds, for every numeric DXO meta entry clients sent with their results (e.g.
/// `loss`, `accuracy`; `NUM_STEPS_CURRENT_ROUND` excluded), the mean over the clients that sent
/// it, weighted like the aggregation (by each client's `NUM_STEPS_CURRENT_ROUND`, default 1).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_server::RoundMetrics;
///
/// let m = RoundMetrics {
///     round: 0,
///     clients: vec!["site-1".into()],
///     failed_clients: vec![],
///     metrics: [("loss".to_owned(), 0.25)].into_iter().collect(),
///     duration: Duration::from_millis(12),
/// };
/// assert_eq!(m.metrics["loss"], 0.25);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RoundMetrics {
    /// The round number.
    pub round: u32,
    /// The clients whose results were aggregated, sorted.
    pub clients: Vec<String>,
    /// The clients that answered with an error (or an unusable result), sorted.
    pub failed_clients: Vec<String>,
    /// Weighted means of the numeric meta entries, by name.
    pub metrics: BTreeMap<String, f64>,
    /// From posting the round's task to the new global model.
    pub duration: Duration,
}

/// Progress of a running workflow, for observers (see
/// [`ServerJobBuilder::events`](crate::ServerJobBuilder::events)).
#[derive(Clone, Debug, PartialEq)]
pub enum WorkflowEvent {
    /// A workflow started.
    WorkflowStarted {
        /// Its id.
        workflow: String,
    },
    /// A round started: its task is about to be posted.
    RoundStarted {
        /// The workflow's id.
        workflow: String,
        /// The round number.
        round: u32,
        /// The last round number + 1 (`start_round + num_rounds`).
        end_round: u32,
        /// How many clients the round's task goes to.
        targets: usize,
    },
    /// One client's result for the current round arrived.
    ResultReceived {
        /// The workflow's id.
        workflow: String,
        /// The round number.
        round: u32,
        /// The client.
        client: String,
        /// Whether it succeeded.
        success: bool,
    },
    /// A round completed.
    RoundCompleted {
        /// The workflow's id.
        workflow: String,
        /// Its metrics.
        metrics: RoundMetrics,
    },
    /// A workflow ended (successfully or not).
    WorkflowFinished {
        /// Its id.
        workflow: String,
        /// `None` on success, the error's text otherwise.
        error: Option<String>,
    },
}
