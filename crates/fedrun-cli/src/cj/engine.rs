//! Starting the client job's engine on the deployed job: the engine, its component factories,
//! and the executors of the job's client config.
//!
//! A job in a real deployment names NVFlare's classes; fedrun builds those it has a factory
//! for (NVFlare's numpy components, the example trainers). Every factory was registered by
//! this program on purpose, so the build authorizer allows them; a class without a factory
//! fails the start with one error naming it (the deployed job's loader checks that first).

use std::sync::Arc;

use fedrun_core::{Map, Value};
use fedrun_engine::{
    ClientEngine, ClientJobConfig, EngineHandle, RegisterComponentFactory, SetBuildAuthorizer,
    TaskRouter,
};
use fedrun_wire::TcpTransport;
use serde_json::Value as Json;

use super::parent::StatsSource;
use crate::deployed::DeployedJob;
use crate::error::CliError;
use crate::transport::JobTransport;

/// The engine of a started client job, and what its task loop needs.
pub struct StartedJob {
    /// The engine.
    pub engine: EngineHandle,
    /// The executors by task name.
    pub router: TaskRouter,
    /// The answer to the parent's `show_stats`.
    pub stats: StatsSource,
}

/// A JSON value as a fedrun [`Value`] (numbers keep their integer-ness).
///
/// # Example
/// ```
/// use fedrun_cli::cj::engine::json_to_value;
///
/// let v = json_to_value(&serde_json::json!({"a": [1, 2.5, "x", null, true]}));
/// assert_eq!(v.get("a").and_then(|a| a.as_array()).map(|a| a.len()), Some(5));
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

/// Starts the engine of `site` for `job_id` on `transport` and builds the job's client config.
///
/// # Errors
///
/// [`CliError::Engine`] when the engine does not start or a component does not build,
/// [`CliError::BadJob`] when the client config is not one.
pub async fn start_engine(
    job: &DeployedJob,
    site: &str,
    job_id: &str,
    transport: &TcpTransport,
    client_args: Map,
    project_name: &str,
    ssid: &str,
) -> Result<StartedJob, CliError> {
    let engine_err = |source| CliError::Engine {
        site: site.to_owned(),
        source,
    };
    let client_config =
        ClientJobConfig::from_value(&job.client_config).map_err(|e| CliError::BadJob {
            path: job.client_config_path.clone(),
            reason: e.to_string(),
        })?;
    let engine = ClientEngine::builder(site, job_id)
        .client_config(client_args)
        .job_meta(json_to_value(&job.meta))
        .project_name(project_name)
        .ssid(ssid)
        .start_on(JobTransport::Tcp(transport.clone()))
        .await
        .map_err(engine_err)?;
    let prepared = async {
        for (class, factory) in crate::deployed::client_factories() {
            engine
                .send(RegisterComponentFactory { class, factory })
                .await??;
        }
        engine
            .send(SetBuildAuthorizer {
                authorizer: Arc::new(|_node: &Json, _path: &str| Ok(())),
            })
            .await?;
        client_config.build(&engine).await
    };
    match prepared.await {
        Ok(router) => {
            let stats_engine = engine.clone();
            let stats: StatsSource = Arc::new(move || {
                let engine = stats_engine.clone();
                Box::pin(async move { engine.show_stats().await.unwrap_or(Value::Nil) })
            });
            Ok(StartedJob {
                engine,
                router,
                stats,
            })
        }
        Err(e) => {
            engine.stop().await;
            Err(engine_err(e))
        }
    }
}
