//! Measuring helpers shared by the children and the orchestrator: percentiles and medians
//! computed exactly as the NVFlare harness computes them (so both columns of the table mean the
//! same thing), process memory from `/proc`, wall-clock time, and a cheap checksum that proves a
//! large transfer arrived intact without holding it in memory.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value as Json};

/// Bytes in one MiB.
pub const MIB: f64 = 1024.0 * 1024.0;

/// The `p`-th percentile of sorted values, with `cellbench.py`'s rank rule
/// (`round(p/100 * n + 0.5) - 1`, clamped).
///
/// # Example
///
/// ```
/// use fedrun_bench::measure::percentile;
///
/// let v: Vec<f64> = (1..=100).map(f64::from).collect();
/// assert_eq!(percentile(&v, 50.0), Some(51.0));
/// assert_eq!(percentile(&v, 99.0), Some(100.0));
/// assert_eq!(percentile(&[], 50.0), None);
/// ```
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as f64;
    let rank = (p / 100.0 * n + 0.5).round() as i64 - 1;
    let k = rank.clamp(0, sorted.len() as i64 - 1) as usize;
    sorted.get(k).copied()
}

/// Median of unsorted values (the mean of the middle two for an even count, as Python's
/// `statistics.median`).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v.get(mid).copied()
    } else {
        Some((v[mid - 1] + v[mid]) / 2.0)
    }
}

/// `{"median", "min", "max", "n"}` of the values, or JSON `null` when there are none.
pub fn summarize(values: &[f64]) -> Json {
    match median(values) {
        None => Json::Null,
        Some(med) => json!({
            "median": med,
            "min": values.iter().copied().fold(f64::INFINITY, f64::min),
            "max": values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            "n": values.len(),
        }),
    }
}

/// Seconds since the Unix epoch (comparable between processes on one machine, like Python's
/// `time.time()`).
pub fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Resident memory of a process, from `/proc/<pid>/status`, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: Option<u64>,
    /// `VmHWM`: the peak resident size so far.
    pub hwm: Option<u64>,
}

impl Memory {
    /// The memory of process `pid` (`None`: this process). Fields are `None` when the file or
    /// the line is missing (the process is gone, or this is not Linux).
    pub fn of(pid: Option<u32>) -> Memory {
        let path = match pid {
            Some(pid) => format!("/proc/{pid}/status"),
            None => "/proc/self/status".to_owned(),
        };
        match std::fs::read_to_string(path) {
            Ok(status) => Memory::parse(&status),
            Err(_) => Memory::default(),
        }
    }

    /// Parses the text of a `/proc/<pid>/status` file.
    ///
    /// # Example
    ///
    /// ```
    /// use fedrun_bench::measure::Memory;
    ///
    /// let m = Memory::parse("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n");
    /// assert_eq!((m.rss, m.hwm), (Some(1 << 20), Some(2 << 20)));
    /// ```
    pub fn parse(status: &str) -> Memory {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kb| kb.trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
        };
        Memory {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
        }
    }
}

/// A position-dependent checksum of a byte stream that does not depend on how the stream is cut
/// into pieces: the wrapping sum of each little-endian 64-bit word times an odd multiplier
/// derived from its index, plus the length. One pass, no allocation: cheap next to the copy
/// that moved the bytes.
///
/// # Example
///
/// ```
/// use fedrun_bench::measure::WordSum;
///
/// let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
/// let mut whole = WordSum::default();
/// whole.update(&data);
/// let mut pieces = WordSum::default();
/// for piece in data.chunks(13) {
///     pieces.update(piece);
/// }
/// assert_eq!(whole.finish(), pieces.finish());
/// let mut other = WordSum::default();
/// other.update(&data[1..]);
/// assert_ne!(whole.finish(), other.finish());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WordSum {
    sum: u64,
    words: u64,
    pending: [u8; 8],
    npending: usize,
    len: u64,
}

impl WordSum {
    fn add_word(&mut self, word: u64) {
        let mult = self.words.wrapping_mul(2).wrapping_add(1);
        self.sum = self.sum.wrapping_add(word.wrapping_mul(mult));
        self.words += 1;
    }

    /// Adds the next bytes of the stream.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.npending > 0 {
            let take = (8 - self.npending).min(data.len());
            self.pending[self.npending..self.npending + take].copy_from_slice(&data[..take]);
            self.npending += take;
            data = &data[take..];
            if self.npending < 8 {
                return;
            }
            self.add_word(u64::from_le_bytes(self.pending));
            self.npending = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.add_word(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.npending = rest.len();
    }

    /// The bytes added so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The checksum of everything added so far (a partial last word is zero-padded).
    pub fn finish(&self) -> u64 {
        let mut copy = *self;
        if copy.npending > 0 {
            let mut b = [0u8; 8];
            b[..copy.npending].copy_from_slice(&copy.pending[..copy.npending]);
            copy.add_word(u64::from_le_bytes(b));
        }
        copy.sum ^ copy.len.rotate_left(32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn swapped_words_change_the_checksum() {
        let a: Vec<u8> = (0..16u8).collect();
        let mut b = a.clone();
        b[..8].copy_from_slice(&a[8..]);
        b[8..].copy_from_slice(&a[..8]);
        let sum = |d: &[u8]| {
            let mut s = WordSum::default();
            s.update(d);
            s.finish()
        };
        assert_ne!(sum(&a), sum(&b));
    }
}
