//! NVFlare's `.npz` download items: a zip of `.npy` files, stored (not compressed).
//!
//! When NVFlare serves numpy arrays through its download service, every item of a reply is the
//! output of `numpy.savez(..)` for one array named `T<k>` (the array's reference id in the
//! message it belongs to), i.e. a zip holding one stored entry `T<k>.npy`. `numpy.savez`
//! never compresses (`savez_compressed` does, and NVFlare does not use it), so only the stored
//! method is accepted; a deflated entry is a typed error, not a silent failure.
//!
//! Reading trusts nothing: the end record, the central directory and every local header are
//! checked against the input before use, no allocation is sized by a claimed length, entry
//! contents are zero-copy slices of the input and their CRC-32 is verified. numpy writes the
//! local headers with zip64 extra fields (`force_zip64`), so the sizes are taken from the
//! central directory, reading its zip64 extra fields when the 32-bit fields are saturated.
//!
//! Writing produces a plain (non-zip64) stored zip that `numpy.load` reads; entries above
//! 4 GiB are refused with [`NpzError::TooLarge`].
//!
//! # Example
//! ```
//! use bytes::{Bytes, BytesMut};
//! use fedrun_fobs::npz;
//!
//! let zip = npz::write(&[("T0.npy", b"\x93NUMPY...".as_slice())]).unwrap();
//! let entries = npz::read(&Bytes::from(zip)).unwrap();
//! assert_eq!(entries[0].name, "T0.npy");
//! assert_eq!(&entries[0].data[..], b"\x93NUMPY...");
//! ```

use bytes::{Bytes, BytesMut};

const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_ZIP64_EOCD: u32 = 0x0606_4b50;
const SIG_ZIP64_LOCATOR: u32 = 0x0706_4b50;
const LOCAL_LEN: usize = 30;
const CENTRAL_LEN: usize = 46;
const EOCD_LEN: usize = 22;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_LEN: usize = 56;
const ZIP64_EXTRA_ID: u16 = 0x0001;
/// The end record's comment is at most this long, which bounds the backwards search.
const MAX_COMMENT: usize = 0xffff;

/// What can be wrong with an `.npz` item.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum NpzError {
    /// No end-of-central-directory record was found.
    #[error("not a zip: no end-of-central-directory record")]
    NoEndRecord,
    /// A structure claims bytes past the end of the input.
    #[error("zip {what} at byte {offset} runs past the end of the input ({len} bytes)")]
    OutOfBounds {
        /// Which structure.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// The input length.
        len: usize,
    },
    /// A structure does not start with its signature.
    #[error("zip {what} at byte {offset} has a bad signature")]
    BadSignature {
        /// Which structure.
        what: &'static str,
        /// Where it starts.
        offset: u64,
    },
    /// Multi-disk archives are not npz items.
    #[error("multi-disk zip archives are not supported")]
    MultiDisk,
    /// An entry is encrypted.
    #[error("zip entry {0:?} is encrypted")]
    Encrypted(String),
    /// An entry uses a compression method other than stored (0).
    #[error("zip entry {name:?} uses compression method {method}; only stored (0) is supported")]
    UnsupportedCompression {
        /// The entry.
        name: String,
        /// Its method.
        method: u16,
    },
    /// A stored entry's compressed and uncompressed sizes differ.
    #[error("stored zip entry {0:?} has different compressed and uncompressed sizes")]
    SizeMismatch(String),
    /// An entry's contents do not match its CRC-32.
    #[error("zip entry {name:?}: CRC-32 {actual:08x} does not match the recorded {expected:08x}")]
    BadCrc {
        /// The entry.
        name: String,
        /// The recorded CRC.
        expected: u32,
        /// The CRC of the contents.
        actual: u32,
    },
    /// An entry name is not UTF-8.
    #[error("zip entry name is not UTF-8")]
    BadName,
    /// Two entries share a name.
    #[error("zip entry {0:?} appears twice")]
    DuplicateName(String),
    /// A zip64 extra field lacks a value its entry needs.
    #[error("zip entry {0:?}: zip64 extra field missing or short")]
    BadZip64Extra(String),
    /// An entry (or the archive) is too large for the plain zip format this writer produces.
    #[error("{0} bytes is too large for a non-zip64 npz")]
    TooLarge(usize),
}

/// One entry of an `.npz` item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpzEntry {
    /// The file name inside the zip, e.g. `T0.npy`.
    pub name: String,
    /// The entry's bytes (a `.npy` file), a zero-copy slice of the input.
    pub data: Bytes,
}

impl NpzEntry {
    /// The array name: the file name without its `.npy` suffix (as `numpy.load` reports it).
    pub fn array_name(&self) -> &str {
        self.name.strip_suffix(".npy").unwrap_or(&self.name)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// `input[offset..offset+len]`, or an out-of-bounds error naming `what`.
fn slice<'a>(
    input: &'a [u8],
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], NpzError> {
    let oob = || NpzError::OutOfBounds {
        what,
        offset,
        len: input.len(),
    };
    let start = usize::try_from(offset).map_err(|_| oob())?;
    let len = usize::try_from(len).map_err(|_| oob())?;
    let end = start.checked_add(len).ok_or_else(oob)?;
    input.get(start..end).ok_or_else(oob)
}

/// The central directory's location: (entry count, offset, size).
fn find_directory(input: &[u8]) -> Result<(u64, u64, u64), NpzError> {
    if input.len() < EOCD_LEN {
        return Err(NpzError::NoEndRecord);
    }
    let lowest = input.len().saturating_sub(EOCD_LEN + MAX_COMMENT);
    let eocd = (lowest..=input.len() - EOCD_LEN)
        .rev()
        .find(|&at| {
            u32_at(input, at) == SIG_EOCD
                && usize::from(u16_at(input, at + 20)) == input.len() - at - EOCD_LEN
        })
        .ok_or(NpzError::NoEndRecord)?;
    if u16_at(input, eocd + 4) != 0 || u16_at(input, eocd + 6) != 0 {
        return Err(NpzError::MultiDisk);
    }
    let mut count = u64::from(u16_at(input, eocd + 10));
    let mut size = u64::from(u32_at(input, eocd + 12));
    let mut offset = u64::from(u32_at(input, eocd + 16));
    let saturated = count == 0xffff || size == 0xffff_ffff || offset == 0xffff_ffff;
    if saturated
        && eocd >= ZIP64_LOCATOR_LEN
        && u32_at(input, eocd - ZIP64_LOCATOR_LEN) == SIG_ZIP64_LOCATOR
    {
        let loc = eocd - ZIP64_LOCATOR_LEN;
        let at = u64_at(input, loc + 8);
        let rec = slice(input, at, ZIP64_EOCD_LEN as u64, "zip64 end record")?;
        if u32_at(rec, 0) != SIG_ZIP64_EOCD {
            return Err(NpzError::BadSignature {
                what: "zip64 end record",
                offset: at,
            });
        }
        count = u64_at(rec, 32);
        size = u64_at(rec, 40);
        offset = u64_at(rec, 48);
    }
    Ok((count, offset, size))
}

/// Values of a zip64 extra field, in the order the saturated fields appear.
fn zip64_values(extra: &[u8]) -> Option<Vec<u64>> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = u16_at(extra, at);
        let len = usize::from(u16_at(extra, at + 2));
        let body = extra.get(at + 4..at + 4 + len)?;
        if id == ZIP64_EXTRA_ID {
            return Some(body.chunks_exact(8).map(|c| u64_at(c, 0)).collect());
        }
        at += 4 + len;
    }
    None
}

/// Reads an `.npz` item: every entry, in central-directory order, as zero-copy slices of
/// `input`, each checked against its CRC-32.
///
/// # Errors
///
/// An [`NpzError`] for anything that is not a well-formed, stored, single-disk zip.
///
/// # Example
/// ```
/// use bytes::Bytes;
/// use fedrun_fobs::npz::{self, NpzError};
///
/// assert_eq!(npz::read(&Bytes::from_static(b"junk")), Err(NpzError::NoEndRecord));
/// ```
pub fn read(input: &Bytes) -> Result<Vec<NpzEntry>, NpzError> {
    let (count, dir_offset, dir_size) = find_directory(input)?;
    let dir = slice(input, dir_offset, dir_size, "central directory")?;
    // every entry takes at least CENTRAL_LEN bytes: the count cannot outgrow the input
    let bound = dir.len() / CENTRAL_LEN;
    let mut entries: Vec<NpzEntry> =
        Vec::with_capacity(bound.min(usize::try_from(count).unwrap_or(bound)));
    let mut names = std::collections::HashSet::new();
    let mut at = 0usize;
    for _ in 0..count {
        let abs = dir_offset + at as u64;
        let head = slice(
            dir,
            at as u64,
            CENTRAL_LEN as u64,
            "central directory entry",
        )
        .map_err(|_| NpzError::OutOfBounds {
            what: "central directory entry",
            offset: abs,
            len: input.len(),
        })?;
        if u32_at(head, 0) != SIG_CENTRAL {
            return Err(NpzError::BadSignature {
                what: "central directory entry",
                offset: abs,
            });
        }
        let flags = u16_at(head, 8);
        let method = u16_at(head, 10);
        let crc = u32_at(head, 16);
        let mut csize = u64::from(u32_at(head, 20));
        let mut usize_ = u64::from(u32_at(head, 24));
        let name_len = u64::from(u16_at(head, 28));
        let extra_len = u64::from(u16_at(head, 30));
        let comment_len = u64::from(u16_at(head, 32));
        let mut local = u64::from(u32_at(head, 42));
        let var = slice(
            dir,
            (at + CENTRAL_LEN) as u64,
            name_len + extra_len + comment_len,
            "central directory entry",
        )?;
        let name_bytes = &var[..name_len as usize];
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| NpzError::BadName)?
            .to_owned();
        let extra = &var[name_len as usize..(name_len + extra_len) as usize];
        if usize_ == 0xffff_ffff || csize == 0xffff_ffff || local == 0xffff_ffff {
            let vals = zip64_values(extra).ok_or_else(|| NpzError::BadZip64Extra(name.clone()))?;
            let mut vals = vals.into_iter();
            let mut next = |field: &mut u64| -> Result<(), NpzError> {
                if *field == 0xffff_ffff {
                    *field = vals
                        .next()
                        .ok_or_else(|| NpzError::BadZip64Extra(name.clone()))?;
                }
                Ok(())
            };
            next(&mut usize_)?;
            next(&mut csize)?;
            next(&mut local)?;
        }
        if flags & 1 != 0 {
            return Err(NpzError::Encrypted(name));
        }
        if method != 0 {
            return Err(NpzError::UnsupportedCompression { name, method });
        }
        if csize != usize_ {
            return Err(NpzError::SizeMismatch(name));
        }
        let lh = slice(input, local, LOCAL_LEN as u64, "local header")?;
        if u32_at(lh, 0) != SIG_LOCAL {
            return Err(NpzError::BadSignature {
                what: "local header",
                offset: local,
            });
        }
        let data_at =
            local + LOCAL_LEN as u64 + u64::from(u16_at(lh, 26)) + u64::from(u16_at(lh, 28));
        let data = slice(input, data_at, csize, "entry data")?;
        let actual = crc32(data);
        if actual != crc {
            return Err(NpzError::BadCrc {
                name,
                expected: crc,
                actual,
            });
        }
        if !names.insert(name.clone()) {
            return Err(NpzError::DuplicateName(name));
        }
        // `slice` checked the range, so these casts cannot truncate
        let start = data_at as usize;
        entries.push(NpzEntry {
            name,
            data: input.slice(start..start + data.len()),
        });
        at += CENTRAL_LEN + (name_len + extra_len + comment_len) as usize;
    }
    Ok(entries)
}

/// Writes a stored zip of `entries` (name, contents), as `numpy.savez` would for `.npy`
/// contents. Names should end in `.npy` for `numpy.load` to report them without it.
///
/// # Errors
///
/// [`NpzError::TooLarge`] when an entry or the archive needs zip64.
pub fn write(entries: &[(&str, &[u8])]) -> Result<Vec<u8>, NpzError> {
    let total: usize = entries
        .iter()
        .map(|(n, d)| LOCAL_LEN + CENTRAL_LEN + 2 * n.len() + d.len())
        .sum::<usize>()
        + EOCD_LEN;
    if total > u32::MAX as usize - 1 || entries.len() >= 0xffff {
        return Err(NpzError::TooLarge(total));
    }
    let mut out = Vec::with_capacity(total);
    let mut central = Vec::with_capacity(entries.iter().map(|(n, _)| CENTRAL_LEN + n.len()).sum());
    for (name, data) in entries {
        let name_len = u16::try_from(name.len()).map_err(|_| NpzError::TooLarge(name.len()))?;
        let offset = out.len() as u32; // total < u32::MAX checked above
        let crc = crc32(data);
        let size = data.len() as u32;
        put_local_header(&mut out, name, name_len, crc, size);
        out.extend_from_slice(data);
        put_central_entry(&mut central, name, name_len, crc, size, offset);
    }
    let dir_offset = out.len() as u32;
    out.extend_from_slice(&central);
    put_end_record(
        &mut out,
        entries.len() as u16,
        central.len() as u32,
        dir_offset,
    );
    Ok(out)
}

/// Turns `buf`, the contents of one entry (a `.npy` file), into the stored zip that
/// [`write()`] makes of `[(name, buf)]`, in the same buffer: the contents move up by the local
/// header's length (a `memmove`, no second buffer) and the central directory follows them. The
/// buffer grows by about a hundred bytes, in place when it has the capacity. On an error `buf`
/// is left as it was.
///
/// This is how a big array is served as an `.npz` item without ever being held twice.
///
/// # Errors
///
/// [`NpzError::TooLarge`] when the entry needs zip64 or the name is too long.
///
/// # Example
/// ```
/// use bytes::BytesMut;
/// use fedrun_fobs::npz;
///
/// let mut buf = BytesMut::from(&b"\x93NUMPY..."[..]);
/// npz::frame_in_place("T0.npy", &mut buf).unwrap();
/// assert_eq!(&buf[..], &npz::write(&[("T0.npy", b"\x93NUMPY...")]).unwrap()[..]);
/// ```
pub fn frame_in_place(name: &str, buf: &mut BytesMut) -> Result<(), NpzError> {
    let total = LOCAL_LEN + CENTRAL_LEN + 2 * name.len() + buf.len() + EOCD_LEN;
    if total > u32::MAX as usize - 1 {
        return Err(NpzError::TooLarge(total));
    }
    let name_len = u16::try_from(name.len()).map_err(|_| NpzError::TooLarge(name.len()))?;
    let crc = crc32(buf);
    let size = buf.len() as u32; // total < u32::MAX checked above
    let mut head = Vec::with_capacity(LOCAL_LEN + name.len());
    put_local_header(&mut head, name, name_len, crc, size);
    let mut tail = Vec::with_capacity(CENTRAL_LEN + name.len() + EOCD_LEN);
    put_central_entry(&mut tail, name, name_len, crc, size, 0);
    let central_len = tail.len() as u32;
    put_end_record(&mut tail, 1, central_len, (head.len() + buf.len()) as u32);
    let n = buf.len();
    buf.resize(head.len() + n + tail.len(), 0);
    buf.copy_within(0..n, head.len());
    buf[..head.len()].copy_from_slice(&head);
    buf[head.len() + n..].copy_from_slice(&tail);
    Ok(())
}

/// A local header: version 20, no flags, stored, no time, crc, sizes, name, no extra.
fn put_local_header(out: &mut Vec<u8>, name: &str, name_len: u16, crc: u32, size: u32) {
    out.extend_from_slice(&SIG_LOCAL.to_le_bytes());
    out.extend_from_slice(&20u16.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // flags, method
    out.extend_from_slice(&[0, 0, 0x21, 0]); // time 00:00, date 1980-01-01
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// A central directory entry for a local header at `offset`.
fn put_central_entry(
    central: &mut Vec<u8>,
    name: &str,
    name_len: u16,
    crc: u32,
    size: u32,
    offset: u32,
) {
    central.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
    central.extend_from_slice(&20u16.to_le_bytes()); // made by
    central.extend_from_slice(&20u16.to_le_bytes()); // needed
    central.extend_from_slice(&[0; 4]); // flags, method
    central.extend_from_slice(&[0, 0, 0x21, 0]);
    central.extend_from_slice(&crc.to_le_bytes());
    central.extend_from_slice(&size.to_le_bytes());
    central.extend_from_slice(&size.to_le_bytes());
    central.extend_from_slice(&name_len.to_le_bytes());
    central.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attrs
    central.extend_from_slice(&0x0180_0000u32.to_le_bytes()); // external: -rw-------
    central.extend_from_slice(&offset.to_le_bytes());
    central.extend_from_slice(name.as_bytes());
}

/// The end-of-central-directory record.
fn put_end_record(out: &mut Vec<u8>, count: u16, central_len: u32, dir_offset: u32) {
    out.extend_from_slice(&SIG_EOCD.to_le_bytes());
    out.extend_from_slice(&[0; 4]); // disk numbers
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&central_len.to_le_bytes());
    out.extend_from_slice(&dir_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
}

/// The CRC-32 (IEEE, as zip uses) of `data`.
///
/// # Example
/// ```
/// assert_eq!(fedrun_fobs::npz::crc32(b"123456789"), 0xcbf4_3926);
/// ```
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// `numpy.savez(T0=np.arange(6, dtype=np.float32).reshape(2, 3))` from numpy 2.4 (what
    /// NVFlare 2.9 serves): zip64 local header, sizes only in the central directory.
    const NUMPY_SAVEZ: &str = "504b03042d0000000000000021004fe9002affffffffffffffff0600140054302e6e70790100100098000000000000009800000000000000934e554d5059010076007b276465736372273a20273c6634272c2027666f727472616e5f6f72646572273a2046616c73652c20277368617065273a2028322c2033292c207d202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020202020200a000000000000803f0000004000004040000080400000a040504b01022d032d0000000000000021004fe9002a980000009800000006000000000000000000000080010000000054302e6e7079504b0506000000000100010034000000d00000000000";

    fn numpy_item() -> Bytes {
        Bytes::from(hex::decode(NUMPY_SAVEZ).unwrap())
    }

    #[test]
    fn framing_in_place_writes_what_write_writes_and_reads_back_zero_copy() {
        let npy: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut buf = BytesMut::with_capacity(npy.len() + 4096);
        buf.extend_from_slice(&npy);
        let at = buf.as_ptr();
        frame_in_place("T3.npy", &mut buf).unwrap();
        assert_eq!(buf.as_ptr(), at, "grew in place");
        assert_eq!(&buf[..], &write(&[("T3.npy", &npy)]).unwrap()[..]);
        let zip = buf.freeze();
        let entries = read(&zip).unwrap();
        assert_eq!(entries[0].name, "T3.npy");
        assert_eq!(&entries[0].data[..], &npy[..]);
    }

    #[test]
    fn framing_a_name_too_long_leaves_the_buffer_unchanged() {
        let mut buf = BytesMut::from(&b"abc"[..]);
        let name = "x".repeat(70_000);
        assert!(matches!(
            frame_in_place(&name, &mut buf),
            Err(NpzError::TooLarge(_))
        ));
        assert_eq!(&buf[..], b"abc");
    }

    #[test]
    fn reads_what_numpy_savez_writes() {
        let entries = read(&numpy_item()).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].array_name(), "T0");
        let a = fedrun_core::NdArray::from_npy(entries[0].data.clone()).unwrap();
        assert_eq!(a.shape(), &[2, 3]);
        assert_eq!(a.to_f32_vec().unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn written_zip_reads_back_and_has_the_expected_layout() {
        let zip = write(&[("T0.npy", b"abc"), ("T1.npy", b"")]).unwrap();
        let back = read(&Bytes::from(zip.clone())).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(
            (back[0].name.as_str(), &back[0].data[..]),
            ("T0.npy", &b"abc"[..])
        );
        assert_eq!(
            (back[1].name.as_str(), &back[1].data[..]),
            ("T1.npy", &b""[..])
        );
        assert_eq!(zip.len(), 2 * (30 + 46 + 12) + 3 + 22);
    }

    #[test]
    fn flipped_data_byte_fails_the_crc() {
        let mut z = numpy_item().to_vec();
        z[100] ^= 1; // inside the .npy data
        assert!(matches!(
            read(&Bytes::from(z)),
            Err(NpzError::BadCrc { .. })
        ));
    }

    #[test]
    fn deflated_entry_is_refused_by_name() {
        let mut z = write(&[("T0.npy", b"abc")]).unwrap();
        let cd = z.len() - 22 - (46 + 6);
        z[cd + 10] = 8; // method: deflate
        assert_eq!(
            read(&Bytes::from(z)),
            Err(NpzError::UnsupportedCompression {
                name: "T0.npy".into(),
                method: 8
            })
        );
    }

    #[test]
    fn huge_claimed_sizes_and_offsets_are_bounds_errors() {
        let mut z = write(&[("T0.npy", b"abc")]).unwrap();
        let cd = z.len() - 22 - (46 + 6);
        z[cd + 20..cd + 28].copy_from_slice(&[0xfe, 0xff, 0xff, 0x7f, 0xfe, 0xff, 0xff, 0x7f]);
        assert!(matches!(
            read(&Bytes::from(z)),
            Err(NpzError::OutOfBounds { .. })
        ));
        let mut z = write(&[("T0.npy", b"abc")]).unwrap();
        let n = z.len();
        z[n - 12..n - 10].copy_from_slice(&[0xff, 0x7f]); // directory size
        assert!(matches!(
            read(&Bytes::from(z)),
            Err(NpzError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn duplicate_entry_names_are_refused() {
        let z = write(&[("T0.npy", b"a"), ("T0.npy", b"b")]).unwrap();
        assert_eq!(
            read(&Bytes::from(z)),
            Err(NpzError::DuplicateName("T0.npy".into()))
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = read(&Bytes::from(data));
        }

        #[test]
        fn corrupted_numpy_item_never_panics(at in 0usize..282, byte in any::<u8>()) {
            let mut z = numpy_item().to_vec();
            z[at] = byte;
            let _ = read(&Bytes::from(z));
        }

        #[test]
        fn truncated_item_is_an_error(cut in 0usize..282) {
            let z = numpy_item().slice(..cut);
            prop_assert!(read(&z).is_err());
        }

        #[test]
        fn written_entries_round_trip(a in proptest::collection::vec(any::<u8>(), 0..300),
                                      b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let z = write(&[("T0.npy", &a), ("T1.npy", &b)]).unwrap();
            let back = read(&Bytes::from(z)).unwrap();
            prop_assert_eq!(&back[0].data[..], &a[..]);
            prop_assert_eq!(&back[1].data[..], &b[..]);
        }
    }
}
