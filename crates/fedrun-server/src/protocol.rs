//! The wire form of the server side of the task protocol (pinned in `task-protocol.md`):
//! reading `get_task` / `submit_update` requests and building the exact replies.
//!
//! Kept apart from the task manager's bookkeeping so that the header names and their order —
//! which Python clients read — are in one place, next to the capture they come from
//! (`tests/data/nvflare-2.9/sim_vectors.decoded.jsonl`, the `server>` messages).

use std::time::Duration;

use fedrun_core::constants::{fl_ctx_key, header_key, special_task, task_header};
use fedrun_core::{Map, PeerContext, Shareable, Value};

/// The `method` of the task operator of a broadcast task.
pub(crate) const BROADCAST_METHOD: &str = "bcast";

/// Who sent a request, as its peer context says.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Requester {
    /// `__identity_name__` (the site), when it is a string.
    pub(crate) identity: Option<String>,
    /// `__run_num__` (the job), when it is a string.
    pub(crate) run_num: Option<String>,
}

impl Requester {
    /// The sender of `request` from its `__peer_ctx__`; `None` without a (well-formed) one.
    pub(crate) fn of(request: &Shareable) -> Option<Requester> {
        let ctx = request.peer_context()?;
        let text = |key: &str| ctx.get(key).and_then(Value::as_str).map(str::to_owned);
        Some(Requester {
            identity: text(fl_ctx_key::IDENTITY_NAME),
            run_num: text(fl_ctx_key::RUN_NUM),
        })
    }
}

/// A duration in seconds as NVFlare sends it: an integer when whole, else a float.
pub(crate) fn seconds(d: Duration) -> Value {
    if d.subsec_nanos() == 0 {
        Value::from(d.as_secs())
    } else {
        Value::from(d.as_secs_f64())
    }
}

/// The optional headers every non-end reply carries.
#[derive(Clone, Debug)]
pub(crate) struct PollHints {
    /// `__wait_time__`: how long the client waits before polling again.
    pub(crate) wait_time: Duration,
    /// `min_get_task_timeout`, when configured.
    pub(crate) min_get_task_timeout: Option<Duration>,
}

/// `task_name = __try_again__`: nothing for this client now.
pub(crate) fn try_again(server: &PeerContext, hints: &PollHints) -> Shareable {
    let mut reply = Shareable::new();
    reply.set_header(task_header::TASK_NAME, special_task::TRY_AGAIN);
    reply.set_header(header_key::WAIT_TIME, seconds(hints.wait_time));
    if let Some(t) = hints.min_get_task_timeout {
        reply.set_header(task_header::MIN_GET_TASK_TIMEOUT, seconds(t));
    }
    reply.set_peer_context(server.clone());
    reply
}

/// `task_name = __end_run__`, with the empty task id and cookie jar of the capture.
pub(crate) fn end_run(server: &PeerContext) -> Shareable {
    let mut reply = Shareable::new();
    let mut jar = Map::new();
    jar.insert(header_key::TASK_ID, "");
    reply.set_cookie_jar(jar);
    reply.set_header(header_key::TASK_ID, "");
    reply.set_header(task_header::TASK_NAME, special_task::END_RUN);
    reply.set_peer_context(server.clone());
    reply
}

/// What a real task reply is made of.
pub(crate) struct TaskSend<'a> {
    /// The task's id.
    pub(crate) task_id: &'a str,
    /// The task's name.
    pub(crate) name: &'a str,
    /// The task data (its headers and body are copied).
    pub(crate) data: &'a Shareable,
    /// The workflow that posted it (`__workflow__` cookie).
    pub(crate) workflow: &'a str,
    /// The task timeout, for the task operator and `__msg_root_ttl__`.
    pub(crate) timeout: Option<Duration>,
    /// A fresh message-root id.
    pub(crate) msg_root_id: &'a str,
    /// The server's peer context.
    pub(crate) server: &'a PeerContext,
    /// Polling hints.
    pub(crate) hints: &'a PollHints,
}

/// A real task, with the headers of the capture in the capture's order (after the data's own
/// headers, e.g. `__content_type__`, `current_round`, `num_rounds`): `__cookie_jar__`,
/// `__task_name__`, `__task_operator__`, `__task_id__`, `__msg_root_id__`, `__msg_root_ttl__`
/// (with a timeout only), `__audit_event_id__`, `__wait_time__`, `min_get_task_timeout` (when
/// configured), `task_name`, `__peer_ctx__`.
pub(crate) fn task(send: &TaskSend<'_>) -> Shareable {
    let mut reply = send.data.clone();
    let mut jar = reply.cookie_jar().cloned().unwrap_or_default();
    jar.insert(header_key::WORKFLOW, send.workflow);
    jar.insert(header_key::TASK_ID, send.task_id);
    reply.set_cookie_jar(jar);
    reply.set_header(header_key::TASK_NAME, send.name);
    if reply.header_or_none(header_key::TASK_OPERATOR).is_none() {
        let mut op = Map::new();
        op.insert("op_id", send.name);
        op.insert("method", BROADCAST_METHOD);
        op.insert("timeout", send.timeout.map_or(Value::from(0), seconds));
        reply.set_header(header_key::TASK_OPERATOR, op);
    }
    reply.set_header(header_key::TASK_ID, send.task_id);
    reply.set_header(header_key::MSG_ROOT_ID, send.msg_root_id);
    if let Some(t) = send.timeout {
        reply.set_header(header_key::MSG_ROOT_TTL, seconds(t));
    }
    reply.set_header(header_key::AUDIT_EVENT_ID, Value::Nil);
    reply.set_header(header_key::WAIT_TIME, seconds(send.hints.wait_time));
    if let Some(t) = send.hints.min_get_task_timeout {
        reply.set_header(task_header::MIN_GET_TASK_TIMEOUT, seconds(t));
    }
    reply.set_header(task_header::TASK_NAME, send.name);
    reply.set_peer_context(send.server.clone());
    reply
}

/// The task id a result answers: the echoed cookie jar's `__task_id__`, else the
/// `__task_id__` header.
pub(crate) fn result_task_id(result: &Shareable) -> Option<String> {
    result
        .cookie(header_key::TASK_ID)
        .and_then(Value::as_str)
        .or_else(|| {
            result
                .header_or_none(header_key::TASK_ID)
                .and_then(Value::as_str)
        })
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

/// The `last_task_id` header of a `get_task` request.
pub(crate) fn last_task_id(request: &Shareable) -> Option<&str> {
    request
        .header_or_none(task_header::LAST_TASK_ID)
        .and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedrun_core::{DataKind, Dxo};

    fn server() -> PeerContext {
        let mut ctx = PeerContext::default();
        ctx.set("__run_num__", "simulate_job");
        ctx.set("__identity_name__", "server");
        ctx
    }

    fn header_keys(s: &Shareable) -> Vec<String> {
        s.headers()
            .unwrap()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn task_reply_has_the_captured_headers_in_the_captured_order() {
        let mut data = Dxo::new(DataKind::Weights, Map::new()).to_shareable();
        data.set_header("current_round", 0);
        data.set_header("num_rounds", 2);
        data.add_cookie("contribution_round", 0);
        let hints = PollHints {
            wait_time: Duration::from_secs(2),
            min_get_task_timeout: None,
        };
        let reply = task(&TaskSend {
            task_id: "t1",
            name: "train",
            data: &data,
            workflow: "sag",
            timeout: Some(Duration::from_secs(60)),
            msg_root_id: "m1",
            server: &server(),
            hints: &hints,
        });
        // The capture (idx 8), minus nothing.
        assert_eq!(
            header_keys(&reply),
            [
                "__content_type__",
                "current_round",
                "num_rounds",
                "__cookie_jar__",
                "__task_name__",
                "__task_operator__",
                "__task_id__",
                "__msg_root_id__",
                "__msg_root_ttl__",
                "__audit_event_id__",
                "__wait_time__",
                "task_name",
                "__peer_ctx__",
            ]
        );
        let jar: Vec<&str> = reply
            .cookie_jar()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(jar, ["contribution_round", "__workflow__", "__task_id__"]);
        assert_eq!(
            reply.header_or_none("__wait_time__"),
            Some(&Value::from(2u64))
        );
        assert_eq!(result_task_id(&reply).as_deref(), Some("t1"));
        assert!(reply.get("DXO").is_some());
    }

    #[test]
    fn end_run_reply_matches_the_capture() {
        let reply = end_run(&server());
        assert_eq!(
            header_keys(&reply),
            ["__cookie_jar__", "__task_id__", "task_name", "__peer_ctx__"]
        );
        assert_eq!(reply.cookie("__task_id__"), Some(&Value::from("")));
        assert_eq!(result_task_id(&reply), None);
    }

    #[test]
    fn fractional_waits_are_floats_and_whole_ones_integers() {
        assert_eq!(seconds(Duration::from_millis(500)), Value::from(0.5));
        assert_eq!(seconds(Duration::from_secs(3)), Value::from(3u64));
    }
}
