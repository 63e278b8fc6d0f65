//! Fully qualified cell names (FQCN).
//!
//! Every CellNet endpoint is addressed by a dot-joined path, root first (`server`,
//! `server.<job>`, `site-1`, `site-1.<job>`). Routing, reply addressing and the
//! server/client split all derive from that string, so it is validated once, here, and then
//! carried as a [`Fqcn`] that is known to be well formed.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use crate::error::CellError;

/// A validated fully qualified cell name.
///
/// Rules: non-empty parts separated by `.`, each part made of
/// `[A-Za-z0-9_~-]`, and no part repeated within one name. The root (first part) `server` is
/// reserved for the server side; every other root names a client site.
///
/// # Example
///
/// ```
/// use fedrun_cell::Fqcn;
///
/// let job = Fqcn::job_cell("site-1", "6f1c0d9e-5a7b-4f3e-9d2a-0c1b2a3d4e5f").unwrap();
/// assert_eq!(job.root(), "site-1");
/// assert_eq!(job.parent(), Some(Fqcn::new("site-1").unwrap()));
/// assert!(!job.is_server_side());
/// assert!(Fqcn::SERVER.is_server_side());
/// assert!(Fqcn::new("site-1..job").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fqcn(Cow<'static, str>);

impl Fqcn {
    /// The separator between parts.
    pub const SEPARATOR: char = '.';

    /// The root of the server side: `server`.
    pub const SERVER: Fqcn = Fqcn(Cow::Borrowed("server"));

    /// Parses and validates a name.
    ///
    /// # Errors
    ///
    /// [`CellError::InvalidFqcn`] when the name is empty, has an empty part, a part with a
    /// character outside `[A-Za-z0-9_~-]`, or a part that appears twice.
    pub fn new(name: impl Into<String>) -> Result<Fqcn, CellError> {
        let name: String = name.into();
        validate(&name)?;
        Ok(Fqcn(Cow::Owned(name)))
    }

    /// The cell of job `job_id` at `site`: `<site>.<job_id>` (both validated).
    ///
    /// # Errors
    ///
    /// [`CellError::InvalidFqcn`] when either part is not a valid name part (this includes a
    /// `site` that already contains a `.`, or a job id equal to the site name).
    pub fn job_cell(site: &str, job_id: &str) -> Result<Fqcn, CellError> {
        for part in [site, job_id] {
            if part.contains(Self::SEPARATOR) {
                return Err(invalid(
                    &format!("{site}.{job_id}"),
                    format!("'{part}' must be a single name part"),
                ));
            }
        }
        Fqcn::new(format!("{site}{}{job_id}", Self::SEPARATOR))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parts, root first.
    pub fn parts(&self) -> impl Iterator<Item = &str> {
        self.0.split(Self::SEPARATOR)
    }

    /// The root part (`server`, `site-1`, ...).
    pub fn root(&self) -> &str {
        self.0.split(Self::SEPARATOR).next().unwrap_or(&self.0)
    }

    /// The name without its last part, or `None` for a root.
    pub fn parent(&self) -> Option<Fqcn> {
        self.0
            .rsplit_once(Self::SEPARATOR)
            .map(|(parent, _)| Fqcn(Cow::Owned(parent.to_owned())))
    }

    /// Whether this is a root name (one part).
    pub fn is_root(&self) -> bool {
        !self.0.contains(Self::SEPARATOR)
    }

    /// Whether the cell belongs to the server side (its root is `server`).
    pub fn is_server_side(&self) -> bool {
        self.root() == Self::SERVER.as_str()
    }
}

fn invalid(name: &str, reason: impl Into<String>) -> CellError {
    CellError::InvalidFqcn {
        fqcn: name.to_owned(),
        reason: reason.into(),
    }
}

fn validate(name: &str) -> Result<(), CellError> {
    if name.is_empty() {
        return Err(invalid(name, "empty name"));
    }
    let mut seen: Vec<&str> = Vec::new();
    for part in name.split(Fqcn::SEPARATOR) {
        if part.is_empty() {
            return Err(invalid(name, "empty part"));
        }
        if let Some(bad) = part
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '~' | '-')))
        {
            return Err(invalid(
                name,
                format!("character {bad:?} in part '{part}' is not one of [A-Za-z0-9_~-]"),
            ));
        }
        if seen.contains(&part) {
            return Err(invalid(name, format!("part '{part}' appears twice")));
        }
        seen.push(part);
    }
    Ok(())
}

impl fmt::Display for Fqcn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Fqcn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fqcn({:?})", self.0)
    }
}

impl AsRef<str> for Fqcn {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Fqcn {
    type Err = CellError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fqcn::new(s)
    }
}

impl TryFrom<&str> for Fqcn {
    type Error = CellError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Fqcn::new(s)
    }
}

impl TryFrom<String> for Fqcn {
    type Error = CellError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Fqcn::new(s)
    }
}

impl From<Fqcn> for String {
    fn from(f: Fqcn) -> String {
        f.0.into_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn valid_names_parse_and_expose_their_structure() {
        let f = Fqcn::new("server.job_1~a-B").unwrap();
        assert_eq!(f.root(), "server");
        assert!(f.is_server_side());
        assert_eq!(f.parent().unwrap(), Fqcn::SERVER);
        assert_eq!(f.parts().collect::<Vec<_>>(), ["server", "job_1~a-B"]);
        assert!(Fqcn::SERVER.parent().is_none());
        assert!(Fqcn::SERVER.is_root());
        assert!(!f.is_root());
        assert!(!Fqcn::new("server-1").unwrap().is_server_side());
    }

    #[test]
    fn const_server_equals_parsed_server() {
        use std::collections::HashSet;
        let set: HashSet<Fqcn> = [Fqcn::SERVER].into_iter().collect();
        assert!(set.contains(&Fqcn::new("server").unwrap()));
    }

    #[test]
    fn malformed_names_are_rejected_with_a_reason() {
        for bad in ["", ".", "a.", ".a", "a..b", "a b", "a/b", "a.b.a", "sité"] {
            match Fqcn::new(bad) {
                Err(CellError::InvalidFqcn { fqcn, reason }) => {
                    assert_eq!(fqcn, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn job_cell_joins_site_and_job_and_refuses_dotted_parts() {
        assert_eq!(
            Fqcn::job_cell("site-1", "j1").unwrap().as_str(),
            "site-1.j1"
        );
        assert!(Fqcn::job_cell("site-1.x", "j1").is_err());
        assert!(Fqcn::job_cell("site-1", "a.b").is_err());
        assert!(Fqcn::job_cell("same", "same").is_err());
        assert!(Fqcn::job_cell("", "j").is_err());
    }
}
