//! The producer side: serve offered arrays to whoever holds their reference.
//!
//! [`DownloadHandle::offer`] takes the arrays out of an outgoing Shareable (leaving
//! placeholders) and keeps them under a fresh batch id; the returned header value goes on the
//! outgoing message as [`fedrun_cell::header::DOWNLOAD_REFS`], which the wire turns into the
//! dot-3 datum NVFlare's receivers follow. [`DownloadService`] answers their requests with
//! NVFlare's status/state protocol: each reply carries the next items (one `.npz` per array,
//! named `T<k>.npy`) up to about `chunk_size` bytes, `state = {start, count}` tells the receiver
//! what to echo, and `{"status": "eof"}` ends the batch.
//!
//! Memory: an offered array nothing else holds becomes its `.npz` item in its own buffer when
//! it is offered (the `.npy` bytes move up by the zip header, the directory follows them), and
//! that item is what every reply carries: serving it copies nothing, and the wire slices it into
//! stream chunks where it lies. An array that is still shared (e.g. kept by the sender for a
//! retry) is kept as it is and written into an `.npz` item when served, so only the batch being
//! served is serialized (one reply, about `chunk_size` bytes, or one array bigger than that). A batch is dropped
//! once its receivers have all reached its end or cancelled, or when it was idle for
//! `idle_expiry`; a finished batch leaves a small tombstone so that a receiver retrying its
//! last request still gets `eof`. Confirmations are not asked for (no `confirm_expected`), so
//! NVFlare's receivers do not send any; a stray one is acknowledged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_cell::{request_handler, CellError, CellHandle, CellMessage, HandlerError, Payload};
use fedrun_core::{Map, NdArray, Shareable, Value};
use fedrun_fobs::download_ref::{refs_to_value, DownloadRef, DOT_NUMPY_DOWNLOAD};
use fedrun_fobs::npz;

use super::{key, status, tree, DownloadConfig, CHANNEL, TOPIC};

/// Zip overhead of a one-entry `.npz` item beyond its name and `.npy` bytes.
const NPZ_OVERHEAD: usize = 30 + 46 + 22;

/// One offered array, as it is served.
#[derive(Debug)]
enum Item {
    /// Its `.npz` item, ready: the array's own buffer, framed in place when the offer was made
    /// (the array was not shared), so serving it copies nothing.
    Npz(Bytes),
    /// An array shared with someone else: its `.npz` item is written when it is served.
    Array(NdArray),
    /// An array that cannot be an `.npz` item (over 4 GiB): serving it fails with this.
    Failed(String),
}

impl Item {
    /// The item of array `T<k>` = `a`: framed in place when nothing else holds its buffer.
    fn new(k: usize, a: NdArray) -> Item {
        match a.try_into_mut() {
            Ok(m) => {
                let mut buf = m.into_npy();
                match npz::frame_in_place(&item_name(k), &mut buf) {
                    Ok(()) => Item::Npz(buf.freeze()),
                    // too large for a plain zip: serving it fails, as writing it would
                    Err(e) => Item::Failed(format!("item T{k}: {e}")),
                }
            }
            Err(shared) => Item::Array(shared),
        }
    }

    /// About how many bytes the item takes in a reply.
    fn size(&self, k: usize) -> usize {
        match self {
            Item::Npz(b) => b.len(),
            Item::Array(a) => a.npy().len() + 2 * item_name(k).len() + NPZ_OVERHEAD,
            Item::Failed(_) => 0,
        }
    }

    /// The item's bytes (shared for a framed item, written for a shared array).
    fn bytes(&self, k: usize) -> Result<Bytes, ServeError> {
        match self {
            Item::Npz(b) => Ok(b.clone()),
            Item::Array(a) => npz::write(&[(item_name(k).as_str(), a.npy())])
                .map(Bytes::from)
                .map_err(|e| ServeError::Failed(format!("item T{k}: {e}"))),
            Item::Failed(why) => Err(ServeError::Failed(why.clone())),
        }
    }
}

/// The entry name of array `k`.
fn item_name(k: usize) -> String {
    format!("T{k}.npy")
}

/// One offered batch.
struct Offer {
    /// `None` once every receiver reached the end (a tombstone).
    arrays: Option<Vec<Item>>,
    receivers_left: usize,
    last_active: Instant,
}

/// The batches of one producer and the protocol over them (no I/O, the clock is an argument).
pub struct Offers {
    chunk_size: usize,
    idle_expiry: Duration,
    offers: HashMap<String, Offer>,
}

/// Why a request cannot be served; the reply's cell return code.
#[derive(Debug, PartialEq, Eq)]
pub enum ServeError {
    /// No `ref_id`, a malformed state, or an unknown batch: `invalid_request`.
    InvalidRequest(String),
    /// The items could not be serialized: `process_exception`.
    Failed(String),
}

fn reply_map(pairs: Vec<(&str, Value)>) -> Value {
    let mut m = Map::with_capacity(pairs.len());
    for (k, v) in pairs {
        m.insert(k, v);
    }
    Value::Map(m)
}

impl Offers {
    /// No batches; replies up to about `chunk_size` bytes; batches idle for `idle_expiry`
    /// expire.
    pub fn new(chunk_size: usize, idle_expiry: Duration) -> Self {
        Offers {
            chunk_size: chunk_size.max(1),
            idle_expiry,
            offers: HashMap::new(),
        }
    }

    /// Keeps `arrays` (item `T<k>` = `arrays[k]`) for `receivers` receivers under `ref_id`.
    ///
    /// An array nothing else holds is framed as its `.npz` item right away, in its own buffer
    /// ([`npz::frame_in_place`]): the batch then costs the arrays' size once, also while it is
    /// served.
    pub fn add(&mut self, ref_id: String, arrays: Vec<NdArray>, receivers: usize, now: Instant) {
        let items = arrays
            .into_iter()
            .enumerate()
            .map(|(k, a)| Item::new(k, a))
            .collect();
        let offer = Offer {
            arrays: Some(items),
            receivers_left: receivers.max(1),
            last_active: now,
        };
        self.offers.insert(ref_id, offer);
    }

    /// Batches (live or finished) still known.
    pub fn len(&self) -> usize {
        self.offers.len()
    }

    /// Whether no batch is known.
    pub fn is_empty(&self) -> bool {
        self.offers.is_empty()
    }

    /// Whether `ref_id`'s arrays are still held.
    pub fn holds(&self, ref_id: &str) -> bool {
        self.offers.get(ref_id).is_some_and(|o| o.arrays.is_some())
    }

    /// Drops batch `ref_id` now, whatever its receivers did; `false` if it was not known.
    pub fn release(&mut self, ref_id: &str) -> bool {
        self.offers.remove(ref_id).is_some()
    }

    /// Drops batches idle for longer than the expiry; returns how many.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let before = self.offers.len();
        let expiry = self.idle_expiry;
        self.offers
            .retain(|_, o| now.saturating_duration_since(o.last_active) <= expiry);
        before - self.offers.len()
    }

    /// One receiver is done with `ref_id`: the arrays go when the last one is.
    fn receiver_done(offer: &mut Offer) {
        offer.receivers_left = offer.receivers_left.saturating_sub(1);
        if offer.receivers_left == 0 {
            offer.arrays = None;
        }
    }

    /// Answers one download request (its payload map). `Ok(None)` is an empty `ok` reply.
    ///
    /// # Errors
    ///
    /// [`ServeError`] as described there.
    pub fn serve(&mut self, request: &Map, now: Instant) -> Result<Option<Value>, ServeError> {
        let ref_id = request
            .get(key::REF_ID)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ServeError::InvalidRequest(format!("missing {}", key::REF_ID)))?;
        if request.get(key::CONFIRM).is_some() {
            // never asked for; acknowledged and ignored
            return Ok(None);
        }
        let Some(offer) = self.offers.get_mut(ref_id) else {
            return Err(ServeError::InvalidRequest(format!(
                "no ref found for {ref_id}"
            )));
        };
        offer.last_active = now;
        if request.get(key::CANCEL).and_then(Value::as_bool) == Some(true) {
            if offer.arrays.is_some() {
                Self::receiver_done(offer);
            }
            return Ok(None);
        }
        let Some(arrays) = offer.arrays.as_ref() else {
            return Ok(Some(reply_map(vec![(key::STATUS, status::EOF.into())])));
        };
        let start = match request.get(key::STATE) {
            None | Some(Value::Nil) => 0,
            Some(Value::Map(st)) if st.is_empty() => 0,
            Some(Value::Map(st)) => {
                let field = |k: &str| {
                    st.get(k)
                        .and_then(Value::as_u64)
                        .and_then(|x| usize::try_from(x).ok())
                        .ok_or_else(|| ServeError::InvalidRequest(format!("bad state {k}")))
                };
                field(key::START)?.saturating_add(field(key::COUNT)?)
            }
            Some(_) => return Err(ServeError::InvalidRequest("state is not a map".into())),
        };
        if start >= arrays.len() {
            Self::receiver_done(offer);
            return Ok(Some(reply_map(vec![(key::STATUS, status::EOF.into())])));
        }
        let mut items = Vec::new();
        let mut total = 0usize;
        for (k, a) in arrays.iter().enumerate().skip(start) {
            let size = a.size(k);
            if !items.is_empty() && total + size >= self.chunk_size {
                break;
            }
            let item = a.bytes(k)?;
            total += item.len();
            items.push(Value::Bin(item));
        }
        let mut state = Map::with_capacity(2);
        state.insert(key::START, start as u64);
        state.insert(key::COUNT, items.len() as u64);
        Ok(Some(reply_map(vec![
            (key::STATUS, status::OK.into()),
            (key::STATE, Value::Map(state)),
            (key::DATA, Value::Array(items)),
            (key::CANCEL_CAPABLE, true.into()),
        ])))
    }
}

/// Starts the producer of a cell: [`DownloadService::start`].
pub struct DownloadService;

/// What the service shares between its handler, its sweeper and its handles.
struct Shared {
    offers: Mutex<Offers>,
    fqcn: String,
    prefix: String,
}

/// A handle to a running [`DownloadService`]: offer arrays. Cheap to clone.
#[derive(Clone)]
pub struct DownloadHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DownloadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownloadHandle")
            .field("fqcn", &self.shared.fqcn)
            .finish_non_exhaustive()
    }
}

impl DownloadService {
    /// Registers the download handler on `cell` (channel `download_service__`, topic
    /// `download_service__download`) and starts the idle sweeper (it ends when the last handle
    /// and the cell's handler are gone). `site` and `job` name the log lines.
    ///
    /// # Errors
    ///
    /// [`CellError::Stopped`] when the cell has stopped.
    ///
    /// # Panics
    ///
    /// Like any actix spawn, when called outside a running actix `System`.
    pub async fn start(
        cell: &CellHandle,
        site: &str,
        job: &str,
        config: &DownloadConfig,
    ) -> Result<DownloadHandle, CellError> {
        let shared = Arc::new(Shared {
            offers: Mutex::new(Offers::new(config.chunk_size, config.idle_expiry)),
            fqcn: cell.fqcn().to_string(),
            prefix: format!("[job={job} site={site}]"),
        });
        let weak = Arc::downgrade(&shared);
        let handler = request_handler(move |request: CellMessage| {
            let shared = weak.upgrade();
            async move {
                let Some(shared) = shared else {
                    return Err(HandlerError::ServiceUnavailable);
                };
                serve(&shared, &request)
            }
        });
        cell.register_request_handler(CHANNEL, TOPIC, handler)
            .await?;
        let period = (config.idle_expiry / 2).max(Duration::from_millis(100));
        actix::spawn(sweep_loop(Arc::downgrade(&shared), period));
        Ok(DownloadHandle { shared })
    }
}

fn serve(shared: &Shared, request: &CellMessage) -> Result<Option<CellMessage>, HandlerError> {
    let origin = request.headers.origin().unwrap_or("");
    let Some(map) = request.payload.as_value().and_then(|v| v.as_map()) else {
        log::warn!(
            "{} download request from {origin} on {CHANNEL}/{TOPIC} without a map payload, refused",
            shared.prefix
        );
        return Err(HandlerError::InvalidRequest);
    };
    let result = shared
        .offers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .serve(map, Instant::now());
    match result {
        Ok(Some(v)) => Ok(Some(CellMessage::new(Payload::value(v)))),
        Ok(None) => Ok(Some(CellMessage::empty())),
        Err(ServeError::InvalidRequest(why)) => {
            log::warn!(
                "{} download request from {origin} refused: {why}",
                shared.prefix
            );
            Err(HandlerError::InvalidRequest)
        }
        Err(ServeError::Failed(why)) => {
            log::error!("{} download for {origin} failed: {why}", shared.prefix);
            Err(HandlerError::Other(why))
        }
    }
}

async fn sweep_loop(shared: Weak<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.tick().await; // the first tick is immediate
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let dropped = shared
            .offers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sweep(Instant::now());
        if dropped > 0 {
            log::info!(
                "{} {dropped} download offer(s) expired unread",
                shared.prefix
            );
        }
    }
}

impl DownloadHandle {
    /// Takes every array out of `shareable` (placeholders `T0`, `T1`, ... stay in their place)
    /// and offers them to one receiver under a fresh batch id. Returns the value to set as the
    /// outgoing message's [`fedrun_cell::header::DOWNLOAD_REFS`], or `None` (and leaves the
    /// Shareable unchanged) when it holds no array.
    ///
    /// # Example
    /// ```
    /// use fedrun_cell::{header, CellMessage, Cell, Fqcn, Network};
    /// use fedrun_core::{NdArray, Shareable};
    /// use fedrun_engine::download::{DownloadConfig, DownloadService};
    ///
    /// actix::System::new().block_on(async {
    ///     let cell = Cell::start(Fqcn::job_cell("site-1", "J").unwrap(), Network::new()).unwrap();
    ///     let config = DownloadConfig::default();
    ///     let service = DownloadService::start(&cell, "site-1", "J", &config).await.unwrap();
    ///     let mut result = Shareable::new();
    ///     result.insert("w", NdArray::from_f32(&[2], &[1.0, 2.0]).unwrap());
    ///     let refs = service.offer(&mut result).unwrap();
    ///     let msg = CellMessage::new(result).with_header(header::DOWNLOAD_REFS, refs);
    ///     assert!(msg.payload.as_shareable().unwrap().get("w").unwrap().as_ndarray().is_none());
    ///     assert_eq!(service.pending(), 1);
    /// });
    /// ```
    pub fn offer(&self, shareable: &mut Shareable) -> Option<Value> {
        self.offer_to(shareable, 1)
    }

    /// [`DownloadHandle::offer`] for a message sent to `receivers` cells (the arrays stay until
    /// each of them has read them, or the offer expires).
    pub fn offer_to(&self, shareable: &mut Shareable, receivers: usize) -> Option<Value> {
        let arrays = tree::arrays_to_refs(shareable);
        if arrays.is_empty() {
            return None;
        }
        let ref_id = uuid::Uuid::new_v4().to_string();
        let count = arrays.len();
        let bytes: usize = arrays.iter().map(|a| a.npy().len()).sum();
        self.shared
            .offers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(ref_id.clone(), arrays, receivers, Instant::now());
        log::debug!(
            "{} offers {count} array(s), {bytes} bytes, as download {ref_id}",
            self.shared.prefix
        );
        Some(refs_to_value(&[DownloadRef {
            fqcn: self.shared.fqcn.clone(),
            ref_id,
            dot: DOT_NUMPY_DOWNLOAD,
        }]))
    }

    /// How many batches are known (held, or finished and not yet expired).
    pub fn pending(&self) -> usize {
        self.shared
            .offers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Drops the arrays of batch `ref_id` now (an offer made for any number of receivers, e.g.
    /// a task result that may be pushed again, is released once it was accepted).
    pub fn release(&self, ref_id: &str) -> bool {
        let released = self
            .shared
            .offers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release(ref_id);
        if released {
            log::debug!("{} released download {ref_id}", self.shared.prefix);
        }
        released
    }

    /// Whether the arrays of batch `ref_id` are still held.
    pub fn holds(&self, ref_id: &str) -> bool {
        self.shared
            .offers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .holds(ref_id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn arr(n: usize) -> NdArray {
        NdArray::from_f32(&[n], &vec![1.5; n]).unwrap()
    }

    fn req(ref_id: &str, state: Option<(u64, u64)>) -> Map {
        let mut m = Map::new();
        m.insert(key::REF_ID, ref_id);
        if let Some((s, c)) = state {
            let mut st = Map::new();
            st.insert(key::START, s);
            st.insert(key::COUNT, c);
            m.insert(key::STATE, Value::Map(st));
        }
        m
    }

    fn state_of(v: &Value) -> (u64, u64) {
        let st = v
            .as_map()
            .unwrap()
            .get(key::STATE)
            .unwrap()
            .as_map()
            .unwrap();
        (
            st.get(key::START).unwrap().as_u64().unwrap(),
            st.get(key::COUNT).unwrap().as_u64().unwrap(),
        )
    }

    fn status_of(v: &Value) -> &str {
        v.as_map()
            .unwrap()
            .get(key::STATUS)
            .unwrap()
            .as_str()
            .unwrap()
    }

    #[test]
    fn batches_fill_up_to_the_chunk_size_then_eof_drops_the_arrays() {
        let now = Instant::now();
        // each item is 4000 bytes of data + npy header + zip overhead: two fit in 10 000
        let mut o = Offers::new(10_000, Duration::from_secs(60));
        o.add("r".into(), vec![arr(1000), arr(1000), arr(1000)], 1, now);
        let first = o.serve(&req("r", None), now).unwrap().unwrap();
        assert_eq!((status_of(&first), state_of(&first)), ("ok", (0, 2)));
        let second = o.serve(&req("r", Some((0, 2))), now).unwrap().unwrap();
        assert_eq!((status_of(&second), state_of(&second)), ("ok", (2, 1)));
        let items = second
            .as_map()
            .unwrap()
            .get(key::DATA)
            .unwrap()
            .as_array()
            .unwrap();
        let entries = npz::read(items[0].as_bin().unwrap()).unwrap();
        assert_eq!(entries[0].name, "T2.npy");
        let end = o.serve(&req("r", Some((2, 1))), now).unwrap().unwrap();
        assert_eq!(status_of(&end), "eof");
        assert!(!o.holds("r"));
        // a retried last request still ends cleanly
        let again = o.serve(&req("r", Some((2, 1))), now).unwrap().unwrap();
        assert_eq!(status_of(&again), "eof");
    }

    #[test]
    fn an_unshared_array_is_served_from_its_own_buffer_a_shared_one_as_a_copy() {
        let now = Instant::now();
        let mut o = Offers::new(1, Duration::from_secs(60));
        let own = arr(100_000);
        let own_at = own.npy().as_ptr();
        let shared = arr(1000);
        let kept = shared.clone();
        o.add("r".into(), vec![own, shared], 1, now);
        let item = |v: &Value| {
            v.as_map()
                .unwrap()
                .get(key::DATA)
                .unwrap()
                .as_array()
                .unwrap()[0]
                .as_bin()
                .unwrap()
                .clone()
        };
        let first = item(&o.serve(&req("r", None), now).unwrap().unwrap());
        // the item is the array's own buffer, framed in place
        assert_eq!(first.as_ptr(), own_at);
        let e = npz::read(&first).unwrap();
        assert_eq!(e[0].name, "T0.npy");
        assert_eq!(
            NdArray::from_npy(e[0].data.clone())
                .unwrap()
                .to_f32_vec()
                .unwrap(),
            vec![1.5; 100_000]
        );
        let second = item(&o.serve(&req("r", Some((0, 1))), now).unwrap().unwrap());
        let e = npz::read(&second).unwrap();
        assert_eq!(e[0].name, "T1.npy");
        assert_eq!(e[0].data, kept.npy().clone());
        assert!(!second.as_ptr_range().contains(&kept.npy().as_ptr()));
    }

    #[test]
    fn an_item_bigger_than_the_chunk_size_still_goes_alone() {
        let now = Instant::now();
        let mut o = Offers::new(10, Duration::from_secs(60));
        o.add("r".into(), vec![arr(100), arr(100)], 1, now);
        let first = o.serve(&req("r", None), now).unwrap().unwrap();
        assert_eq!(state_of(&first), (0, 1));
    }

    #[test]
    fn unknown_ref_and_bad_state_are_invalid_requests() {
        let now = Instant::now();
        let mut o = Offers::new(10, Duration::from_secs(60));
        assert!(matches!(
            o.serve(&req("nope", None), now),
            Err(ServeError::InvalidRequest(_))
        ));
        assert!(matches!(
            o.serve(&Map::new(), now),
            Err(ServeError::InvalidRequest(_))
        ));
        o.add("r".into(), vec![arr(1)], 1, now);
        let mut bad = req("r", None);
        bad.insert(key::STATE, "x");
        assert!(matches!(
            o.serve(&bad, now),
            Err(ServeError::InvalidRequest(_))
        ));
    }

    #[test]
    fn cancel_releases_the_arrays_and_idle_offers_expire() {
        let now = Instant::now();
        let mut o = Offers::new(10, Duration::from_secs(60));
        o.add("r".into(), vec![arr(1)], 1, now);
        let mut cancel = req("r", None);
        cancel.insert(key::CANCEL, true);
        assert_eq!(o.serve(&cancel, now), Ok(None));
        assert!(!o.holds("r"));
        o.add("s".into(), vec![arr(1)], 1, now);
        assert_eq!(o.sweep(now + Duration::from_secs(30)), 0);
        assert!(o.holds("s"));
        assert_eq!(o.sweep(now + Duration::from_secs(61)), 2);
        assert!(o.is_empty());
    }

    #[test]
    fn two_receivers_both_get_the_arrays() {
        let now = Instant::now();
        let mut o = Offers::new(1 << 20, Duration::from_secs(60));
        o.add("r".into(), vec![arr(1)], 2, now);
        for _ in 0..2 {
            assert_eq!(
                status_of(&o.serve(&req("r", None), now).unwrap().unwrap()),
                "ok"
            );
            assert_eq!(
                status_of(&o.serve(&req("r", Some((0, 1))), now).unwrap().unwrap()),
                "eof"
            );
        }
        assert!(!o.holds("r"));
    }
}
