//! Starting an engine, and talking to it without building messages.
//!
//! [`ClientEngine::builder`] starts everything one client job needs — the job's cell on a
//! transport, then `RunInfo`, `ComponentRegistry`, `AuxRunner`, `StreamProcessor`, `TaskFetcher`
//! and the `ClientRunManager` facade —
//! and returns an [`EngineHandle`]. The handle is a cheap, cloneable, typed front for the facade:
//! one async method per engine call, each returning `Result<_, EngineError>`, so users never touch
//! actix's `MailboxError`. Users who prefer messages use [`EngineHandle::addr`] or
//! [`EngineHandle::send`].

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use fedrun_cell::{AbortSignal, Cell, CellHandle, Fqcn, Network, Transport};
use fedrun_core::constants::{event_scope, fl_ctx_key, widget_id};
use fedrun_core::{Client, ClientRunInfo, FlContext, Map, Shareable, TaskAssignment, Value};

use crate::aux::{
    AuxConfig, AuxHandler, AuxReplies, AuxRunner, AuxTargets, FireAndForgetAuxRequest,
    GetClientFromName, GetJobClients, MulticastAuxRequests, RegisterAuxMessageHandler,
    SendAuxRequest, ValidateTargets,
};
use crate::component::{ComponentRef, EventHandler};
use crate::download::{ArrayResolver, DownloadConfig, DownloadService};
use crate::error::EngineError;
use crate::facade::{AbortApp, ClientRunManager, EngineActors, StopEngine};
use crate::registry::{
    AddComponent, AddHandler, AddWidget, BuildComponent, ComponentRegistry, FireEvent,
    GetAllComponents, GetComponent, GetWidget,
};
use crate::run_info::{
    ErrorReport, GetAbortSignal, GetRunInfo, NewContext, ResetErrors, RunInfo, RunInfoConfig,
    ShowErrors,
};
use crate::stream::{
    ConsumerFactory, ObjectProducer, RegisterStreamProcessing, StreamConfig, StreamObjects,
    StreamOutcome, StreamProcessor,
};
use crate::task_fetcher::{
    parent_site_name, GetTaskAssignment, OfferTaskResult, SendTaskResult, TaskFetcher,
    TaskFetcherConfig, TaskPull, DEFAULT_COMMUNICATION_TIMEOUT,
};
use crate::widgets::{FedEventRunner, InfoCollector};

/// Starts client job engines: see [`ClientEngine::builder`].
pub struct ClientEngine;

impl ClientEngine {
    /// A builder for the engine of job `job_id` at site `client_name`.
    pub fn builder(client_name: &str, job_id: &str) -> ClientEngineBuilder {
        ClientEngineBuilder {
            run_info: RunInfoConfig::new(client_name, job_id),
            check_run_mismatch: false,
            communication_timeout: DEFAULT_COMMUNICATION_TIMEOUT,
            ssid: None,
            project_name: None,
            download: DownloadConfig::default(),
            offer_results: false,
        }
    }
}

/// Configuration of a client job engine before it starts.
///
/// # Example
/// ```
/// use fedrun_cell::Network;
/// use fedrun_core::Value;
/// use fedrun_engine::ClientEngine;
///
/// actix::System::new().block_on(async {
///     let network = Network::new();
///     let engine = ClientEngine::builder("site-1", "job-1").start(&network).await.unwrap();
///     assert_eq!(engine.get_run_info().await.unwrap().job_id, "job-1");
///     assert!(engine.show_errors().await.unwrap().is_none());
/// });
/// ```
pub struct ClientEngineBuilder {
    run_info: RunInfoConfig,
    check_run_mismatch: bool,
    communication_timeout: Duration,
    ssid: Option<String>,
    project_name: Option<String>,
    download: DownloadConfig,
    offer_results: bool,
}

impl ClientEngineBuilder {
    /// The client args (`fqsn`, `is_leaf`, ...), as NVFlare's `client.client_args`.
    pub fn client_config(mut self, config: Map) -> Self {
        self.run_info = self.run_info.with_client_config(config);
        self
    }

    /// The job meta (`job_clients`, ...); its clients are loaded at start, as NVFlare's job
    /// process does before the runner starts.
    pub fn job_meta(mut self, meta: Value) -> Self {
        self.run_info = self.run_info.with_job_meta(meta);
        self
    }

    /// Shorthand for a job meta whose `job_clients` are plain sites with these names.
    pub fn job_clients(self, names: &[&str]) -> Self {
        let clients: Vec<Value> = names
            .iter()
            .map(|n| Value::Map([("name", Value::from(*n))].into_iter().collect()))
            .collect();
        let meta: Map = [("job_clients", Value::Array(clients))]
            .into_iter()
            .collect();
        self.job_meta(Value::Map(meta))
    }

    /// Answer aux requests from peers of another job with `RUN_MISMATCH` (off by
    /// default because NVFlare's parent processes have no job id).
    pub fn check_run_mismatch(mut self, on: bool) -> Self {
        self.check_run_mismatch = on;
        self
    }

    /// The starting communication timeout of task pulls and result pushes (default 300 s, as
    /// NVFlare's; a server reply's `min_get_task_timeout` may raise it).
    pub fn communication_timeout(mut self, timeout: Duration) -> Self {
        self.communication_timeout = timeout;
        self
    }

    /// The job's session id: NVFlare's job `ssid` (the CJ reads it from `NVFLARE_JOB_SSID`; the
    /// simulator uses `"NA"`). A successful task pull stamps it into the pull's context as
    /// `__ssid__`, and a task result whose context carries another session is not sent
    /// (`invalid_session`), as NVFlare's communicator does. Default: no session (no stamp; a
    /// context stamped with a session is then refused).
    pub fn ssid(mut self, ssid: impl Into<String>) -> Self {
        self.ssid = Some(ssid.into());
        self
    }

    /// The project name task requests carry (the startup kit's `servers[0].name`; default
    /// `"fedrun"`). NVFlare's server job does not check it.
    pub fn project_name(mut self, name: impl Into<String>) -> Self {
        self.project_name = Some(name.into());
        self
    }

    /// Task results leave with their arrays as NVFlare numpy download references served by
    /// this engine in items of about `chunk_size` bytes (the job's `np_download_chunk_size`); 0
    /// (the default) keeps arrays inline. References in what the engine *receives* are always
    /// resolved (downloaded from their producer before a handler or a requester sees them).
    pub fn np_download_chunk_size(mut self, chunk_size: usize) -> Self {
        self.offer_results = chunk_size > 0;
        if chunk_size > 0 {
            self.download.chunk_size = chunk_size;
        }
        self
    }

    /// Start the engine on the in-process `network`: its cell is `<client_name>.<job_id>`.
    pub async fn start(self, network: &Network) -> Result<EngineHandle, EngineError> {
        self.start_on(network.clone()).await
    }

    /// Start the engine on any cell transport.
    ///
    /// The job's clients are loaded from the job meta first (when there is one). A site whose
    /// FQSN (client config `fqsn`) has a parent pulls its tasks from that parent's job cell
    /// `<parent fqcn>.<job_id>` instead of `server.<job_id>`; the parent must be one of the
    /// job's clients, else the start fails with [`EngineError::UnknownParent`] (and the cell is
    /// stopped again).
    pub async fn start_on<T: Transport>(self, transport: T) -> Result<EngineHandle, EngineError> {
        let site = self.run_info.client_name.clone();
        let job_id = self.run_info.job_id.clone();
        let fqcn = Fqcn::job_cell(&site, &job_id).map_err(|e| EngineError::CellUnavailable {
            fqcn: format!("{site}.{job_id}"),
            reason: e.to_string(),
        })?;
        let cell =
            Cell::start(fqcn.clone(), transport).map_err(|e| EngineError::CellUnavailable {
                fqcn: fqcn.to_string(),
                reason: e.to_string(),
            })?;
        // NVFlare's numpy download references in anything this cell receives are resolved
        // before a handler or a requester sees the message.
        let resolver = ArrayResolver::new(cell.clone(), &site, &job_id, self.download.clone());
        cell.set_payload_resolver(Some(Arc::new(resolver)))
            .await
            .map_err(|e| EngineError::CellUnavailable {
                fqcn: fqcn.to_string(),
                reason: e.to_string(),
            })?;
        let has_meta = self.run_info.job_meta.is_some();
        let fqsn = self.run_info.fqsn();
        let run_info = RunInfo::new(self.run_info).start();
        let registry = ComponentRegistry::new(&job_id, &site)
            .with_error_sink(run_info.clone().recipient())
            .start();
        let aux = AuxRunner::new(
            AuxConfig::new(&site, &job_id, cell.clone(), run_info.clone())
                .with_check_run_mismatch(self.check_run_mismatch),
        )
        .start();
        let stream = StreamProcessor::start(StreamConfig::new(
            &site,
            &job_id,
            aux.clone(),
            run_info.clone(),
        ))
        .await?;
        if has_meta {
            let loaded = aux.send(GetJobClients { job_meta: None }).await;
            let loaded = loaded.map_err(|_| EngineError::ActorGone { actor: "AuxRunner" });
            if let Err(e) = loaded.and_then(|r| r) {
                cell.stop().await;
                return Err(e);
            }
        }
        let parent = match resolve_parent(&aux, &fqsn).await {
            Ok(parent) => parent,
            Err(e) => {
                log::error!("[job={job_id} site={site}] cannot start the engine: {e}");
                cell.stop().await;
                return Err(e);
            }
        };
        let mut task_config =
            TaskFetcherConfig::new(&site, &job_id, cell.clone(), run_info.clone())
                .with_communication_timeout(self.communication_timeout)
                .with_events(registry.clone().recipient());
        if let Some((_, parent_fqcn)) = &parent {
            task_config = task_config.with_parent_fqcn(parent_fqcn.clone());
        }
        if let Some(ssid) = &self.ssid {
            task_config = task_config.with_ssid(ssid.as_str());
        }
        if let Some(project) = &self.project_name {
            task_config = task_config.with_project_name(project.as_str());
        }
        if self.offer_results {
            let downloads = DownloadService::start(&cell, &site, &job_id, &self.download)
                .await
                .map_err(|e| EngineError::CellUnavailable {
                    fqcn: fqcn.to_string(),
                    reason: e.to_string(),
                })?;
            task_config = task_config.with_downloads(downloads);
        }
        let task = TaskFetcher::new(task_config)?.start();
        let info = InfoCollector::new(&site, &job_id, &run_info, &registry);
        let fed = FedEventRunner::new(&site, &job_id, &aux, &registry, &run_info);
        for (id, widget) in [
            (widget_id::INFO_COLLECTOR, ComponentRef::new(info)),
            (widget_id::FED_EVENT_RUNNER, ComponentRef::new(fed)),
        ] {
            let added = registry.send(AddWidget {
                id: id.to_owned(),
                widget,
            });
            added.await.map_err(|_| EngineError::ActorGone {
                actor: "ComponentRegistry",
            })??;
        }
        let actors = EngineActors {
            run_info,
            registry,
            aux,
            stream,
            task,
        };
        let facade = ClientRunManager::new(actors, &site, &job_id).start();
        let handle = EngineHandle {
            addr: facade,
            cell,
            site: Arc::from(site.as_str()),
            job_id: Arc::from(job_id.as_str()),
            ssid: self.ssid.map(Arc::from),
            parent: parent.map(|(name, _)| Arc::from(name.as_str())),
        };
        log::info!(
            "[job={job_id} site={site}] client job engine started on cell {fqcn}, tasks from {}",
            handle.parent().unwrap_or("server")
        );
        Ok(handle)
    }
}

/// The parent site of `fqsn` (name and cell), `None` for a site served by the server.
async fn resolve_parent(
    aux: &Addr<AuxRunner>,
    fqsn: &str,
) -> Result<Option<(String, Fqcn)>, EngineError> {
    let Some(parent) = parent_site_name(fqsn) else {
        return Ok(None);
    };
    let unknown = || EngineError::UnknownParent {
        parent: parent.to_owned(),
        fqsn: fqsn.to_owned(),
    };
    let found = aux
        .send(GetClientFromName {
            name: parent.to_owned(),
        })
        .await
        .map_err(|_| EngineError::ActorGone { actor: "AuxRunner" })?;
    let client = found.ok_or_else(unknown)?;
    let fqcn = Fqcn::new(client.fqcn.clone()).map_err(|e| EngineError::InvalidTargetFqcn {
        fqcn: client.fqcn.clone(),
        reason: e.to_string(),
    })?;
    Ok(Some((client.name, fqcn)))
}

/// A cloneable, typed handle on a running engine: one async method per engine call.
///
/// Every method sends one message to the `ClientRunManager` facade and waits for its reply; a
/// stopped engine gives [`EngineError::ActorGone`].
#[derive(Clone)]
pub struct EngineHandle {
    addr: Addr<ClientRunManager>,
    cell: CellHandle,
    site: Arc<str>,
    job_id: Arc<str>,
    ssid: Option<Arc<str>>,
    parent: Option<Arc<str>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("site", &self.site)
            .field("job_id", &self.job_id)
            .finish_non_exhaustive()
    }
}

fn gone(_: MailboxError) -> EngineError {
    EngineError::ActorGone {
        actor: "ClientRunManager",
    }
}

impl EngineHandle {
    /// The facade's raw address: it accepts every engine message.
    pub fn addr(&self) -> &Addr<ClientRunManager> {
        &self.addr
    }

    /// The job's cell (`<site>.<job_id>`).
    pub fn cell(&self) -> &CellHandle {
        &self.cell
    }

    /// This engine's site name.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// This engine's job id.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The job's session id ([`ClientEngineBuilder::ssid`]), e.g. for the wire layer's `ssid`
    /// cell header.
    pub fn ssid(&self) -> Option<&str> {
        self.ssid.as_deref()
    }

    /// The parent site whose job serves this site's tasks; `None`: the server. NVFlare's
    /// client runner also sends its runner sync, heartbeats and task checks there.
    pub fn parent(&self) -> Option<&str> {
        self.parent.as_deref()
    }

    /// The aux target of the task server: the parent site, or the server.
    pub fn parent_target(&self) -> AuxTargets {
        match &self.parent {
            Some(parent) => AuxTargets::Site(parent.to_string()),
            None => AuxTargets::Server,
        }
    }

    /// The reply key of the task server in aux replies: the parent's name, or `server`.
    pub fn parent_reply_key(&self) -> &str {
        self.parent.as_deref().unwrap_or("server")
    }

    /// Send any engine message through the facade.
    pub async fn send<M>(&self, msg: M) -> Result<M::Result, EngineError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        ClientRunManager: Handler<M>,
    {
        self.addr.send(msg).await.map_err(gone)
    }

    /// NVFlare's `get_run_info()`.
    pub async fn get_run_info(&self) -> Result<ClientRunInfo, EngineError> {
        self.send(GetRunInfo).await
    }

    /// NVFlare's `new_context()`.
    pub async fn new_context(&self) -> Result<FlContext, EngineError> {
        self.send(NewContext).await
    }

    /// NVFlare's `show_errors()` (fixed): the error log, `None` when empty.
    pub async fn show_errors(&self) -> Result<Option<ErrorReport>, EngineError> {
        self.send(ShowErrors).await
    }

    /// NVFlare's `reset_errors()` (fixed): clears the error log.
    pub async fn reset_errors(&self) -> Result<(), EngineError> {
        self.send(ResetErrors).await
    }

    /// The info collector's `get_run_stats()`: fires `info_collector.get_stats` and returns the
    /// `{group: info}` map the handlers filled (see [`InfoCollector::show_stats`]).
    pub async fn show_stats(&self) -> Result<Map, EngineError> {
        self.info_collector().await?.show_stats().await
    }

    /// NVFlare's `get_widget(id)`: the widget registered under `id` (`info_collector`,
    /// `fed_event_runner`), `None` for any other id.
    pub async fn get_widget(&self, id: &str) -> Result<Option<ComponentRef>, EngineError> {
        self.send(GetWidget { id: id.to_owned() }).await
    }

    /// The `info_collector` widget, typed.
    pub async fn info_collector(&self) -> Result<Arc<InfoCollector>, EngineError> {
        self.typed_widget(widget_id::INFO_COLLECTOR).await
    }

    /// The `fed_event_runner` widget, typed.
    pub async fn fed_event_runner(&self) -> Result<Arc<FedEventRunner>, EngineError> {
        self.typed_widget(widget_id::FED_EVENT_RUNNER).await
    }

    async fn typed_widget<T: crate::Component>(&self, id: &str) -> Result<Arc<T>, EngineError> {
        self.get_widget(id)
            .await?
            .and_then(|w| w.downcast::<T>())
            .ok_or_else(|| EngineError::MissingWidget(id.to_owned()))
    }

    /// NVFlare's `FLComponent.fire_fed_event(event_type, data, fl_ctx)`: fires `event_type`
    /// locally with `data` as `__event_data__` and scope `federation`; the `fed_event_runner`
    /// widget then sends it to the server job (topic `fed.event`) once the run started.
    /// `ctx`: the context to fire on (`None`: a new one of the run). Returns the context as the
    /// handlers left it.
    pub async fn fire_fed_event(
        &self,
        event_type: &str,
        data: Shareable,
        ctx: Option<FlContext>,
    ) -> Result<FlContext, EngineError> {
        let mut ctx = match ctx {
            Some(ctx) => ctx,
            None => self.new_context().await?,
        };
        ctx.put(fl_ctx_key::EVENT_DATA, data, true, false);
        ctx.put(
            fl_ctx_key::EVENT_SCOPE,
            event_scope::FEDERATION,
            true,
            false,
        );
        self.fire_event(event_type, ctx).await
    }

    /// The run's abort signal (triggered by [`EngineHandle::abort_app`]).
    pub async fn abort_signal(&self) -> Result<AbortSignal, EngineError> {
        self.send(GetAbortSignal).await
    }

    /// NVFlare's `abort_app(job_id)`: aborts this run if `job_id` is its job;
    /// otherwise logs a warning. Returns whether the run was aborted.
    pub async fn abort_app(&self, job_id: &str) -> Result<bool, EngineError> {
        self.send(AbortApp {
            job_id: job_id.to_owned(),
        })
        .await
    }

    /// NVFlare's `add_component(id, component)`.
    pub async fn add_component(
        &self,
        id: &str,
        component: ComponentRef,
    ) -> Result<(), EngineError> {
        self.send(AddComponent {
            id: id.to_owned(),
            component,
        })
        .await?
    }

    /// NVFlare's `get_component(id)`.
    pub async fn get_component(&self, id: &str) -> Result<Option<ComponentRef>, EngineError> {
        self.send(GetComponent { id: id.to_owned() }).await
    }

    /// NVFlare's `get_all_components()`, in insertion order.
    pub async fn get_all_components(&self) -> Result<Vec<(String, ComponentRef)>, EngineError> {
        self.send(GetAllComponents).await
    }

    /// NVFlare's `add_handler(h)`.
    pub async fn add_handler(&self, handler: Arc<dyn EventHandler>) -> Result<(), EngineError> {
        self.send(AddHandler { handler }).await
    }

    /// NVFlare's `fire_event(event_type, fl_ctx)`; returns the context as the handlers left it.
    pub async fn fire_event(
        &self,
        event_type: &str,
        ctx: FlContext,
    ) -> Result<FlContext, EngineError> {
        self.send(FireEvent {
            event_type: event_type.to_owned(),
            ctx,
        })
        .await?
    }

    /// NVFlare's `build_component(config_dict)`: `None` for a disabled or empty config.
    pub async fn build_component(
        &self,
        config: serde_json::Value,
    ) -> Result<Option<ComponentRef>, EngineError> {
        self.send(BuildComponent { config }).await?
    }

    /// NVFlare's `register_aux_message_handler(topic, func)`.
    pub async fn register_aux_message_handler(
        &self,
        topic: &str,
        handler: impl Into<AuxHandler>,
    ) -> Result<(), EngineError> {
        self.send(RegisterAuxMessageHandler::new(topic, handler))
            .await?
    }

    /// NVFlare's `send_aux_request(targets, topic, request, timeout)` with `optional` and
    /// `secure` off; send a [`SendAuxRequest`] with [`EngineHandle::send`] for the others.
    /// A zero timeout sends fire-and-forget and returns an empty map.
    pub async fn send_aux_request(
        &self,
        targets: impl Into<AuxTargets>,
        topic: &str,
        request: Shareable,
        timeout: Duration,
    ) -> Result<AuxReplies, EngineError> {
        self.send(SendAuxRequest::new(targets, topic, request, timeout))
            .await?
    }

    /// NVFlare's `multicast_aux_requests(topic, {target: request}, timeout)`.
    pub async fn multicast_aux_requests(
        &self,
        topic: &str,
        requests: Vec<(String, Shareable)>,
        timeout: Duration,
    ) -> Result<AuxReplies, EngineError> {
        self.send(MulticastAuxRequests::new(topic, requests, timeout))
            .await?
    }

    /// NVFlare's `fire_and_forget_aux_request(topic, request)` (to the job's server).
    pub async fn fire_and_forget_aux_request(
        &self,
        topic: &str,
        request: Shareable,
    ) -> Result<(), EngineError> {
        self.send(FireAndForgetAuxRequest::new(topic, request))
            .await?
    }

    /// NVFlare's `get_job_clients(fl_ctx)`: (re)loads the job's clients from the job meta.
    pub async fn get_job_clients(&self) -> Result<Vec<Client>, EngineError> {
        self.send(GetJobClients { job_meta: None }).await?
    }

    /// NVFlare's `validate_targets(names)`: `(valid, invalid)`, with the same name rule as
    /// sending.
    pub async fn validate_targets(
        &self,
        names: Vec<String>,
    ) -> Result<(Vec<String>, Vec<String>), EngineError> {
        self.send(ValidateTargets { names }).await
    }

    /// NVFlare's `register_stream_processing(channel, topic, factory)`: streams arriving on
    /// (channel, topic) get a consumer from `factory`. Send a [`RegisterStreamProcessing`] with
    /// [`EngineHandle::send`] to add `stream_done_cb` / `consumed_cb`.
    pub async fn register_stream_processing(
        &self,
        channel: &str,
        topic: &str,
        factory: impl ConsumerFactory,
    ) -> Result<(), EngineError> {
        self.send(RegisterStreamProcessing::new(channel, topic, factory))
            .await
    }

    /// NVFlare's `stream_objects(channel, topic, stream_ctx, targets, producer)` with an empty
    /// stream context; send a [`StreamObjects`] with [`EngineHandle::send`] for the options.
    pub async fn stream_objects(
        &self,
        channel: &str,
        topic: &str,
        targets: impl Into<AuxTargets>,
        producer: impl ObjectProducer,
    ) -> Result<StreamOutcome, EngineError> {
        self.send(StreamObjects::new(channel, topic, targets, producer))
            .await?
    }

    /// NVFlare's `get_task_assignment(fl_ctx, timeout)` with a new context of the run: pulls one
    /// task from the server job (or the parent site's). `Ok(None)` is a failed pull (try again
    /// later); the special names `__try_again__` and `__end_run__` come back as assignments. The
    /// pull waits `max(timeout, communication timeout)`, or the communication timeout when
    /// `timeout` is `None`. The pull's context is dropped: use [`EngineHandle::pull_task`] to
    /// keep it.
    pub async fn get_task_assignment(
        &self,
        timeout: Option<Duration>,
    ) -> Result<Option<TaskAssignment>, EngineError> {
        Ok(self.pull_task(None, timeout).await?.task)
    }

    /// NVFlare's `get_task_assignment(fl_ctx, timeout)` on `ctx` (`None`: a new context of the
    /// run): the assignment and the pull's context, which holds the server's peer context and
    /// the session's `__ssid__`; process the task in it and send its result with
    /// [`EngineHandle::send_task_result_in`].
    pub async fn pull_task(
        &self,
        ctx: Option<FlContext>,
        timeout: Option<Duration>,
    ) -> Result<TaskPull, EngineError> {
        self.send(GetTaskAssignment { ctx, timeout }).await?
    }

    /// NVFlare's `send_task_result(result, fl_ctx, timeout)` with the task's context (normally
    /// the pull's, [`TaskPull::ctx`]): `false` when the context is of another session, or when
    /// the server job did not answer `ok`.
    pub async fn send_task_result_in(
        &self,
        ctx: FlContext,
        result: Shareable,
        timeout: Option<Duration>,
    ) -> Result<bool, EngineError> {
        self.send(SendTaskResult {
            result,
            task_name: None,
            ctx: Some(ctx),
            timeout,
        })
        .await?
    }

    /// Offers a task result's arrays for download once, before its pushes ([`OfferTaskResult`]);
    /// the result comes back unchanged when the engine sends arrays inline.
    pub async fn offer_task_result(&self, result: Shareable) -> Result<Shareable, EngineError> {
        self.send(OfferTaskResult { result }).await
    }

    /// NVFlare's `send_task_result(result, fl_ctx, timeout)` with a new context of the run: pushes
    /// a task result (its task name from its `__task_name__` header). `true` only when the server
    /// job's cell answered `ok`. Waits `timeout`, or the communication timeout when `None`. Send a
    /// [`SendTaskResult`] with [`EngineHandle::send`] to pass a task name or a context.
    pub async fn send_task_result(
        &self,
        result: Shareable,
        timeout: Option<Duration>,
    ) -> Result<bool, EngineError> {
        self.send(SendTaskResult {
            result,
            task_name: None,
            ctx: None,
            timeout,
        })
        .await?
    }

    /// Stop the job's cell (peers then see it as unreachable) and the engine's actors.
    pub async fn stop(&self) {
        self.cell.stop().await;
        // The facade holds the owners' only addresses: once it stops, each owner stops as soon
        // as its mailbox is empty. An engine that is already gone has nothing left to stop.
        let _ = self.addr.send(StopEngine).await;
    }
}
