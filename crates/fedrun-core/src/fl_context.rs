//! The live FLContext and the manager that shares its sticky props.
//!
//! Every piece of work in a client job (a task, an event, an aux request) runs with a context: a
//! bag of props, each with a mask (sticky and/or private). *Sticky* props set through a context
//! that has a manager become *stickers* of that manager, and every context of the same manager
//! sees them, including contexts created before the sticker was set. *Private* props never leave
//! the site; the public ones are what a peer receives ([`FlContext::to_peer_context`]).
//!
//! Differences from NVFlare, on purpose:
//! - `__run_num__` (the job id) is a real public sticker of the manager (#30), so
//!   [`FlContext::set_public_props`] cannot lose it;
//! - the convenience getters ([`FlContext::job_id`], [`FlContext::process_type`],
//!   [`FlContext::identity_name`]) use the same lookup as [`FlContext::get_prop`] (#31);
//! - props hold [`Value`]s only: engine objects (`__engine__`, `__manager__`, the abort signal)
//!   are passed by the engine alongside the context, not inside it;
//! - [`FlContext::get_prop`] takes `&self` and does not copy a sticker into the local props; the
//!   only observable consequence is that [`FlContext::public_props`] lists a sticker set
//!   elsewhere only once it was set through (or copied into) this context.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use indexmap::IndexMap;

use crate::constants::fl_ctx_key;
use crate::error::CoreError;
use crate::peer_context::{ContextProp, PeerContext, MASK_PRIVATE, MASK_STICKY};
use crate::value::{Map, Value};

/// The mask of a prop from its two flags.
fn mask_of(private: bool, sticky: bool) -> u8 {
    (if private { MASK_PRIVATE } else { 0 }) | (if sticky { MASK_STICKY } else { 0 })
}

fn is_sticky(mask: u8) -> bool {
    mask & MASK_STICKY != 0
}

fn is_private(mask: u8) -> bool {
    mask & MASK_PRIVATE != 0
}

/// One local prop of a context.
#[derive(Clone, Debug, PartialEq)]
struct Prop {
    value: Value,
    mask: u8,
}

/// The sticky props shared by all contexts of one manager. A key lives in at most one of the two
/// maps: its map *is* its mask (public sticky or private sticky).
#[derive(Debug, Default)]
struct Stickers {
    public: IndexMap<String, Value>,
    private: IndexMap<String, Value>,
}

impl Stickers {
    /// The sticker's value and mask, private first (NVFlare's lookup order).
    fn get(&self, key: &str) -> Option<(&Value, u8)> {
        if let Some(v) = self.private.get(key) {
            return Some((v, MASK_STICKY | MASK_PRIVATE));
        }
        self.public.get(key).map(|v| (v, MASK_STICKY))
    }
}

struct ManagerInner {
    identity_name: String,
    job_id: String,
    stickers: Mutex<Stickers>,
}

/// Creates the contexts of one job on one site and holds their sticky props (NVFlare's
/// `FLContextManager`). Cloning is cheap and shares the stickers.
///
/// # Example
/// ```
/// use fedrun_core::{FlContextManager, Value};
///
/// let mgr = FlContextManager::new(
///     "site-1",
///     "job-1",
///     vec![("__fqsn__".into(), Value::from("site-1"))],
///     vec![("__process_type__".into(), Value::from("CJ"))],
/// );
/// let early = mgr.new_context();
/// let mut other = mgr.new_context();
/// other.set_prop("round", 3, false, true).unwrap();
/// // a sticky prop is visible from every context of the manager, even older ones
/// assert_eq!(early.get_prop("round"), Some(Value::from(3)));
/// assert_eq!(early.job_id().as_deref(), Some("job-1"));
/// ```
#[derive(Clone)]
pub struct FlContextManager {
    inner: Arc<ManagerInner>,
}

impl FlContextManager {
    /// A manager for site `identity_name` running job `job_id`.
    ///
    /// The job id becomes the public sticker `__run_num__` (an entry `__run_num__` in either
    /// sticker list is ignored with a warning: `job_id` is authoritative). A key present in both
    /// lists is kept as a private sticker only (private wins, as in NVFlare's lookup).
    pub fn new(
        identity_name: &str,
        job_id: &str,
        public_stickers: Vec<(String, Value)>,
        private_stickers: Vec<(String, Value)>,
    ) -> Self {
        let mut stickers = Stickers::default();
        stickers
            .public
            .insert(fl_ctx_key::RUN_NUM.to_owned(), Value::from(job_id));
        for (key, value) in public_stickers {
            if key == fl_ctx_key::RUN_NUM {
                log::warn!(
                    "site {identity_name} job {job_id}: ignoring public sticker {key}: the job id is set by the manager"
                );
                continue;
            }
            stickers.public.insert(key, value);
        }
        for (key, value) in private_stickers {
            if key == fl_ctx_key::RUN_NUM {
                log::warn!(
                    "site {identity_name} job {job_id}: ignoring private sticker {key}: the job id is a public sticker"
                );
                continue;
            }
            if stickers.public.shift_remove(&key).is_some() {
                log::warn!(
                    "site {identity_name} job {job_id}: sticker {key} given as both public and private; kept private"
                );
            }
            stickers.private.insert(key, value);
        }
        FlContextManager {
            inner: Arc::new(ManagerInner {
                identity_name: identity_name.to_owned(),
                job_id: job_id.to_owned(),
                stickers: Mutex::new(stickers),
            }),
        }
    }

    /// The sticker map, even if a thread panicked while holding it (every critical section
    /// leaves the maps consistent, so the data is still valid).
    fn stickers(&self) -> MutexGuard<'_, Stickers> {
        self.inner
            .stickers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A new context (NVFlare's `new_context`). Its local props, in order:
    /// `__run_num__` (public sticky), `__identity_name__` (public, non-sticky, only when the
    /// identity is not empty), then every public sticker (public sticky) and every private
    /// sticker (private sticky), with their current values.
    pub fn new_context(&self) -> FlContext {
        let mut props: IndexMap<String, Prop> = IndexMap::new();
        {
            let stickers = self.stickers();
            let run_num = stickers
                .public
                .get(fl_ctx_key::RUN_NUM)
                .cloned()
                .unwrap_or_else(|| Value::from(self.job_id()));
            props.insert(
                fl_ctx_key::RUN_NUM.to_owned(),
                Prop {
                    value: run_num,
                    mask: MASK_STICKY,
                },
            );
            if !self.identity_name().is_empty() {
                props.insert(
                    fl_ctx_key::IDENTITY_NAME.to_owned(),
                    Prop {
                        value: Value::from(self.identity_name()),
                        mask: 0,
                    },
                );
            }
            for (key, value) in &stickers.public {
                if key == fl_ctx_key::RUN_NUM {
                    continue;
                }
                props.insert(
                    key.clone(),
                    Prop {
                        value: value.clone(),
                        mask: MASK_STICKY,
                    },
                );
            }
            for (key, value) in &stickers.private {
                props.insert(
                    key.clone(),
                    Prop {
                        value: value.clone(),
                        mask: MASK_STICKY | MASK_PRIVATE,
                    },
                );
            }
        }
        FlContext {
            props,
            manager: Some(self.clone()),
        }
    }

    /// The site name this manager was created for.
    pub fn identity_name(&self) -> &str {
        &self.inner.identity_name
    }

    /// The job id this manager was created for.
    pub fn job_id(&self) -> &str {
        &self.inner.job_id
    }

    /// The current value of a sticker (private first, then public).
    pub fn sticker(&self, key: &str) -> Option<Value> {
        self.stickers().get(key).map(|(v, _)| v.clone())
    }

    /// The current value of a public sticker.
    fn public_sticker(&self, key: &str) -> Option<Value> {
        self.stickers().public.get(key).cloned()
    }

    /// Write a sticker with a sticky `mask`, unless the key is already a sticker with another
    /// mask (then `Err(existing mask)` and no change). Check and write happen under one lock.
    fn put_sticker(&self, key: &str, value: Value, mask: u8) -> Result<(), u8> {
        let mut stickers = self.stickers();
        if let Some((_, existing)) = stickers.get(key) {
            if existing != mask {
                return Err(existing);
            }
        }
        if is_private(mask) {
            stickers.private.insert(key.to_owned(), value);
        } else {
            stickers.public.insert(key.to_owned(), value);
        }
        Ok(())
    }
}

impl fmt::Debug for FlContextManager {
    /// Never blocks: when the sticker lock is held elsewhere the stickers are shown as locked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("FlContextManager");
        d.field("identity_name", &self.inner.identity_name)
            .field("job_id", &self.inner.job_id);
        match self.inner.stickers.try_lock() {
            Ok(stickers) => d
                .field("public_stickers", &stickers.public)
                .field("private_stickers", &stickers.private),
            Err(std::sync::TryLockError::Poisoned(p)) => {
                let stickers = p.into_inner();
                d.field("public_stickers", &stickers.public)
                    .field("private_stickers", &stickers.private)
            }
            Err(std::sync::TryLockError::WouldBlock) => d.field("stickers", &"<locked>"),
        };
        d.finish()
    }
}

/// A live FLContext: local props, and optionally the manager whose stickers it shares.
///
/// # Example
/// ```
/// use fedrun_core::{CoreError, FlContext, Value};
///
/// let mut ctx = FlContext::new();
/// ctx.set_prop("lr", 0.1, false, false).unwrap();
/// ctx.set_prop("secret", "s3", true, false).unwrap();
/// // a prop's mask cannot change
/// assert!(matches!(
///     ctx.set_prop("lr", 0.2, true, false),
///     Err(CoreError::PropMaskConflict { .. })
/// ));
/// assert_eq!(ctx.get_prop("lr"), Some(Value::from(0.1)));
/// // only public props leave the site
/// assert!(ctx.public_props().contains_key("lr"));
/// assert!(!ctx.public_props().contains_key("secret"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct FlContext {
    props: IndexMap<String, Prop>,
    manager: Option<FlContextManager>,
}

impl FlContext {
    /// An empty context without a manager: sticky props then stay local.
    pub fn new() -> Self {
        Self::default()
    }

    /// The manager this context was created by, if any.
    pub fn manager(&self) -> Option<&FlContextManager> {
        self.manager.as_ref()
    }

    /// Set a prop (NVFlare's `set_prop`).
    ///
    /// Refused with [`CoreError::PropMaskConflict`], changing nothing, when the key exists locally
    /// with another mask, or when the prop is sticky and the manager holds a sticker for the key
    /// with another mask. Otherwise a sticky prop is written to the manager (so every context of
    /// the manager sees it) and the prop is written locally.
    pub fn set_prop(
        &mut self,
        key: &str,
        value: impl Into<Value>,
        private: bool,
        sticky: bool,
    ) -> Result<(), CoreError> {
        let mask = mask_of(private, sticky);
        if let Some(existing) = self.props.get(key).map(|p| p.mask) {
            if existing != mask {
                log::warn!(
                    "site {} job {}: prop {key} exists with mask {existing}; not changed to mask {mask}",
                    self.site_for_log(),
                    self.job_for_log()
                );
                return Err(CoreError::PropMaskConflict {
                    key: key.to_owned(),
                    existing,
                    requested: mask,
                });
            }
        }
        let value = value.into();
        if sticky {
            if let Some(manager) = &self.manager {
                if let Err(existing) = manager.put_sticker(key, value.clone(), mask) {
                    log::warn!(
                        "site {} job {}: sticker {key} exists with mask {existing}; not changed to mask {mask}",
                        manager.identity_name(),
                        manager.job_id()
                    );
                    return Err(CoreError::PropMaskConflict {
                        key: key.to_owned(),
                        existing,
                        requested: mask,
                    });
                }
            }
        }
        self.props.insert(key.to_owned(), Prop { value, mask });
        Ok(())
    }

    /// A prop's value (NVFlare's `get_prop`): a local non-sticky prop as it is; otherwise the
    /// manager's sticker (private first, then public) when there is one; otherwise the local
    /// prop, if any.
    pub fn get_prop(&self, key: &str) -> Option<Value> {
        let local = self.props.get(key);
        if let Some(p) = local {
            if !is_sticky(p.mask) {
                return Some(p.value.clone());
            }
        }
        if let Some(v) = self.manager.as_ref().and_then(|m| m.sticker(key)) {
            return Some(v);
        }
        local.map(|p| p.value.clone())
    }

    /// Write a prop locally with no checks, never touching the manager (NVFlare's `put`).
    pub fn put(&mut self, key: &str, value: impl Into<Value>, private: bool, sticky: bool) {
        self.props.insert(
            key.to_owned(),
            Prop {
                value: value.into(),
                mask: mask_of(private, sticky),
            },
        );
    }

    /// Remove a local prop. Keys starting with `__` are removed only when `force` is true.
    /// Removal is local: a sticker of the manager is still found by [`FlContext::get_prop`].
    /// Returns whether a prop was removed.
    pub fn remove_prop(&mut self, key: &str, force: bool) -> bool {
        if key.starts_with("__") && !force {
            return false;
        }
        self.props.shift_remove(key).is_some()
    }

    /// The public props (NVFlare's `get_all_public_props`): every local prop without the private
    /// bit, in order, with sticky ones read from the manager's public stickers when present.
    /// Stickers never set through or copied into this context are not listed.
    pub fn public_props(&self) -> Map {
        self.public_entries()
            .map(|(k, v)| (Value::from(k), v))
            .collect()
    }

    /// Public props as (key, current value) pairs.
    fn public_entries(&self) -> impl Iterator<Item = (String, Value)> + '_ {
        self.props
            .iter()
            .filter(|(_, p)| !is_private(p.mask))
            .map(|(k, p)| {
                let value = if is_sticky(p.mask) {
                    self.manager
                        .as_ref()
                        .and_then(|m| m.public_sticker(k))
                        .unwrap_or_else(|| p.value.clone())
                } else {
                    p.value.clone()
                };
                (k.clone(), value)
            })
    }

    /// Replace the public props (NVFlare's `set_public_props`): drop every local public prop
    /// (sticky or not), keep the private ones, then set each entry of `props` as a public
    /// non-sticky prop. Entries with a non-string key, or clashing with a private prop's mask,
    /// are skipped with a warning. The job id stays available through the manager's sticker.
    pub fn set_public_props(&mut self, props: &Map) {
        self.props.retain(|_, p| is_private(p.mask));
        for (key, value) in props.iter() {
            match key.as_str() {
                Some(k) => {
                    // A conflict was already logged by set_prop; skipping it is NVFlare's behaviour.
                    let _ = self.set_prop(k, value.clone(), false, false);
                }
                None => log::warn!(
                    "site {} job {}: ignoring public prop with a {} key",
                    self.site_for_log(),
                    self.job_for_log(),
                    key.kind()
                ),
            }
        }
    }

    /// The job id (`__run_num__`), with the same lookup as [`FlContext::get_prop`].
    pub fn job_id(&self) -> Option<String> {
        self.get_str(fl_ctx_key::RUN_NUM)
    }

    /// The site name (`__identity_name__`), `""` when absent.
    pub fn identity_name(&self) -> String {
        self.get_str(fl_ctx_key::IDENTITY_NAME).unwrap_or_default()
    }

    /// The process type (`__process_type__`, e.g. `"CJ"`).
    pub fn process_type(&self) -> Option<String> {
        self.get_str(fl_ctx_key::PROCESS_TYPE)
    }

    fn get_str(&self, key: &str) -> Option<String> {
        match self.get_prop(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// The serialisable form of this context that NVFlare sends to a peer: the public props only,
    /// each with mask 0, and no model.
    pub fn to_peer_context(&self) -> PeerContext {
        PeerContext {
            model: Value::Nil,
            props: self
                .public_entries()
                .map(|(k, value)| (k, ContextProp { value, mask: 0 }))
                .collect(),
        }
    }

    /// Store the peer's context as the local private non-sticky prop `__peer_ctx__`.
    pub fn set_peer_context(&mut self, ctx: PeerContext) {
        self.put(fl_ctx_key::PEER_CTX, ctx, true, false);
    }

    /// The peer's context, if one was stored (it is never a sticker, so the local prop is read).
    pub fn peer_context(&self) -> Option<&PeerContext> {
        self.props
            .get(fl_ctx_key::PEER_CTX)
            .and_then(|p| p.value.as_context())
    }

    fn site_for_log(&self) -> String {
        self.identity_name()
    }

    fn job_for_log(&self) -> String {
        self.job_id().unwrap_or_else(|| "?".to_owned())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::constants::fl_ctx_key as k;

    fn site1_manager() -> FlContextManager {
        FlContextManager::new(
            "site-1",
            "job-1",
            vec![
                (k::FQSN.to_owned(), Value::from("site-1")),
                (k::IS_LEAF.to_owned(), Value::from(true)),
            ],
            vec![
                (k::PROCESS_TYPE.to_owned(), Value::from("CJ")),
                (k::JOB_META.to_owned(), Value::map()),
            ],
        )
    }

    fn keys(m: &Map) -> Vec<&str> {
        m.keys().filter_map(Value::as_str).collect()
    }

    #[test]
    fn fresh_context_public_props_are_exactly_run_num_identity_fqsn_is_leaf() {
        let ctx = site1_manager().new_context();
        let public = ctx.public_props();
        assert_eq!(
            keys(&public),
            vec![
                "__run_num__",
                "__identity_name__",
                "__fqsn__",
                "__is_leaf__"
            ]
        );
        assert_eq!(public.get("__run_num__"), Some(&Value::from("job-1")));
        assert_eq!(
            public.get("__identity_name__"),
            Some(&Value::from("site-1"))
        );
        assert_eq!(public.get("__fqsn__"), Some(&Value::from("site-1")));
        assert_eq!(public.get("__is_leaf__"), Some(&Value::from(true)));
        // private stickers are there, but not public
        assert_eq!(ctx.process_type().as_deref(), Some("CJ"));
        assert_eq!(ctx.get_prop(k::JOB_META), Some(Value::map()));
    }

    #[test]
    fn run_num_is_a_real_sticker_of_the_manager() {
        let mgr = site1_manager();
        assert_eq!(mgr.sticker(k::RUN_NUM), Some(Value::from("job-1")));
        let mut ctx = mgr.new_context();
        assert!(ctx.remove_prop(k::RUN_NUM, true));
        assert_eq!(ctx.job_id().as_deref(), Some("job-1"));
    }

    #[test]
    fn job_id_argument_wins_over_a_run_num_sticker() {
        let mgr = FlContextManager::new(
            "s",
            "job-1",
            vec![(k::RUN_NUM.to_owned(), Value::from("other"))],
            vec![(k::RUN_NUM.to_owned(), Value::from("other2"))],
        );
        assert_eq!(mgr.new_context().job_id().as_deref(), Some("job-1"));
    }

    #[test]
    fn a_key_in_both_sticker_lists_is_kept_private() {
        let mgr = FlContextManager::new(
            "s",
            "j",
            vec![("x".to_owned(), Value::from(1))],
            vec![("x".to_owned(), Value::from(2))],
        );
        let ctx = mgr.new_context();
        assert_eq!(ctx.get_prop("x"), Some(Value::from(2)));
        assert!(!ctx.public_props().contains_key("x"));
    }

    #[test]
    fn empty_identity_is_not_set_and_reads_as_empty_string() {
        let mgr = FlContextManager::new("", "j", vec![], vec![]);
        let ctx = mgr.new_context();
        assert_eq!(keys(&ctx.public_props()), vec!["__run_num__"]);
        assert_eq!(ctx.identity_name(), "");
        assert_eq!(FlContext::new().identity_name(), "");
    }

    #[test]
    fn sticky_prop_set_in_one_context_is_visible_from_every_context_including_earlier_ones() {
        let mgr = site1_manager();
        let bystander = mgr.new_context();
        let earlier = mgr.new_context();
        let mut setter = mgr.new_context();
        setter.set_prop("round", 3, false, true).unwrap();
        setter.set_prop("secret", "s", true, true).unwrap();
        let later = mgr.new_context();
        for ctx in [&bystander, &earlier, &setter, &later] {
            assert_eq!(ctx.get_prop("round"), Some(Value::from(3)));
            assert_eq!(ctx.get_prop("secret"), Some(Value::from("s")));
        }
        // an update through the earlier context is seen by the others
        let mut earlier = earlier;
        earlier.set_prop("round", 4, false, true).unwrap();
        assert_eq!(later.get_prop("round"), Some(Value::from(4)));
        assert_eq!(setter.get_prop("round"), Some(Value::from(4)));
        // a context created later copies the sticker locally, so it is listed as public...
        assert!(mgr.new_context().public_props().contains_key("round"));
        // ...but a sticker never copied into a context is not among its public props
        assert!(!bystander.public_props().contains_key("round"));
    }

    #[test]
    fn non_sticky_prop_stays_local_to_its_context() {
        let mgr = site1_manager();
        let mut a = mgr.new_context();
        let b = mgr.new_context();
        a.set_prop("x", 1, false, false).unwrap();
        assert_eq!(a.get_prop("x"), Some(Value::from(1)));
        assert_eq!(b.get_prop("x"), None);
        assert_eq!(mgr.sticker("x"), None);
    }

    #[test]
    fn local_non_sticky_prop_shadows_a_sticker() {
        let mgr = site1_manager();
        let mut a = mgr.new_context();
        let mut b = FlContext {
            props: IndexMap::new(),
            manager: Some(mgr.clone()),
        };
        a.set_prop("x", 1, false, true).unwrap();
        b.set_prop("x", 2, false, false).unwrap();
        assert_eq!(b.get_prop("x"), Some(Value::from(2)));
        assert_eq!(a.get_prop("x"), Some(Value::from(1)));
    }

    #[test]
    fn changing_the_mask_of_a_local_prop_is_refused_without_change() {
        let mut ctx = FlContext::new();
        ctx.set_prop("x", 1, false, false).unwrap();
        let err = ctx.set_prop("x", 2, true, false).unwrap_err();
        assert_eq!(
            err,
            CoreError::PropMaskConflict {
                key: "x".into(),
                existing: 0,
                requested: MASK_PRIVATE
            }
        );
        assert_eq!(ctx.get_prop("x"), Some(Value::from(1)));
        assert!(ctx.public_props().contains_key("x"));
        // same mask: accepted
        ctx.set_prop("x", 3, false, false).unwrap();
        assert_eq!(ctx.get_prop("x"), Some(Value::from(3)));
    }

    #[test]
    fn sticky_prop_clashing_with_a_sticker_mask_is_refused_without_change() {
        let mgr = site1_manager();
        let mut a = mgr.new_context();
        a.set_prop("x", 1, true, true).unwrap();
        // b has no local "x" (created without copying stickers), so only the manager can refuse
        let mut b = FlContext {
            props: IndexMap::new(),
            manager: Some(mgr.clone()),
        };
        let err = b.set_prop("x", 2, false, true).unwrap_err();
        assert!(matches!(
            err,
            CoreError::PropMaskConflict { ref key, existing: 3, requested: 1 } if key == "x"
        ));
        assert!(b.props.get("x").is_none());
        assert_eq!(mgr.sticker("x"), Some(Value::from(1)));
        // the private sticker for __process_type__ refuses a public sticky write too
        let mut c = FlContext {
            props: IndexMap::new(),
            manager: Some(mgr.clone()),
        };
        assert!(c.set_prop(k::PROCESS_TYPE, "SJ", false, true).is_err());
        assert_eq!(c.process_type().as_deref(), Some("CJ"));
    }

    #[test]
    fn put_writes_locally_without_checks_or_manager() {
        let mgr = site1_manager();
        let mut a = mgr.new_context();
        a.set_prop("x", 1, false, false).unwrap();
        a.put("x", 2, true, true);
        assert_eq!(a.get_prop("x"), Some(Value::from(2)));
        assert!(!a.public_props().contains_key("x"));
        assert_eq!(mgr.sticker("x"), None);
        assert_eq!(mgr.new_context().get_prop("x"), None);
    }

    #[test]
    fn dunder_keys_are_removed_only_when_forced() {
        let mut ctx = FlContext::new();
        ctx.put("__secret__", 1, false, false);
        ctx.put("plain", 2, false, false);
        assert!(!ctx.remove_prop("__secret__", false));
        assert_eq!(ctx.get_prop("__secret__"), Some(Value::from(1)));
        assert!(ctx.remove_prop("__secret__", true));
        assert_eq!(ctx.get_prop("__secret__"), None);
        assert!(ctx.remove_prop("plain", false));
        assert!(!ctx.remove_prop("plain", false));
    }

    #[test]
    fn removing_a_sticky_prop_is_local_and_the_sticker_comes_back() {
        let mgr = site1_manager();
        let mut ctx = mgr.new_context();
        ctx.set_prop("x", 1, false, true).unwrap();
        assert!(ctx.remove_prop("x", false));
        assert!(!ctx.public_props().contains_key("x"));
        assert_eq!(ctx.get_prop("x"), Some(Value::from(1)));
    }

    #[test]
    fn set_public_props_replaces_public_props_and_keeps_private_ones() {
        let mut ctx = site1_manager().new_context();
        ctx.set_prop("local_pub", 1, false, false).unwrap();
        ctx.set_prop("local_priv", 2, true, false).unwrap();
        let mut incoming = Map::new();
        incoming.insert("peer_a", "a");
        incoming.insert(7, "non-string key is skipped");
        incoming.insert("local_priv", "clashes with a private prop");
        ctx.set_public_props(&incoming);
        assert_eq!(keys(&ctx.public_props()), vec!["peer_a"]);
        assert_eq!(ctx.get_prop("local_pub"), None);
        assert_eq!(ctx.get_prop("local_priv"), Some(Value::from(2)));
        assert_eq!(ctx.process_type().as_deref(), Some("CJ"));
    }

    #[test]
    fn set_public_props_keeps_the_job_id() {
        let mut ctx = site1_manager().new_context();
        ctx.set_public_props(&Map::new());
        assert_eq!(ctx.job_id().as_deref(), Some("job-1"));
        assert_eq!(ctx.get_prop(k::RUN_NUM), Some(Value::from("job-1")));
    }

    #[test]
    fn getters_see_stickers_set_after_the_context_was_created() {
        let mgr = FlContextManager::new("site-1", "job-1", vec![], vec![]);
        let early = mgr.new_context();
        assert_eq!(early.process_type(), None);
        let mut other = mgr.new_context();
        other.set_prop(k::PROCESS_TYPE, "CJ", true, true).unwrap();
        assert_eq!(early.process_type().as_deref(), Some("CJ"));
        assert_eq!(early.job_id().as_deref(), Some("job-1"));
        assert_eq!(early.identity_name(), "site-1");
    }

    #[test]
    fn context_without_manager_keeps_sticky_props_locally() {
        let mut ctx = FlContext::new();
        ctx.set_prop("x", 1, false, true).unwrap();
        assert_eq!(ctx.get_prop("x"), Some(Value::from(1)));
        assert_eq!(ctx.job_id(), None);
        let copy = ctx.clone();
        assert_eq!(copy.get_prop("x"), Some(Value::from(1)));
    }

    #[test]
    fn peer_context_carries_public_props_only_with_mask_zero() {
        let mgr = site1_manager();
        let mut ctx = mgr.new_context();
        ctx.set_prop("pub_sticky", 1, false, true).unwrap();
        ctx.set_prop("priv", 2, true, false).unwrap();
        // the sticker's current value is sent, even if another context changed it
        mgr.new_context()
            .set_prop("pub_sticky", 5, false, true)
            .unwrap();
        let peer = ctx.to_peer_context();
        assert_eq!(peer.model, Value::Nil);
        let names: Vec<&str> = peer.props.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "__run_num__",
                "__identity_name__",
                "__fqsn__",
                "__is_leaf__",
                "pub_sticky"
            ]
        );
        assert!(peer.props.iter().all(|(_, p)| p.mask == 0));
        assert_eq!(peer.get("pub_sticky"), Some(&Value::from(5)));
    }

    #[test]
    fn peer_context_is_stored_as_a_private_local_prop() {
        let mut ctx = site1_manager().new_context();
        let mut peer = PeerContext::default();
        peer.set(k::IDENTITY_NAME, "server");
        ctx.set_peer_context(peer.clone());
        assert_eq!(ctx.peer_context(), Some(&peer));
        assert!(!ctx.public_props().contains_key(k::PEER_CTX));
        assert_eq!(ctx.get_prop(k::PEER_CTX), Some(Value::from(peer)));
        assert!(FlContext::new().peer_context().is_none());
    }

    #[test]
    fn debug_of_a_manager_whose_lock_is_held_does_not_block() {
        let mgr = site1_manager();
        let ctx = mgr.new_context();
        let text = {
            let _held = mgr.stickers();
            format!("{ctx:?}")
        };
        assert!(text.contains("<locked>"), "{text}");
        assert!(text.contains("job-1"));
        let free = format!("{mgr:?}");
        assert!(free.contains("__fqsn__"), "{free}");
    }

    #[test]
    fn contexts_can_move_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FlContext>();
        assert_send_sync::<FlContextManager>();
        let mgr = site1_manager();
        let mut ctx = mgr.new_context();
        std::thread::spawn(move || ctx.set_prop("from_thread", true, false, true))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(mgr.sticker("from_thread"), Some(Value::from(true)));
    }
}
