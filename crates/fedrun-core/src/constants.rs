//! NVFlare's string constants, exactly as they travel on the wire.
//!
//! Grouped by what they name. Each value is the literal string NVFlare 2.9 uses;
//! changing one breaks interoperability with Python sites.

/// Keys of a Shareable's header map (`ReservedHeaderKey`), and the container key itself.
pub mod header_key {
    /// The key of the header map inside every Shareable.
    pub const HEADERS: &str = "__headers__";
    /// Aux topic of a request.
    pub const TOPIC: &str = "__topic__";
    /// Application return code.
    pub const RC: &str = "__rc__";
    /// Cookie jar, echoed back by the peer.
    pub const COOKIE_JAR: &str = "__cookie_jar__";
    /// Public props of the sender's context.
    pub const PEER_PROPS: &str = "__peer_props__";
    /// Set on a reply that arrived too late.
    pub const REPLY_IS_LATE: &str = "__reply_is_late__";
    /// Task name.
    pub const TASK_NAME: &str = "__task_name__";
    /// Task id.
    pub const TASK_ID: &str = "__task_id__";
    /// Workflow name.
    pub const WORKFLOW: &str = "__workflow__";
    /// Audit event id.
    pub const AUDIT_EVENT_ID: &str = "__audit_event_id__";
    /// Content type (`"DXO"`).
    pub const CONTENT_TYPE: &str = "__content_type__";
    /// Task operator.
    pub const TASK_OPERATOR: &str = "__task_operator__";
    /// Error text.
    pub const ERROR: &str = "__error__";
    /// Serialised peer FLContext.
    pub const PEER_CTX: &str = "__peer_ctx__";
    /// Message-root id (download transactions).
    pub const MSG_ROOT_ID: &str = "__msg_root_id__";
    /// Message-root time to live.
    pub const MSG_ROOT_TTL: &str = "__msg_root_ttl__";
    /// Keep download references lazy on forwarding hops.
    pub const PASS_THROUGH: &str = "__pass_through__";
    /// Seconds to wait before polling again (task fetch).
    pub const WAIT_TIME: &str = "__wait_time__";
}

/// Keys of FLContext props (`FLContextKey`, plus the keys of other NVFlare classes that travel in
/// contexts).
pub mod fl_ctx_key {
    /// The job id (`FLContextKey.CURRENT_RUN`); a public sticker of every engine context.
    pub const RUN_NUM: &str = "__run_num__";
    /// The site's name.
    pub const IDENTITY_NAME: &str = "__identity_name__";
    /// The site's fully qualified site name.
    pub const FQSN: &str = "__fqsn__";
    /// Whether the site is a leaf of the client hierarchy.
    pub const IS_LEAF: &str = "__is_leaf__";
    /// The context manager (an engine object; fedrun passes it separately).
    pub const MANAGER: &str = "__manager__";
    /// The engine (an engine object; fedrun passes it separately).
    pub const ENGINE: &str = "__engine__";
    /// The process type (see [`super::process_type`]).
    pub const PROCESS_TYPE: &str = "__process_type__";
    /// The client's start-up arguments.
    pub const CLIENT_CONFIG: &str = "__client_config__";
    /// The job's meta (`meta.json`).
    pub const JOB_META: &str = "__job_meta__";
    /// The job's privacy scope name.
    pub const JOB_SCOPE_NAME: &str = "__job_scope_name__";
    /// The scope name in effect.
    pub const EFFECTIVE_JOB_SCOPE_NAME: &str = "__effective_job_scope_name__";
    /// The scope's props.
    pub const SCOPE_PROPS: &str = "__scope_props__";
    /// The scope object.
    pub const SCOPE_OBJECT: &str = "__scope_object__";
    /// The job clients' hierarchy (forest).
    pub const CLIENT_HIERARCHY: &str = "__client_hierarchy__";
    /// The client runner (an engine object).
    pub const RUNNER: &str = "__runner__";
    /// The peer's context.
    pub const PEER_CTX: &str = "__peer_ctx__";
    /// The run's abort signal (an engine object).
    pub const RUN_ABORT_SIGNAL: &str = "__run_abort_signal__";
    /// Set when an abort of the run was requested.
    pub const RUN_ABORT_REQUESTED: &str = "__run_abort_requested__";
    /// Exceptions raised by event handlers (`{handler name: error}`).
    pub const EXCEPTIONS: &str = "__exceptions__";
    /// The id of the event being fired.
    pub const EVENT_ID: &str = "__event_id__";
    /// The data of the event being fired.
    pub const EVENT_DATA: &str = "__event_data__";
    /// The origin of the event being fired.
    pub const EVENT_ORIGIN: &str = "__event_origin__";
    /// The scope of the event being fired (`local` by default).
    pub const EVENT_SCOPE: &str = "__event_scope__";
    /// The current task's name.
    pub const TASK_NAME: &str = "__task_name__";
    /// The current task's id.
    pub const TASK_ID: &str = "__task_id__";
    /// The current task's data.
    pub const TASK_DATA: &str = "__task_data__";
    /// The current task's result.
    pub const TASK_RESULT: &str = "__task_result__";
    /// The SSID of the client's session.
    pub const SSID: &str = "__ssid__";
    /// The current job id (parent-process flavour).
    pub const CURRENT_JOB_ID: &str = "__current_job_id__";
    /// The client's name.
    pub const CLIENT_NAME: &str = "__client_name__";
    /// Custom props.
    pub const CUSTOM_PROPS: &str = "__custom_props__";
    /// The depth of nested event firing (private, non-sticky).
    pub const EVENT_DEPTH: &str = "###event_depth";
}

/// Process types (`ProcessType`). A client job engine always runs as
/// [`CLIENT_JOB`](process_type::CLIENT_JOB).
pub mod process_type {
    /// Server parent process.
    pub const SERVER_PARENT: &str = "SP";
    /// Server job process.
    pub const SERVER_JOB: &str = "SJ";
    /// Client parent process.
    pub const CLIENT_PARENT: &str = "CP";
    /// Client job process.
    pub const CLIENT_JOB: &str = "CJ";
}

/// Site types (`SiteType`), and the reserved target names of aux messages.
pub mod site_type {
    /// The server (also `FQCN.ROOT_SERVER`, the server's cell name).
    pub const SERVER: &str = "server";
    /// The server's parent process.
    pub const SERVER_PARENT: &str = "server_parent";
    /// A client.
    pub const CLIENT: &str = "client";
    /// Every site: the server and every other job client.
    pub const ALL: &str = "@ALL";
}

/// Fully qualified cell names.
pub mod fqcn {
    /// The root server's cell name.
    pub const ROOT_SERVER: &str = "server";
    /// The separator of FQCN and FQSN components.
    pub const SEPARATOR: &str = ".";
}

/// Reserved aux topics (`ReservedTopic`) and the fed-event topic.
pub mod reserved_topic {
    /// End the run.
    pub const END_RUN: &str = "__end_run__";
    /// Abort the current task.
    pub const ABORT_TASK: &str = "__abort_task__";
    /// Do a task (pushed by the server).
    pub const DO_TASK: &str = "__do_task__";
    /// An aux command.
    pub const AUX_COMMAND: &str = "__aux_command__";
    /// Runner synchronisation at job start.
    pub const SYNC_RUNNER: &str = "__sync_runner__";
    /// Job heartbeat.
    pub const JOB_HEARTBEAT: &str = "__job_heartbeat__";
    /// Check whether a task is still wanted.
    pub const TASK_CHECK: &str = "__task_check__";
    /// Application metrics.
    pub const APP_METRICS: &str = "__app_metrics__";
    /// A message root was deleted (download transactions).
    pub const MSG_ROOT_DELETED: &str = "__msg_root_deleted__";
    /// Stop the cell network.
    pub const STOP_CELLNET: &str = "__stop_cellnet__";
    /// Events fired across sites.
    pub const FED_EVENT: &str = "fed.event";
}

/// Special task names (`SpecialTaskName`) the server answers a task fetch with.
pub mod special_task {
    /// No task now: ask again later.
    pub const TRY_AGAIN: &str = "__try_again__";
    /// The run is over.
    pub const END_RUN: &str = "__end_run__";
}

/// Headers of task fetch and result messages.
pub mod task_header {
    /// The fetched task's name (`ServerCommandKey.TASK_NAME`).
    pub const TASK_NAME: &str = "task_name";
    /// The id of the last task received.
    pub const LAST_TASK_ID: &str = "last_task_id";
    /// The smallest get-task timeout.
    pub const MIN_GET_TASK_TIMEOUT: &str = "min_get_task_timeout";
    /// Cell header on task traffic.
    pub const PROJECT_NAME: &str = "project_name";
    /// Seconds to wait before fetching again.
    pub const WAIT_TIME: &str = "__wait_time__";
}

/// Cell channels.
pub mod channel {
    /// Aux messages (the topic is the aux topic).
    pub const AUX_COMMUNICATION: &str = "aux_communication";
    /// Task fetch and result push.
    pub const SERVER_COMMAND: &str = "server_command";
    /// Admin commands into the client job (e.g. topic `abort`).
    pub const CLIENT_COMMAND: &str = "client_command";
}

/// Cell topics of the `server_command` channel (and the admin abort command).
pub mod topic {
    /// Fetch a task.
    pub const GET_TASK: &str = "get_task";
    /// Push a task result.
    pub const SUBMIT_UPDATE: &str = "submit_update";
    /// Abort the job (channel `client_command`).
    pub const ABORT: &str = "abort";
}

/// Object streaming: aux topics, request headers and stream-context keys.
pub mod stream {
    /// Aux topic of a stream request.
    pub const TOPIC_REQUEST: &str = "ObjectStreamer.Request";
    /// Aux topic of a stream abort (also sent at normal end).
    pub const TOPIC_ABORT: &str = "ObjectStreamer.Abort";
    /// Header: the stream transaction id.
    pub const HEADER_TX_ID: &str = "ObjectStreamer.TX_ID";
    /// Header: the sequence number.
    pub const HEADER_SEQ: &str = "ObjectStreamer.SEQ";
    /// Header: the application topic.
    pub const HEADER_TOPIC: &str = "ObjectStreamer.TOPIC";
    /// Header: the application channel.
    pub const HEADER_CHANNEL: &str = "ObjectStreamer.CHANNEL";
    /// Header: the stream context.
    pub const HEADER_CTX: &str = "ObjectStreamer.CTX";
    /// Header: the end result.
    pub const HEADER_END_RESULT: &str = "ObjectStreamer.END_RESULT";
    /// Stream-context key: the channel.
    pub const CTX_CHANNEL: &str = "__channel__";
    /// Stream-context key: the topic.
    pub const CTX_TOPIC: &str = "__topic__";
    /// Stream-context key: the final return code.
    pub const CTX_RC: &str = "__RC__";
    /// Stream-context key: set when the stream ended.
    pub const CTX_END_STREAM: &str = "__end_stream__";
}

/// Event types (`EventType`) the client job engine fires or handles.
pub mod event_type {
    /// The system is booting.
    pub const SYSTEM_BOOTSTRAP: &str = "_system_bootstrap";
    /// The run is about to start.
    pub const ABOUT_TO_START_RUN: &str = "_about_to_start_run";
    /// The run started.
    pub const START_RUN: &str = "_start_run";
    /// The run is about to end.
    pub const ABOUT_TO_END_RUN: &str = "_about_to_end_run";
    /// The run ended.
    pub const END_RUN: &str = "_end_run";
    /// Ask handlers whether the run may end now.
    pub const CHECK_END_RUN_READINESS: &str = "_check_end_run_readiness";
    /// The current task is aborted.
    pub const ABORT_TASK: &str = "_abort_task";
    /// A fatal system error happened.
    pub const FATAL_SYSTEM_ERROR: &str = "_fatal_system_error";
    /// A fatal task error happened.
    pub const FATAL_TASK_ERROR: &str = "_fatal_task_error";
    /// Before fetching a task.
    pub const BEFORE_PULL_TASK: &str = "_before_pull_task";
    /// After fetching a task.
    pub const AFTER_PULL_TASK: &str = "_after_pull_task";
    /// Before the task data filters run.
    pub const BEFORE_TASK_DATA_FILTER: &str = "_before_task_data_filter";
    /// After the task data filters ran.
    pub const AFTER_TASK_DATA_FILTER: &str = "_after_task_data_filter";
    /// Before the executor runs the task.
    pub const BEFORE_TASK_EXECUTION: &str = "_before_task_execution";
    /// After the executor ran the task.
    pub const AFTER_TASK_EXECUTION: &str = "_after_task_execution";
    /// Before the task result filters run.
    pub const BEFORE_TASK_RESULT_FILTER: &str = "_before_task_result_filter";
    /// After the task result filters ran.
    pub const AFTER_TASK_RESULT_FILTER: &str = "_after_task_result_filter";
    /// Before sending a task result.
    pub const BEFORE_SEND_TASK_RESULT: &str = "_before_send_task_result";
    /// After sending a task result.
    pub const AFTER_SEND_TASK_RESULT: &str = "_after_send_task_result";
    /// A task was assigned (sent) to a client.
    pub const TASK_ASSIGNMENT_SENT: &str = "_task_assignment_sent";
    /// A task result was received.
    pub const TASK_RESULT_RECEIVED: &str = "_task_result_received";
    /// A critical log entry is available.
    pub const CRITICAL_LOG_AVAILABLE: &str = "_critical_log_available";
    /// An error log entry is available (recorded by the info collector).
    pub const ERROR_LOG_AVAILABLE: &str = "_error_log_available";
    /// An exception log entry is available.
    pub const EXCEPTION_LOG_AVAILABLE: &str = "_exception_log_available";
    /// A warning log entry is available.
    pub const WARNING_LOG_AVAILABLE: &str = "_warning_log_available";
    /// An info log entry is available.
    pub const INFO_LOG_AVAILABLE: &str = "_info_log_available";
    /// A debug log entry is available.
    pub const DEBUG_LOG_AVAILABLE: &str = "_debug_log_available";
}

/// Event scopes (`__event_scope__`).
pub mod event_scope {
    /// The default scope: this site only.
    pub const LOCAL: &str = "local";
    /// A fed event: also sent to the federation (`EventScope.FEDERATION`).
    pub const FEDERATION: &str = "federation";
}

/// Shareable headers of a fed event (`FedEventHeader`), as NVFlare's fed-event runners set them.
pub mod fed_event_header {
    /// When the event was fired (seconds since the epoch, a float).
    pub const TIMESTAMP: &str = "_timestamp";
    /// The event's unique id (a uuid4 hex string); used to drop duplicates per sender.
    pub const EVENT_ID: &str = "_event_id";
    /// The event type to fire at the receiver.
    pub const EVENT_TYPE: &str = "_event_type";
    /// `out` (default) for an event leaving this site, `in` for one received.
    pub const DIRECTION: &str = "_direction";
    /// The identity name of the site that fired the event.
    pub const ORIGIN: &str = "_origin";
    /// The target sites (only the server's runner uses it).
    pub const TARGETS: &str = "_targets";
}

/// The info collector's stats protocol (`InfoCollector.EVENT_TYPE_GET_STATS` and
/// `InfoCollector.CTX_KEY_STATS_COLLECTOR`).
pub mod info_collector {
    /// The event fired to collect stats from every component.
    pub const EVENT_TYPE_GET_STATS: &str = "info_collector.get_stats";
    /// The context prop under which handlers add their stats (group → info).
    pub const CTX_KEY_STATS_COLLECTOR: &str = "info_collector.stats_collector";
    /// The error category name.
    pub const CATEGORY_ERROR: &str = "error";
    /// The stats category name.
    pub const CATEGORY_STATS: &str = "stats";
}

/// The CJ's admin commands answered by the info collector (`AdminCommandNames`); they arrive on
/// channel `client_command` with the command as the topic.
pub mod info_command {
    /// Collect and return the run's stats.
    pub const SHOW_STATS: &str = "show_stats";
    /// Return the run's error log.
    pub const SHOW_ERRORS: &str = "show_errors";
    /// Clear the run's error log.
    pub const RESET_ERRORS: &str = "reset_errors";
}

/// Widget ids.
pub mod widget_id {
    /// The info collector (keeps the error log).
    pub const INFO_COLLECTOR: &str = "info_collector";
    /// The component caller.
    pub const COMPONENT_CALLER: &str = "component_caller";
    /// The fed-event runner.
    pub const FED_EVENT_RUNNER: &str = "fed_event_runner";
}

/// Keys of a job's meta (`JobMetaKey`).
pub mod job_meta_key {
    /// The list of the job's client dicts.
    pub const JOB_CLIENTS: &str = "job_clients";
    /// The job's privacy scope.
    pub const SCOPE: &str = "scope";
}

/// Configuration variable names and their defaults (read through NVFlare's ConfigService).
///
/// Timeouts and intervals are in seconds. A variable whose default is "none" has no `_DEFAULT`.
pub mod config_var {
    /// How long an aux runner waits for the cell (application config, read once).
    pub const CELL_WAIT_TIMEOUT: &str = "cell_wait_timeout";
    /// Default of [`CELL_WAIT_TIMEOUT`].
    pub const CELL_WAIT_TIMEOUT_DEFAULT: f64 = 5.0;
    /// How many streams are processed at once.
    pub const MAX_CONCURRENT_STREAMING_SESSIONS: &str = "max_concurrent_streaming_sessions";
    /// Default of [`MAX_CONCURRENT_STREAMING_SESSIONS`].
    pub const MAX_CONCURRENT_STREAMING_SESSIONS_DEFAULT: usize = 20;
    /// Timeout of a task fetch (default none: the communication timeout applies).
    pub const GET_TASK_TIMEOUT: &str = "get_task_timeout";
    /// Timeout of a result push (default none: the communication timeout applies).
    pub const SUBMIT_TASK_RESULT_TIMEOUT: &str = "submit_task_result_timeout";
    /// Timeout of a task check.
    pub const TASK_CHECK_TIMEOUT: &str = "task_check_timeout";
    /// Default of [`TASK_CHECK_TIMEOUT`].
    pub const TASK_CHECK_TIMEOUT_DEFAULT: f64 = 5.0;
    /// Interval between task checks.
    pub const TASK_CHECK_INTERVAL: &str = "task_check_interval";
    /// Default of [`TASK_CHECK_INTERVAL`].
    pub const TASK_CHECK_INTERVAL_DEFAULT: f64 = 5.0;
    /// Interval between job heartbeats.
    pub const JOB_HEARTBEAT_INTERVAL: &str = "job_heartbeat_interval";
    /// Default of [`JOB_HEARTBEAT_INTERVAL`].
    pub const JOB_HEARTBEAT_INTERVAL_DEFAULT: f64 = 10.0;
    /// Timeout of one runner-sync request.
    pub const RUNNER_SYNC_TIMEOUT: &str = "runner_sync_timeout";
    /// Default of [`RUNNER_SYNC_TIMEOUT`].
    pub const RUNNER_SYNC_TIMEOUT_DEFAULT: f64 = 2.0;
    /// Overall deadline of the runner sync.
    pub const MAX_RUNNER_SYNC_TIMEOUT: &str = "max_runner_sync_timeout";
    /// Default of [`MAX_RUNNER_SYNC_TIMEOUT`].
    pub const MAX_RUNNER_SYNC_TIMEOUT_DEFAULT: f64 = 60.0;
    /// How long to wait for handlers to be ready to end the run.
    pub const END_RUN_READINESS_TIMEOUT: &str = "end_run_readiness_timeout";
    /// Default of [`END_RUN_READINESS_TIMEOUT`].
    pub const END_RUN_READINESS_TIMEOUT_DEFAULT: f64 = 5.0;
    /// Interval between end-run readiness checks.
    pub const END_RUN_READINESS_CHECK_INTERVAL: &str = "end_run_readiness_check_interval";
    /// Default of [`END_RUN_READINESS_CHECK_INTERVAL`].
    pub const END_RUN_READINESS_CHECK_INTERVAL_DEFAULT: f64 = 0.5;
    /// Client argument: the communicator's timeout.
    pub const COMMUNICATION_TIMEOUT: &str = "communication_timeout";
    /// Default of [`COMMUNICATION_TIMEOUT`].
    pub const COMMUNICATION_TIMEOUT_DEFAULT: f64 = 300.0;
    /// Client argument: the site's FQSN (default: the client name).
    pub const FQSN: &str = "fqsn";
    /// Client argument: whether the site is a leaf.
    pub const IS_LEAF: &str = "is_leaf";
    /// Default of [`IS_LEAF`].
    pub const IS_LEAF_DEFAULT: bool = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_keys_that_nvflare_spells_specially_are_exact() {
        assert_eq!(fl_ctx_key::EVENT_DEPTH, "###event_depth");
        assert_eq!(fl_ctx_key::RUN_NUM, "__run_num__");
        assert_eq!(stream::CTX_RC, "__RC__");
        assert_eq!(site_type::ALL, "@ALL");
        assert_eq!(reserved_topic::FED_EVENT, "fed.event");
        assert_eq!(process_type::CLIENT_JOB, "CJ");
    }

    #[test]
    fn dunder_keys_are_wrapped_in_double_underscores() {
        let keys = [
            fl_ctx_key::RUN_NUM,
            fl_ctx_key::IDENTITY_NAME,
            fl_ctx_key::FQSN,
            fl_ctx_key::IS_LEAF,
            fl_ctx_key::PROCESS_TYPE,
            fl_ctx_key::CLIENT_CONFIG,
            fl_ctx_key::JOB_META,
            fl_ctx_key::CLIENT_HIERARCHY,
            fl_ctx_key::PEER_CTX,
            fl_ctx_key::RUN_ABORT_SIGNAL,
            fl_ctx_key::RUN_ABORT_REQUESTED,
            fl_ctx_key::EXCEPTIONS,
            fl_ctx_key::EVENT_ID,
            fl_ctx_key::EVENT_DATA,
            fl_ctx_key::EVENT_ORIGIN,
            fl_ctx_key::EVENT_SCOPE,
            fl_ctx_key::TASK_NAME,
            fl_ctx_key::TASK_ID,
            fl_ctx_key::TASK_DATA,
            fl_ctx_key::TASK_RESULT,
            fl_ctx_key::SSID,
            fl_ctx_key::CURRENT_JOB_ID,
            fl_ctx_key::CLIENT_NAME,
            fl_ctx_key::CUSTOM_PROPS,
            reserved_topic::END_RUN,
            reserved_topic::STOP_CELLNET,
            special_task::TRY_AGAIN,
            special_task::END_RUN,
            stream::CTX_CHANNEL,
            stream::CTX_TOPIC,
            stream::CTX_END_STREAM,
        ];
        for k in keys {
            assert!(
                k.len() > 4 && k.starts_with("__") && k.ends_with("__"),
                "{k}"
            );
        }
    }

    #[test]
    fn event_types_start_with_one_underscore() {
        for e in [
            event_type::SYSTEM_BOOTSTRAP,
            event_type::START_RUN,
            event_type::END_RUN,
            event_type::CHECK_END_RUN_READINESS,
            event_type::ERROR_LOG_AVAILABLE,
            event_type::TASK_RESULT_RECEIVED,
        ] {
            assert!(e.starts_with('_') && !e.starts_with("__"), "{e}");
        }
    }

    #[test]
    fn streaming_headers_share_the_object_streamer_prefix() {
        for h in [
            stream::TOPIC_REQUEST,
            stream::TOPIC_ABORT,
            stream::HEADER_TX_ID,
            stream::HEADER_SEQ,
            stream::HEADER_TOPIC,
            stream::HEADER_CHANNEL,
            stream::HEADER_CTX,
            stream::HEADER_END_RESULT,
        ] {
            assert!(h.starts_with("ObjectStreamer."), "{h}");
        }
    }
}
