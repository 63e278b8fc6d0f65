//! Starting the client job's engine on the deployed job: the engine, its component factories,
//! and the executors of the job's client config.
//!
//! A job in a real deployment names NVFlare's classes; fedrun builds those it has a factory
//! for (NVFlare's numpy components, the example trainers). A class without a factory fails
//! the start with one error naming it (the deployed job's loader checks that first).
//!
//! Numpy arrays in task results leave as NVFlare download references served by this job (in
//! items of `np_download_chunk_size` bytes, 2 MiB unless the job or the environment says
//! otherwise), exactly as NVFlare's own job process sends them; `np_download_chunk_size: 0`
//! sends them inline. References in what the job receives are always resolved.

use fedrun_core::{Map, Value};
use fedrun_engine::{ClientEngine, EngineHandle, TaskRouter};
use fedrun_wire::TcpTransport;
use serde_json::Value as Json;

use crate::deployed::{DeployedJob, NP_DOWNLOAD_CHUNK_SIZE_DEFAULT};
use crate::error::CliError;
use crate::transport::JobTransport;

/// The engine of a started client job, and what its task loop needs.
pub struct StartedJob {
    /// The engine.
    pub engine: EngineHandle,
    /// The executors by task name.
    pub router: TaskRouter,
}

/// A JSON value as a fedrun [`Value`] (numbers keep their integer-ness).
///
/// # Example
/// ```
/// use fedrun_cli::cj::engine::json_to_value;
///
/// let v = json_to_value(&serde_json::json!({"a": [1, 2.5, "x", null, true]}));
/// let a = v.as_map().and_then(|m| m.get("a")).and_then(|a| a.as_array());
/// assert_eq!(a.map(|a| a.len()), Some(5));
/// ```
pub fn json_to_value(json: &Json) -> Value {
    match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (None, Some(u), _) => Value::from(u),
            (None, None, Some(f)) => Value::from(f),
            _ => Value::Nil,
        },
        Json::String(s) => Value::from(s.clone()),
        Json::Array(items) => Value::Array(items.iter().map(json_to_value).collect()),
        Json::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| (Value::from(k.clone()), json_to_value(v)))
                .collect(),
        ),
    }
}

/// Starts the engine of `site` for `job_id` on `transport` and builds the job's client config
/// (every built-in client class is registered; see [`DeployedJob::build`]).
///
/// # Errors
///
/// [`CliError::Engine`] when the engine does not start or a component does not build.
pub async fn start_engine(
    job: &DeployedJob,
    transport: &TcpTransport,
    client_args: Map,
    project_name: &str,
    ssid: &str,
) -> Result<StartedJob, CliError> {
    let engine = ClientEngine::builder(&job.site, &job.job_id)
        .client_config(client_args)
        .job_meta(json_to_value(&job.meta))
        .project_name(project_name)
        .ssid(ssid)
        .np_download_chunk_size(
            job.np_download_chunk_size
                .unwrap_or(NP_DOWNLOAD_CHUNK_SIZE_DEFAULT)
                .try_into()
                .unwrap_or(usize::MAX),
        )
        .start_on(JobTransport::Tcp(transport.clone()))
        .await
        .map_err(|source| CliError::Engine {
            site: job.site.clone(),
            source,
        })?;
    match job.build(&engine).await {
        Ok(router) => Ok(StartedJob { engine, router }),
        Err(e) => {
            engine.stop().await;
            Err(e)
        }
    }
}
