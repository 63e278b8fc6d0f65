//! Outgoing aux requests: preparing the Shareable and the cell message, and turning cell replies
//! into Shareables.
//!
//! Unlike NVFlare, unicast and multicast share one preparation path, so the message-root and
//! pass-through headers are copied for both, and `secure` is kept for
//! fire-and-forget sends.

use std::time::Duration;

use fedrun_cell::{header, CellCode, CellMessage, Payload};
use fedrun_core::constants::header_key;
use fedrun_core::{AppReturnCode, CellReturnCode, FlContext, ReturnCode, Shareable, Value};

/// Turns a timeout in seconds (NVFlare's float argument) into the [`Duration`] the aux messages
/// take: zero, negative and NaN become [`Duration::ZERO`] (fire-and-forget), `+inf` becomes
/// [`Duration::MAX`] (wait forever).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use fedrun_engine::aux_timeout_secs;
///
/// assert_eq!(aux_timeout_secs(-1.0), Duration::ZERO);
/// assert_eq!(aux_timeout_secs(f64::NAN), Duration::ZERO);
/// assert_eq!(aux_timeout_secs(1.5), Duration::from_millis(1500));
/// assert_eq!(aux_timeout_secs(f64::INFINITY), Duration::MAX);
/// ```
pub fn aux_timeout_secs(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else {
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

/// Python's truthiness of a header value: nil, `false`, zero, and empty strings / containers are
/// false; anything else is true.
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Nil => false,
        Value::Bool(b) => *b,
        Value::Int(_) => v.as_i64() != Some(0) && v.as_u64() != Some(0),
        Value::F32(_) | Value::F64(_) => v.as_f64().is_some_and(|f| f != 0.0),
        Value::Str(s) => !s.is_empty(),
        Value::Bin(b) => !b.is_empty(),
        Value::Array(a) | Value::Tuple(a) | Value::Set(a) => !a.is_empty(),
        Value::Map(m) => !m.is_empty(),
        _ => true,
    }
}

/// Sets the headers every outgoing aux request carries: `__topic__`, and `__peer_props__` = the
/// public props of `ctx` (private props never leave the site).
pub(crate) fn prepare_request(request: &mut Shareable, topic: &str, ctx: &FlContext) {
    request.set_header(header_key::TOPIC, topic);
    request.set_peer_props(ctx.public_props());
}

/// The cell message carrying `request`, with the message-root headers copied from the request
/// (`__msg_root_id__` → `cn__msg_root_id`, `__msg_root_ttl__` → `cn__msg_root_ttl` when truthy,
/// `__pass_through__` truthy → `cn__pass_through = true`; absent otherwise).
pub(crate) fn cell_message(request: Shareable) -> CellMessage {
    let root_id = request
        .header_or_none(header_key::MSG_ROOT_ID)
        .filter(|v| truthy(v))
        .cloned();
    let root_ttl = request
        .header_or_none(header_key::MSG_ROOT_TTL)
        .filter(|v| truthy(v))
        .cloned();
    let pass_through = request
        .header_or_none(header_key::PASS_THROUGH)
        .is_some_and(truthy);
    let mut msg = CellMessage::new(request);
    if let Some(id) = root_id {
        msg.headers.insert(header::MSG_ROOT_ID, id);
    }
    if let Some(ttl) = root_ttl {
        msg.headers.insert(header::MSG_ROOT_TTL, ttl);
    }
    if pass_through {
        msg.headers.set_pass_through(true);
    }
    msg
}

/// Converts one cell reply into the Shareable the caller sees:
///
/// | cell code | Shareable |
/// |---|---|
/// | `ok` with a Shareable payload | the payload |
/// | `ok` with another payload | `ERROR` |
/// | `timeout` | `TIMEOUT` |
/// | `comm_error` | `COMMUNICATION_ERROR` |
/// | `process_exception` | `EXECUTION_EXCEPTION` |
/// | `abort_run`, `invalid_request`, `invalid_session`, `service_unavailable` | the cell code, verbatim |
/// | `authentication_error` | `unauthenticated` |
/// | anything else | `ERROR` |
///
/// `optional` lowers the log level of failures to debug.
pub(crate) fn convert_reply(
    reply: CellMessage,
    target: &str,
    log_prefix: &str,
    optional: bool,
) -> Shareable {
    let code = reply.return_code();
    let rc: ReturnCode = match &code {
        CellCode::Known(CellReturnCode::Ok) => {
            let kind = payload_kind(&reply.payload);
            if let Some(s) = reply.payload.into_shareable() {
                return s;
            }
            log::error!(
                "{log_prefix} reply from {target} is ok but its payload is {kind}, not a Shareable"
            );
            return Shareable::make_reply(AppReturnCode::Error, None);
        }
        CellCode::Known(CellReturnCode::Timeout) => AppReturnCode::Timeout.into(),
        CellCode::Known(CellReturnCode::CommError) => AppReturnCode::CommunicationError.into(),
        CellCode::Known(CellReturnCode::ProcessException) => {
            AppReturnCode::ExecutionException.into()
        }
        CellCode::Known(
            c @ (CellReturnCode::AbortRun
            | CellReturnCode::InvalidRequest
            | CellReturnCode::InvalidSession
            | CellReturnCode::ServiceUnavailable),
        ) => (*c).into(),
        CellCode::Known(CellReturnCode::AuthenticationError) => {
            CellReturnCode::Unauthenticated.into()
        }
        CellCode::Known(_) | CellCode::Unknown(_) => AppReturnCode::Error.into(),
    };
    let level = if optional {
        log::Level::Debug
    } else {
        log::Level::Warn
    };
    log::log!(
        level,
        "{log_prefix} request to {target} failed: cell code {code} ({}) -> {rc}",
        reply.headers.error().unwrap_or("no detail")
    );
    Shareable::make_reply(rc, None)
}

fn payload_kind(p: &Payload) -> &'static str {
    match p {
        Payload::None => "empty",
        Payload::Bytes(_) => "bytes",
        Payload::Value(v) => v.kind(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use fedrun_core::Map;

    fn reply(code: &str) -> CellMessage {
        CellMessage::new(Shareable::new()).with_header(header::RETURN_CODE, code)
    }

    fn rc(code: &str) -> String {
        convert_reply(reply(code), "t", "test", true)
            .return_code()
            .as_str()
            .to_owned()
    }

    #[test]
    fn reply_conversion_follows_the_table() {
        let cases = [
            ("timeout", "TIMEOUT"),
            ("comm_error", "COMMUNICATION_ERROR"),
            ("process_exception", "EXECUTION_EXCEPTION"),
            ("abort_run", "abort_run"),
            ("invalid_request", "invalid_request"),
            ("invalid_session", "invalid_session"),
            ("service_unavailable", "service_unavailable"),
            ("authentication_error", "unauthenticated"),
            ("unauthenticated", "ERROR"),
            ("target_unreachable", "ERROR"),
            ("invalid_target", "ERROR"),
            ("msg_too_big", "ERROR"),
            ("filter_error", "ERROR"),
            ("brand_new", "ERROR"),
        ];
        for (cell, app) in cases {
            assert_eq!(rc(cell), app, "cell code {cell}");
        }
    }

    #[test]
    fn ok_reply_yields_its_shareable_and_a_non_shareable_yields_error() {
        let mut s = Shareable::new();
        s.insert("answer", 42);
        s.add_cookie("c", 1);
        let got = convert_reply(CellMessage::new(s.clone()), "t", "test", false);
        assert_eq!(got, s);
        let got = convert_reply(CellMessage::new(Payload::value(7)), "t", "test", false);
        assert_eq!(got.return_code().as_str(), "ERROR");
        let got = convert_reply(CellMessage::empty(), "t", "test", false);
        assert_eq!(got.return_code().as_str(), "ERROR");
    }

    #[test]
    fn msg_root_headers_are_copied_only_when_truthy() {
        let mut s = Shareable::new();
        s.set_header(header_key::MSG_ROOT_ID, "root-1");
        s.set_header(header_key::MSG_ROOT_TTL, 30.0);
        s.set_header(header_key::PASS_THROUGH, true);
        let m = cell_message(s);
        assert_eq!(m.headers.msg_root_id(), Some("root-1"));
        assert_eq!(m.headers.msg_root_ttl(), Some(30.0));
        assert_eq!(m.headers.pass_through(), Some(true));

        let mut s = Shareable::new();
        s.set_header(header_key::MSG_ROOT_ID, "");
        s.set_header(header_key::MSG_ROOT_TTL, 0);
        s.set_header(header_key::PASS_THROUGH, false);
        let m = cell_message(s);
        assert!(!m.headers.contains_key(header::MSG_ROOT_ID));
        assert!(!m.headers.contains_key(header::MSG_ROOT_TTL));
        assert!(!m.headers.contains_key(header::PASS_THROUGH));
    }

    #[test]
    fn prepared_request_carries_topic_and_only_public_props() {
        let mut ctx = FlContext::new();
        ctx.set_prop("public", 1, false, false).unwrap();
        ctx.set_prop("secret", 2, true, false).unwrap();
        let mut s = Shareable::new();
        prepare_request(&mut s, "t1", &ctx);
        assert_eq!(
            s.header_or_none(header_key::TOPIC).and_then(Value::as_str),
            Some("t1")
        );
        let props = s.peer_props().and_then(Value::as_map).unwrap();
        assert!(props.contains_key("public"));
        assert!(!props.contains_key("secret"));
    }

    #[test]
    fn truthiness_follows_python() {
        for falsy in [
            Value::Nil,
            Value::from(false),
            Value::from(0),
            Value::from(0.0),
            Value::from(""),
            Value::Map(Map::new()),
            Value::from(Vec::<Value>::new()),
        ] {
            assert!(!truthy(&falsy), "{falsy:?}");
        }
        for t in [
            Value::from(true),
            Value::from(1),
            Value::from(-1),
            Value::from(0.5),
            Value::from("x"),
        ] {
            assert!(truthy(&t), "{t:?}");
        }
    }
}
