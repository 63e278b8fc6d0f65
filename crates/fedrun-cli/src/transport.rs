//! What carries a federation's messages: the in-process network, or NVFlare's wire over TCP.
//!
//! By default `fedrun simulate` puts every job's cell on one in-process [`Network`]: messages
//! are handed over without being encoded. With `--transport tcp` every job gets its own NVFlare
//! endpoint (a [`TcpTransport`]) and every message crosses loopback TCP as SFM frames with FOBS
//! payloads, exactly as between separate processes: the endpoint `server`, listening on
//! `127.0.0.1:0`, hosts the server job's cell `server.<job>`, and each client job is an endpoint
//! `<site>.<job>` hosting its own cell and connecting to it. So one command checks that a job
//! behaves the same once its messages are on the wire. `fedrun server` and `fedrun client`
//! ([`crate::server_cmd`], [`crate::client_cmd`]) use the same helpers across processes.
//!
//! - [`TransportKind`]: the choice (`inproc` or `tcp`).
//! - [`JobTransport`]: the transport of one job's cell, whichever it is (a
//!   [`fedrun_cell::Transport`] itself, so engines and server jobs start on it unchanged).
//! - [`SimNetwork`]: the medium of a whole simulation: hands out the server's and each client's
//!   transport and shuts them all down at the end.
//! - [`listen_server`] and [`connect_client`]: one endpoint each, with errors that say what to
//!   fix (a bad address, a port in use, a server that does not answer); [`listen_server_with`]
//!   and [`connect_client_with`] take [`TlsOptions`] for TLS and mTLS (`stcp://`).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use actix::Recipient;
use fedrun_cell::{CellError, CellMessage, Deliver, Fqcn, Network, Transport};
use fedrun_core::CellReturnCode;
use fedrun_wire::{TcpTransport, TcpUrl, WireConfig};
use futures::future::BoxFuture;

use crate::error::CliError;
use crate::tls_opts::TlsOptions;

/// How long a simulated client waits for its loopback connection to the server endpoint.
pub const LOOPBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`SimNetwork::shutdown`] waits for the server to see a client's connection close.
const HANG_UP_WAIT: Duration = Duration::from_secs(1);

/// How the jobs of a federation talk to each other.
///
/// # Example
/// ```
/// use fedrun_cli::transport::TransportKind;
///
/// assert_eq!("tcp".parse::<TransportKind>().unwrap(), TransportKind::Tcp);
/// assert_eq!(TransportKind::default().to_string(), "inproc");
/// assert!("udp".parse::<TransportKind>().is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// One in-process network; messages are never encoded.
    #[default]
    #[value(name = "inproc")]
    InProc,
    /// One NVFlare endpoint per job, connected over loopback TCP.
    #[value(name = "tcp")]
    Tcp,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::InProc => "inproc",
            TransportKind::Tcp => "tcp",
        })
    }
}

impl FromStr for TransportKind {
    type Err = CliError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inproc" => Ok(TransportKind::InProc),
            "tcp" => Ok(TransportKind::Tcp),
            other => Err(CliError::BadOption {
                option: "transport",
                reason: format!("'{other}' is neither 'inproc' nor 'tcp'"),
            }),
        }
    }
}

/// The transport one job's cell runs on.
///
/// Cheap to clone (both kinds are shared handles).
///
/// # Example
/// ```
/// use fedrun_cell::{Cell, Fqcn, Network};
/// use fedrun_cli::transport::JobTransport;
///
/// actix::System::new().block_on(async {
///     let transport = JobTransport::InProc(Network::new());
///     let cell = Cell::start(Fqcn::SERVER, transport.clone()).unwrap();
///     assert!(cell.is_running());
///     cell.stop().await;
/// });
/// ```
#[derive(Clone)]
pub enum JobTransport {
    /// The in-process network.
    InProc(Network),
    /// An NVFlare endpoint on TCP.
    Tcp(TcpTransport),
}

impl fmt::Debug for JobTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobTransport::InProc(net) => f
                .debug_tuple("InProc")
                .field(&format_args!("{} cell(s)", net.cells().len()))
                .finish(),
            JobTransport::Tcp(tcp) => f.debug_tuple("Tcp").field(tcp).finish(),
        }
    }
}

impl Transport for JobTransport {
    fn register(&self, fqcn: Fqcn, inbox: Recipient<Deliver>) -> Result<(), CellError> {
        match self {
            JobTransport::InProc(net) => Transport::register(net, fqcn, inbox),
            JobTransport::Tcp(tcp) => tcp.register(fqcn, inbox),
        }
    }

    fn unregister(&self, fqcn: &Fqcn) {
        match self {
            JobTransport::InProc(net) => Transport::unregister(net, fqcn),
            JobTransport::Tcp(tcp) => tcp.unregister(fqcn),
        }
    }

    fn route(&self, msg: CellMessage) -> BoxFuture<'static, Result<(), CellReturnCode>> {
        match self {
            JobTransport::InProc(net) => Transport::route(net, msg),
            JobTransport::Tcp(tcp) => tcp.route(msg),
        }
    }
}

/// The medium of one simulation (see the module doc).
///
/// # Example
/// ```
/// use fedrun_cli::transport::{SimNetwork, TransportKind};
///
/// actix::System::new().block_on(async {
///     let net = SimNetwork::start(TransportKind::Tcp).await.unwrap();
///     let url = net.server_url().unwrap();
///     assert!(url.starts_with("tcp://127.0.0.1:"), "{url}");
///     // site-1's job endpoint connects (and has shaken hands) before this returns
///     let _client = net.client_transport("site-1", "job-1").await.unwrap();
///     net.shutdown().await;
/// });
/// ```
pub struct SimNetwork {
    medium: Medium,
}

enum Medium {
    InProc(Network),
    Tcp {
        server: TcpTransport,
        url: String,
        clients: Mutex<Vec<TcpTransport>>,
    },
}

impl fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimNetwork")
            .field("kind", &self.kind())
            .field("server_url", &self.server_url())
            .finish()
    }
}

impl SimNetwork {
    /// A medium of `kind`; for [`TransportKind::Tcp`] the server endpoint is already listening
    /// on a free loopback port.
    ///
    /// # Errors
    ///
    /// [`CliError::BadOption`] (`transport`) when the loopback listener cannot be opened.
    pub async fn start(kind: TransportKind) -> Result<Self, CliError> {
        let medium = match kind {
            TransportKind::InProc => Medium::InProc(Network::new()),
            TransportKind::Tcp => {
                let (server, addr) =
                    listen_server("127.0.0.1:0")
                        .await
                        .map_err(|e| CliError::BadOption {
                            option: "transport",
                            reason: format!("cannot open the loopback server endpoint: {e}"),
                        })?;
                Medium::Tcp {
                    server,
                    url: format!("tcp://{addr}"),
                    clients: Mutex::new(Vec::new()),
                }
            }
        };
        Ok(Self { medium })
    }

    /// Which medium this is.
    pub fn kind(&self) -> TransportKind {
        match self.medium {
            Medium::InProc(_) => TransportKind::InProc,
            Medium::Tcp { .. } => TransportKind::Tcp,
        }
    }

    /// The server endpoint's `tcp://host:port` (`None` in process).
    pub fn server_url(&self) -> Option<String> {
        match &self.medium {
            Medium::InProc(_) => None,
            Medium::Tcp { url, .. } => Some(url.clone()),
        }
    }

    /// The transport of the server job's cell.
    pub fn server_transport(&self) -> JobTransport {
        match &self.medium {
            Medium::InProc(net) => JobTransport::InProc(net.clone()),
            Medium::Tcp { server, .. } => JobTransport::Tcp(server.clone()),
        }
    }

    /// The transport of `site`'s job cell: in process the shared network; on TCP a new endpoint
    /// `<site>.<job_id>` connected to the server endpoint (the handshake is done when this
    /// returns, so the client's first message does not race its connection).
    ///
    /// # Errors
    ///
    /// [`CliError::BadOption`] (`site`) for a site or job id that is not a valid cell-name part,
    /// [`CliError::Timeout`] when the connection is not up within
    /// [`LOOPBACK_CONNECT_TIMEOUT`].
    pub async fn client_transport(
        &self,
        site: &str,
        job_id: &str,
    ) -> Result<JobTransport, CliError> {
        match &self.medium {
            Medium::InProc(net) => Ok(JobTransport::InProc(net.clone())),
            Medium::Tcp { url, clients, .. } => {
                let tcp = connect_client(url, site, job_id, LOOPBACK_CONNECT_TIMEOUT).await?;
                clients
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(tcp.clone());
                Ok(JobTransport::Tcp(tcp))
            }
        }
    }

    /// Closes every TCP endpoint (clients first, each saying goodbye; then the server). Nothing
    /// to do in process. Call it once the cells are stopped.
    pub async fn shutdown(&self) {
        if let Medium::Tcp {
            server, clients, ..
        } = &self.medium
        {
            let clients: Vec<TcpTransport> = clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain(..)
                .collect();
            futures::future::join_all(clients.iter().map(TcpTransport::shutdown)).await;
            // Let the server see those connections close, so that it does not say goodbye
            // (and wait for answers) on connections that are already going away.
            futures::future::join_all(
                clients
                    .iter()
                    .map(|c| server.wait_for_peer_gone(c.own_fqcn(), HANG_UP_WAIT)),
            )
            .await;
            server.shutdown().await;
        }
    }
}

/// `host:port` or `tcp://host:port` as a `tcp://` URL, checked.
///
/// # Errors
///
/// [`CliError::BadOption`] naming `option` when the address does not parse.
///
/// # Example
/// ```
/// use fedrun_cli::transport::tcp_url;
///
/// assert_eq!(tcp_url("listen", "127.0.0.1:8002").unwrap(), "tcp://127.0.0.1:8002");
/// assert_eq!(tcp_url("server", "tcp://localhost:1").unwrap(), "tcp://localhost:1");
/// assert_eq!(tcp_url("server", "stcp://localhost:1").unwrap(), "stcp://localhost:1");
/// assert!(tcp_url("server", "localhost").is_err());
/// ```
pub fn tcp_url(option: &'static str, address: &str) -> Result<String, CliError> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("tcp://{address}")
    };
    // `stcp://` is TLS on the same kind of address
    let plain = match url.strip_prefix("stcp://") {
        Some(rest) => format!("tcp://{rest}"),
        None => url.clone(),
    };
    TcpUrl::parse(&plain).map_err(|e| CliError::BadOption {
        option,
        reason: format!(
            "'{address}': {e} (expected host:port, tcp://host:port or stcp://host:port)"
        ),
    })?;
    Ok(url)
}

/// The server endpoint (`server`) listening on `address` (`host:port` or `tcp://host:port`;
/// port 0 picks a free one). Returns it and the bound address.
///
/// # Errors
///
/// [`CliError::BadOption`] (`listen`) for an address that does not parse or cannot be bound
/// (e.g. the port is in use).
pub async fn listen_server(address: &str) -> Result<(TcpTransport, SocketAddr), CliError> {
    listen_server_with(address, &TlsOptions::default()).await
}

/// As [`listen_server`], over TLS or mTLS when `tls` says so ([`TlsOptions::listener`]).
///
/// # Errors
///
/// As [`listen_server`], and for TLS options that do not work.
pub async fn listen_server_with(
    address: &str,
    tls: &TlsOptions,
) -> Result<(TcpTransport, SocketAddr), CliError> {
    let url = tcp_url("listen", address)?;
    let listener = tls.listener(url.starts_with("stcp://"))?;
    let transport = TcpTransport::new(Fqcn::SERVER, WireConfig::default());
    let listening = match listener {
        Some(l) => transport.add_tls_listener(&url, l).await,
        None => transport.add_listener(&url).await,
    };
    let addr = listening.map_err(|e| CliError::BadOption {
        option: "listen",
        reason: format!("cannot listen on {url}: {e}"),
    })?;
    Ok((transport, addr))
}

/// The endpoint of `site`'s job `job_id` (named `<site>.<job_id>`), connected to the server
/// endpoint at `server_url`; waits at most `timeout` for the handshake (the connector keeps
/// retrying meanwhile, so the server may start a little later).
///
/// # Errors
///
/// [`CliError::BadOption`] for a bad URL (`server`) or a site or job id that cannot name a cell
/// (`name`; `server` is reserved), [`CliError::Timeout`] when the server does not answer.
pub async fn connect_client(
    server_url: &str,
    site: &str,
    job_id: &str,
    timeout: Duration,
) -> Result<TcpTransport, CliError> {
    connect_client_with(server_url, site, job_id, timeout, &TlsOptions::default()).await
}

/// As [`connect_client`], over TLS or mTLS when `tls` says so ([`TlsOptions::connector`]).
///
/// # Errors
///
/// As [`connect_client`], and for TLS options that do not work (in mTLS also a site whose
/// certificate is not its own).
pub async fn connect_client_with(
    server_url: &str,
    site: &str,
    job_id: &str,
    timeout: Duration,
    tls: &TlsOptions,
) -> Result<TcpTransport, CliError> {
    let url = tcp_url("server", server_url)?;
    let connector = tls.connector(url.starts_with("stcp://"))?;
    if site == Fqcn::SERVER.as_str() {
        return Err(CliError::BadOption {
            option: "name",
            reason: "'server' is the server's name, not a client site's".to_owned(),
        });
    }
    let own = Fqcn::job_cell(site, job_id).map_err(|e| CliError::BadOption {
        option: "name",
        reason: e.to_string(),
    })?;
    let transport = TcpTransport::new(own, WireConfig::default());
    match connector {
        Some(c) => transport.add_tls_connector(&url, c),
        None => transport.add_connector(&url),
    }
    .map_err(|e| CliError::BadOption {
        option: "server",
        reason: format!("cannot connect to {url}: {e}"),
    })?;
    if transport.wait_for_peer(&Fqcn::SERVER, timeout).await {
        log::info!("[job={job_id} site={site}] connected to the server at {url}");
        Ok(transport)
    } else {
        transport.shutdown().await;
        Err(CliError::Timeout {
            what: format!("the server at {url} to accept {site}'s connection"),
            secs: timeout.as_secs(),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addresses_without_scheme_become_tcp_urls_and_bad_ones_name_the_option() {
        assert_eq!(tcp_url("listen", "0:8002").unwrap(), "tcp://0:8002");
        let err = tcp_url("listen", "127.0.0.1").unwrap_err().to_string();
        assert!(
            err.starts_with("invalid option --listen: '127.0.0.1'"),
            "{err}"
        );
        let err = tcp_url("server", "grpc://h:1").unwrap_err().to_string();
        assert!(err.contains("--server"), "{err}");
    }

    #[actix::test]
    async fn each_simulated_client_job_is_its_own_endpoint_connected_to_the_server() {
        let net = SimNetwork::start(TransportKind::Tcp).await.unwrap();
        let mut clients = Vec::new();
        for site in ["site-1", "site-2"] {
            let JobTransport::Tcp(tcp) = net.client_transport(site, "j").await.unwrap() else {
                panic!("a TCP simulation hands out TCP transports");
            };
            assert_eq!(tcp.own_fqcn().as_str(), format!("{site}.j"));
            assert_eq!(tcp.peers(), [Fqcn::SERVER]);
            clients.push(tcp);
        }
        let JobTransport::Tcp(server) = net.server_transport() else {
            panic!("a TCP simulation hands out TCP transports");
        };
        let second = Fqcn::new("site-2.j").unwrap();
        assert!(server.wait_for_peer(&second, Duration::from_secs(5)).await);
        assert_eq!(server.peers(), [Fqcn::new("site-1.j").unwrap(), second]);
        net.shutdown().await;
        assert!(
            clients[0]
                .wait_for_peer_gone(&Fqcn::SERVER, Duration::from_secs(5))
                .await
        );

        let inproc = SimNetwork::start(TransportKind::InProc).await.unwrap();
        assert_eq!(inproc.server_url(), None);
        assert!(matches!(
            inproc.client_transport("site-1", "j").await.unwrap(),
            JobTransport::InProc(_)
        ));
    }

    #[actix::test]
    async fn a_port_in_use_is_refused_with_the_address() {
        let (first, addr) = listen_server("127.0.0.1:0").await.unwrap();
        let err = listen_server(&addr.to_string()).await.unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("cannot listen on tcp://{addr}")),
            "{err}"
        );
        first.shutdown().await;
    }

    #[actix::test]
    async fn a_client_named_server_or_with_a_dot_is_refused_before_connecting() {
        let err = connect_client("127.0.0.1:1", "server", "j", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--name"), "{err}");
        let err = connect_client("127.0.0.1:1", "site.1", "j", Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--name"), "{err}");
    }
}
