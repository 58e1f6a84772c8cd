//! The TCP relay listener (`--tcp-listen`): nodes whose networks block UDP
//! reach the registry over TCP with TLS, and everything they would have
//! sent over UDP (handshakes, sealed control messages, STUN, relayed
//! tunnel datagrams, all already end-to-end protected) travels framed on
//! that stream ([`pilot_proto::streamframe`]).
//!
//! The socket loop sees each connection as one more datagram source: its
//! datagrams come from a *marker address* in `100::/64` (RFC 6666's
//! discard-only prefix, so never the source of a real UDP datagram), which
//! embeds the connection's IPv4 address and port, and what the loop sends
//! to a marker address goes back down that connection. So a node attached
//! over TCP registers, holds its control session and is relayed to and
//! from UDP-attached nodes by the same code as everyone else.
//!
//! TLS authenticates the registry (the certificate's key is the registry
//! key in Edwards form, see [`pilot_proto::tlskey`]) and lets the stream
//! pass firewalls that inspect port 443. Abuse is bounded before any
//! cryptography: new connections per source IP are rate limited, the
//! connections in all and per source IP are capped, TLS handshakes in
//! progress are capped and each has a deadline, and a connection that
//! stays silent is closed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use pilot_proto::ratelimit::RateLimiter;
use pilot_proto::streamframe::{self, Deframer};
use pilot_proto::tlskey::TlsKey;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{ServerConfig, SignatureAlgorithm, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info};

/// Bounds on what TCP clients may cost.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once, in all.
    pub max_conns: usize,
    /// Connections open at once from one IP address (several nodes may
    /// share one NAT).
    pub max_per_ip: usize,
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// New connections per second from one IP address, and the burst.
    pub per_ip_rate: u32,
    /// See `per_ip_rate`.
    pub per_ip_burst: u32,
    /// Deadline of a TLS handshake.
    pub handshake_timeout: Duration,
    /// A connection that carries nothing for this long is closed (a node
    /// pings the registry every 10 s).
    pub idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: 4096,
            max_per_ip: 64,
            max_handshakes: 64,
            per_ip_rate: 2,
            per_ip_burst: 10,
            handshake_timeout: Duration::from_secs(5),
            idle: Duration::from_secs(90),
        }
    }
}

/// Datagrams queued towards one connection; more are dropped, as a full
/// UDP socket buffer would.
const OUT_QUEUE: usize = 512;
/// Datagrams from all connections queued for the socket loop.
pub const IN_QUEUE: usize = 2048;

/// The TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The certificate.
    #[error("cannot make the TLS certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The marker address of a TCP connection from `peer` (see the module
/// comment); `id` tells apart connections from IPv6 sources.
pub fn marker(peer: SocketAddr, id: u64) -> SocketAddr {
    let segments = match peer.ip() {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            [
                0x100,
                0,
                0,
                0,
                0,
                0,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
            ]
        }
        IpAddr::V6(_) => {
            let b = id.to_be_bytes();
            [
                0x100,
                0,
                0,
                0,
                1,
                u16::from_be_bytes([b[2], b[3]]),
                u16::from_be_bytes([b[4], b[5]]),
                u16::from_be_bytes([b[6], b[7]]),
            ]
        }
    };
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(segments),
        peer.port(),
        0,
        0,
    ))
}

/// True if `a` is a TCP connection's marker address.
pub fn is_marker(a: SocketAddr) -> bool {
    match a {
        SocketAddr::V6(v6) => v6.ip().segments()[..4] == [0x100, 0, 0, 0],
        SocketAddr::V4(_) => false,
    }
}

/// The live connections, by marker address: where the socket loop's
/// datagrams for them go.
#[derive(Default)]
pub struct Hub {
    conns: Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>,
    /// Datagrams dropped because a connection's queue was full or it was
    /// gone.
    pub dropped: AtomicU64,
}

impl Hub {
    /// Queues `datagram` for the connection behind marker `to`.
    pub fn send(&self, datagram: &[u8], to: SocketAddr) {
        let mut frame = Vec::with_capacity(streamframe::PREFIX + datagram.len());
        let sent = streamframe::encode(datagram, &mut frame).is_ok()
            && self
                .conns
                .lock()
                .get(&to)
                .is_some_and(|tx| tx.try_send(frame).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.conns.lock().len()
    }

    /// True if none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the socket loop holds of the TCP side.
pub struct TcpSide {
    /// Where datagrams for marker addresses go.
    pub hub: Arc<Hub>,
    /// Datagrams from the connections, with their marker address.
    pub incoming: mpsc::Receiver<(Vec<u8>, SocketAddr)>,
    /// The accept loop (aborted when the registry stops).
    pub task: JoinHandle<()>,
}

/// The registry's TLS server configuration: TLS 1.3 only, one
/// self-signed certificate whose key is the registry key in Edwards form.
pub fn tls_config(secret: &[u8; 32]) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let certified = certified(secret)?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneCert(certified)));
    Ok(Arc::new(config))
}

/// The self-signed certificate and its key.
fn certified(secret: &[u8; 32]) -> Result<Arc<CertifiedKey>, TlsSetupError> {
    let key = Arc::new(TlsKey::from_registry_secret(secret));
    let mut params = rcgen::CertificateParams::new(vec!["pilot-registry".to_string()])?;
    // Deterministic, positive, from the key (nobody checks it: the pin is
    // the key, not the certificate).
    let mut serial = key.public()[..16].to_vec();
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&CertKey(&key, key.public()))?;
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(cert.der().to_vec())],
        Arc::new(RegistryTlsKey(key)),
    )))
}

/// Starts accepting on `listener`.
pub fn spawn(
    listener: TcpListener,
    secret: &[u8; 32],
    limits: Limits,
) -> Result<TcpSide, TlsSetupError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(secret)?);
    let hub = Arc::new(Hub::default());
    let (tx, incoming) = mpsc::channel(IN_QUEUE);
    if let Ok(a) = listener.local_addr() {
        info!("accepting nodes over TCP with TLS on {a}");
    }
    let task = tokio::spawn(accept_loop(listener, acceptor, hub.clone(), tx, limits));
    Ok(TcpSide {
        hub,
        incoming,
        task,
    })
}

/// Open connections per source IP (shared by the accept loop and the
/// connection tasks, which give their place back when they end).
type Counts = Arc<Mutex<(usize, HashMap<IpAddr, usize>)>>;

/// A connection's place in [`Counts`], given back on drop.
struct Place {
    counts: Counts,
    ip: IpAddr,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut c = self.counts.lock();
        c.0 = c.0.saturating_sub(1);
        if let Some(n) = c.1.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.1.remove(&self.ip);
            }
        }
    }
}

/// Takes a place for a connection from `ip`, if the caps allow one.
fn take_place(counts: &Counts, ip: IpAddr, limits: &Limits) -> Option<Place> {
    let mut c = counts.lock();
    let here = c.1.get(&ip).copied().unwrap_or(0);
    if c.0 >= limits.max_conns || here >= limits.max_per_ip {
        return None;
    }
    c.0 += 1;
    c.1.insert(ip, here + 1);
    Some(Place {
        counts: counts.clone(),
        ip,
    })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    hub: Arc<Hub>,
    tx: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    limits: Limits,
) {
    let counts: Counts = Arc::default();
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let mut rate = RateLimiter::new(limits.per_ip_rate, limits.per_ip_burst);
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors, mostly: wait instead of spinning.
                debug!("TCP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !rate.allow(&peer.ip(), Instant::now()) {
            debug!(%peer, "TCP relay: too many new connections from this address");
            continue;
        }
        let Some(place) = take_place(&counts, peer.ip(), &limits) else {
            debug!(%peer, "TCP relay: connection cap reached");
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            debug!(%peer, "TCP relay: too many TLS handshakes in progress");
            continue;
        };
        next_id += 1;
        let at = marker(peer, next_id);
        let (acceptor, hub, tx, limits) =
            (acceptor.clone(), hub.clone(), tx.clone(), limits.clone());
        tokio::spawn(async move {
            let _place = place;
            let _ = stream.set_nodelay(true);
            let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%peer, "TCP relay: TLS handshake failed: {e}");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "TCP relay: TLS handshake timed out");
                    return;
                }
            };
            drop(permit);
            debug!(%peer, marker = %at, "TCP relay: node connected");
            serve_conn(tls, at, &hub, tx, limits.idle).await;
            debug!(%peer, "TCP relay: connection closed");
        });
    }
}

/// Carries one connection's frames both ways until it ends, stays idle
/// too long, or sends something that is not a frame.
async fn serve_conn(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    at: SocketAddr,
    hub: &Hub,
    tx: mpsc::Sender<(Vec<u8>, SocketAddr)>,
    idle: Duration,
) {
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(OUT_QUEUE);
    hub.conns.lock().insert(at, out_tx);
    let (mut rd, mut wr) = tokio::io::split(tls);
    let reader = async {
        let mut d = Deframer::new();
        loop {
            let n = match tokio::time::timeout(idle, rd.read(d.spare())).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(n)) => n,
            };
            d.filled(n);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        // Full: dropped, as a busy UDP socket would.
                        let _ = tx.try_send((f.to_vec(), at));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        debug!(marker = %at, "TCP relay: {e}; closing");
                        return;
                    }
                }
            }
        }
    };
    let writer = async {
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some(first) = out_rx.recv().await {
            buf.clear();
            buf.extend_from_slice(&first);
            while buf.len() < 60_000 {
                match out_rx.try_recv() {
                    Ok(f) => buf.extend_from_slice(&f),
                    Err(_) => break,
                }
            }
            if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
    };
    let gone = tx.clone();
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
        // The registry stopped.
        _ = gone.closed() => {}
    }
    hub.conns.lock().remove(&at);
}

/// The TLS key as rustls signs with it.
struct RegistryTlsKey(Arc<TlsKey>);

impl std::fmt::Debug for RegistryTlsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistryTlsKey")
    }
}

impl SigningKey for RegistryTlsKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered
            .contains(&SignatureScheme::ED25519)
            .then(|| Box::new(Ed25519Signer(self.0.clone())) as Box<dyn Signer>)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

/// One handshake's signer.
struct Ed25519Signer(Arc<TlsKey>);

impl std::fmt::Debug for Ed25519Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ed25519Signer")
    }
}

impl Signer for Ed25519Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        Ok(self.0.sign(message).to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// The key as rcgen signs the certificate with it.
struct CertKey<'a>(&'a TlsKey, [u8; 32]);

impl rcgen::PublicKeyData for CertKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.1
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ED25519
    }
}

impl rcgen::SigningKey for CertKey<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        Ok(self.0.sign(msg).to_vec())
    }
}

/// Every client gets the one certificate.
#[derive(Debug)]
struct OneCert(Arc<CertifiedKey>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_addresses_are_never_udp_sources_and_keep_the_peer() {
        let m = marker("198.51.100.7:40000".parse().unwrap(), 1);
        assert_eq!(m.to_string(), "[100::c633:6407]:40000");
        assert!(is_marker(m));
        let m6 = marker("[2001:db8::1]:5".parse().unwrap(), 7);
        assert!(is_marker(m6));
        assert_ne!(m6, marker("[2001:db8::1]:5".parse().unwrap(), 8));
        assert!(!is_marker("198.51.100.7:40000".parse().unwrap()));
        assert!(!is_marker("[2001:db8::1]:5".parse().unwrap()));
    }

    #[test]
    fn caps_per_ip_and_in_all() {
        let limits = Limits {
            max_conns: 3,
            max_per_ip: 2,
            ..Limits::default()
        };
        let counts: Counts = Arc::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let a1 = take_place(&counts, a, &limits).unwrap();
        let _a2 = take_place(&counts, a, &limits).unwrap();
        assert!(take_place(&counts, a, &limits).is_none(), "per IP");
        let _b1 = take_place(&counts, b, &limits).unwrap();
        assert!(take_place(&counts, b, &limits).is_none(), "in all");
        drop(a1);
        assert!(
            take_place(&counts, b, &limits).is_some(),
            "a place came back"
        );
    }

    #[test]
    fn the_certificate_carries_the_registry_key_in_edwards_form() {
        tls_config(&[5; 32]).unwrap();
        let key = TlsKey::from_registry_secret(&[5; 32]).public();
        let certified = certified(&[5; 32]).unwrap();
        let der = certified.cert[0].as_ref();
        assert!(der.windows(32).any(|w| w == key));
    }
}
