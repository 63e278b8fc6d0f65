//! The serialised form of an FLContext, as it travels inside a Shareable (`__peer_ctx__`).
//!
//! NVFlare sends a context as `[model, {key: {"value": v, "mask": m}}]`; only public props are
//! sent. The live context, with its manager and sticky props, is [`crate::fl_context`]'s business.

use crate::value::Value;

/// Prop mask bit: the prop is sticky.
pub const MASK_STICKY: u8 = 1;
/// Prop mask bit: the prop is private.
pub const MASK_PRIVATE: u8 = 2;

/// One prop of a serialised context.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextProp {
    /// The value.
    pub value: Value,
    /// Bit 0 sticky, bit 1 private (public non-sticky = 0).
    pub mask: u8,
}

/// A serialised FLContext: the model slot (normally `None`) and the props in order.
///
/// # Example
/// ```
/// use fedrun_core::{PeerContext, Value};
///
/// let mut ctx = PeerContext::default();
/// ctx.set("__identity_name__", "site-1");
/// ctx.set("__run_num__", "job-1");
/// assert_eq!(ctx.get("__run_num__").and_then(Value::as_str), Some("job-1"));
/// ```
#[derive(Clone, Debug, PartialEq, Default)]
pub struct PeerContext {
    /// The model slot of the context (NVFlare sends `None`).
    pub model: Value,
    /// The props, in order.
    pub props: Vec<(String, ContextProp)>,
}

impl PeerContext {
    /// A prop's value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, p)| &p.value)
    }

    /// Set a public, non-sticky prop (replacing in place).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        let prop = ContextProp {
            value: value.into(),
            mask: 0,
        };
        match self.props.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = prop,
            None => self.props.push((key.to_owned(), prop)),
        }
    }
}
