//! The node's fixed context and its clients, which any task may use without
//! touching the control state: identity and keys, configuration, the
//! registry and relay links, the STUN client and the NAT type it measured,
//! session indexes and handshake timestamps.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use pilot_proto::handshake::{self, MacKey};
use pilot_proto::identity::{Identity, NodeId};
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::{
    FromRegistry, NatType, PeerInfo, PeerRef, Registration, Signed, ToRegistry,
};
use pilot_proto::session::CipherSuite;
use pilot_proto::stun;
use pilot_proto::timers::Timing;
use pilot_proto::wire::INIT_LEN;
use tokio::sync::{oneshot, Notify};

use crate::link::{LinkError, RegistryLink};
use crate::shared::Shared;
use crate::state::StateDir;
use crate::tun::Tun;

/// How the node is configured.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The state directory.
    pub state: StateDir,
    /// The registry (None: use the one remembered in the state directory).
    pub registry: Option<JoinUrl>,
    /// Hostname to claim.
    pub hostname: Option<String>,
    /// UDP address to listen on (None: last port, or any).
    pub listen: Option<SocketAddr>,
    /// Data cipher for sessions we initiate.
    pub suite: CipherSuite,
    /// Use UDP GSO/GRO and TUN offloads where the kernel allows.
    pub offload: bool,
    /// How long start-up waits for the registry before using the cached
    /// address.
    pub register_timeout: Duration,
    /// `--mtu`: the TUN MTU never exceeds it (otherwise it follows the
    /// underlay routes, see [`crate::pathmtu`]).
    pub mtu: Option<u16>,
    /// `--rotate-identity-every`: rotate the identity when the current one
    /// is this old (see [`crate::rotation`]).
    pub rotate_every: Option<Duration>,
    /// Ask the gateway to map a public port to the tunnel port (NAT-PMP);
    /// off with `--no-port-mapping`.
    pub port_mapping: bool,
    /// Gossip with trusted peers ([`crate::gossip`]); off with
    /// `--no-gossip`.
    pub gossip: bool,
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Microseconds since the Unix epoch.
pub(crate) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // The system generator does not fail on Linux; a zero is still valid.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

/// The node's fixed context.
pub struct Context<T: Tun> {
    /// Our keys.
    pub identity: Identity,
    /// Our node id.
    pub id: NodeId,
    /// MAC key for handshakes addressed to us.
    pub own_mac: MacKey,
    /// Configuration.
    pub cfg: NodeConfig,
    /// The registry session.
    pub link: RegistryLink,
    /// The session with a relay-only instance the registry told us about.
    pub relay_link: RwLock<Option<Arc<RegistryLink>>>,
    /// What the packet loops share.
    pub shared: Arc<Shared<T>>,
    /// Our NAT type, as last measured (as peers must treat it: a gateway
    /// port mapping makes a per-destination NAT endpoint-independent).
    pub nat: Mutex<NatType>,
    /// The port mapping our gateway holds for our tunnel port (PCP,
    /// NAT-PMP or UPnP IGD), if it does ([`crate::portmap`]).
    pub mapped: Mutex<Option<crate::portmap::Mapping>>,
    stun_pending: Mutex<HashMap<[u8; 12], oneshot::Sender<SocketAddr>>>,
    last_timestamp: AtomicU64,
    /// Signals `down` (and, with `restart` set, a restart under a rotated
    /// identity).
    pub stop: Notify,
    /// The node stops to start again (its identity was rotated).
    pub restart: std::sync::atomic::AtomicBool,
    /// When the node started.
    pub started: SystemTime,
    /// The tunnel timers' durations.
    pub timing: Timing,
    /// The overlay's DNS server: the names it may tell, where it listens.
    pub dns: Arc<crate::dns::DnsShared>,
    /// Held while (re)connecting to the registry: the start, the port-map
    /// keeper and the session keeper each may register, and two signed
    /// registrations in flight at once make the registry refuse the older
    /// one as a replay.
    pub registering: tokio::sync::Mutex<()>,
}

impl<T: Tun> Context<T> {
    /// The context of a node with these keys, configuration and socket.
    pub fn new(identity: Identity, cfg: NodeConfig, join: JoinUrl, shared: Arc<Shared<T>>) -> Self {
        Context {
            id: identity.node_id(),
            own_mac: MacKey::for_static(&identity.static_public()),
            identity,
            cfg,
            link: RegistryLink::new(join),
            relay_link: RwLock::new(None),
            shared,
            nat: Mutex::new(NatType::Unknown),
            mapped: Mutex::new(None),
            stun_pending: Mutex::new(HashMap::new()),
            last_timestamp: AtomicU64::new(0),
            stop: Notify::new(),
            restart: std::sync::atomic::AtomicBool::new(false),
            started: SystemTime::now(),
            timing: timing_from_env(),
            dns: Arc::default(),
            registering: tokio::sync::Mutex::new(()),
        }
    }

    /// A handshake timestamp greater than every one this node sent before:
    /// nanoseconds of the wall clock, or one more than the last.
    pub fn next_timestamp(&self) -> u64 {
        let floor = unix_micros() * 1000;
        let mut last = self.last_timestamp.load(Ordering::Relaxed);
        loop {
            let ts = (last + 1).max(floor);
            match self.last_timestamp.compare_exchange_weak(
                last,
                ts,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return ts,
                Err(now) => last = now,
            }
        }
    }

    /// A session index no live session, registry or relay link uses.
    pub fn fresh_index(&self) -> u32 {
        loop {
            let i = random_u64() as u32;
            let relay_owns = self
                .relay_link
                .read()
                .as_ref()
                .is_some_and(|l| l.owns_index(i));
            if !self.shared.table.read().by_index.contains_key(&i)
                && !self.link.owns_index(i)
                && !relay_owns
            {
                return i;
            }
        }
    }

    /// An initiation towards the registry (or a relay) with key `key`.
    pub fn make_init(&self, key: &[u8; 32]) -> Option<(handshake::Initiator, [u8; INIT_LEN])> {
        handshake::initiate(
            self.identity.static_secret(),
            key,
            self.fresh_index(),
            self.next_timestamp(),
            CipherSuite::Aes256Gcm,
        )
        .ok()
    }

    /// A signed registration with sequence number `seq`.
    pub fn registration(
        &self,
        seq: u64,
        hostname: Option<String>,
        nat: NatType,
    ) -> Signed<Registration> {
        let port = self.shared.udp.local_addr().map(|a| a.port()).unwrap_or(0);
        let mut endpoints = local_endpoints(port, self.shared.udp.is_ipv6());
        let mapped = self.mapped.lock().as_ref().map(|m| m.external);
        if let Some(m) = mapped {
            // The mapped endpoint first: it is the one that works from
            // anywhere.
            endpoints.retain(|e| *e != m);
            endpoints.insert(0, m);
            endpoints.truncate(pilot_proto::messages::MAX_ENDPOINTS - 1);
        }
        Signed::sign(
            Registration {
                identity: self.identity.public(),
                hostname,
                seq,
                local_endpoints: endpoints,
                nat: self.mapped_nat(nat),
            },
            &self.identity,
        )
    }

    /// Looks a peer up at the registry and checks what it says.
    pub async fn lookup(&self, peer: &PeerRef) -> Result<PeerInfo, String> {
        let answer = self
            .link
            .call(&self.shared.udp, |req| ToRegistry::Lookup {
                req,
                peer: peer.clone(),
            })
            .await
            .map_err(|e| e.to_string())?;
        let FromRegistry::Peer { info, .. } = answer else {
            return Err("unexpected answer from the registry".into());
        };
        if !info.identity.binding_valid() {
            return Err(format!(
                "the registry returned keys for {peer} that do not belong together; refusing them"
            ));
        }
        if let PeerRef::Id(id) = peer {
            if info.identity.node_id() != *id {
                return Err(format!(
                    "the registry returned another node's keys for {peer}; refusing them"
                ));
            }
        }
        if let Some(net) = self.shared.network() {
            if !net.contains(&info.address) {
                return Err(format!(
                    "the registry returned address {} outside the overlay {net}",
                    info.address
                ));
            }
        }
        // Our own record (someone named this node) is the caller's to
        // refuse; another node's record with our address is a lie.
        if info.address == self.address() && info.identity.node_id() != self.id {
            return Err(format!(
                "the registry returned this node's own address {} for {peer}",
                info.address
            ));
        }
        Ok(info)
    }

    /// Learns our public endpoint and NAT type: STUN to the registry's port
    /// and to its second STUN port, from the data socket. The same public
    /// endpoint for both means endpoint-independent mapping; one of our own
    /// addresses means no NAT.
    pub async fn detect_nat(&self) -> NatType {
        let primary = self.link.endpoint();
        let alt = SocketAddr::new(primary.ip(), primary.port().wrapping_add(1));
        let (a, b) = tokio::join!(self.stun(primary), self.stun(alt));
        let port = self.shared.udp.local_addr().map(|a| a.port()).unwrap_or(0);
        let own = local_endpoints(port, self.shared.udp.is_ipv6());
        let nat = self.mapped_nat(nat_type(&own, a, b));
        if let Some(a) = a {
            self.link.set_observed(a);
        }
        *self.nat.lock() = nat;
        nat
    }

    /// The NAT type peers must assume: with a port mapping at the gateway,
    /// a per-destination NAT still has one endpoint that anybody reaches
    /// (the mapped one), as an endpoint-independent NAT has.
    pub fn mapped_nat(&self, measured: NatType) -> NatType {
        match (measured, self.mapped.lock().is_some()) {
            (NatType::PerDestination, true) => NatType::EndpointIndependent,
            (n, _) => n,
        }
    }

    /// True if `to` answers a STUN binding request (a registry does,
    /// whatever key a node expects of it).
    pub async fn answers_stun(&self, to: SocketAddr) -> bool {
        self.stun(to).await.is_some()
    }

    async fn stun(&self, to: SocketAddr) -> Option<SocketAddr> {
        self.stun_via(to, false).await
    }

    /// STUN to `to` over UDP even while the registry is diverted to the
    /// TCP relay: does UDP get through?
    pub async fn stun_udp(&self, to: SocketAddr) -> Option<SocketAddr> {
        self.stun_via(to, true).await
    }

    async fn stun_via(&self, to: SocketAddr, udp_only: bool) -> Option<SocketAddr> {
        for _ in 0..3 {
            let mut tid = [0u8; 12];
            tid[..8].copy_from_slice(&random_u64().to_le_bytes());
            tid[8..].copy_from_slice(&(random_u64() as u32).to_le_bytes());
            let (tx, rx) = oneshot::channel();
            self.stun_pending.lock().insert(tid, tx);
            let req = stun::binding_request(&tid);
            let _ = match udp_only {
                true => self.shared.udp.send_to_udp(&req, to).await,
                false => self.shared.udp.send_to(&req, to).await,
            };
            let r = tokio::time::timeout(Duration::from_millis(400), rx).await;
            self.stun_pending.lock().remove(&tid);
            if let Ok(Ok(a)) = r {
                return Some(a);
            }
        }
        None
    }

    /// A STUN answer arrived: hand it to the request waiting for it.
    pub fn on_stun_response(&self, buf: &[u8]) {
        if buf.len() < 20 {
            return;
        }
        let tid: [u8; 12] = buf[8..20].try_into().unwrap_or_default();
        if let Some(addr) = stun::parse_binding_response(buf, &tid) {
            if let Some(tx) = self.stun_pending.lock().remove(&tid) {
                let _ = tx.send(addr);
            }
        }
    }

    /// Handshake and registration with the registry or a relay, with a
    /// registration from `register`.
    pub async fn attach(
        &self,
        link: &RegistryLink,
        reg: Signed<Registration>,
    ) -> Result<FromRegistry, LinkError> {
        // The join URL's token, if it has one, goes with every
        // registration: a registry uses it only for a node it does not know.
        let token = link.join.token;
        let answer = link
            .call(&self.shared.udp, |req| match token {
                Some(t) => ToRegistry::RegisterWithToken {
                    req,
                    reg: reg.clone(),
                    token: t.0,
                },
                None => ToRegistry::Register {
                    req,
                    reg: reg.clone(),
                },
            })
            .await?;
        match answer {
            FromRegistry::Registered { .. } => Ok(answer),
            _ => Err(LinkError::Protocol),
        }
    }

    /// Our overlay address, if known.
    pub fn address(&self) -> Ipv4Addr {
        self.shared.address()
    }

    /// Moves the registry link to the next instance of the join URL and
    /// makes the packet loops follow: relayed datagrams go there, and only
    /// datagrams from there count as the relay's. Returns the new endpoint.
    pub fn fail_over(&self) -> SocketAddr {
        let next = self.link.fail_over();
        self.shared.set_registry(next);
        next
    }
}

/// The environment variable that divides every tunnel timer (rekey, key
/// expiry, retries, keepalives, relay fallback) so that tests can model
/// minutes in seconds. For tests only: a node with scaled timers still
/// works with normal ones, but rekeys and probes far more often.
pub const TIME_SCALE_ENV: &str = "PILOT_TEST_TIME_SCALE";

fn timing_from_env() -> Timing {
    match std::env::var(TIME_SCALE_ENV).ok().map(|v| v.parse::<u32>()) {
        None => Timing::DEFAULT,
        Some(Ok(f)) if (1..=1000).contains(&f) => {
            if f > 1 {
                tracing::warn!(
                    "{TIME_SCALE_ENV}={f}: every tunnel timer is {f}x shorter (for tests only)"
                );
            }
            Timing::scaled(f)
        }
        Some(_) => {
            tracing::warn!("{TIME_SCALE_ENV} must be a whole number from 1 to 1000; ignored");
            Timing::DEFAULT
        }
    }
}

/// The NAT type from the endpoints two STUN servers on different ports saw
/// (`a` the registry's port, `b` its second STUN port) and our own
/// endpoints: one of ours means no NAT, the same public endpoint for both
/// means endpoint-independent mapping. (`pilot-tun netcheck` uses it too.)
pub(crate) fn nat_type(
    own: &[SocketAddr],
    a: Option<SocketAddr>,
    b: Option<SocketAddr>,
) -> NatType {
    match (a, b) {
        (Some(a), _) if own.contains(&a) => NatType::None,
        (Some(a), Some(b)) if a == b => NatType::EndpointIndependent,
        (Some(_), Some(_)) => NatType::PerDestination,
        _ => NatType::Unknown,
    }
}

/// UDP endpoints on this host's own interfaces, as candidates for peers:
/// IPv4 addresses, and with `v6` (an IPv6 tunnel socket) global IPv6 ones
/// too. Loopback, link-local and IPv6 unique-local addresses are left out
/// (the overlay's own IPv6 /48 is unique-local).
pub(crate) fn local_endpoints(port: u16, v6: bool) -> Vec<SocketAddr> {
    let mut out = vec![];
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(s) = a.address.as_ref() else {
                continue;
            };
            let ip: std::net::IpAddr = match (s.as_sockaddr_in(), s.as_sockaddr_in6()) {
                (Some(sin), _) => {
                    let ip = sin.ip();
                    if ip.is_loopback() || ip.is_unspecified() || ip.is_link_local() {
                        continue;
                    }
                    ip.into()
                }
                (None, Some(sin6)) if v6 => {
                    let ip = sin6.ip();
                    let first = ip.segments()[0];
                    let link_local = first & 0xffc0 == 0xfe80;
                    let unique_local = first & 0xfe00 == 0xfc00;
                    if ip.is_loopback()
                        || ip.is_unspecified()
                        || ip.is_multicast()
                        || link_local
                        || unique_local
                        || ip.to_ipv4_mapped().is_some()
                    {
                        continue;
                    }
                    ip.into()
                }
                _ => continue,
            };
            let e = SocketAddr::from((ip, port));
            if !out.contains(&e) && out.len() < pilot_proto::messages::MAX_ENDPOINTS - 1 {
                out.push(e);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_endpoints_leave_out_what_peers_cannot_reach() {
        for v6 in [false, true] {
            for e in local_endpoints(4000, v6) {
                assert_eq!(e.port(), 4000);
                match e.ip() {
                    std::net::IpAddr::V4(a) => {
                        assert!(!a.is_loopback() && !a.is_link_local(), "{e}")
                    }
                    std::net::IpAddr::V6(a) => {
                        assert!(v6, "IPv6 endpoint {e} for an IPv4 socket");
                        let first = a.segments()[0];
                        let link_local = first & 0xffc0 == 0xfe80;
                        let unique_local = first & 0xfe00 == 0xfc00;
                        assert!(!a.is_loopback() && !link_local && !unique_local, "{e}");
                    }
                }
            }
        }
    }
}
