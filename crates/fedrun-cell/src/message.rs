//! The CellNet message: ordered headers plus a payload.
//!
//! A [`CellMessage`] is what cells exchange. Its header map carries the routing and
//! request/reply bookkeeping under the `cn__*` keys (listed, with their exact strings, in
//! [`header`]) next to any application header (`project_name`, auth tokens, ...). Header order
//! is kept ([`indexmap::IndexMap`]) because a later TCP transport must re-encode frames byte for
//! byte.
//!
//! Inside one process the payload is never encoded: a Shareable travels as an
//! `Arc<Value>`, so every hop shares the same allocation. [`Payload::encoding`] still reports
//! what `cn__payload_encoding` a wire transport would use.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use fedrun_core::{CellReturnCode, Shareable, Value};
use indexmap::IndexMap;

/// The exact header keys of a cell message.
pub mod header {
    /// Prefix of every CellNet header.
    pub const CELLNET_PREFIX: &str = "cn__";
    /// Prefix of the streaming layer's headers.
    pub const STREAM_PREFIX: &str = "sm__";

    /// `"req"`, `"reply"` or `"return"` (see [`MsgType`](super::MsgType)).
    pub const MSG_TYPE: &str = "cn__msg_type";
    /// Channel (service) name.
    pub const CHANNEL: &str = "cn__channel";
    /// Topic within the channel.
    pub const TOPIC: &str = "cn__topic";
    /// FQCN of the cell that created the message.
    pub const ORIGIN: &str = "cn__origin";
    /// FQCN of the final target cell.
    pub const DESTINATION: &str = "cn__destination";
    /// FQCN of the cell that sent this hop.
    pub const FROM: &str = "cn__from";
    /// FQCN of the next hop.
    pub const TO: &str = "cn__to";
    /// Request id: a uuid4 string, or a list of them in a reply answering several requests.
    pub const REQ_ID: &str = "cn__req_id";
    /// Whether the request wants a reply.
    pub const REPLY_EXPECTED: &str = "cn__reply_expected";
    /// Reply status (a [`CellReturnCode`](fedrun_core::CellReturnCode) string).
    pub const RETURN_CODE: &str = "cn__return_code";
    /// Optional error text in a reply.
    pub const ERROR: &str = "cn__error";
    /// `"none"`, `"bytes"` or `"fobs"` (see [`PayloadEncoding`](super::PayloadEncoding)).
    pub const PAYLOAD_ENCODING: &str = "cn__payload_encoding";
    /// Payload size in bytes (informational).
    pub const PAYLOAD_LEN: &str = "cn__payload_len";
    /// Hops: a list of `[fqcn, epoch seconds]`.
    pub const ROUTE: &str = "cn__route";
    /// Epoch seconds at send.
    pub const SEND_TIME: &str = "cn__send_time";
    /// End-to-end payload encryption requested.
    pub const SECURE: &str = "cn__secure";
    /// Errors about this message are logged at debug level only.
    pub const OPTIONAL: &str = "cn__optional";
    /// In a `return` message: the headers of the undeliverable request.
    pub const ORIGINAL_HEADERS: &str = "cn__original_headers";
    /// In a `return` message: `"cant_forward"` or `"intercept"`.
    pub const RETURN_REASON: &str = "cn__return_reason";
    /// Ad-hoc listener offer.
    pub const CONN_URL: &str = "cn__conn_url";
    /// Id of the message tree download transactions are attached to.
    pub const MSG_ROOT_ID: &str = "cn__msg_root_id";
    /// Lifetime (seconds) of that message tree.
    pub const MSG_ROOT_TTL: &str = "cn__msg_root_ttl";
    /// Receiver should keep tensor download references lazy.
    pub const PASS_THROUGH: &str = "cn__pass_through";
    /// Cross-client-family traffic must go through the server.
    pub const SERVER_TRANSIT_REQUIRED: &str = "cn__server_transit_required";
    /// P2P encryption bookkeeping: clear payload length.
    pub const CLEAR_PAYLOAD_LEN: &str = "cn__clear_payload_len";
    /// P2P encryption bookkeeping: payload is encrypted.
    pub const ENCRYPTED: &str = "cn__encrypted";

    /// Local only, never on the wire: the download references (a list of
    /// `{"fqcn", "ref_id", "dot"}` maps) of a payload whose arrays must be pulled from their
    /// producer. Set by the wire transport on a received message whose payload came with
    /// download-reference datums (then resolved by the cell's
    /// [`PayloadResolver`](crate::PayloadResolver)); set by a sender on an outgoing message to
    /// have the transport append those datums to the payload.
    pub const DOWNLOAD_REFS: &str = "fedrun.download_refs";
}

/// The kind of a cell message (`cn__msg_type`).
///
/// # Example
///
/// ```
/// use fedrun_cell::MsgType;
/// assert_eq!(MsgType::Reply.as_str(), "reply");
/// assert_eq!(MsgType::from_wire("return"), Some(MsgType::Return));
/// assert_eq!(MsgType::from_wire("REQ"), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// `"req"`: a request (or a fire-and-forget message).
    Req,
    /// `"reply"`: the answer to a request.
    Reply,
    /// `"return"`: a request sent back because it could not be delivered.
    Return,
}

impl MsgType {
    /// The exact wire string.
    pub fn as_str(&self) -> &'static str {
        match self {
            MsgType::Req => "req",
            MsgType::Reply => "reply",
            MsgType::Return => "return",
        }
    }

    /// Parses the exact wire string.
    pub fn from_wire(s: &str) -> Option<MsgType> {
        match s {
            "req" => Some(MsgType::Req),
            "reply" => Some(MsgType::Reply),
            "return" => Some(MsgType::Return),
            _ => None,
        }
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a payload is (or would be) encoded on the wire (`cn__payload_encoding`).
///
/// # Example
///
/// ```
/// use fedrun_cell::PayloadEncoding;
/// assert_eq!(PayloadEncoding::Fobs.as_str(), "fobs");
/// assert_eq!(PayloadEncoding::from_wire("none"), Some(PayloadEncoding::None));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadEncoding {
    /// `"none"`: no payload.
    None,
    /// `"bytes"`: raw bytes.
    Bytes,
    /// `"fobs"`: a FOBS-encoded object.
    Fobs,
}

impl PayloadEncoding {
    /// The exact wire string.
    pub fn as_str(&self) -> &'static str {
        match self {
            PayloadEncoding::None => "none",
            PayloadEncoding::Bytes => "bytes",
            PayloadEncoding::Fobs => "fobs",
        }
    }

    /// Parses the exact wire string.
    pub fn from_wire(s: &str) -> Option<PayloadEncoding> {
        match s {
            "none" => Some(PayloadEncoding::None),
            "bytes" => Some(PayloadEncoding::Bytes),
            "fobs" => Some(PayloadEncoding::Fobs),
            _ => None,
        }
    }
}

impl fmt::Display for PayloadEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value of a `cn__return_code` header: a code fedrun knows, or whatever string a peer
/// sent (kept verbatim rather than rejected, so a newer peer's code is still reported).
///
/// # Example
///
/// ```
/// use fedrun_cell::CellCode;
/// use fedrun_core::CellReturnCode;
///
/// assert_eq!(CellCode::from("timeout"), CellCode::Known(CellReturnCode::Timeout));
/// assert_eq!(CellCode::from("brand_new").as_str(), "brand_new");
/// assert!(CellCode::from(CellReturnCode::Ok).is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum CellCode {
    /// A known cell return code.
    Known(CellReturnCode),
    /// A code fedrun does not know, as received.
    Unknown(String),
}

impl CellCode {
    /// The exact wire string.
    pub fn as_str(&self) -> &str {
        match self {
            CellCode::Known(c) => c.as_str(),
            CellCode::Unknown(s) => s,
        }
    }

    /// The known code, if it is one.
    pub fn known(&self) -> Option<CellReturnCode> {
        match self {
            CellCode::Known(c) => Some(*c),
            CellCode::Unknown(_) => None,
        }
    }

    /// True only for `ok`.
    pub fn is_ok(&self) -> bool {
        *self == CellCode::Known(CellReturnCode::Ok)
    }
}

impl From<CellReturnCode> for CellCode {
    fn from(c: CellReturnCode) -> Self {
        CellCode::Known(c)
    }
}

impl From<&str> for CellCode {
    fn from(s: &str) -> Self {
        CellReturnCode::from_wire(s)
            .map_or_else(|| CellCode::Unknown(s.to_owned()), CellCode::Known)
    }
}

impl PartialEq<CellReturnCode> for CellCode {
    fn eq(&self, other: &CellReturnCode) -> bool {
        *self == CellCode::Known(*other)
    }
}

impl fmt::Display for CellCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The header map of a cell message: insertion-ordered, string keys, [`Value`] values.
///
/// Typed getters read the `cn__*` header keys and return `None` when the key is
/// absent **or** holds a value of the wrong type (the raw value stays readable with
/// [`Headers::get`]). Any other key is an application header.
///
/// # Example
///
/// ```
/// use fedrun_cell::{header, Headers, MsgType};
///
/// let mut h = Headers::new();
/// h.set_msg_type(MsgType::Req);
/// h.set_channel("aux_communication");
/// h.insert("project_name", "demo");
/// assert_eq!(h.msg_type(), Some(MsgType::Req));
/// assert_eq!(h.get(header::CHANNEL).and_then(|v| v.as_str()), Some("aux_communication"));
/// assert_eq!(h.app_headers().map(|(k, _)| k).collect::<Vec<_>>(), ["project_name"]);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Headers(IndexMap<String, Value>);

macro_rules! str_header {
    ($get:ident, $set:ident, $key:path, $doc:literal) => {
        #[doc = concat!("`", stringify!($key), "`: ", $doc)]
        pub fn $get(&self) -> Option<&str> {
            self.get($key).and_then(Value::as_str)
        }

        #[doc = concat!("Sets ", $doc)]
        pub fn $set(&mut self, value: impl Into<String>) {
            self.insert($key, value.into());
        }
    };
}

macro_rules! bool_header {
    ($get:ident, $set:ident, $key:path, $doc:literal) => {
        #[doc = concat!("`", stringify!($key), "`: ", $doc)]
        pub fn $get(&self) -> Option<bool> {
            self.get($key).and_then(Value::as_bool)
        }

        #[doc = concat!("Sets ", $doc)]
        pub fn $set(&mut self, value: bool) {
            self.insert($key, value);
        }
    };
}

macro_rules! f64_header {
    ($get:ident, $set:ident, $key:path, $doc:literal) => {
        #[doc = concat!("`", stringify!($key), "`: ", $doc, " (any number is read as f64)")]
        pub fn $get(&self) -> Option<f64> {
            self.get($key).and_then(Value::as_f64)
        }

        #[doc = concat!("Sets ", $doc)]
        pub fn $set(&mut self, value: f64) {
            self.insert($key, value);
        }
    };
}

impl Headers {
    /// An empty header map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw value of a header.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// Whether the header is present.
    pub fn contains_key(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    /// Sets a header; an existing key keeps its position. Returns the previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Option<Value> {
        self.0.insert(key.into(), value.into())
    }

    /// Removes a header, keeping the order of the others. Returns its value.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.0.shift_remove(key)
    }

    /// All headers, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The application headers: those without the `cn__` or `sm__` prefix, in order.
    pub fn app_headers(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.iter().filter(|(k, _)| {
            !k.starts_with(header::CELLNET_PREFIX) && !k.starts_with(header::STREAM_PREFIX)
        })
    }

    /// The underlying ordered map.
    pub fn as_map(&self) -> &IndexMap<String, Value> {
        &self.0
    }

    /// Consumes the headers into the ordered map.
    pub fn into_map(self) -> IndexMap<String, Value> {
        self.0
    }

    /// `cn__msg_type`: the kind of message (`None` if absent or not a known kind).
    pub fn msg_type(&self) -> Option<MsgType> {
        self.get(header::MSG_TYPE)
            .and_then(Value::as_str)
            .and_then(MsgType::from_wire)
    }

    /// Sets the kind of message.
    pub fn set_msg_type(&mut self, t: MsgType) {
        self.insert(header::MSG_TYPE, t.as_str());
    }

    str_header!(channel, set_channel, header::CHANNEL, "the channel.");
    str_header!(topic, set_topic, header::TOPIC, "the topic.");
    str_header!(
        origin,
        set_origin,
        header::ORIGIN,
        "the FQCN of the creator."
    );
    str_header!(
        destination,
        set_destination,
        header::DESTINATION,
        "the FQCN of the final target."
    );
    str_header!(
        from,
        set_from,
        header::FROM,
        "the FQCN of this hop's sender."
    );
    str_header!(to, set_to, header::TO, "the FQCN of the next hop.");
    str_header!(
        error,
        set_error,
        header::ERROR,
        "the error text of a reply."
    );
    str_header!(
        msg_root_id,
        set_msg_root_id,
        header::MSG_ROOT_ID,
        "the message-root id."
    );

    /// `cn__req_id` when it is a single string.
    pub fn req_id(&self) -> Option<&str> {
        self.get(header::REQ_ID).and_then(Value::as_str)
    }

    /// Every request id the message carries: one for a string, each string element for a list
    /// (a reply may answer several requests), none when absent. Empty strings (streamed
    /// replies) are skipped.
    pub fn req_ids(&self) -> Vec<&str> {
        match self.get(header::REQ_ID) {
            Some(Value::Str(s)) if !s.is_empty() => vec![s.as_str()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .filter(|s| !s.is_empty())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Sets a single request id.
    pub fn set_req_id(&mut self, id: impl Into<String>) {
        self.insert(header::REQ_ID, id.into());
    }

    /// Sets a list of request ids.
    pub fn set_req_ids<I, S>(&mut self, ids: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let list: Vec<Value> = ids.into_iter().map(|s| Value::Str(s.into())).collect();
        self.insert(header::REQ_ID, list);
    }

    bool_header!(
        reply_expected,
        set_reply_expected,
        header::REPLY_EXPECTED,
        "whether a reply is wanted."
    );
    bool_header!(secure, set_secure, header::SECURE, "end-to-end encryption.");
    bool_header!(
        optional,
        set_optional,
        header::OPTIONAL,
        "errors logged at debug level only."
    );
    bool_header!(
        pass_through,
        set_pass_through,
        header::PASS_THROUGH,
        "keep download references lazy."
    );

    /// `cn__return_code`: the reply status, known or not (`None` if absent or not a string).
    pub fn return_code(&self) -> Option<CellCode> {
        self.get(header::RETURN_CODE)
            .and_then(Value::as_str)
            .map(CellCode::from)
    }

    /// Sets the reply status.
    pub fn set_return_code(&mut self, code: impl Into<CellCode>) {
        let code: CellCode = code.into();
        self.insert(header::RETURN_CODE, code.as_str());
    }

    /// `cn__payload_encoding` (`None` if absent or unknown).
    pub fn payload_encoding(&self) -> Option<PayloadEncoding> {
        self.get(header::PAYLOAD_ENCODING)
            .and_then(Value::as_str)
            .and_then(PayloadEncoding::from_wire)
    }

    /// Sets the payload encoding.
    pub fn set_payload_encoding(&mut self, e: PayloadEncoding) {
        self.insert(header::PAYLOAD_ENCODING, e.as_str());
    }

    /// `cn__payload_len`: payload size in bytes.
    pub fn payload_len(&self) -> Option<u64> {
        self.get(header::PAYLOAD_LEN).and_then(Value::as_u64)
    }

    /// Sets the payload size.
    pub fn set_payload_len(&mut self, len: u64) {
        self.insert(header::PAYLOAD_LEN, len);
    }

    /// `cn__route`: the hops as `(fqcn, epoch seconds)`; `None` if absent or malformed.
    pub fn route(&self) -> Option<Vec<(&str, f64)>> {
        let hops = self.get(header::ROUTE)?.as_array()?;
        hops.iter()
            .map(|hop| match hop.as_array() {
                Some([fqcn, time]) => Some((fqcn.as_str()?, time.as_f64()?)),
                _ => None,
            })
            .collect()
    }

    /// Replaces the route.
    pub fn set_route<I, S>(&mut self, hops: I)
    where
        I: IntoIterator<Item = (S, f64)>,
        S: Into<String>,
    {
        let list: Vec<Value> = hops
            .into_iter()
            .map(|(fqcn, t)| Value::Array(vec![Value::Str(fqcn.into()), Value::F64(t)]))
            .collect();
        self.insert(header::ROUTE, list);
    }

    /// Appends a hop to the route (creating it if absent or not a list).
    pub fn push_route(&mut self, fqcn: impl Into<String>, time: f64) {
        let hop = Value::Array(vec![Value::Str(fqcn.into()), Value::F64(time)]);
        match self.0.get_mut(header::ROUTE) {
            Some(Value::Array(hops)) => hops.push(hop),
            _ => {
                self.insert(header::ROUTE, vec![hop]);
            }
        }
    }

    f64_header!(
        send_time,
        set_send_time,
        header::SEND_TIME,
        "the send time."
    );
    f64_header!(
        msg_root_ttl,
        set_msg_root_ttl,
        header::MSG_ROOT_TTL,
        "the message-root lifetime."
    );
}

impl<K: Into<String>, V: Into<Value>> FromIterator<(K, V)> for Headers {
    fn from_iter<T: IntoIterator<Item = (K, V)>>(iter: T) -> Self {
        Headers(
            iter.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }
}

impl From<IndexMap<String, Value>> for Headers {
    fn from(map: IndexMap<String, Value>) -> Self {
        Headers(map)
    }
}

impl IntoIterator for Headers {
    type Item = (String, Value);
    type IntoIter = indexmap::map::IntoIter<String, Value>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// The body of a cell message.
///
/// In-process the payload is never encoded: bytes are shared ([`Bytes`]) and values are shared
/// behind an [`Arc`], so routing a message never copies its body.
///
/// # Example
///
/// ```
/// use fedrun_cell::{Payload, PayloadEncoding};
/// use fedrun_core::Shareable;
///
/// let p = Payload::shareable(Shareable::new());
/// assert!(p.as_shareable().is_some());
/// assert_eq!(p.encoding(), PayloadEncoding::Fobs);
/// assert_eq!(Payload::None.encoding(), PayloadEncoding::None);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Payload {
    /// No payload.
    #[default]
    None,
    /// Raw bytes.
    Bytes(Bytes),
    /// A decoded value (a Shareable travels as `Value::Shareable`).
    Value(Arc<Value>),
}

impl Payload {
    /// A Shareable payload: `Payload::Value(Arc::new(Value::Shareable(..)))`.
    pub fn shareable(s: Shareable) -> Payload {
        Payload::Value(Arc::new(Value::Shareable(Box::new(s))))
    }

    /// A value payload.
    pub fn value(v: impl Into<Value>) -> Payload {
        Payload::Value(Arc::new(v.into()))
    }

    /// The Shareable, if the payload is one.
    pub fn as_shareable(&self) -> Option<&Shareable> {
        match self {
            Payload::Value(v) => v.as_shareable(),
            _ => None,
        }
    }

    /// The Shareable, owned: moved out when this is the only reference, cloned otherwise.
    pub fn into_shareable(self) -> Option<Shareable> {
        match self {
            Payload::Value(v) => match Arc::try_unwrap(v) {
                Ok(Value::Shareable(s)) => Some(*s),
                Ok(_) => None,
                Err(shared) => shared.as_shareable().cloned(),
            },
            _ => None,
        }
    }

    /// The shared value, if the payload is a value.
    pub fn as_value(&self) -> Option<&Arc<Value>> {
        match self {
            Payload::Value(v) => Some(v),
            _ => None,
        }
    }

    /// The bytes, if the payload is raw bytes.
    pub fn as_bytes(&self) -> Option<&Bytes> {
        match self {
            Payload::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// Whether there is no payload.
    pub fn is_none(&self) -> bool {
        matches!(self, Payload::None)
    }

    /// The `cn__payload_encoding` a wire transport would use, following NVFlare's rule:
    /// absent → `none`, bytes-like → `bytes`, anything else → `fobs`. A `Value::Nil` counts as
    /// absent and a `Value::Bin` as bytes-like, like Python's `None` and `bytes`.
    pub fn encoding(&self) -> PayloadEncoding {
        match self {
            Payload::None => PayloadEncoding::None,
            Payload::Bytes(_) => PayloadEncoding::Bytes,
            Payload::Value(v) => match v.as_ref() {
                Value::Nil => PayloadEncoding::None,
                Value::Bin(_) => PayloadEncoding::Bytes,
                _ => PayloadEncoding::Fobs,
            },
        }
    }

    /// The payload size when it is known without encoding (no payload: 0, bytes: their length);
    /// `None` for a value, whose size only exists once encoded.
    pub fn known_len(&self) -> Option<u64> {
        match self {
            Payload::None => Some(0),
            Payload::Bytes(b) => Some(b.len() as u64),
            Payload::Value(v) => match v.as_ref() {
                Value::Nil => Some(0),
                Value::Bin(b) => Some(b.len() as u64),
                _ => None,
            },
        }
    }
}

impl From<Shareable> for Payload {
    fn from(s: Shareable) -> Self {
        Payload::shareable(s)
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload::Bytes(b)
    }
}

impl From<Value> for Payload {
    fn from(v: Value) -> Self {
        Payload::Value(Arc::new(v))
    }
}

impl From<Arc<Value>> for Payload {
    fn from(v: Arc<Value>) -> Self {
        Payload::Value(v)
    }
}

/// A CellNet message: headers and payload.
///
/// # Example
///
/// ```
/// use fedrun_cell::{CellMessage, Payload};
/// use fedrun_core::{CellReturnCode, Shareable};
///
/// let msg = CellMessage::new(Shareable::new()).with_header("project_name", "demo");
/// assert!(msg.payload.as_shareable().is_some());
/// assert_eq!(msg.headers.get("project_name").and_then(|v| v.as_str()), Some("demo"));
/// // a message without `cn__return_code` counts as ok, like NVFlare's reply conversion
/// assert_eq!(msg.return_code(), CellReturnCode::Ok);
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CellMessage {
    /// The headers (`cn__*` and application headers).
    pub headers: Headers,
    /// The body.
    pub payload: Payload,
}

impl CellMessage {
    /// A message with this payload and no headers.
    pub fn new(payload: impl Into<Payload>) -> Self {
        CellMessage {
            headers: Headers::new(),
            payload: payload.into(),
        }
    }

    /// A message with neither headers nor payload.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builder: sets a header and returns the message.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers.insert(key, value);
        self
    }

    /// The reply status: `cn__return_code`, or `ok` when the header is absent.
    pub fn return_code(&self) -> CellCode {
        self.headers
            .return_code()
            .unwrap_or(CellCode::Known(CellReturnCode::Ok))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn header_keys_are_the_exact_nvflare_strings() {
        let keys = [
            header::MSG_TYPE,
            header::CHANNEL,
            header::TOPIC,
            header::ORIGIN,
            header::DESTINATION,
            header::FROM,
            header::TO,
            header::REQ_ID,
            header::REPLY_EXPECTED,
            header::RETURN_CODE,
            header::ERROR,
            header::PAYLOAD_ENCODING,
            header::PAYLOAD_LEN,
            header::ROUTE,
            header::SEND_TIME,
            header::SECURE,
            header::OPTIONAL,
            header::ORIGINAL_HEADERS,
            header::RETURN_REASON,
            header::CONN_URL,
            header::MSG_ROOT_ID,
            header::MSG_ROOT_TTL,
            header::PASS_THROUGH,
            header::SERVER_TRANSIT_REQUIRED,
            header::CLEAR_PAYLOAD_LEN,
            header::ENCRYPTED,
        ];
        let names = [
            "msg_type",
            "channel",
            "topic",
            "origin",
            "destination",
            "from",
            "to",
            "req_id",
            "reply_expected",
            "return_code",
            "error",
            "payload_encoding",
            "payload_len",
            "route",
            "send_time",
            "secure",
            "optional",
            "original_headers",
            "return_reason",
            "conn_url",
            "msg_root_id",
            "msg_root_ttl",
            "pass_through",
            "server_transit_required",
            "clear_payload_len",
            "encrypted",
        ];
        for (k, n) in keys.iter().zip(names) {
            assert_eq!(*k, format!("cn__{n}"));
        }
    }

    #[test]
    fn typed_setters_and_getters_round_trip_and_keep_insertion_order() {
        let mut h = Headers::new();
        h.insert("app", 1);
        h.set_msg_type(MsgType::Reply);
        h.set_channel("c");
        h.set_topic("t");
        h.set_origin("site-1.j");
        h.set_destination("server");
        h.set_from("site-1.j");
        h.set_to("server");
        h.set_req_id("abc");
        h.set_reply_expected(true);
        h.set_return_code(CellReturnCode::Timeout);
        h.set_error("boom");
        h.set_payload_encoding(PayloadEncoding::Bytes);
        h.set_payload_len(12);
        h.set_route([("site-1.j", 1.5)]);
        h.push_route("site-1", 2.0);
        h.set_send_time(3.25);
        h.set_secure(false);
        h.set_optional(true);
        h.set_msg_root_id("root");
        h.set_msg_root_ttl(60.0);
        h.set_pass_through(true);
        assert_eq!(h.msg_type(), Some(MsgType::Reply));
        assert_eq!(h.channel(), Some("c"));
        assert_eq!(h.topic(), Some("t"));
        assert_eq!(h.origin(), Some("site-1.j"));
        assert_eq!(h.destination(), Some("server"));
        assert_eq!(h.from(), Some("site-1.j"));
        assert_eq!(h.to(), Some("server"));
        assert_eq!(h.req_id(), Some("abc"));
        assert_eq!(h.req_ids(), ["abc"]);
        assert_eq!(h.reply_expected(), Some(true));
        assert_eq!(
            h.return_code(),
            Some(CellCode::Known(CellReturnCode::Timeout))
        );
        assert_eq!(h.error(), Some("boom"));
        assert_eq!(h.payload_encoding(), Some(PayloadEncoding::Bytes));
        assert_eq!(h.payload_len(), Some(12));
        assert_eq!(h.route().unwrap(), [("site-1.j", 1.5), ("site-1", 2.0)]);
        assert_eq!(h.send_time(), Some(3.25));
        assert_eq!(h.secure(), Some(false));
        assert_eq!(h.optional(), Some(true));
        assert_eq!(h.msg_root_id(), Some("root"));
        assert_eq!(h.msg_root_ttl(), Some(60.0));
        assert_eq!(h.pass_through(), Some(true));
        assert_eq!(h.iter().next().map(|(k, _)| k), Some("app"));
        assert_eq!(h.app_headers().count(), 1);
        h.remove(header::CHANNEL);
        assert_eq!(h.iter().nth(1).map(|(k, _)| k), Some(header::MSG_TYPE));
    }

    #[test]
    fn unknown_return_code_is_kept_verbatim() {
        let mut h = Headers::new();
        h.insert(header::RETURN_CODE, "future_code");
        assert_eq!(
            h.return_code(),
            Some(CellCode::Unknown("future_code".into()))
        );
    }

    #[test]
    fn req_id_may_be_a_list_and_malformed_typed_headers_read_as_none() {
        let mut h = Headers::new();
        h.set_req_ids(["a", "b"]);
        assert_eq!(h.req_ids(), ["a", "b"]);
        assert_eq!(h.req_id(), None);
        h.insert(header::ROUTE, vec![Value::from("not a pair")]);
        assert!(h.route().is_none());
        h.insert(header::MSG_TYPE, "request");
        assert!(h.msg_type().is_none());
        h.insert(header::REPLY_EXPECTED, "yes");
        assert!(h.reply_expected().is_none());
    }

    #[test]
    fn payload_encoding_follows_payload_kind() {
        assert_eq!(Payload::None.encoding(), PayloadEncoding::None);
        assert_eq!(
            Payload::Bytes(Bytes::from_static(b"x")).encoding(),
            PayloadEncoding::Bytes
        );
        assert_eq!(Payload::value(Value::Nil).encoding(), PayloadEncoding::None);
        assert_eq!(
            Payload::value(Bytes::from_static(b"x")).encoding(),
            PayloadEncoding::Bytes
        );
        assert_eq!(Payload::value(1).encoding(), PayloadEncoding::Fobs);
        assert_eq!(
            Payload::Bytes(Bytes::from_static(b"abc")).known_len(),
            Some(3)
        );
        assert_eq!(Payload::value(1).known_len(), None);
    }

    #[test]
    fn into_shareable_moves_when_unique_and_clones_when_shared() {
        let mut s = Shareable::new();
        s.insert("k", 1);
        let p = Payload::shareable(s.clone());
        let shared = p.clone();
        assert_eq!(p.into_shareable().unwrap(), s);
        assert_eq!(shared.into_shareable().unwrap(), s);
        assert!(Payload::value(1).into_shareable().is_none());
    }
}
