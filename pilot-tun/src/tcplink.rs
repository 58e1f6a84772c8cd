//! The node's TCP relay link, for networks that block UDP: when the
//! registry gives no UDP answer, a TLS connection to the registry's TCP
//! port (the join URL's `?tcp=<port>`, same IP; never a port the URL does
//! not name) carries every datagram the node has for the registry — the
//! control session and relayed tunnel traffic, both already end-to-end
//! protected — framed on the stream ([`crate::divert`] switches them).
//! UDP is probed every [`PROBE_EVERY`] meanwhile, and taken back as soon
//! as the registry answers it.
//!
//! The TLS handshake is accepted only if it is signed by the registry key
//! the join URL pins ([`pilot_proto::tlskey`]); the certificate's bytes are
//! not trusted for anything, so there is no certificate authority.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pilot_proto::streamframe::Deframer;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::context::Context;
use crate::divert::Divert;
use crate::tun::Tun;

/// The registry unreachable over UDP this long (and a STUN probe
/// unanswered) means UDP is blocked. At start the probe runs at once.
pub const BLOCKED_AFTER: Duration = Duration::from_secs(3);
/// How often UDP is tried again while on TCP (one STUN request, up to
/// three tries).
pub const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Deadline of the TCP connect and of the TLS handshake, each.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Nothing read for this long: the connection is dead (the registry
/// answers a ping every 10 s).
pub const IDLE: Duration = Duration::from_secs(35);
/// Frames queued for the writer; more are dropped like UDP would.
const OUT_QUEUE: usize = 1024;

/// The TCP relay link failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum TcpLinkError {
    /// The TCP connect.
    #[error("cannot connect to the registry's TCP port {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed; a pin mismatch shows here.
    #[error("TLS with {addr} failed: {source} (is the key in the join URL this registry's?)")]
    Tls {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No answer within [`CONNECT_TIMEOUT`].
    #[error("no TCP or TLS answer from {0} within 5 s")]
    Timeout(SocketAddr),
    /// The connection ended.
    #[error("the registry closed the TCP connection")]
    Closed,
    /// Nothing came for [`IDLE`].
    #[error("nothing from the registry over TCP for {}s", IDLE.as_secs())]
    Idle,
    /// Reading or writing.
    #[error("TCP: {0}")]
    Io(std::io::Error),
    /// The stream carried something that is not a frame.
    #[error(transparent)]
    Frame(#[from] pilot_proto::streamframe::FrameError),
}

/// Accepts a TLS 1.3 server whose handshake signature verifies under the
/// pinned registry key (see the module comment).
#[derive(Debug)]
struct PinnedRegistry {
    key: [u8; 32],
}

impl ServerCertVerifier for PinnedRegistry {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The certificate proves nothing by itself; the handshake signature
        // checked below, under the pinned key, is what authenticates.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is configured.
        Err(rustls::Error::InvalidCertificate(
            CertificateError::BadSignature,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        _cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme == SignatureScheme::ED25519
            && pilot_proto::tlskey::verify_pinned(&self.key, message, dss.signature())
        {
            Ok(HandshakeSignatureValid::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature,
            ))
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The TLS client configuration that pins registry key `key`.
pub fn client_config(key: [u8; 32]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        // The ring provider supports TLS 1.3: this cannot fail.
        .expect("TLS 1.3 with the ring provider")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedRegistry { key }))
        .with_no_client_auth();
    Arc::new(config)
}

/// A TLS connection to the registry.
pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects to the registry's TCP port and completes TLS, pinning `key`.
pub async fn connect(addr: SocketAddr, key: [u8; 32]) -> Result<Stream, TcpLinkError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| TcpLinkError::Timeout(addr))?
        .map_err(|source| TcpLinkError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(client_config(key));
    // An IP address as the name: no SNI is sent.
    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| TcpLinkError::Timeout(addr))?
        .map_err(|source| TcpLinkError::Tls { addr, source })
}

/// Carries frames both ways until the connection fails: what arrives goes
/// to `divert` (as datagrams from the registry), what `out` yields goes
/// to the registry.
pub async fn run(
    stream: Stream,
    divert: &Divert,
    mut out: mpsc::Receiver<Vec<u8>>,
) -> TcpLinkError {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let reader = async {
        let mut d = Deframer::new();
        loop {
            let n = match tokio::time::timeout(IDLE, rd.read(d.spare())).await {
                Err(_) => return TcpLinkError::Idle,
                Ok(Ok(0)) => return TcpLinkError::Closed,
                Ok(Err(e)) => return TcpLinkError::Io(e),
                Ok(Ok(n)) => n,
            };
            d.filled(n);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => divert.deliver(f),
                    Ok(None) => break,
                    Err(e) => return e.into(),
                }
            }
        }
    };
    let writer = async {
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some(first) = out.recv().await {
            buf.clear();
            buf.extend_from_slice(&first);
            while buf.len() < 60_000 {
                match out.try_recv() {
                    Ok(f) => buf.extend_from_slice(&f),
                    Err(_) => break,
                }
            }
            if let Err(e) = wr.write_all(&buf).await {
                return TcpLinkError::Io(e);
            }
            if let Err(e) = wr.flush().await {
                return TcpLinkError::Io(e);
            }
        }
        TcpLinkError::Closed
    };
    tokio::select! {
        e = reader => e,
        e = writer => e,
    }
}

/// Runs for the node's life if the join URL names a TCP port: watches
/// whether the registry answers over UDP, moves to the TCP relay when it
/// does not, and back when it does again.
pub async fn keeper<T: Tun>(ctx: Arc<Context<T>>) {
    if ctx.link.join.tcp.is_none() {
        return;
    }
    let divert = &ctx.shared.udp.divert;
    // At start, and after the TCP link failed: probe at once.
    let mut check_now = true;
    let mut backoff = Duration::from_secs(2);
    loop {
        if !check_now {
            wait_unreachable(&ctx).await;
        }
        // The instance in use (with several, the node may have moved on).
        let registry = ctx.link.endpoint();
        let Some(tcp) = ctx.link.join.tcp_addr(registry) else {
            return;
        };
        if ctx.stun_udp(registry).await.is_some() {
            // UDP works: the registry keeper gets through on its own.
            check_now = false;
            tokio::time::sleep(PROBE_EVERY).await;
            continue;
        }
        let stream = match connect(tcp, ctx.link.join.key).await {
            Ok(s) => s,
            Err(e) => {
                warn!("UDP to the registry gets no answer, and TCP does not work either: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                check_now = true;
                continue;
            }
        };
        backoff = Duration::from_secs(2);
        let (tx, rx) = mpsc::channel(OUT_QUEUE);
        let why = format!("no UDP answer from the registry at {registry}: UDP looks blocked");
        divert.engage(registry, tcp, tx, why);
        info!(%tcp, "UDP to the registry gets no answer; relaying over TCP with TLS");
        // The registry session moves to the new transport.
        ctx.link.drop_session();
        ctx.link.wake();
        // Ok(true): UDP answers again; Ok(false): the node moved to
        // another instance of the registry.
        let ended = tokio::select! {
            e = run(stream, divert, rx) => Err(e),
            () = udp_answers(&ctx, registry) => Ok(true),
            () = moved_from(&ctx, registry) => Ok(false),
        };
        divert.release();
        match ended {
            Err(e) => {
                warn!("the TCP relay link ended ({e}); trying UDP, then TCP again");
                check_now = true;
            }
            Ok(true) => {
                info!("UDP to the registry answers again; leaving the TCP relay");
                check_now = false;
            }
            Ok(false) => {
                info!(%registry, "the node moved to another registry instance; leaving its TCP relay");
                check_now = true;
            }
        }
        ctx.link.drop_session();
        ctx.link.wake();
    }
}

/// Returns once the registry has been unreachable for [`BLOCKED_AFTER`].
async fn wait_unreachable<T: Tun>(ctx: &Context<T>) {
    let mut silent_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if ctx.link.reachable() {
            silent_since = None;
            continue;
        }
        if silent_since.get_or_insert_with(Instant::now).elapsed() >= BLOCKED_AFTER {
            return;
        }
    }
}

/// Returns once the registry link has moved away from `registry` (to
/// another instance of a join URL with several).
async fn moved_from<T: Tun>(ctx: &Context<T>, registry: SocketAddr) {
    while ctx.link.endpoint() == registry {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Returns once the registry answers STUN over UDP (probing every
/// [`PROBE_EVERY`]).
async fn udp_answers<T: Tun>(ctx: &Context<T>, registry: SocketAddr) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        if ctx.stun_udp(registry).await.is_some() {
            return;
        }
    }
}
