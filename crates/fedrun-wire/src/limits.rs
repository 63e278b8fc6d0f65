//! Limits on what a peer may make this endpoint hold, and their defaults.
//!
//! Everything here exists because a peer that can reach the port is not trusted before it has
//! proved anything: its endpoint name is checked against NVFlare's own rules (and a length
//! bound NVFlare lacks) before it is used or logged, anything it supplied is logged only as a
//! bounded prefix ([`Bounded`]), and the connection limits default to what the process can
//! afford (the soft `RLIMIT_NOFILE`), so that `accept` never fails for lack of descriptors.

use std::fmt;

use fedrun_cell::Fqcn;

use crate::error::WireError;

/// The longest endpoint name accepted in a handshake, in bytes. NVFlare sets no bound; its
/// names are a site name and a job id (a UUID, 36 bytes) joined by a dot, far below this.
pub const MAX_ENDPOINT_NAME_LEN: usize = 256;

/// The most bytes of a peer-supplied string that reach a log line or an error message.
pub const LOG_PREFIX_LEN: usize = 64;

/// File descriptors kept for everything but accepted connections (connectors, log and data
/// files, the listener itself) when [`default_max_connections`] derives the limit.
const FD_RESERVE_MIN: usize = 32;
/// The soft descriptor limit assumed where it cannot be read.
const FALLBACK_FD_LIMIT: usize = 1024;

/// A peer-supplied string as it may appear in a log line: at most [`LOG_PREFIX_LEN`] bytes
/// (cut at a character boundary), control characters escaped, and the full length when cut.
///
/// # Example
///
/// ```
/// use fedrun_wire::limits::Bounded;
///
/// assert_eq!(Bounded("site-1").to_string(), "\"site-1\"");
/// let huge = "x".repeat(10 * 1024 * 1024);
/// let shown = Bounded(&huge).to_string();
/// assert!(shown.len() < 120, "{shown}");
/// assert!(shown.ends_with("(10485760 bytes)"));
/// ```
#[derive(Clone, Copy)]
pub struct Bounded<'a>(pub &'a str);

impl fmt::Display for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.len() <= LOG_PREFIX_LEN {
            return write!(f, "{s:?}");
        }
        let mut end = LOG_PREFIX_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{:?}… ({} bytes)", &s[..end], s.len())
    }
}

impl fmt::Debug for Bounded<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checks an endpoint name from a handshake by NVFlare's rules (CellNet's `FQCN.validate`, which
/// its connection manager applies to every handshake: surrounding white space ignored, only
/// `[A-Za-z0-9_.~-]`, no empty part, no part twice) and a length
/// bound of [`MAX_ENDPOINT_NAME_LEN`] bytes, then makes it a [`Fqcn`].
///
/// # Errors
///
/// [`WireError::RefusedEndpointName`], which names the peer's string by a bounded prefix only.
///
/// # Example
///
/// ```
/// use fedrun_wire::limits::check_endpoint_name;
///
/// assert_eq!(check_endpoint_name(" site-1.job-7 ").unwrap().as_str(), "site-1.job-7");
/// assert!(check_endpoint_name("site-1/x").is_err(), "NVFlare refuses '/'");
/// assert!(check_endpoint_name("a.b.a").is_err(), "a part twice");
/// assert!(check_endpoint_name(&"s".repeat(300)).is_err(), "too long");
/// ```
pub fn check_endpoint_name(name: &str) -> Result<Fqcn, WireError> {
    let refuse = |reason: &str| WireError::RefusedEndpointName {
        name: Bounded(name).to_string(),
        reason: reason.to_owned(),
    };
    if name.len() > MAX_ENDPOINT_NAME_LEN {
        return Err(refuse(&format!(
            "longer than {MAX_ENDPOINT_NAME_LEN} bytes"
        )));
    }
    let name = name.trim();
    if name.is_empty() {
        return Err(refuse("empty"));
    }
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '~' | '-');
    if !name.chars().all(valid) {
        return Err(refuse("a character outside [A-Za-z0-9_.~-]"));
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(refuse("an empty part"));
    }
    for (i, p) in parts.iter().enumerate() {
        if parts[..i].contains(p) {
            return Err(refuse("a part appears twice"));
        }
    }
    Fqcn::new(name).map_err(|_| refuse("not a cell name"))
}

/// The default [`crate::WireConfig::max_connections`]: the soft `RLIMIT_NOFILE` of this process
/// less a reserve (a quarter of it, at least 32) for everything else the process opens, and at
/// least 1. Read from `/proc/self/limits`; 1024 is assumed where that cannot be read.
pub fn default_max_connections() -> usize {
    let limit = soft_fd_limit().unwrap_or(FALLBACK_FD_LIMIT);
    connections_for_fd_limit(limit)
}

/// Accepted connections allowed under a soft descriptor limit of `limit`.
pub(crate) fn connections_for_fd_limit(limit: usize) -> usize {
    let reserve = (limit / 4).max(FD_RESERVE_MIN);
    limit.saturating_sub(reserve).max(1)
}

/// The soft "Max open files" of this process, if it can be read (Linux).
fn soft_fd_limit() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    match soft {
        "unlimited" => Some(usize::MAX / 2),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nvflare_names_pass_and_others_are_refused_with_a_bounded_message() {
        for ok in [
            "server",
            "site-1",
            "site_2.0f3c-aa",
            "server.job1",
            "admin-x",
            "a~b",
        ] {
            assert_eq!(check_endpoint_name(ok).unwrap().as_str(), ok);
        }
        for bad in ["", " ", "a..b", ".a", "a.", "sp ace", "a/b", "a.a", "é"] {
            assert!(check_endpoint_name(bad).is_err(), "{bad:?}");
        }
        let huge = "y".repeat(10 * 1024 * 1024);
        let msg = check_endpoint_name(&huge).unwrap_err().to_string();
        assert!(msg.len() < 300, "error message of {} bytes", msg.len());
    }

    #[test]
    fn a_cut_prefix_stays_on_a_character_boundary() {
        let s = "é".repeat(100);
        let shown = Bounded(&s).to_string();
        assert!(shown.contains("(200 bytes)"));
        assert!(shown.len() < 100);
    }

    #[test]
    fn the_connection_limit_leaves_descriptors_for_the_rest_of_the_process() {
        assert_eq!(connections_for_fd_limit(128), 96);
        assert_eq!(connections_for_fd_limit(64), 32);
        assert_eq!(connections_for_fd_limit(10), 1);
        assert_eq!(connections_for_fd_limit(20_000), 15_000);
        assert!(default_max_connections() >= 1);
    }
}
