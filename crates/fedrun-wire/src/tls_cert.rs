//! The subject common name (CN) of an X.509 certificate, read by a small bounded DER walker.
//!
//! NVFlare binds an mTLS connection to the name a peer registers by comparing it with the CN of
//! the peer's certificate (its provisioning tool writes `CN=<site name>` and nothing else that
//! identifies the site). webpki validates certificates but never exposes the subject, so this
//! module reads just that one field: certificate → tbsCertificate → subject → the
//! `2.5.4.3` attribute. Every length is checked against the bytes actually present; nothing is
//! allocated from a declared length; a malformed certificate yields `None`, never a panic.

/// DER tag of a SEQUENCE.
const SEQUENCE: u8 = 0x30;
/// DER tag of a SET.
const SET: u8 = 0x31;
/// DER tag of an OBJECT IDENTIFIER.
const OID: u8 = 0x06;
/// DER tag of the explicit `[0]` version of a tbsCertificate.
const VERSION: u8 = 0xa0;
/// The content bytes of OID 2.5.4.3 (id-at-commonName).
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
/// The longest CN read (X.520 `ub-common-name`, 64 characters, at most 4 bytes each in UTF-8).
const MAX_CN_BYTES: usize = 256;

/// One DER element: its tag, its content, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // long form: 1..=4 length bytes (a certificate is far below 4 GiB)
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (content, after) = rest.split_at(len);
    Some((tag, content, after))
}

/// The content of the element at the head of `input` if it has tag `want`, and what follows.
fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, content, after) = element(input)?;
    (tag == want).then_some((content, after))
}

/// The subject CN of a DER certificate, if it has exactly one readable CN.
///
/// Accepted string types: UTF8String, PrintableString, IA5String, TeletexString (as Latin-1,
/// which is what NVFlare's `cryptography` writes nothing but ASCII into). A certificate with two
/// CNs is ambiguous and yields `None`, as does one whose CN is longer than 256 bytes.
///
/// # Example
///
/// ```
/// // no certificate at all
/// assert_eq!(fedrun_wire::tls::common_name(&[0x30, 0x00]), None);
/// ```
pub fn common_name(der: &[u8]) -> Option<String> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&VERSION) {
        rest = element(rest)?.2;
    }
    // serial, signature algorithm, issuer, validity
    for _ in 0..4 {
        rest = element(rest)?.2;
    }
    let (mut subject, _) = expect(rest, SEQUENCE)?;
    let mut found: Option<String> = None;
    while !subject.is_empty() {
        let (mut rdn, after) = expect(subject, SET)?;
        subject = after;
        while !rdn.is_empty() {
            let (attr, after) = expect(rdn, SEQUENCE)?;
            rdn = after;
            let (oid, value) = expect(attr, OID)?;
            if oid != COMMON_NAME {
                continue;
            }
            let (tag, text, _) = element(value)?;
            if text.len() > MAX_CN_BYTES || found.is_some() {
                return None;
            }
            found = Some(match tag {
                0x0c | 0x13 | 0x16 => std::str::from_utf8(text).ok()?.to_owned(),
                0x14 => text.iter().map(|&b| char::from(b)).collect(),
                _ => return None,
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert_with_cn(cn: &str) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "nvidia");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn common_name_is_read_from_the_subject() {
        assert_eq!(
            common_name(&cert_with_cn("site-1")).as_deref(),
            Some("site-1")
        );
    }

    #[test]
    fn truncated_or_garbage_certificates_yield_none_without_panicking() {
        let der = cert_with_cn("site-1");
        for cut in 0..der.len() {
            // every prefix is malformed; none may panic (most yield None)
            let _ = common_name(&der[..cut]);
        }
        assert_eq!(common_name(&[]), None);
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
    }

    #[test]
    fn a_subject_without_cn_yields_none() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "nvidia");
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(common_name(&der), None);
    }
}
