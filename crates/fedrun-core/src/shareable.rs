//! `Shareable`: the unit of data every NVFlare message carries.
//!
//! A Shareable is a string-keyed, insertion-ordered map of [`Value`]s that always contains the
//! key `__headers__`, whose value is the header map (return code, cookies, peer props, peer
//! context, ...). Order is kept because NVFlare's encoding of a Shareable is its dict in insertion
//! order, and fedrun re-encodes payloads byte for byte.

use indexmap::IndexMap;

use crate::constants::header_key;
use crate::error::CoreError;
use crate::peer_context::PeerContext;
use crate::return_code::ReturnCode;
use crate::value::{Map, Value};

/// NVFlare's `Shareable`.
///
/// # Example
/// ```
/// use fedrun_core::{AppReturnCode, ReturnCode, Shareable, Value};
///
/// let mut request = Shareable::new();
/// request.insert("weights", vec![Value::from(1.0), Value::from(2.0)]);
/// request.set_header("__task_name__", "train");
/// request.add_cookie("round", 3);
///
/// let reply = Shareable::make_reply(AppReturnCode::Ok, None);
/// assert!(reply.return_code().is_ok());
/// assert_eq!(request.header("__task_name__").unwrap().and_then(Value::as_str), Some("train"));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Shareable {
    entries: IndexMap<String, Value>,
}

impl Default for Shareable {
    fn default() -> Self {
        Self::new()
    }
}

impl Shareable {
    /// An empty Shareable: `{"__headers__": {}}`.
    pub fn new() -> Self {
        let mut entries = IndexMap::new();
        entries.insert(header_key::HEADERS.to_owned(), Value::map());
        Shareable { entries }
    }

    /// NVFlare's `Shareable(data)`: copies the entries of `data` and then **replaces** the header
    /// map with an empty one, so headers present in `data` are dropped.
    /// Use [`Shareable::with_headers`] to keep them.
    pub fn from_entries<I, K>(data: I) -> Self
    where
        I: IntoIterator<Item = (K, Value)>,
        K: Into<String>,
    {
        let mut s = Shareable::with_headers(data);
        s.entries
            .insert(header_key::HEADERS.to_owned(), Value::map());
        s
    }

    /// Build from entries, keeping a `__headers__` entry if there is one (added empty, first,
    /// otherwise). This is also how a decoder rebuilds a Shareable exactly as it arrived.
    pub fn with_headers<I, K>(data: I) -> Self
    where
        I: IntoIterator<Item = (K, Value)>,
        K: Into<String>,
    {
        let mut entries: IndexMap<String, Value> = IndexMap::new();
        for (k, v) in data {
            entries.insert(k.into(), v);
        }
        if !entries.contains_key(header_key::HEADERS) {
            entries.shift_insert(0, header_key::HEADERS.to_owned(), Value::map());
        }
        Shareable { entries }
    }

    /// Number of entries, `__headers__` included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Never true: `__headers__` is always present (a Shareable is never "empty").
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Look up an entry.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.get(key)
    }

    /// Look up an entry, mutably.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.entries.get_mut(key)
    }

    /// Insert or replace an entry (a replaced entry keeps its position). Returns the old value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) -> Option<Value> {
        self.entries.insert(key.into(), value.into())
    }

    /// Remove an entry, keeping the order of the others. `__headers__` cannot be removed: it is
    /// reset to an empty map instead.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        if key == header_key::HEADERS {
            return self
                .entries
                .insert(header_key::HEADERS.to_owned(), Value::map());
        }
        self.entries.shift_remove(key)
    }

    /// True when the entry exists.
    pub fn contains_key(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// All entries in order, `__headers__` included.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.entries.iter()
    }

    /// All entries, consumed, in order.
    pub fn into_entries(self) -> impl Iterator<Item = (String, Value)> {
        self.entries.into_iter()
    }

    /// The header container as it is (normally a map; a peer may have sent anything).
    pub fn raw_headers(&self) -> Option<&Value> {
        self.entries.get(header_key::HEADERS)
    }

    /// The header map, or an error if the container is not a map (NVFlare raises a value error).
    pub fn headers(&self) -> Result<Option<&Map>, CoreError> {
        match self.entries.get(header_key::HEADERS) {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::Map(m)) => Ok(Some(m)),
            Some(other) => Err(CoreError::HeadersNotAMap(other.kind())),
        }
    }

    /// A header value. `Ok(None)` when absent; an error when the container is not a map.
    pub fn header(&self, key: &str) -> Result<Option<&Value>, CoreError> {
        Ok(self.headers()?.and_then(|m| m.get(key)))
    }

    /// A header value, treating a malformed container as "absent". Convenient for code that only
    /// reads optional headers of a peer's message.
    pub fn header_or_none(&self, key: &str) -> Option<&Value> {
        self.header(key).ok().flatten()
    }

    /// Set a header; a missing or malformed container is replaced by a new map.
    pub fn set_header(&mut self, key: &str, value: impl Into<Value>) {
        self.headers_mut().insert(key, value);
    }

    /// Remove a header.
    pub fn remove_header(&mut self, key: &str) -> Option<Value> {
        match self.entries.get_mut(header_key::HEADERS) {
            Some(Value::Map(m)) => m.remove(key),
            _ => None,
        }
    }

    /// The header map, mutably; a missing or malformed container is replaced by a new map.
    pub fn headers_mut(&mut self) -> &mut Map {
        let slot = self
            .entries
            .entry(header_key::HEADERS.to_owned())
            .or_insert_with(Value::map);
        if !matches!(slot, Value::Map(_)) {
            *slot = Value::map();
        }
        match slot {
            Value::Map(m) => m,
            // Just made a map above.
            _ => unreachable!("header container was set to a map"),
        }
    }

    /// The return code (`__rc__`), `OK` when absent (NVFlare's default).
    pub fn return_code(&self) -> ReturnCode {
        match self.header_or_none(header_key::RC) {
            Some(Value::Str(s)) => ReturnCode::from(s.as_str()),
            _ => ReturnCode::OK,
        }
    }

    /// Set the return code.
    pub fn set_return_code(&mut self, rc: impl Into<ReturnCode>) {
        let rc = rc.into();
        self.set_header(header_key::RC, rc.as_str());
    }

    /// NVFlare's `make_reply(rc, headers)`: a new Shareable with `__rc__` and, if `headers` is a
    /// non-empty map, each of its entries as a header.
    pub fn make_reply(rc: impl Into<ReturnCode>, headers: Option<&Map>) -> Shareable {
        let mut s = Shareable::new();
        s.set_return_code(rc);
        if let Some(h) = headers {
            for (k, v) in h.iter() {
                s.headers_mut().insert(k.clone(), v.clone());
            }
        }
        s
    }

    /// NVFlare's `make_copy(src, exclude_headers)`: a copy of the content and of the headers
    /// minus the excluded header keys.
    pub fn make_copy(&self, exclude_headers: &[&str]) -> Shareable {
        let mut s = self.clone();
        if let Some(Value::Map(m)) = s.entries.get_mut(header_key::HEADERS) {
            for k in exclude_headers {
                m.remove(k);
            }
        }
        s
    }

    /// The cookie jar (`__cookie_jar__`), if it is a map.
    pub fn cookie_jar(&self) -> Option<&Map> {
        self.header_or_none(header_key::COOKIE_JAR)
            .and_then(Value::as_map)
    }

    /// Replace the cookie jar.
    pub fn set_cookie_jar(&mut self, jar: Map) {
        self.set_header(header_key::COOKIE_JAR, jar);
    }

    /// Add a cookie, creating the jar if needed.
    pub fn add_cookie(&mut self, name: &str, value: impl Into<Value>) {
        let headers = self.headers_mut();
        if !matches!(headers.get(header_key::COOKIE_JAR), Some(Value::Map(_))) {
            headers.insert(header_key::COOKIE_JAR, Value::map());
        }
        if let Some(Value::Map(jar)) = headers.get_mut(header_key::COOKIE_JAR) {
            jar.insert(name, value);
        }
    }

    /// A cookie.
    pub fn cookie(&self, name: &str) -> Option<&Value> {
        self.cookie_jar().and_then(|j| j.get(name))
    }

    /// Set the sender's public props (`__peer_props__`).
    pub fn set_peer_props(&mut self, props: Map) {
        self.set_header(header_key::PEER_PROPS, props);
    }

    /// The sender's public props, as they came (may be any value from a peer).
    pub fn peer_props(&self) -> Option<&Value> {
        self.header_or_none(header_key::PEER_PROPS)
    }

    /// One peer prop; `None` when the props are not a map.
    pub fn peer_prop(&self, key: &str) -> Option<&Value> {
        self.peer_props()
            .and_then(Value::as_map)
            .and_then(|m| m.get(key))
    }

    /// Set the peer context (`__peer_ctx__`).
    pub fn set_peer_context(&mut self, ctx: PeerContext) {
        self.set_header(header_key::PEER_CTX, ctx);
    }

    /// The peer context, if present and well formed.
    pub fn peer_context(&self) -> Option<&PeerContext> {
        self.header_or_none(header_key::PEER_CTX)
            .and_then(Value::as_context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::return_code::AppReturnCode;

    #[test]
    fn new_shareable_always_carries_empty_headers() {
        let s = Shareable::new();
        assert_eq!(s.len(), 1);
        assert_eq!(s.headers().ok().flatten().map(Map::len), Some(0));
    }

    #[test]
    fn constructing_from_data_drops_its_headers() {
        let mut h = Map::new();
        h.insert("__rc__", "ERROR");
        let s = Shareable::from_entries(vec![
            ("__headers__", Value::Map(h.clone())),
            ("x", Value::from(1)),
        ]);
        assert_eq!(s.return_code(), ReturnCode::OK);
        let kept =
            Shareable::with_headers(vec![("x", Value::from(1)), ("__headers__", Value::Map(h))]);
        assert_eq!(kept.return_code(), ReturnCode::App(AppReturnCode::Error));
        // the position of __headers__ is kept as it came
        assert_eq!(kept.iter().next().map(|(k, _)| k.as_str()), Some("x"));
    }

    #[test]
    fn header_container_that_is_not_a_map_is_a_typed_error() {
        let s = Shareable::with_headers(vec![("__headers__", Value::from(3))]);
        assert!(matches!(
            s.header("a"),
            Err(CoreError::HeadersNotAMap("int"))
        ));
        let mut s = s;
        s.set_header("a", 1);
        assert_eq!(s.header("a").ok().flatten(), Some(&Value::from(1)));
    }

    #[test]
    fn make_reply_copies_headers_and_sets_rc() {
        let mut h = Map::new();
        h.insert("k", "v");
        let r = Shareable::make_reply(AppReturnCode::TopicUnknown, Some(&h));
        assert_eq!(r.return_code().as_str(), "TOPIC_UNKNOWN");
        assert_eq!(r.header_or_none("k"), Some(&Value::from("v")));
    }

    #[test]
    fn make_copy_excludes_the_named_headers_only() {
        let mut s = Shareable::new();
        s.set_header("a", 1);
        s.set_header("b", 2);
        s.insert("data", "d");
        let c = s.make_copy(&["a"]);
        assert!(c.header_or_none("a").is_none());
        assert_eq!(c.header_or_none("b"), Some(&Value::from(2)));
        assert_eq!(c.get("data"), Some(&Value::from("d")));
        assert_eq!(s.header_or_none("a"), Some(&Value::from(1)));
    }

    #[test]
    fn cookies_are_created_on_demand_and_replaced_whole() {
        let mut s = Shareable::new();
        assert!(s.cookie_jar().is_none());
        s.add_cookie("task_id", "t1");
        assert_eq!(s.cookie("task_id"), Some(&Value::from("t1")));
        s.set_cookie_jar(Map::new());
        assert!(s.cookie("task_id").is_none());
    }

    #[test]
    fn peer_prop_is_none_when_props_are_not_a_map() {
        let mut s = Shareable::new();
        s.set_header("__peer_props__", vec![Value::from(1)]);
        assert!(s.peer_prop("x").is_none());
        let mut p = Map::new();
        p.insert("__identity_name__", "site-1");
        s.set_peer_props(p);
        assert_eq!(
            s.peer_prop("__identity_name__"),
            Some(&Value::from("site-1"))
        );
    }

    #[test]
    fn removing_headers_resets_them_instead() {
        let mut s = Shareable::new();
        s.set_header("a", 1);
        s.remove("__headers__");
        assert!(s.contains_key("__headers__"));
        assert!(s.header_or_none("a").is_none());
    }
}
