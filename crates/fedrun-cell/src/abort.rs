//! Cooperative abort signals.
//!
//! NVFlare threads a `Signal` object through long operations (a request wait, a task run) so
//! that the job can abandon them; a signal derived from another one fires whenever its parent
//! fires. [`AbortSignal`] is that concept in Rust: a cheap, cloneable handle over
//! [`tokio_util::sync::CancellationToken`], which already gives the parent → child propagation
//! and an awaitable "fired" event without polling.

use tokio_util::sync::CancellationToken;

/// A cloneable, cooperative "stop what you are doing" flag.
///
/// Clones share one state: triggering any clone triggers all of them. A [`child`](Self::child)
/// is triggered when any ancestor is, but triggering the child leaves the parent untouched.
/// Triggering is idempotent and cannot be undone.
///
/// # Example
///
/// ```
/// use fedrun_cell::abort::AbortSignal;
///
/// let job = AbortSignal::new();
/// let task = job.child();
/// task.trigger();
/// assert!(task.is_triggered());
/// assert!(!job.is_triggered()); // a child never fires its parent
///
/// let other_task = job.child();
/// job.trigger();
/// assert!(other_task.is_triggered()); // a parent fires every child
/// ```
#[derive(Clone, Debug, Default)]
pub struct AbortSignal {
    token: CancellationToken,
}

impl AbortSignal {
    /// A fresh, untriggered signal with no parent.
    pub fn new() -> Self {
        Self::default()
    }

    /// Triggers this signal (and therefore every clone and every descendant).
    /// Calling it again has no further effect.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether this signal, or any of its ancestors, has been triggered.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// A new signal that is triggered when this one (or any ancestor) is triggered, and that
    /// can also be triggered on its own without affecting this one.
    pub fn child(&self) -> AbortSignal {
        AbortSignal {
            token: self.token.child_token(),
        }
    }

    /// Completes when the signal is triggered (immediately if it already is).
    ///
    /// The future is cancel-safe: dropping it (e.g. inside `tokio::select!`) has no effect on
    /// the signal.
    pub async fn triggered(&self) {
        self.token.cancelled().await;
    }

    /// The underlying token, for code that wants to hand it to tokio-based APIs directly.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl From<CancellationToken> for AbortSignal {
    /// Wraps an existing token; the signal fires when the token is cancelled.
    fn from(token: CancellationToken) -> Self {
        AbortSignal { token }
    }
}

#[cfg(test)]
mod tests {
    use super::AbortSignal;
    use std::time::Duration;

    #[test]
    fn clones_share_state() {
        let a = AbortSignal::new();
        let b = a.clone();
        assert!(!b.is_triggered());
        a.trigger();
        assert!(b.is_triggered());
    }

    #[test]
    fn grandchild_fires_when_root_fires_but_not_the_reverse() {
        let root = AbortSignal::new();
        let child = root.child();
        let grandchild = child.child();
        grandchild.trigger();
        assert!(!child.is_triggered());
        assert!(!root.is_triggered());
        let other = child.child();
        root.trigger();
        assert!(child.is_triggered());
        assert!(other.is_triggered());
    }

    #[tokio::test]
    async fn triggered_future_completes_on_trigger_and_is_immediate_when_already_triggered() {
        let signal = AbortSignal::new();
        let waiter = signal.child();
        let task = tokio::spawn(async move { waiter.triggered().await });
        signal.trigger();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("waiter did not see the trigger")
            .expect("waiter task failed");
        tokio::time::timeout(Duration::from_secs(5), signal.triggered())
            .await
            .expect("already-triggered signal must complete at once");
    }
}
