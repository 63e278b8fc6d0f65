//! Memory and speed of a streamed 256 MiB request between two fedrun cells of one process over
//! loopback TCP (`cargo bench -p fedrun-wire --bench stream_send`).
//!
//! The request payload is 256 MiB of raw bytes (`cn__payload_encoding` `bytes`, so encoding
//! shares the allocation instead of copying it). For each window size the bench prints the
//! process's RSS before the message exists, after it exists (sender's copy), and the peak
//! (VmHWM, reset through `/proc/self/clear_refs` before each run) while the message is
//! streamed, reassembled by the receiving endpoint, handed to its handler and answered. The
//! peak above "message built" is what streaming costs on top of the sender's own message: the
//! receiver's reassembled blob (unavoidable: the handler gets the whole message) plus what is
//! in flight (queued frames, socket and codec buffers, out-of-order chunks).

use std::time::{Duration, Instant};

use bytes::Bytes;
use fedrun_cell::{request_handler, Cell, CellMessage, Fqcn, Payload, SendRequest};
use fedrun_core::CellReturnCode;
use fedrun_wire::{StreamSendConfig, TcpTransport, WireConfig};

const MIB: usize = 1024 * 1024;
const MESSAGE: usize = 256 * MIB;

/// A `/proc/self/status` field in MiB.
fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

async fn run(window: u64) -> Result<(), String> {
    let stream_send = StreamSendConfig {
        window_size: window,
        ..StreamSendConfig::default()
    };
    let config = WireConfig {
        stream_send: stream_send.clone(),
        ..WireConfig::default()
    };
    let server_net = TcpTransport::new(Fqcn::SERVER, config.clone());
    let addr = server_net
        .add_listener("tcp://127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let server = Cell::start(Fqcn::SERVER, server_net.clone()).map_err(|e| e.to_string())?;
    server
        .register_request_handler(
            "bench",
            "upload",
            request_handler(|req: CellMessage| async move {
                let len = req.payload.as_bytes().map_or(0, Bytes::len);
                let mut reply = fedrun_core::Shareable::new();
                reply.insert("len", len as u64);
                Ok(Some(CellMessage::new(reply)))
            }),
        )
        .await
        .map_err(|e| e.to_string())?;
    let job_id = Fqcn::job_cell("site-1", "bench").map_err(|e| e.to_string())?;
    let job_net = TcpTransport::new(job_id.clone(), config);
    job_net
        .add_connector(&format!("tcp://{addr}"))
        .map_err(|e| e.to_string())?;
    if !job_net
        .wait_for_peer(&Fqcn::SERVER, Duration::from_secs(10))
        .await
    {
        return Err("no connection".into());
    }
    let job = Cell::start(job_id, job_net.clone()).map_err(|e| e.to_string())?;

    let before = status_mib("VmRSS:").unwrap_or(f64::NAN);
    let message = Bytes::from((0..MESSAGE).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let built = status_mib("VmRSS:").unwrap_or(f64::NAN);
    // Resets VmHWM to the current RSS (Linux >= 4.0), so the peak is this run's.
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let started = Instant::now();
    let reply = job
        .send_request(SendRequest::new(
            "bench",
            "upload",
            Fqcn::SERVER,
            CellMessage::new(Payload::Bytes(message)),
            Duration::from_secs(600),
        ))
        .await;
    let took = started.elapsed();
    let peak = status_mib("VmHWM:").unwrap_or(f64::NAN);
    let reply = reply.map_err(|e| e.to_string())?;
    if reply.return_code() != CellReturnCode::Ok {
        return Err(format!("reply {:?}", reply.headers));
    }
    let echoed = reply
        .payload
        .as_shareable()
        .and_then(|s| s.get("len"))
        .and_then(|v| v.as_u64());
    if echoed != Some(MESSAGE as u64) {
        return Err(format!("the handler saw {echoed:?} bytes"));
    }
    println!(
        "window {:.0} MiB, chunk {:.0} MiB: 256 MiB request in {:.2} s ({:.0} MiB/s)",
        mib(window),
        mib(stream_send.chunk_size as u64),
        took.as_secs_f64(),
        256.0 / took.as_secs_f64()
    );
    println!(
        "  VmRSS before the message {before:.1} MiB, with the message {built:.1} MiB; \
         VmHWM during the send {peak:.1} MiB = message built + {:.1} MiB \
         (receiver's reassembled 256 MiB included: + {:.1} MiB beyond it){}",
        peak - built,
        peak - built - 256.0,
        if reset {
            ""
        } else {
            " [VmHWM could not be reset: the peak may be older]"
        }
    );
    job.stop().await;
    server.stop().await;
    job_net.shutdown().await;
    server_net.shutdown().await;
    Ok(())
}

fn main() {
    let outcome = actix::System::new().block_on(async {
        for window in [64 * MIB as u64, 8 * MIB as u64] {
            run(window).await?;
        }
        Ok::<(), String>(())
    });
    if let Err(e) = outcome {
        eprintln!("stream_send bench failed: {e}");
        std::process::exit(1);
    }
}
