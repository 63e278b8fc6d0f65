//! A connection's byte stream, plain TCP or TLS over TCP, split into a reader and a writer.
//!
//! The transport's connection code (handshake, reader, writer) is the same for both; only the
//! bytes differ. Plain TCP keeps tokio's lock-free `into_split`; a TLS stream is one state
//! machine, so its halves share it through `tokio::io::split`.
//!
//! Python's `ssl` sockets end a connection without a TLS `close_notify` (`shutdown` + `close`),
//! which rustls reports as `UnexpectedEof`: the reader half maps it to an ordinary end of
//! stream. Authentication failures (a missing or refused certificate, an alert from the peer)
//! are recognised by [`auth_failure`] so that a connector reports them as such instead of as a
//! network error.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::AlertDescription;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

use fedrun_cell::Fqcn;

use crate::error::WireError;
use crate::tls::{check_identity, common_name, ConnectionSecurity, TlsConnector, TlsListener};
use crate::transport::TcpUrl;

/// The TLS role of a listener or connector, and what it checks after the handshake.
#[derive(Clone, Debug)]
pub(crate) enum TlsSide {
    /// Accepts TLS connections.
    Server(Arc<TlsListener>),
    /// Opens TLS connections to `host`.
    Client {
        connector: Arc<TlsConnector>,
        host: String,
    },
}

impl TlsSide {
    /// Whether the peer's registered name must match its certificate's CN (mTLS).
    fn binds_identity(&self) -> bool {
        let security = match self {
            TlsSide::Server(l) => l.security,
            TlsSide::Client { connector, .. } => connector.security,
        };
        security == ConnectionSecurity::Mtls
    }

    /// The identity `server` names resolve to.
    pub(crate) fn server_identity(&self) -> &str {
        match self {
            TlsSide::Server(l) => &l.server_identity,
            TlsSide::Client { connector, .. } => &connector.server_identity,
        }
    }
}

/// An established byte stream.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// Runs the TLS handshake on `stream` when `tls` is set (the caller bounds it in time).
    pub(crate) async fn establish(stream: TcpStream, tls: Option<&TlsSide>) -> io::Result<Conn> {
        stream.set_nodelay(true)?;
        Ok(match tls {
            None => Conn::Plain(stream),
            Some(TlsSide::Server(l)) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&l.config));
                Conn::Tls(Box::new(acceptor.accept(stream).await?.into()))
            }
            Some(TlsSide::Client { connector, host }) => {
                let c = tokio_rustls::TlsConnector::from(Arc::clone(&connector.config));
                let name = crate::tls::server_name(host);
                Conn::Tls(Box::new(c.connect(name, stream).await?.into()))
            }
        })
    }

    /// What the peer's certificate says about it (nothing on plain TCP).
    pub(crate) fn peer_identity(&self) -> PeerIdentity {
        let Conn::Tls(tls) = self else {
            return PeerIdentity(None);
        };
        let (_, session) = tls.get_ref();
        let cn = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|c| common_name(c));
        PeerIdentity(cn)
    }

    /// Splits the stream into its reading and writing halves.
    pub(crate) fn into_split(self) -> (ConnRead, ConnWrite) {
        match self {
            Conn::Plain(s) => {
                let (r, w) = s.into_split();
                (ConnRead::Plain(r), ConnWrite::Plain(w))
            }
            Conn::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ConnRead::Tls(r), ConnWrite::Tls(w))
            }
        }
    }
}

/// The CN of a peer's certificate, kept after the stream is split.
pub(crate) struct PeerIdentity(Option<String>);

impl PeerIdentity {
    /// The identity check NVFlare's mTLS does on a registered name, if `tls` binds identities.
    pub(crate) fn check(&self, tls: Option<&TlsSide>, peer: &Fqcn) -> Result<(), WireError> {
        match tls {
            Some(side) if side.binds_identity() => {
                check_identity(peer, self.0.as_deref(), side.server_identity())
            }
            _ => Ok(()),
        }
    }
}

/// Parses `tcp://host:port` or `stcp://host:port` (a TLS listener or connector uses TLS
/// whatever the scheme says, as NVFlare does with `secure_train`).
pub(crate) fn parse_any_url(url: &str) -> Result<TcpUrl, WireError> {
    match url.strip_prefix("stcp://") {
        Some(rest) => TcpUrl::parse(&format!("tcp://{rest}")).map_err(|e| match e {
            WireError::InvalidUrl { reason, .. } => WireError::InvalidUrl {
                url: url.to_owned(),
                reason,
            },
            other => other,
        }),
        None => TcpUrl::parse(url),
    }
}

/// The reading half of a [`Conn`].
pub(crate) enum ConnRead {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// The writing half of a [`Conn`].
pub(crate) enum ConnWrite {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl AsyncRead for ConnRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnRead::Plain(r) => Pin::new(r).poll_read(cx, buf),
            ConnRead::Tls(r) => match Pin::new(r).poll_read(cx, buf) {
                // a peer that closes without close_notify (every Python peer) has just closed
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(()))
                }
                other => other,
            },
        }
    }
}

impl AsyncWrite for ConnWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Plain(w) => Pin::new(w).poll_write(cx, buf),
            ConnWrite::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            ConnWrite::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ConnWrite::Plain(w) => w.is_write_vectored(),
            ConnWrite::Tls(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Plain(w) => Pin::new(w).poll_flush(cx),
            ConnWrite::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Plain(w) => Pin::new(w).poll_shutdown(cx),
            ConnWrite::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// A server that closes an mTLS connection this soon after READY is taken to have refused the
/// name this endpoint registered: NVFlare answers HELLO with READY before it checks the name
/// against the certificate, then closes the connection.
const REFUSED_AFTER_READY: Duration = Duration::from_secs(2);

/// Whether a connection of `tls` that lasted `lasted` after READY looks like NVFlare's refusal
/// of the registered name (a connector in mTLS only).
pub(crate) fn refused_after_ready(tls: Option<&TlsSide>, lasted: Duration) -> bool {
    matches!(tls, Some(side @ TlsSide::Client { .. }) if side.binds_identity())
        && lasted < REFUSED_AFTER_READY
}

/// Why `e` is an authentication failure (a certificate refused by either side, or a peer
/// that refused this endpoint's), if it is one; `None` for anything else. With TLS 1.3 a
/// client learns that the server refused its certificate only at its first read (the
/// `certificate_required` alert arrives while it waits for READY).
pub(crate) fn auth_failure(e: &WireError) -> Option<String> {
    let rustls_error = match e {
        WireError::IdentityMismatch { .. } => return Some(e.to_string()),
        WireError::Io(io) => io.get_ref()?.downcast_ref::<rustls::Error>()?,
        _ => return None,
    };
    match rustls_error {
        rustls::Error::InvalidCertificate(c) => Some(format!("certificate refused: {c}")),
        rustls::Error::NoCertificatesPresented => {
            Some("the peer presented no certificate".to_owned())
        }
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::CertificateRequired => {
                Some("the peer requires a client certificate (mTLS) and got none".to_owned())
            }
            AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError => Some(format!(
                "the peer refused this endpoint's certificate ({alert:?})"
            )),
            _ => None,
        },
        _ => None,
    }
}
