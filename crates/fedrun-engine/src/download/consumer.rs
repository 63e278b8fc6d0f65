//! The consumer side: pull referenced arrays from their producer and put them in place.
//!
//! [`download_arrays`] runs NVFlare's download protocol for one batch: `{"ref_id"}` first, then
//! the `state` of each reply echoed back until `{"status": "eof"}`. It says `confirm_capable`,
//! as NVFlare's own receivers do, so that an NVFlare producer that wants a confirmation asks for
//! one; it is then sent fire-and-forget. A timed-out request is sent again with the same state
//! (the producer serves the same items again), up to `max_retries` times.
//!
//! Hostile producers are bounded: every item must be a well-formed `.npz` whose entries are
//! items the payload actually refers to, each at most once, and every `ok` reply must bring at
//! least one of them, so a download ends after at most one reply per referenced item. Arrays
//! are zero-copy slices of the reply that carried them: memory is one reply (about the
//! producer's chunk size) plus the arrays themselves.
//!
//! [`ArrayResolver`] is the cell's [`PayloadResolver`]: for a received message carrying
//! [`header::DOWNLOAD_REFS`] it downloads every numpy batch, substitutes the placeholders and
//! hands the complete message back to the cell. Tensor references (dot 6) are refused.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use fedrun_cell::{
    header, CellHandle, CellMessage, FireAndForget, Fqcn, Payload, PayloadResolver, ResolveError,
    SendRequest,
};
use fedrun_core::{CellReturnCode, Map, NdArray, Value};
use fedrun_fobs::download_ref::{refs_from_value, DownloadRef, DOT_NUMPY_DOWNLOAD};
use fedrun_fobs::npz;
use futures::future::{BoxFuture, FutureExt};

use super::{key, status, tree, DownloadConfig, CHANNEL, TOPIC};

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DownloadError {
    /// The producer's FQCN is not a valid cell name.
    #[error("invalid producer {0:?}")]
    BadProducer(String),
    /// A request got a non-`ok` reply (after retries, for timeouts).
    #[error("request to {producer} failed: {code} {error}")]
    Request {
        /// The producer.
        producer: String,
        /// The reply's code.
        code: String,
        /// The reply's `cn__error`.
        error: String,
    },
    /// The producer said `{"status": "error"}`.
    #[error("producer {0} reported an error")]
    Producer(String),
    /// A reply is not what the protocol allows.
    #[error("protocol error from {producer}: {why}")]
    Protocol {
        /// The producer.
        producer: String,
        /// What was wrong.
        why: String,
    },
    /// An item is not a valid `.npz`.
    #[error("bad npz item from {producer}: {source}")]
    Npz {
        /// The producer.
        producer: String,
        /// The zip error.
        #[source]
        source: npz::NpzError,
    },
    /// An item's `.npy` is invalid.
    #[error("bad array {item} from {producer}: {source}")]
    Array {
        /// The producer.
        producer: String,
        /// The item.
        item: String,
        /// The array error (boxed: it is large).
        #[source]
        source: Box<fedrun_core::CoreError>,
    },
    /// The download ended without some referenced items.
    #[error("download from {producer} ended without item(s) {missing:?}")]
    Missing {
        /// The producer.
        producer: String,
        /// The items that never came.
        missing: Vec<String>,
    },
    /// The cell stopped.
    #[error("cell stopped during download")]
    CellStopped,
}

impl DownloadError {
    /// The cell return code a message whose download failed turns into: `comm_error` when the
    /// producer could not be reached or answered with an error code, `process_exception` when
    /// what it sent is unusable.
    pub fn return_code(&self) -> CellReturnCode {
        match self {
            DownloadError::Request { .. } | DownloadError::CellStopped => CellReturnCode::CommError,
            _ => CellReturnCode::ProcessException,
        }
    }
}

fn request_payload(ref_id: &str, state: Option<&Value>) -> CellMessage {
    let mut m = Map::with_capacity(3);
    m.insert(key::REF_ID, ref_id);
    m.insert(key::CONFIRM_CAPABLE, true);
    if let Some(st) = state {
        m.insert(key::STATE, st.clone());
    }
    CellMessage::new(Payload::value(Value::Map(m)))
}

/// Downloads batch `r` from its producer through `cell`; `wanted` are the item ids the payload
/// refers to (the download fails if one is missing, or if anything else comes). `prefix` starts
/// the log lines (`[job=.. site=..]`).
///
/// # Errors
///
/// A [`DownloadError`] for a failed request, a producer error or anything malformed.
pub async fn download_arrays(
    cell: &CellHandle,
    r: &DownloadRef,
    wanted: &BTreeSet<String>,
    config: &DownloadConfig,
    prefix: &str,
) -> Result<HashMap<String, NdArray>, DownloadError> {
    let producer =
        Fqcn::new(r.fqcn.as_str()).map_err(|_| DownloadError::BadProducer(r.fqcn.clone()))?;
    let proto = |why: String| DownloadError::Protocol {
        producer: r.fqcn.clone(),
        why,
    };
    let mut arrays: HashMap<String, NdArray> = HashMap::with_capacity(wanted.len());
    let mut state: Option<Value> = None;
    let mut cancel_capable = false;
    let mut retries = 0u32;
    let mut total_bytes = 0usize;
    // one reply per item at most, plus the eof
    for _ in 0..=wanted.len() {
        let reply = loop {
            let request = SendRequest::new(
                CHANNEL,
                TOPIC,
                producer.clone(),
                request_payload(&r.ref_id, state.as_ref()),
                config.request_timeout,
            );
            let reply = cell
                .send_request(request)
                .await
                .map_err(|_| DownloadError::CellStopped)?;
            let code = reply.return_code();
            if code == CellReturnCode::Timeout && retries < config.max_retries {
                retries += 1;
                log::warn!(
                    "{prefix} download {} from {producer} timed out, retry {retries}/{}",
                    r.ref_id,
                    config.max_retries
                );
                continue;
            }
            if code != CellReturnCode::Ok {
                if cancel_capable {
                    send_control(cell, &producer, &r.ref_id, key::CANCEL, Value::from(true)).await;
                }
                return Err(DownloadError::Request {
                    producer: r.fqcn.clone(),
                    code: code.as_str().to_owned(),
                    error: reply.headers.error().unwrap_or("").to_owned(),
                });
            }
            break reply;
        };
        let Some(body) = reply.payload.as_value().and_then(|v| v.as_map()) else {
            return Err(proto("reply payload is not a map".into()));
        };
        let st = body.get(key::STATUS).and_then(Value::as_str).unwrap_or("");
        cancel_capable |= body.get(key::CANCEL_CAPABLE).and_then(Value::as_bool) == Some(true);
        let confirm = (body.get(key::CONFIRM_EXPECTED).and_then(Value::as_bool) == Some(true))
            .then(|| body.get(key::CONFIRM_NONCE).cloned().unwrap_or(Value::Nil));
        match st {
            status::EOF => {
                let missing: Vec<String> = wanted
                    .iter()
                    .filter(|w| !arrays.contains_key(*w))
                    .cloned()
                    .collect();
                if let Some(nonce) = confirm {
                    let truth = if missing.is_empty() {
                        "success"
                    } else {
                        "failed"
                    };
                    send_confirm(cell, &producer, &r.ref_id, truth, nonce).await;
                }
                if !missing.is_empty() {
                    return Err(DownloadError::Missing {
                        producer: r.fqcn.clone(),
                        missing,
                    });
                }
                log::debug!(
                    "{prefix} downloaded {} array(s), {total_bytes} bytes, from {producer} ({})",
                    arrays.len(),
                    r.ref_id
                );
                return Ok(arrays);
            }
            status::OK => {}
            status::ERROR => {
                if let Some(nonce) = confirm {
                    send_confirm(cell, &producer, &r.ref_id, "failed", nonce).await;
                }
                return Err(DownloadError::Producer(r.fqcn.clone()));
            }
            other => return Err(proto(format!("unknown status {other:?}"))),
        }
        let items = body
            .get(key::DATA)
            .and_then(Value::as_array)
            .filter(|items| !items.is_empty())
            .ok_or_else(|| proto("ok reply without items".into()))?;
        let consumed = consume_items(items, wanted, &mut arrays, &r.fqcn);
        if let Err(e) = consumed {
            if cancel_capable {
                send_control(cell, &producer, &r.ref_id, key::CANCEL, Value::from(true)).await;
            }
            return Err(e);
        }
        total_bytes += consumed.unwrap_or(0);
        match body.get(key::STATE) {
            Some(s @ Value::Map(_)) => state = Some(s.clone()),
            _ => return Err(proto("ok reply without a state map".into())),
        }
    }
    Err(proto(format!(
        "more replies than the {} referenced item(s)",
        wanted.len()
    )))
}

/// Parses one reply's items into `arrays`; returns their byte count.
fn consume_items(
    items: &[Value],
    wanted: &BTreeSet<String>,
    arrays: &mut HashMap<String, NdArray>,
    producer: &str,
) -> Result<usize, DownloadError> {
    let mut bytes = 0;
    for item in items {
        let Some(zip) = item.as_bin() else {
            return Err(DownloadError::Protocol {
                producer: producer.to_owned(),
                why: "item is not bytes".into(),
            });
        };
        bytes += zip.len();
        let entries = npz::read(zip).map_err(|source| DownloadError::Npz {
            producer: producer.to_owned(),
            source,
        })?;
        for e in entries {
            let name = e.array_name().to_owned();
            if !wanted.contains(&name) || arrays.contains_key(&name) {
                return Err(DownloadError::Protocol {
                    producer: producer.to_owned(),
                    why: format!("unexpected or repeated item {name:?}"),
                });
            }
            let a = NdArray::from_npy(e.data).map_err(|source| DownloadError::Array {
                producer: producer.to_owned(),
                item: name.clone(),
                source: Box::new(source),
            })?;
            arrays.insert(name, a);
        }
    }
    Ok(bytes)
}

/// Sends the producer a fire-and-forget control map (`ref_id` plus `fields`): a cancel or a
/// confirmation; `what` names it in the log if it cannot be sent.
async fn send_to_producer(
    cell: &CellHandle,
    producer: &Fqcn,
    ref_id: &str,
    fields: Vec<(&str, Value)>,
    what: &str,
) {
    let mut m = Map::with_capacity(1 + fields.len());
    m.insert(key::REF_ID, ref_id);
    for (k, v) in fields {
        m.insert(k, v);
    }
    let msg = FireAndForget::new(
        CHANNEL,
        TOPIC,
        vec![producer.clone()],
        CellMessage::new(Payload::value(Value::Map(m))),
    )
    .with_optional(true);
    if let Err(e) = cell.fire_and_forget(msg).await {
        log::debug!("download {ref_id}: {what} not sent: {e}");
    }
}

async fn send_control(cell: &CellHandle, producer: &Fqcn, ref_id: &str, k: &str, v: Value) {
    send_to_producer(cell, producer, ref_id, vec![(k, v)], k).await;
}

async fn send_confirm(cell: &CellHandle, producer: &Fqcn, ref_id: &str, truth: &str, nonce: Value) {
    let fields = vec![
        (key::CONFIRM, Value::from(truth)),
        (key::CONFIRM_NONCE, nonce),
    ];
    send_to_producer(cell, producer, ref_id, fields, "confirmation").await;
}

/// The [`PayloadResolver`] of a job cell: downloads the numpy arrays a received message refers
/// to and puts them in place.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use fedrun_cell::{Cell, Fqcn, Network};
/// use fedrun_engine::download::{ArrayResolver, DownloadConfig};
///
/// actix::System::new().block_on(async {
///     let cell = Cell::start(Fqcn::job_cell("site-1", "J").unwrap(), Network::new()).unwrap();
///     let resolver = ArrayResolver::new(cell.clone(), "site-1", "J", DownloadConfig::default());
///     cell.set_payload_resolver(Some(Arc::new(resolver))).await.unwrap();
/// });
/// ```
#[derive(Clone)]
pub struct ArrayResolver {
    inner: Arc<ResolverInner>,
}

struct ResolverInner {
    cell: CellHandle,
    config: DownloadConfig,
    prefix: String,
}

impl ArrayResolver {
    /// A resolver that downloads through `cell` (the cell it is set on); `site` and `job` name
    /// the log lines.
    pub fn new(cell: CellHandle, site: &str, job: &str, config: DownloadConfig) -> Self {
        ArrayResolver {
            inner: Arc::new(ResolverInner {
                cell,
                config,
                prefix: format!("[job={job} site={site}]"),
            }),
        }
    }
}

impl PayloadResolver for ArrayResolver {
    fn resolve(&self, msg: CellMessage) -> BoxFuture<'static, Result<CellMessage, ResolveError>> {
        let inner = Arc::clone(&self.inner);
        async move { inner.resolve(msg).await }.boxed()
    }
}

impl ResolverInner {
    async fn resolve(&self, mut msg: CellMessage) -> Result<CellMessage, ResolveError> {
        let what = format!(
            "{}/{} from {}",
            msg.headers.channel().unwrap_or(""),
            msg.headers.topic().unwrap_or(""),
            msg.headers.origin().unwrap_or("")
        );
        let fail = |code: CellReturnCode, text: String| {
            log::error!("{} payload of {what} not resolved: {text}", self.prefix);
            ResolveError::new(code, text)
        };
        let refs = match msg.headers.remove(header::DOWNLOAD_REFS) {
            Some(v) => refs_from_value(&v)
                .map_err(|e| fail(CellReturnCode::ProcessException, e.to_string()))?,
            None => return Ok(msg),
        };
        if let Some(r) = refs.iter().find(|r| r.dot != DOT_NUMPY_DOWNLOAD) {
            return Err(fail(
                CellReturnCode::ProcessException,
                format!(
                    "download references with dot {} (tensors) are not supported; \
                     set tensor_download_chunk_size=0 on the sender (ref {} from {})",
                    r.dot, r.ref_id, r.fqcn
                ),
            ));
        }
        let Payload::Value(value) = &mut msg.payload else {
            return Err(fail(
                CellReturnCode::ProcessException,
                "download references on a payload that is not a FOBS object".into(),
            ));
        };
        // NVFlare writes one numpy batch per message (all its arrays, items T0..Tn)
        let [r] = refs.as_slice() else {
            return Err(fail(
                CellReturnCode::ProcessException,
                format!(
                    "{} numpy download batches in one payload; expected one",
                    refs.len()
                ),
            ));
        };
        let wanted = tree::ref_items(value);
        let arrays = download_arrays(&self.cell, r, &wanted, &self.config, &self.prefix)
            .await
            .map_err(|e| fail(e.return_code(), e.to_string()))?;
        let missing = tree::substitute(Arc::make_mut(value), &arrays);
        if !missing.is_empty() {
            return Err(fail(
                CellReturnCode::ProcessException,
                format!("no array downloaded for {missing:?}"),
            ));
        }
        Ok(msg)
    }
}
