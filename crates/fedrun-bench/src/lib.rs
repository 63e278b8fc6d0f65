//! fedrun's cellnet benchmarks over loopback TCP, run side by side with NVFlare 2.9, to check
//! fedrun's performance targets against NVFlare's own figures.
//!
//! The binary `fedrun-cellbench` mirrors the NVFlare harness `nvflare/cellbench.py` (kept in this
//! crate): the same scenarios, counts, warm-ups and result files, with fedrun cells in one OS
//! process each. `vs-nvflare.sh` runs both, interleaved with the C loopback limits, and prints one
//! table.
//!
//! # Layout
//!
//! - [`args`]: the command line ([`Options`], [`Scenario`], [`PathKind`], [`TableOptions`]).
//! - [`orchestrator`]: the `run` role — one child process per cell, `GO`, the result, every
//!   child's peak RSS, stopping children by pid with deadlines, `<tag>.json`.
//! - [`node`]: the `cell` role — a server or site process: TCP endpoint, core cell, engine side.
//! - [`scenarios`]: what the active child measures (latency, throughput, multicast, large, ff).
//! - [`measure`]: percentiles, medians, `/proc` memory, a cheap streaming checksum.
//! - [`report`]: the `table` role — NVFlare aux vs fedrun vs C, and the targets.
//! - [`error`]: the one error type, [`BenchError`].
//!
//! # Example
//!
//! ```
//! use fedrun_bench::{Options, Scenario};
//!
//! let o = Options::parse(["--scenario", "large", "--size-mib", "128"].map(String::from)).unwrap();
//! assert_eq!(o.scenario, Scenario::Large);
//! assert_eq!(o.tag(), "large-aux-128MiB");
//! ```

pub mod args;
pub mod error;
pub mod measure;
pub mod node;
pub mod orchestrator;
pub mod report;
pub mod scenarios;

pub use args::{Options, PathKind, Scenario, Source, TableOptions, DEFAULT_CHUNK_KIB};
pub use error::BenchError;
pub use orchestrator::run_orchestrator;
pub use report::run_table;

/// The usage text of `fedrun-cellbench`.
pub const USAGE: &str = "\
usage:
  fedrun-cellbench run   --scenario latency|throughput|multicast|large|ff [--path aux|core]
                         [--runs N] [--append] [--count N] [--warmup N] [--concurrency N]
                         [--clients N] [--size-mib X] [--source reader|memory] [--chunk-kib N]
                         [--deadline S]
                         [--results-dir DIR]
  fedrun-cellbench table --nvflare DIR --fedrun DIR --limits FILE
  fedrun-cellbench cell  ...   (a child process, started by `run`)";
