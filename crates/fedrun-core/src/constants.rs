//! NVFlare's string constants, exactly as they travel on the wire.
//!
//! Grouped by what they name. Each value is the literal string NVFlare 2.9 uses (engine spec §0.1);
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

/// Process types (`ProcessType`). A client job engine always runs as [`CLIENT_JOB`].
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
