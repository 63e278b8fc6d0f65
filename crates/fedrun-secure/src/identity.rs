//! NVFlare's identity binding between a cell name (FQCN) and a certificate CN.
//!
//! With `connection_security` `mtls` (NVFlare's default), a certificate offered for a cell is
//! accepted only if its CN is the identity that cell's name resolves to, as NVFlare's
//! `CellIdentityResolver` does: an exact entry of the identity map, else the entry of the
//! longest dotted prefix of the name, else the name's first segment. A client job's map has
//! `server` → the server's identity (`servers[0].identity` of `fed_client.json`, the server's
//! name in `project.yml`), so `server.J1` → `server1` and `site-2.J1` → `site-2`; a server
//! cell's map has `server` → its own CN.

use std::collections::BTreeMap;

/// Resolves a cell's expected certificate identity from its FQCN.
///
/// # Example
///
/// ```
/// use fedrun_secure::IdentityResolver;
///
/// let r = IdentityResolver::for_client("server1");
/// assert_eq!(r.resolve("site-2.J1"), "site-2");
/// assert_eq!(r.resolve("server.J1"), "server1");
/// assert_eq!(r.resolve("server"), "server1");
/// assert_eq!(r.resolve("site-1"), "site-1");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityResolver {
    map: BTreeMap<String, String>,
}

impl IdentityResolver {
    /// A resolver with no map entries (every name resolves to its first segment).
    pub fn new() -> IdentityResolver {
        IdentityResolver::default()
    }

    /// A client's resolver: `server` (and its jobs) resolve to `server_identity`.
    pub fn for_client(server_identity: &str) -> IdentityResolver {
        IdentityResolver::new().with("server", server_identity)
    }

    /// Adds a map entry: `fqcn` and every cell below it resolve to `identity`.
    pub fn with(mut self, fqcn: &str, identity: &str) -> IdentityResolver {
        self.map.insert(fqcn.to_owned(), identity.to_owned());
        self
    }

    /// The identity a certificate offered for `fqcn` must carry as its CN.
    pub fn resolve(&self, fqcn: &str) -> String {
        let mut name = fqcn;
        loop {
            if let Some(id) = self.map.get(name) {
                return id.clone();
            }
            match name.rfind('.') {
                Some(i) => name = &name[..i],
                None => break,
            }
        }
        fqcn.split('.').next().unwrap_or(fqcn).to_owned()
    }
}
