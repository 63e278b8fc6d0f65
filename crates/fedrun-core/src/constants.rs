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
