//! The `TaskManager` actor: the one owner of the server job's task queue.
//!
//! Workflows post tasks ([`PostTask`]) and clients poll for them (`get_task`) and answer them
//! (`submit_update`); the aux handlers ask about tasks (`__task_check__`) and record client
//! liveness (`__job_heartbeat__`). All of that state — the open tasks, who got which task, who
//! answered, the run's phase and when each client was last seen — lives in this one actor, so
//! every decision is made against one consistent view and no lock is shared. Every handler is
//! synchronous (no await inside the actor): results travel to the waiting workflow over the
//! task's own channel.
//!
//! Rules (the SJ side of the pinned task protocol):
//!
//! - a task is handed to each of its targets once; a target that asks again without having
//!   answered gets it again (it restarted or lost it), unless its `last_task_id` says it already
//!   processed it;
//! - a task past its timeout, or whose workflow stopped waiting, is no longer handed out;
//! - a result is accepted once per target, only for a task it was sent; anything else (late,
//!   unknown, duplicate) is logged and dropped, and the client still gets an `ok` reply;
//! - once every target answered, the task is closed (`__task_check__` then says `TASK_UNKNOWN`);
//! - a client job whose connection closed ([`ClientConnection`]) and did not come back within
//!   the client grace is *counted out*: every open task still expecting it gets a
//!   `COMMUNICATION_ERROR` result in its name at once (the workflow sees a failed client, not
//!   a silent one), and so does every task posted for it until it connects again.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use actix::{Actor, AsyncContext, Context, Handler, Message, MessageResult};
use fedrun_cell::Payload;
use fedrun_core::{AppReturnCode, PeerContext, Shareable};
use tokio::sync::mpsc;

use crate::error::ServerError;
use crate::protocol::{self, PollHints, Requester, TaskSend};
use crate::task::{Task, TaskResult};

/// The default mailbox capacity of the [`TaskManager`].
pub const DEFAULT_TASK_MANAGER_MAILBOX: usize = 1024;

/// The default client grace: how long a client job whose connection closed may take to come
/// back before it is counted out of its tasks.
pub const DEFAULT_CLIENT_GRACE: Duration = Duration::from_secs(30);

/// The phase of the run, as the task manager sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunPhase {
    /// No workflow has started: `get_task` says try again, `__sync_runner__` says
    /// `SERVER_NOT_READY`.
    NotStarted,
    /// A workflow runs.
    Running,
    /// The run is over: `get_task` says `__end_run__`, no task can be posted.
    Ended,
}

/// What a [`TaskManager`] is built from.
#[derive(Clone, Debug)]
pub struct TaskManagerConfig {
    /// The job id (`__run_num__` clients must send).
    pub job_id: String,
    /// The job's clients, by name, in job-meta order.
    pub clients: Vec<String>,
    /// The server's context, sent as `__peer_ctx__` in every reply.
    pub server_ctx: PeerContext,
    /// `__wait_time__` and `min_get_task_timeout` of the replies.
    pub(crate) hints: PollHints,
    /// The mailbox capacity.
    pub mailbox_capacity: usize,
    /// How long a client job whose connection closed may take to come back before it is
    /// counted out (default [`DEFAULT_CLIENT_GRACE`]).
    pub client_grace: Duration,
}

/// One open task.
struct OpenTask {
    id: String,
    name: String,
    workflow: String,
    data: Shareable,
    targets: Vec<String>,
    timeout: Option<std::time::Duration>,
    deadline: Option<Instant>,
    sent: HashSet<String>,
    answered: HashSet<String>,
    results: mpsc::UnboundedSender<TaskResult>,
    /// Told the client's name each time the task is handed to it.
    handed_out: Option<mpsc::UnboundedSender<String>>,
}

impl OpenTask {
    /// Whether this task is still waiting for `client`'s result.
    fn expects(&self, client: &str) -> bool {
        self.targets.iter().any(|t| t == client) && !self.answered.contains(client)
    }

    fn is_live(&self, now: Instant) -> bool {
        !self.results.is_closed() && self.deadline.is_none_or(|d| now < d)
    }
}

/// The actor that owns the task queue (see the module doc).
///
/// Normally started by [`ServerJob`](crate::ServerJob); usable alone with hand-made requests.
///
/// # Example
/// ```
/// use actix::Actor;
/// use fedrun_core::PeerContext;
/// use fedrun_server::task_manager::{GetRunPhase, RunPhase, TaskManager, TaskManagerConfig};
///
/// actix::System::new().block_on(async {
///     let config = TaskManagerConfig::new("job-1", vec!["site-1".into()], PeerContext::default());
///     let tasks = TaskManager::new(config).start();
///     assert_eq!(tasks.send(GetRunPhase).await.unwrap(), RunPhase::NotStarted);
/// });
/// ```
pub struct TaskManager {
    job_id: String,
    clients: HashSet<String>,
    server_ctx: PeerContext,
    hints: PollHints,
    mailbox_capacity: usize,
    phase: RunPhase,
    tasks: Vec<OpenTask>,
    last_seen: HashMap<String, Instant>,
    client_grace: Duration,
    /// Clients whose connection closed, with the generation of that loss (a grace timer only
    /// acts on the loss it was started for).
    lost: HashMap<String, u64>,
    /// Clients counted out: lost for longer than the grace, not back yet.
    counted_out: HashSet<String>,
    loss_generation: u64,
}

impl TaskManagerConfig {
    /// A config with a 0.5 s `__wait_time__`, no `min_get_task_timeout` and the default
    /// mailbox.
    pub fn new(job_id: impl Into<String>, clients: Vec<String>, server_ctx: PeerContext) -> Self {
        TaskManagerConfig {
            job_id: job_id.into(),
            clients,
            server_ctx,
            hints: PollHints {
                wait_time: crate::server_job::DEFAULT_POLL_INTERVAL,
                min_get_task_timeout: None,
            },
            mailbox_capacity: DEFAULT_TASK_MANAGER_MAILBOX,
            client_grace: DEFAULT_CLIENT_GRACE,
        }
    }

    /// Sets the client grace (see [`TaskManagerConfig::client_grace`]).
    pub fn with_client_grace(mut self, grace: Duration) -> Self {
        self.client_grace = grace;
        self
    }

    /// Sets `__wait_time__`: how long clients wait before polling again.
    pub fn with_poll_interval(mut self, wait: std::time::Duration) -> Self {
        self.hints.wait_time = wait;
        self
    }

    /// Sets `min_get_task_timeout`, sent with every non-end reply.
    pub fn with_min_get_task_timeout(mut self, timeout: Option<std::time::Duration>) -> Self {
        self.hints.min_get_task_timeout = timeout;
        self
    }
}

impl TaskManager {
    /// A task manager for `config` (not started; call `.start()`).
    pub fn new(config: TaskManagerConfig) -> Self {
        TaskManager {
            job_id: config.job_id,
            clients: config.clients.into_iter().collect(),
            server_ctx: config.server_ctx,
            hints: config.hints,
            mailbox_capacity: config.mailbox_capacity.max(1),
            phase: RunPhase::NotStarted,
            tasks: Vec::new(),
            last_seen: HashMap::new(),
            client_grace: config.client_grace,
            lost: HashMap::new(),
            counted_out: HashSet::new(),
            loss_generation: 0,
        }
    }

    /// Answers, in `client`'s name, every open task still expecting it with a
    /// `COMMUNICATION_ERROR` result (the client is gone: the workflow must not wait for it).
    fn count_out(&mut self, client: &str) {
        let job = &self.job_id;
        self.tasks.retain_mut(|task| {
            if !task.expects(client) {
                return true;
            }
            task.answered.insert(client.to_owned());
            log::warn!(
                "[job={job} site={client}] client job {client}.{job} counted out of task {} \
                 ({}): its connection is gone",
                task.name,
                task.id
            );
            let rc = AppReturnCode::CommunicationError;
            let delivered = task
                .results
                .send(TaskResult {
                    client: client.to_owned(),
                    result: Shareable::make_reply(rc, None),
                    rc: rc.into(),
                })
                .is_ok();
            delivered && task.answered.len() < task.targets.len()
        });
    }

    /// A client job's connection closed (`connected == false`) or is back.
    fn connection_changed(&mut self, client: String, connected: bool, ctx: &mut Context<Self>) {
        if !self.clients.contains(&client) {
            return;
        }
        if connected {
            let was_lost = self.lost.remove(&client).is_some();
            if self.counted_out.remove(&client) {
                log::info!(
                    "[job={} site={client}] client job {client}.{} is back after being counted \
                     out; it takes part again from the next task",
                    self.job_id,
                    self.job_id
                );
            } else if was_lost {
                log::info!(
                    "[job={} site={client}] client job {client}.{} came back within the grace",
                    self.job_id,
                    self.job_id
                );
            }
            return;
        }
        if self.lost.contains_key(&client) || self.counted_out.contains(&client) {
            return;
        }
        self.loss_generation += 1;
        let generation = self.loss_generation;
        self.lost.insert(client.clone(), generation);
        log::warn!(
            "[job={} site={client}] connection of client job {client}.{} closed; counted out \
             unless it is back within {:.1} s",
            self.job_id,
            self.job_id,
            self.client_grace.as_secs_f64()
        );
        ctx.run_later(self.client_grace, move |act, _ctx| {
            if act.lost.get(&client) != Some(&generation) {
                return;
            }
            act.lost.remove(&client);
            log::error!(
                "[job={} site={client}] client job {client}.{} did not come back within {:.1} s \
                 of losing its connection: counted out",
                act.job_id,
                act.job_id,
                act.client_grace.as_secs_f64()
            );
            act.counted_out.insert(client.clone());
            act.count_out(&client);
        });
    }

    fn seen(&mut self, client: &str) {
        self.last_seen.insert(client.to_owned(), Instant::now());
    }

    /// Drops tasks whose workflow stopped waiting (their result channel is closed).
    fn prune(&mut self) {
        let job = &self.job_id;
        self.tasks.retain(|t| {
            let keep = !t.results.is_closed();
            if !keep {
                log::debug!(
                    "[job={job} site=server] task {} ({}) closed: its workflow stopped waiting",
                    t.name,
                    t.id
                );
            }
            keep
        });
    }

    /// A known client making a request, or `None` (logged) when the request must not be served.
    fn client_of(&self, request: &Shareable, what: &str) -> Result<String, Refusal> {
        let Some(who) = Requester::of(request) else {
            log::warn!(
                "[job={} site=server] {what} without a peer context: try again",
                self.job_id
            );
            return Err(Refusal::TryAgain);
        };
        if who.run_num.as_deref() != Some(self.job_id.as_str()) {
            log::info!(
                "[job={} site=server] {what} from {:?} of job {:?}, not this job: end run",
                self.job_id,
                who.identity,
                who.run_num
            );
            return Err(Refusal::EndRun);
        }
        match who.identity {
            Some(name) if self.clients.contains(&name) => Ok(name),
            other => {
                log::error!(
                    "[job={} site=server] {what} from {other:?}, which is not a client of this job; \
                     refused (try again)",
                    self.job_id
                );
                Err(Refusal::TryAgain)
            }
        }
    }

    fn get_task(&mut self, payload: Payload) -> Shareable {
        let Some(request) = payload.into_shareable() else {
            log::warn!(
                "[job={} site=server] get_task payload is not a Shareable: try again",
                self.job_id
            );
            return protocol::try_again(&self.server_ctx, &self.hints);
        };
        let client = match self.client_of(&request, "get_task") {
            Ok(c) => c,
            Err(Refusal::TryAgain) => return protocol::try_again(&self.server_ctx, &self.hints),
            Err(Refusal::EndRun) => return protocol::end_run(&self.server_ctx),
        };
        self.seen(&client);
        match self.phase {
            RunPhase::Ended => {
                log::debug!(
                    "[job={} site=server] get_task from {client}: run ended",
                    self.job_id
                );
                return protocol::end_run(&self.server_ctx);
            }
            RunPhase::NotStarted => return protocol::try_again(&self.server_ctx, &self.hints),
            RunPhase::Running => {}
        }
        self.prune();
        let last = protocol::last_task_id(&request).map(str::to_owned);
        let now = Instant::now();
        let found = self.tasks.iter_mut().find(|t| {
            t.is_live(now)
                && t.expects(&client)
                && !(t.sent.contains(&client) && last.as_deref() == Some(t.id.as_str()))
        });
        let Some(task) = found else {
            return protocol::try_again(&self.server_ctx, &self.hints);
        };
        if !task.sent.insert(client.clone()) {
            log::info!(
                "[job={} site={client}] task {} ({}) sent again: the client asked without answering",
                self.job_id,
                task.name,
                task.id
            );
        } else {
            log::info!(
                "[job={} site={client}] task {} ({}) sent",
                self.job_id,
                task.name,
                task.id
            );
        }
        if let Some(tx) = &task.handed_out {
            // The workflow may have stopped listening (it then ignores hand-outs).
            let _ = tx.send(client.clone());
        }
        let msg_root_id = uuid::Uuid::new_v4().to_string();
        protocol::task(&TaskSend {
            task_id: &task.id,
            name: &task.name,
            data: &task.data,
            workflow: &task.workflow,
            timeout: task.timeout,
            msg_root_id: &msg_root_id,
            server: &self.server_ctx,
            hints: &self.hints,
        })
    }

    fn submit_update(&mut self, payload: Payload) -> SubmitOutcome {
        let Some(result) = payload.into_shareable() else {
            log::warn!(
                "[job={} site=server] submit_update payload is not a Shareable: dropped",
                self.job_id
            );
            return SubmitOutcome::Dropped;
        };
        let client = match self.client_of(&result, "submit_update") {
            Ok(c) => c,
            Err(_) => {
                log::warn!(
                    "[job={} site=server] submit_update refused: result dropped",
                    self.job_id
                );
                return SubmitOutcome::Dropped;
            }
        };
        self.seen(&client);
        let Some(task_id) = protocol::result_task_id(&result) else {
            log::warn!(
                "[job={} site={client}] result without a task id (cookie __task_id__): dropped",
                self.job_id
            );
            return SubmitOutcome::Dropped;
        };
        let Some(pos) = self.tasks.iter().position(|t| t.id == task_id) else {
            log::info!(
                "[job={} site={client}] late or unknown result for task {task_id}: dropped",
                self.job_id
            );
            return SubmitOutcome::Dropped;
        };
        let task = &mut self.tasks[pos];
        if !task.expects(&client) {
            log::warn!(
                "[job={} site={client}] result for task {} ({task_id}) not expected from this \
                 client (not a target, or already answered): dropped",
                self.job_id,
                task.name
            );
            return SubmitOutcome::Dropped;
        }
        if !task.sent.contains(&client) {
            log::warn!(
                "[job={} site={client}] result for task {} ({task_id}) that was never sent to \
                 this client: dropped",
                self.job_id,
                task.name
            );
            return SubmitOutcome::Dropped;
        }
        task.answered.insert(client.clone());
        let rc = result.return_code();
        log::info!(
            "[job={} site={client}] result for task {} ({task_id}) received, rc {rc}",
            self.job_id,
            task.name
        );
        let delivered = task
            .results
            .send(TaskResult {
                client: client.clone(),
                result,
                rc,
            })
            .is_ok();
        let complete = task.answered.len() == task.targets.len();
        if !delivered {
            log::info!(
                "[job={} site={client}] task {task_id}: its workflow stopped waiting; result \
                 dropped",
                self.job_id
            );
        }
        if complete || !delivered {
            self.tasks.remove(pos);
        }
        if delivered {
            SubmitOutcome::Accepted
        } else {
            SubmitOutcome::Dropped
        }
    }
}

/// Why a request is not served.
enum Refusal {
    TryAgain,
    EndRun,
}

impl Actor for TaskManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

/// A client's `get_task` request (the cell payload). Replies the Shareable to send back: a
/// task, `__try_again__` or `__end_run__` (see the module doc and the pinned protocol).
#[derive(Debug, Message)]
#[rtype(result = "Shareable")]
pub struct GetTask {
    /// The request, as it arrived.
    pub request: Payload,
}

impl Handler<GetTask> for TaskManager {
    type Result = MessageResult<GetTask>;

    fn handle(&mut self, msg: GetTask, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.get_task(msg.request))
    }
}

/// What became of a submitted result (the client's reply is `ok` either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Handed to the waiting workflow.
    Accepted,
    /// Logged and dropped (late, unknown, duplicate, or from an unknown sender).
    Dropped,
}

/// A client's `submit_update` (the cell payload).
#[derive(Debug, Message)]
#[rtype(result = "SubmitOutcome")]
pub struct SubmitUpdate {
    /// The result, as it arrived.
    pub result: Payload,
}

impl Handler<SubmitUpdate> for TaskManager {
    type Result = MessageResult<SubmitUpdate>;

    fn handle(&mut self, msg: SubmitUpdate, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.submit_update(msg.result))
    }
}

/// Is the task `task_id` still expecting `client`'s result? Replies `OK`, `TASK_UNKNOWN`, or
/// `BAD_REQUEST_DATA` when `task_id` is `None`.
#[derive(Debug, Message)]
#[rtype(result = "AppReturnCode")]
pub struct CheckTask {
    /// The asking client.
    pub client: String,
    /// The task id (the request's `__task_id__` header).
    pub task_id: Option<String>,
}

impl Handler<CheckTask> for TaskManager {
    type Result = MessageResult<CheckTask>;

    fn handle(&mut self, msg: CheckTask, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(task_id) = msg.task_id else {
            return MessageResult(AppReturnCode::BadRequestData);
        };
        if self.clients.contains(&msg.client) {
            self.seen(&msg.client);
        }
        let now = Instant::now();
        let open = self
            .tasks
            .iter()
            .any(|t| t.id == task_id && t.is_live(now) && t.expects(&msg.client));
        MessageResult(if open {
            AppReturnCode::Ok
        } else {
            AppReturnCode::TaskUnknown
        })
    }
}

/// Records that `client` is alive (a job heartbeat).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Heartbeat {
    /// The client's name; unknown names are ignored (logged).
    pub client: String,
}

impl Handler<Heartbeat> for TaskManager {
    type Result = ();

    fn handle(&mut self, msg: Heartbeat, _ctx: &mut Context<Self>) {
        if self.clients.contains(&msg.client) {
            self.seen(&msg.client);
        } else {
            log::warn!(
                "[job={} site=server] heartbeat from {:?}, not a client of this job",
                self.job_id,
                msg.client
            );
        }
    }
}

/// When each client was last heard of (any request), by name.
#[derive(Debug, Message)]
#[rtype(result = "HashMap<String, Instant>")]
pub struct GetLastSeen;

impl Handler<GetLastSeen> for TaskManager {
    type Result = MessageResult<GetLastSeen>;

    fn handle(&mut self, _msg: GetLastSeen, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.last_seen.clone())
    }
}

/// The run's phase.
#[derive(Debug, Message)]
#[rtype(result = "RunPhase")]
pub struct GetRunPhase;

impl Handler<GetRunPhase> for TaskManager {
    type Result = MessageResult<GetRunPhase>;

    fn handle(&mut self, _msg: GetRunPhase, _ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.phase)
    }
}

/// Marks the run as running (a workflow starts). No effect once the run ended.
#[derive(Debug, Message)]
#[rtype(result = "RunPhase")]
pub struct StartRun;

impl Handler<StartRun> for TaskManager {
    type Result = MessageResult<StartRun>;

    fn handle(&mut self, _msg: StartRun, _ctx: &mut Context<Self>) -> Self::Result {
        if self.phase == RunPhase::NotStarted {
            log::info!("[job={} site=server] run started", self.job_id);
            self.phase = RunPhase::Running;
        }
        MessageResult(self.phase)
    }
}

/// Ends the run: every open task is closed (waiting workflows see [`ServerError::RunEnded`])
/// and later `get_task` requests are answered `__end_run__`. Replies whether this call ended it
/// (`false` when it already was).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct EndRun;

impl Handler<EndRun> for TaskManager {
    type Result = bool;

    fn handle(&mut self, _msg: EndRun, _ctx: &mut Context<Self>) -> bool {
        if self.phase == RunPhase::Ended {
            return false;
        }
        log::info!(
            "[job={} site=server] run ended ({} open task(s) closed)",
            self.job_id,
            self.tasks.len()
        );
        self.phase = RunPhase::Ended;
        self.tasks.clear();
        true
    }
}

/// A task posted for some clients, as the workflow holds it.
#[derive(Debug)]
pub struct PostedTask {
    /// The task's id (`__task_id__`).
    pub id: String,
    /// The results, in arrival order; closed when the task is closed (run ended, or every target
    /// answered and was delivered).
    pub results: mpsc::UnboundedReceiver<TaskResult>,
}

/// Opens a task for `targets` (known clients, at least one; duplicates are ignored). Replies
/// [`ServerError::RunEnded`] after the end of the run, [`ServerError::UnknownClient`] or
/// [`ServerError::InvalidTask`] for bad targets. Marks the run as running.
#[derive(Debug, Message)]
#[rtype(result = "Result<PostedTask, ServerError>")]
pub struct PostTask {
    /// The task.
    pub task: Task,
    /// Who should run it.
    pub targets: Vec<String>,
    /// The posting workflow's id (`__workflow__` cookie).
    pub workflow: String,
    /// Told the client's name each time the task is handed to a client (e.g. to send it what
    /// goes with the task, such as a streamed model); `None`: nobody needs to know.
    pub handed_out: Option<mpsc::UnboundedSender<String>>,
}

impl Handler<PostTask> for TaskManager {
    type Result = Result<PostedTask, ServerError>;

    fn handle(&mut self, msg: PostTask, _ctx: &mut Context<Self>) -> Self::Result {
        if self.phase == RunPhase::Ended {
            return Err(ServerError::RunEnded);
        }
        let mut targets: Vec<String> = Vec::with_capacity(msg.targets.len());
        for t in msg.targets {
            if !self.clients.contains(&t) {
                return Err(ServerError::UnknownClient(t));
            }
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        if targets.is_empty() {
            return Err(ServerError::InvalidTask(format!(
                "task {} has no target",
                msg.task.name
            )));
        }
        self.phase = RunPhase::Running;
        self.prune();
        let id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        log::info!(
            "[job={} site=server] task {} ({id}) posted by {} for {}",
            self.job_id,
            msg.task.name,
            msg.workflow,
            targets.join(", ")
        );
        let gone: Vec<String> = targets
            .iter()
            .filter(|t| self.counted_out.contains(*t))
            .cloned()
            .collect();
        self.tasks.push(OpenTask {
            id: id.clone(),
            name: msg.task.name,
            workflow: msg.workflow,
            data: msg.task.data,
            targets,
            timeout: msg.task.timeout,
            deadline: msg.task.timeout.map(|t| Instant::now() + t),
            sent: HashSet::new(),
            answered: HashSet::new(),
            results: tx,
            handed_out: msg.handed_out,
        });
        for client in gone {
            self.count_out(&client);
        }
        Ok(PostedTask { id, results: rx })
    }
}

/// Closes a task: it is no longer handed out, its results are dropped and `__task_check__`
/// says `TASK_UNKNOWN`. Unknown ids are ignored.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CancelTask {
    /// The task's id.
    pub task_id: String,
}

impl Handler<CancelTask> for TaskManager {
    type Result = ();

    fn handle(&mut self, msg: CancelTask, _ctx: &mut Context<Self>) {
        let before = self.tasks.len();
        self.tasks.retain(|t| t.id != msg.task_id);
        if self.tasks.len() != before {
            log::debug!(
                "[job={} site=server] task {} closed",
                self.job_id,
                msg.task_id
            );
        }
    }
}

/// Stops the task manager (open tasks are closed with it).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopTaskManager;

impl Handler<StopTaskManager> for TaskManager {
    type Result = ();

    fn handle(&mut self, _msg: StopTaskManager, ctx: &mut Context<Self>) {
        use actix::ActorContext;
        self.tasks.clear();
        ctx.stop();
    }
}

/// A client job's connection closed (`connected: false`) or is (back) up. A client that stays
/// disconnected for the client grace is counted out of its tasks (see the module doc);
/// unknown names are ignored.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ClientConnection {
    /// The client's name.
    pub client: String,
    /// Whether it is connected now.
    pub connected: bool,
}

impl Handler<ClientConnection> for TaskManager {
    type Result = ();

    fn handle(&mut self, msg: ClientConnection, ctx: &mut Context<Self>) {
        self.connection_changed(msg.client, msg.connected, ctx);
    }
}
