//! Hand-written client jobs for the server job's tests: plain cells at `site-N.<job>` that speak
//! the task protocol exactly as the pinned protocol describes it (`get_task`, `submit_update`,
//! aux `__task_check__` / `__sync_runner__` / `__job_heartbeat__`), and record the `__end_run__`
//! aux messages they receive.
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::time::Duration;

use fedrun_cell::{request_handler, Cell, CellHandle, CellMessage, Fqcn, Network, SendRequest};
use fedrun_core::{DataKind, Dxo, Map, NdArray, PeerContext, Shareable, Value};
use tokio::sync::mpsc;

/// Every wait of a test ends within this.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The poll interval the test servers tell clients.
pub const POLL: Duration = Duration::from_millis(5);

/// Awaits `fut` within [`DEADLINE`].
pub async fn within<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .expect("deadline passed")
}

/// A fresh temporary directory path (not created).
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("fedrun-server-{tag}-{}", uuid::Uuid::new_v4()))
}

/// A fake client job.
pub struct FakeClient {
    pub name: String,
    pub job: String,
    pub cell: CellHandle,
    end_runs: mpsc::UnboundedReceiver<Shareable>,
}

impl FakeClient {
    /// Starts `site.job` on `network`, recording `__end_run__` aux messages.
    pub async fn start(network: &Network, site: &str, job: &str) -> FakeClient {
        let cell = Cell::start(Fqcn::job_cell(site, job).unwrap(), network.clone()).unwrap();
        let (tx, end_runs) = mpsc::unbounded_channel();
        cell.register_request_handler(
            "aux_communication",
            "__end_run__",
            request_handler(move |msg: CellMessage| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(msg.payload.into_shareable().unwrap_or_default());
                    Ok(None)
                }
            }),
        )
        .await
        .unwrap();
        FakeClient {
            name: site.to_owned(),
            job: job.to_owned(),
            cell,
            end_runs,
        }
    }

    pub fn server(&self) -> Fqcn {
        Fqcn::job_cell("server", &self.job).unwrap()
    }

    /// This client's peer context, for run `job`.
    pub fn peer_ctx_for(&self, job: &str) -> PeerContext {
        let mut ctx = PeerContext::default();
        ctx.set("__run_num__", job);
        ctx.set("__identity_name__", self.name.as_str());
        ctx.set("__fqsn__", self.name.as_str());
        ctx.set("__is_leaf__", true);
        ctx
    }

    pub fn peer_ctx(&self) -> PeerContext {
        self.peer_ctx_for(&self.job)
    }

    /// Sends one `get_task` with `request` as it is; returns the cell reply.
    pub async fn get_task_raw(&self, request: Shareable) -> CellMessage {
        let req = SendRequest::new(
            "server_command",
            "get_task",
            self.server(),
            CellMessage::new(request).with_header("project_name", "fedrun"),
            DEADLINE,
        );
        within(self.cell.send_request(req)).await.unwrap()
    }

    /// One `get_task` with this client's peer context (and `last_task_id` when given).
    pub async fn ask(&self, last_task_id: Option<&str>) -> Shareable {
        let mut request = Shareable::new();
        request.set_peer_context(self.peer_ctx());
        if let Some(id) = last_task_id {
            request.set_header("last_task_id", id);
        }
        let reply = self.get_task_raw(request).await;
        assert_eq!(reply.return_code().as_str(), "ok");
        reply.payload.into_shareable().unwrap()
    }

    /// Polls until the reply is not `__try_again__` (honouring `__wait_time__`).
    pub async fn next_task(&self, last_task_id: Option<&str>) -> Shareable {
        within(async {
            loop {
                let reply = self.ask(last_task_id).await;
                if task_name(&reply) != "__try_again__" {
                    return reply;
                }
                let wait = reply
                    .header_or_none("__wait_time__")
                    .and_then(Value::as_f64)
                    .unwrap();
                // Not synchronisation: this client obeys the server's `__wait_time__` pacing, as
                // NVFlare's client does; the whole poll is bounded by `within`.
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
        })
        .await
    }

    /// Sends `result` for `task` (cookie jar, task name and id copied, peer ctx set).
    pub async fn submit(&self, task: &Shareable, mut result: Shareable) -> CellMessage {
        if let Some(jar) = task.cookie_jar() {
            result.set_cookie_jar(jar.clone());
        }
        for key in ["__task_name__", "__task_id__"] {
            if let Some(v) = task.header_or_none(key) {
                result.set_header(key, v.clone());
            }
        }
        result.set_header("__msg_root_id__", uuid::Uuid::new_v4().to_string());
        result.set_peer_context(self.peer_ctx());
        let req = SendRequest::new(
            "server_command",
            "submit_update",
            self.server(),
            CellMessage::new(result),
            DEADLINE,
        );
        within(self.cell.send_request(req)).await.unwrap()
    }

    /// An aux request to the server job with this client's peer props; returns the reply
    /// Shareable.
    pub async fn aux(&self, topic: &str, mut request: Shareable) -> Shareable {
        request.set_header("__topic__", topic);
        let mut props = Map::new();
        props.insert("__run_num__", self.job.as_str());
        props.insert("__identity_name__", self.name.as_str());
        request.set_peer_props(props);
        let req = SendRequest::new(
            "aux_communication",
            topic,
            self.server(),
            CellMessage::new(request),
            DEADLINE,
        );
        let reply = within(self.cell.send_request(req)).await.unwrap();
        assert_eq!(reply.return_code().as_str(), "ok");
        reply.payload.into_shareable().unwrap()
    }

    /// `__task_check__` for `task_id` (no header when `None`); returns the reply's `__rc__`.
    pub async fn task_check(&self, task_id: Option<&str>) -> String {
        let mut request = Shareable::new();
        if let Some(id) = task_id {
            request.set_header("__task_id__", id);
        }
        let reply = self.aux("__task_check__", request).await;
        reply.return_code().as_str().to_owned()
    }

    /// The next `__end_run__` aux message this client job received.
    pub async fn end_run_notice(&mut self) -> Shareable {
        within(self.end_runs.recv()).await.unwrap()
    }

    pub async fn stop(&self) {
        self.cell.stop().await;
    }
}

/// The reply's `task_name` header.
pub fn task_name(reply: &Shareable) -> String {
    reply
        .header_or_none("task_name")
        .and_then(Value::as_str)
        .unwrap()
        .to_owned()
}

/// The reply's `__task_id__` header.
pub fn task_id(reply: &Shareable) -> String {
    reply
        .header_or_none("__task_id__")
        .and_then(Value::as_str)
        .unwrap()
        .to_owned()
}

/// A WEIGHTS DXO result with these f32 arrays, `NUM_STEPS_CURRENT_ROUND = steps` and extra
/// meta.
pub fn weights_result(
    arrays: &[(&str, &[usize], &[f32])],
    steps: i64,
    meta: &[(&str, Value)],
) -> Shareable {
    let mut data = Map::new();
    for (name, shape, values) in arrays {
        data.insert(*name, NdArray::from_f32(shape, values).unwrap());
    }
    let mut dxo = Dxo::new(DataKind::Weights, data);
    dxo.meta.insert("NUM_STEPS_CURRENT_ROUND", steps);
    for (k, v) in meta {
        dxo.meta.insert(*k, v.clone());
    }
    dxo.to_shareable()
}

/// The f32 elements of array `name` in a DXO Shareable.
pub fn dxo_array(s: &Shareable, name: &str) -> Vec<f32> {
    Dxo::from_shareable(s)
        .unwrap()
        .data
        .get(name)
        .and_then(Value::as_ndarray)
        .unwrap()
        .to_f32_vec()
        .unwrap()
}
