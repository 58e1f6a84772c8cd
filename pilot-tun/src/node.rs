//! The node: start-up (state, socket, registry, TUN), the tasks that keep
//! the registry and relay sessions alive, the control socket server, and
//! shutdown. The control state lives in [`crate::controller`]; the packet
//! path in [`crate::dataplane`].
//!
//! Tasks of a running node and how they talk:
//!
//! ```text
//!   tun_loop ──┐ Slow items (mpsc)           ┌── registry_keeper ─┐
//!   udp_loop ──┴──────────► control task ◄───┼── relay_keeper ────┤ jobs + reply
//!                           (Controller:     ├── lookups ─────────┤ (mpsc + oneshot)
//!                            trust, node     └── control socket ──┘
//!                            state, peers)
//!        ▲                       │ installs sessions, paths
//!        └──── Shared: peer table, counters, socket, TUN (RwLock) ◄┘
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use parking_lot::Mutex;
use pilot_proto::ipv6::Ula;
use pilot_proto::join::JoinUrl;
use pilot_proto::messages::{ErrorCode, FromRegistry, ToRegistry};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::api::{Request, Response};
use crate::audit::NodeAudit;
pub use crate::context::NodeConfig;
use crate::context::{unix_now, Context};
use crate::controller::{self, Controller, Handle};
use crate::link::{LinkError, RegistryLink};
use crate::shared::Shared;
use crate::state::StateError;
use crate::tun::Tun;
use crate::udp::Udp;

/// Start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A state file.
    #[error(transparent)]
    State(#[from] StateError),
    /// No registry given and none remembered.
    #[error("no registry given: pass --registry pilot://<key>@<ip:port> (printed by pilot-registry) on the first `up`")]
    NoRegistry,
    /// The remembered registry URL does not parse.
    #[error(
        "the registry URL remembered in node.json does not parse ({0}); pass --registry again"
    )]
    BadRegistry(String),
    /// UDP socket.
    #[error("cannot bind UDP {addr}: {why}; choose another port with --listen")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
        /// What it means: for a busy port, who holds it.
        why: String,
    },
    /// The registry could not be reached, or refused, and there is no
    /// cached address.
    #[error("{}", registry_failure(.0))]
    Registry(LinkError),
    /// Something answers STUN at the registry's address, but no handshake
    /// for the key in the join URL: the URL is for another registry, or
    /// the registry's key changed.
    #[error("the registry at {0} answered but not with the key in the join URL: copy the join URL again from the registry (pilot-registry prints it; also in its <state-dir>/join-url) and pass it with --registry")]
    WrongRegistryKey(SocketAddr),
    /// The TUN device.
    #[error("{0}")]
    Tun(String),
    /// Another TUN device routes exactly our overlay network.
    #[error("{dev} already routes {network} in this namespace (another pilot-tun daemon on the same network, or on a network with the same range): two daemons in one namespace need networks with different ranges; stop the other (`pilot-tun --state-dir <its dir> down`), or start this network's registry with another --network")]
    OverlayTaken {
        /// Our overlay network.
        network: Ipv4Net,
        /// The interface that routes it.
        dev: String,
    },
}

/// A running node.
pub struct Node<T: Tun> {
    ctx: Arc<Context<T>>,
    handle: Handle<T>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl<T: Tun> Node<T> {
    /// Starts a node: state, UDP, registry, then the TUN (from `make_tun`,
    /// given our address and the overlay network), then the packet loops.
    pub async fn start(
        cfg: NodeConfig,
        make_tun: impl FnOnce(Ipv4Addr, Ipv4Net) -> Result<T, String>,
    ) -> Result<Self, StartError> {
        cfg.state.create()?;
        if let Some(id) = cfg.state.finish_rotation()? {
            warn!(%id, "finished an identity rotation a stop had cut short");
        }
        let (identity, new) = cfg.state.load_or_create_identity()?;
        let mut node_state = cfg.state.load_node()?;
        if node_state.identity_since.is_none() {
            node_state.identity_since = Some(unix_now());
            cfg.state.save_node(&node_state)?;
        }
        let trust = cfg.state.load_trust()?;
        let mut fleet = cfg.state.load_fleet()?;
        let join: JoinUrl = match (&cfg.registry, &node_state.registry) {
            (Some(j), _) => *j,
            (None, Some(s)) => s.parse().map_err(|_| StartError::BadRegistry(s.clone()))?,
            (None, None) => return Err(StartError::NoRegistry),
        };
        if new {
            info!(id = %identity.node_id(), "created a new identity");
        }
        let mut audit = NodeAudit::open(&cfg.state, &identity, unix_now())?;
        audit.record(
            &identity,
            unix_now(),
            "node-start",
            serde_json::json!({
                "node_id": identity.node_id().to_string(),
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
            }),
        );
        if node_state.registry.as_deref() != Some(&join.to_string()) {
            // The same key with other endpoints (an instance added, moved
            // or gone) is the same registry, and the same network.
            let same = node_state
                .registry
                .as_deref()
                .and_then(|s| s.parse::<JoinUrl>().ok())
                .is_some_and(|old| old.same_registry(&join));
            if !same && node_state.registry.is_some() && node_state.address.is_some() {
                warn!("registry changed; the cached address belongs to the old network");
                node_state.address = None;
                node_state.prefix_len = None;
            }
            node_state.registry = Some(join.to_string());
            cfg.state.save_node(&node_state)?;
        }

        // A registry reached over IPv6 needs an IPv6 socket: one on [::]
        // that takes IPv4 too, so peers of either family reach us.
        let dual = join.endpoints().iter().any(|e| e.is_ipv6());
        let socket = bind_udp(cfg.listen, node_state.port, dual)?;
        let udp = Udp::new(socket, cfg.offload).map_err(|e| {
            bind_error(
                cfg.listen
                    .unwrap_or_else(|| "0.0.0.0:0".parse().expect("literal")),
                e,
            )
        })?;
        let port = udp.local_addr().map(|a| a.port()).ok();
        if port.is_some() && node_state.port != port {
            node_state.port = port;
            cfg.state.save_node(&node_state)?;
        }

        let (slow_tx, slow_rx) = crate::shared::slow_queue(
            crate::shared::SLOW_QUEUE_ITEMS,
            crate::shared::SLOW_QUEUE_BYTES,
        );
        let shared = Arc::new(Shared::new(udp, slow_tx, join.first(), cfg.mtu));
        let ctx = Arc::new(Context::new(identity, cfg, join, shared.clone()));
        // The link picked its endpoint (at random among several).
        shared.set_registry(ctx.link.endpoint());
        if ctx.link.fails_over() {
            info!(endpoint = %ctx.link.endpoint(), endpoints = ctx.link.join.endpoints().len(), "registry has several instances; starting with this one");
        }
        for problem in fleet.sanitize(&ctx.id, &node_state.ancestry(), unix_now()) {
            warn!("fleet.json: dropped {problem}");
        }
        let (controller, handle, jobs) =
            Controller::new(ctx.clone(), trust, node_state, audit, fleet);
        let node = Node {
            ctx: ctx.clone(),
            handle: handle.clone(),
            tasks: Mutex::new(vec![
                tokio::spawn(controller.run(slow_rx, jobs)),
                tokio::spawn(crate::dataplane::udp_loop(shared.clone())),
            ]),
        };

        // The gateway's port mapping is asked for alongside the first
        // registration; if it comes later, the keeper registers again.
        if ctx.cfg.port_mapping {
            let t = tokio::spawn(portmap_keeper(ctx.clone(), handle.clone()));
            node.tasks.lock().push(t);
        }
        // With a TCP port in the join URL: watch whether UDP gets out,
        // from before the first registration on.
        if ctx.link.join.tcp.is_some() {
            let t = tokio::spawn(crate::tcplink::keeper(ctx.clone()));
            node.tasks.lock().push(t);
        }
        // Register, or fall back to the cached address. With several
        // instances, each one that does not answer costs FAILOVER_SILENCE
        // more.
        let others = ctx.link.join.endpoints().len() as u32 - 1;
        let wait = ctx.cfg.register_timeout + crate::link::FAILOVER_SILENCE * others;
        let registered = tokio::time::timeout(wait, connect_any(&ctx, &handle)).await;
        let cached = handle.with(|c| c.cached_address()).await.ok().flatten();
        match (registered, cached) {
            (Ok(Ok(())), _) => {}
            (r, Some((a, n))) => {
                let why = match r {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".into(),
                };
                warn!("registration failed ({why}); coming up on cached address {a}");
                let _ = shared.net.set((a, n));
            }
            (Ok(Err(e)), None) => {
                let e = diagnose(&ctx, e).await;
                node.stop_tasks().await;
                return Err(e);
            }
            (Err(_), None) => {
                let e = diagnose(&ctx, LinkError::Unreachable(ctx.link.endpoint())).await;
                node.stop_tasks().await;
                return Err(e);
            }
        }
        let Some(&(address, network)) = shared.net.get() else {
            node.stop_tasks().await;
            return Err(StartError::Registry(LinkError::Protocol));
        };
        let _ = shared.ula.set(Ula::derive(&ctx.link.join.key, network));
        // Before the TUN exists, so our own route is not among them.
        let routes = crate::routes::host_routes();
        if let Some(r) = crate::routes::claimed_by_tun(&network, &routes, crate::routes::is_tun) {
            node.stop_tasks().await;
            return Err(StartError::OverlayTaken {
                network,
                dev: r.dev,
            });
        }
        for r in crate::routes::overlapping(&network, &routes) {
            warn!(
                "the overlay {network} overlaps the host's route to {} via {}; addresses of that route inside the overlay will go into the tunnel instead",
                r.net, r.dev
            );
        }
        let tun = match make_tun(address, network) {
            Ok(t) => t,
            Err(e) => {
                node.stop_tasks().await;
                return Err(StartError::Tun(e));
            }
        };
        let _ = shared.tun.set(tun);
        let cached = handle.with(|c| c.load_peers()).await.unwrap_or_default();
        // The TUN MTU that fits the routes to the registry and the peers.
        crate::pathmtu::update_tun_mtu(&ctx, &cached);
        {
            let mut tasks = node.tasks.lock();
            tasks.push(tokio::spawn(crate::dataplane::tun_loop(shared.clone())));
            tasks.push(tokio::spawn(registry_keeper(ctx.clone(), handle.clone())));
            tasks.push(tokio::spawn(relay_keeper(ctx.clone(), handle.clone())));
            tasks.push(tokio::spawn(crate::pathmtu::keeper(ctx.clone())));
        }
        if let Some(every) = ctx.cfg.rotate_every {
            let t = tokio::spawn(rotation_keeper(handle.clone(), every));
            node.tasks.lock().push(t);
        }
        // Reconnect to trusted peers now: from their cached endpoints at
        // once (works while the registry is down), and from what the
        // registry says; and send what waits in the outbox.
        handle.submit(|c| c.reconnect_all()).await;
        let (c, h) = (ctx.clone(), handle.clone());
        node.tasks.lock().push(tokio::spawn(async move {
            controller::flush_outbox(&c, &h).await
        }));
        Ok(node)
    }

    /// Handles one control request.
    pub async fn request(&self, req: Request) -> Response {
        controller::request(&self.ctx, &self.handle, req).await
    }

    async fn stop_tasks(&self) {
        // The gateway's port mapping goes with the node (bounded: a gateway
        // that stopped answering must not hold up the stop).
        let mapped = self.ctx.mapped.lock().clone();
        if let (Some(m), Ok(local)) = (mapped, self.ctx.shared.udp.local_addr()) {
            let release = crate::portmap::release(&m, local.port());
            let _ = tokio::time::timeout(Duration::from_secs(1), release).await;
        }
        // The audit log's last entries and signed head, while the control
        // task still runs (bounded: a wedged task must not hold up the stop).
        let close = self.handle.with(|c| c.close_audit());
        if tokio::time::timeout(Duration::from_secs(2), close)
            .await
            .is_err()
        {
            warn!("the audit log could not be closed in time; its last entries stay unsigned");
        }
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *self.tasks.lock());
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Stops every task of the node and waits until they are gone (the UDP
    /// port and the TUN device are released when the last handle drops).
    pub async fn shutdown(self) {
        let hooked = self.ctx.dns.hooked.lock().take();
        if let Some(dev) = hooked {
            let _ = tokio::task::spawn_blocking(move || crate::resolved::unhook(&dev)).await;
        }
        self.stop_tasks().await;
    }

    /// Registers with the registry again now, as the keepers do when the
    /// gateway's port mapping changes or the session grows old. Calls that
    /// overlap (here or in the keepers) run one after the other.
    pub async fn register_again(&self) -> Result<(), LinkError> {
        connect_registry(&self.ctx, &self.handle).await
    }

    /// Our overlay address.
    pub fn address(&self) -> Ipv4Addr {
        self.ctx.address()
    }

    /// Serves the control socket at the state directory's socket path.
    pub fn serve_control(&self) -> std::io::Result<()> {
        let path = self.ctx.cfg.state.socket();
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)?;
        let _ =
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        let t = tokio::spawn(serve_control(
            self.ctx.clone(),
            self.handle.clone(),
            listener,
        ));
        self.tasks.lock().push(t);
        Ok(())
    }

    /// Serves Prometheus metrics on `listener` (`--metrics`), per peer
    /// too if `per_peer` (`--metrics-per-peer`).
    pub fn serve_metrics(&self, listener: tokio::net::TcpListener, per_peer: bool) {
        let t = tokio::spawn(crate::metrics::serve(
            listener,
            self.ctx.clone(),
            self.handle.clone(),
            per_peer,
        ));
        self.tasks.lock().push(t);
    }

    /// Serves DNS for `domain` at our overlay address, port 53 (the TUN
    /// `dev` must be up with it), and points the host's resolver at it
    /// where systemd-resolved runs (see [`crate::dns`],
    /// [`crate::resolved`]). Returns where it listens; an error says why it
    /// could not bind, and the node runs on without DNS.
    pub async fn serve_dns(
        &self,
        domain: crate::dns::Domain,
        dev: &str,
    ) -> Result<SocketAddr, String> {
        let own = self.address();
        let socket = crate::dns::bind(own, crate::dns::PORT).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    " (port 53 needs root or CAP_NET_BIND_SERVICE)".to_string()
                }
                std::io::ErrorKind::AddrInUse => format!(
                    " ({})",
                    pilot_service::ports::udp_in_use(SocketAddr::from((own, crate::dns::PORT)))
                ),
                _ => String::new(),
            };
            format!("cannot serve DNS on {own}:{}: {e}{hint}", crate::dns::PORT)
        })?;
        let at = socket.local_addr().map_err(|e| e.to_string())?;
        let shared = self.ctx.dns.clone();
        let t = tokio::spawn(crate::dns::serve(socket, own, domain.clone(), shared));
        self.tasks.lock().push(t);
        let (d, name) = (dev.to_string(), domain.as_str());
        let hook = tokio::task::spawn_blocking(move || crate::resolved::hook(&d, own, &name))
            .await
            .unwrap_or_else(|e| crate::resolved::Hook::Manual(e.to_string()));
        let (host_resolver, hint) = match hook {
            crate::resolved::Hook::Resolved => {
                info!(dev, "systemd-resolved sends *.{} to {own}", domain.as_str());
                *self.ctx.dns.hooked.lock() = Some(dev.to_string());
                ("systemd-resolved", None)
            }
            crate::resolved::Hook::Manual(why) => {
                info!("DNS for *.{} at {at}; {why}", domain.as_str());
                ("none", Some(why))
            }
        };
        *self.ctx.dns.serving.lock() = Some(crate::api::DnsStatus {
            address: at,
            interface: dev.to_string(),
            domain: domain.as_str(),
            host_resolver: host_resolver.into(),
            hint,
            names: 0,
            answered: 0,
            dropped_not_local: 0,
        });
        Ok(at)
    }

    /// Waits for a `down` request (or a restart, see
    /// [`Node::restart_requested`]).
    pub async fn stopped(&self) {
        self.ctx.stop.notified().await;
    }

    /// The node stopped to start again under a rotated identity.
    pub fn restart_requested(&self) -> bool {
        self.ctx.restart.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// The tunnel socket: `--listen` as given; otherwise any address, on the
/// port used last time if it is free. With `dual` (the registry has an
/// IPv6 endpoint) it is an IPv6 socket that takes IPv4 as well (IPv4
/// addresses show as `::ffff:a.b.c.d`, which [`crate::udp::Udp`] maps back
/// and forth); on a host without IPv6 it falls back to IPv4.
fn bind_udp(
    listen: Option<SocketAddr>,
    last_port: Option<u16>,
    dual: bool,
) -> Result<std::net::UdpSocket, StartError> {
    let bind = |a: SocketAddr| {
        let made = if a.is_ipv6() && a.ip().is_unspecified() {
            bind_dual(a)
        } else {
            std::net::UdpSocket::bind(a)
        };
        made.map_err(|e| bind_error(a, e))
    };
    let any = |port: u16| -> SocketAddr {
        match dual {
            true => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
            false => (std::net::Ipv4Addr::UNSPECIFIED, port).into(),
        }
    };
    let v4_any = |port: u16| SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port));
    match (listen, last_port) {
        (Some(a), _) => bind(a),
        (None, Some(p)) => bind(any(p)).or_else(|_| bind(any(0))).or_else(|e| {
            if dual {
                bind(v4_any(p)).or_else(|_| bind(v4_any(0)))
            } else {
                Err(e)
            }
        }),
        (None, None) => bind(any(0)).or_else(|e| if dual { bind(v4_any(0)) } else { Err(e) }),
    }
}

/// An IPv6 UDP socket bound to `a` that also takes IPv4 (`IPV6_V6ONLY`
/// off, whatever the host's `net.ipv6.bindv6only` says).
fn bind_dual(a: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&a.into())?;
    Ok(s.into())
}

/// A bind failure; a busy port names the process holding it.
fn bind_error(addr: SocketAddr, source: std::io::Error) -> StartError {
    let why = match source.kind() {
        std::io::ErrorKind::AddrInUse => pilot_service::ports::udp_in_use(addr),
        _ => source.to_string(),
    };
    StartError::Bind { addr, source, why }
}

/// A failed first registration in words: a refusal is the registry's own
/// reason (a join token, a taken name); only silence gets the hint about
/// the join URL and UDP.
fn registry_failure(e: &LinkError) -> String {
    match e {
        LinkError::Refused { .. } | LinkError::Assignment(_) => e.to_string(),
        _ => format!("{e}; this node has no cached address yet, so it needs the registry once (check the join URL and that UDP to it is open)"),
    }
}

/// Why registration failed, as precisely as can be told: no handshake
/// answer but a STUN answer from the same address means the registry is
/// there and refuses our handshake, and its MAC check (keyed by the
/// registry's public key) is the one thing that silently drops a
/// handshake from a node it has never seen: the key in the join URL is
/// not its key.
async fn diagnose<T: Tun>(ctx: &Context<T>, e: LinkError) -> StartError {
    match e {
        LinkError::Unreachable(addr) if ctx.link.session().is_none() => {
            if ctx.answers_stun(addr).await {
                StartError::WrongRegistryKey(addr)
            } else {
                StartError::Registry(e)
            }
        }
        e => StartError::Registry(e),
    }
}

/// [`connect_registry`] at the current endpoint, and with several, at each
/// of the others in turn while they do not answer.
async fn connect_any<T: Tun>(ctx: &Context<T>, handle: &Handle<T>) -> Result<(), LinkError> {
    let mut left = ctx.link.join.endpoints().len();
    loop {
        match connect_registry(ctx, handle).await {
            Err(LinkError::Unreachable(at)) if left > 1 => {
                let next = ctx.fail_over();
                warn!(%at, %next, "registry instance does not answer; trying the next one");
                left -= 1;
            }
            r => return r,
        }
    }
}

/// Handshake with the registry, then register (after handing in the
/// last identity rotation if the registry has not taken it yet).
async fn connect_registry<T: Tun>(ctx: &Context<T>, handle: &Handle<T>) -> Result<(), LinkError> {
    connect_registry_as(ctx, handle, true).await
}

/// [`connect_registry`]; `measure_nat` false (right after a failover to
/// another instance) keeps the NAT type measured last instead of waiting
/// for STUN answers again (the instance's second STUN port may not
/// answer, which costs more than a second); the next renewal of the
/// session measures again.
async fn connect_registry_as<T: Tun>(
    ctx: &Context<T>,
    handle: &Handle<T>,
    measure_nat: bool,
) -> Result<(), LinkError> {
    let _one_at_a_time = ctx.registering.lock().await;
    let udp = &ctx.shared.udp;
    ctx.link
        .handshake(udp, || ctx.make_init(&ctx.link.join.key))
        .await?;
    announce_succession(ctx, handle).await?;
    let nat = match measure_nat {
        true => ctx.detect_nat().await,
        // Measured at the first registration (at start, which always
        // measures), whatever it found.
        false => *ctx.nat.lock(),
    };
    let mut reg = handle
        .with(move |c| c.registration(nat))
        .await
        .map_err(|_| LinkError::Protocol)?
        .map_err(|_| LinkError::Protocol)?;
    let mut answer = ctx.attach(&ctx.link, reg.clone()).await?;
    let mut retried = false;
    // A name another node holds: the next try (`name-2`, `name-3`, …),
    // each a registration of its own, a bounded number of times.
    while let (
        FromRegistry::Registered {
            hostname_refused: Some(why),
            ..
        },
        Some(base),
        Some(asked),
    ) = (&answer, &ctx.cfg.hostname, &reg.body.hostname)
    {
        let next = match crate::hostname::next_try(base, asked) {
            Some(n) if crate::hostname::refused_as_taken(why) => n,
            _ => break,
        };
        info!("the name {asked:?} is taken on this network; asking for {next:?}");
        reg = handle
            .with(move |c| c.registration_named(nat, Some(next)))
            .await
            .map_err(|_| LinkError::Protocol)?
            .map_err(|_| LinkError::Protocol)?;
        answer = ctx.attach(&ctx.link, reg.clone()).await?;
        retried = true;
    }
    let FromRegistry::Registered {
        address,
        prefix_len,
        hostname: granted,
        hostname_refused,
        observed,
        relays,
        ..
    } = answer
    else {
        return Err(LinkError::Protocol);
    };
    if let Some(&first) = relays.first() {
        let mut rl = ctx.relay_link.write();
        if rl.as_ref().is_none_or(|l| l.endpoint() != first) {
            *rl = Some(Arc::new(RegistryLink::new(JoinUrl::single(
                ctx.link.join.key,
                first,
            ))));
            ctx.shared.set_relay_only(Some(first), false);
        }
    }
    if let Some(why) = hostname_refused {
        warn!("hostname not granted: {}", crate::sanitize::printable(&why));
    }
    if let (Some(base), Some(got), true) = (&ctx.cfg.hostname, &granted, retried) {
        if base != got {
            info!("this node's name is {got:?} ({base:?} is taken on this network)");
        }
    }
    ctx.link.set_observed(observed);
    // Checked against the bounds and the pinned address before anything
    // uses it.
    handle
        .with(move |c| c.on_registered(address, prefix_len, granted))
        .await
        .map_err(|_| LinkError::Protocol)?
        .map_err(LinkError::Assignment)?;
    // Certificates and revocations may have changed while we were away.
    let _ = handle
        .with(|c| {
            if !c.fleet.rules.is_empty() || c.fleet.cert.is_some() {
                c.fleet_sync_soon();
            }
        })
        .await;
    info!(%address, %observed, "registered");
    Ok(())
}

/// Hands the registry our last identity rotation, if it is not announced
/// yet, then queues the peers' copies. A refusal for good (the old id is
/// unknown here, or already succeeded) is logged and not tried again: the
/// registration that follows says what the registry makes of us.
async fn announce_succession<T: Tun>(
    ctx: &Context<T>,
    handle: &Handle<T>,
) -> Result<(), LinkError> {
    let Ok(Some(succession)) = handle.with(|c| c.unannounced_succession()).await else {
        return Ok(());
    };
    match ctx
        .link
        .call(&ctx.shared.udp, |req| ToRegistry::Succeed {
            req,
            succession: succession.clone(),
        })
        .await
    {
        Ok(FromRegistry::Ok { .. }) => {
            info!("the registry moved our address and name to the new identity")
        }
        Err(LinkError::Refused { code, message })
            if code != ErrorCode::Busy && code != ErrorCode::Internal =>
        {
            warn!(
                "the registry refused our identity rotation ({}): registering as a new node",
                crate::sanitize::printable(&message)
            );
        }
        Ok(_) => return Err(LinkError::Protocol),
        Err(e) => return Err(e),
    }
    match handle.with(|c| c.announce_succession()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            warn!("cannot save node state: {e}");
            Err(LinkError::Protocol)
        }
        Err(_) => Err(LinkError::Protocol),
    }
}

/// Keeps a port mapping at the gateway (PCP, NAT-PMP or UPnP IGD, the
/// first that works) for the tunnel port: renews it at half its lifetime
/// with the protocol that made it, retries with a growing pause while no
/// gateway maps, and registers again whenever the mapped endpoint changes
/// (so peers learn it), then looks the trusted peers up again (the
/// registry passes our new endpoint to each in a punch request).
async fn portmap_keeper<T: Tun>(ctx: Arc<Context<T>>, handle: Handle<T>) {
    let Ok(local) = ctx.shared.udp.local_addr() else {
        return;
    };
    let mut backoff = Duration::from_secs(30);
    loop {
        let held = ctx.mapped.lock().clone();
        let (now, wait) = match crate::portmap::map(local.port(), held.as_ref()).await {
            Ok(m) => {
                backoff = Duration::from_secs(30);
                let wait = (m.lifetime / 2).max(Duration::from_secs(30));
                (Some(m), wait)
            }
            Err(e) => {
                debug!("{e}");
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(600));
                (None, wait)
            }
        };
        let key =
            |m: &Option<crate::portmap::Mapping>| m.as_ref().map(|m| (m.external, m.protocol));
        let changed = key(&held) != key(&now);
        *ctx.mapped.lock() = now.clone();
        if changed {
            match &now {
                Some(m) => {
                    info!(external = %m.external, protocol = %m.protocol, gateway = %m.gateway,
                        "the gateway maps a public port to the tunnel port")
                }
                None => warn!("the gateway's port mapping is gone"),
            }
            if ctx.link.session().is_some() && connect_registry(&ctx, &handle).await.is_ok() {
                handle.submit(|c| c.relookup_all()).await;
            }
        }
        tokio::time::sleep(wait).await;
    }
}

/// Rotates the identity whenever the current one reaches `every` of age
/// (`--rotate-identity-every`); the rotation restarts the node, so this
/// task ends with it.
async fn rotation_keeper<T: Tun>(handle: Handle<T>, every: Duration) {
    loop {
        let since = handle
            .with(|c| c.node_state.identity_since.unwrap_or(0))
            .await
            .unwrap_or(0);
        let due = since.saturating_add(every.as_secs());
        let now = unix_now();
        if now < due {
            // Wake at least hourly: the clock may jump.
            tokio::time::sleep(Duration::from_secs((due - now).min(3600))).await;
            continue;
        }
        match handle.with(|c| c.rotate_identity()).await {
            Ok(Ok(r)) => {
                info!(old = %r.old_node_id, new = %r.new_node_id, "scheduled identity rotation");
                return;
            }
            Ok(Err(e)) => warn!("scheduled identity rotation failed: {e}"),
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

/// Handshake and registration with a relay-only instance.
async fn connect_relay<T: Tun>(
    ctx: &Context<T>,
    handle: &Handle<T>,
    relay: &RegistryLink,
) -> Result<(), LinkError> {
    relay
        .handshake(&ctx.shared.udp, || ctx.make_init(&relay.join.key))
        .await?;
    let nat = *ctx.nat.lock();
    let reg = handle
        .with(move |c| c.registration(nat))
        .await
        .map_err(|_| LinkError::Protocol)?
        .map_err(|_| LinkError::Protocol)?;
    ctx.attach(relay, reg).await.map(|_| ())
}

/// Keeps the registry session alive: pings every 10 s, reconnects with
/// backoff when it stops answering, and renews the session before its keys
/// grow old. With several instances in the join URL it pings every
/// [`FAILOVER_PING`](crate::link::FAILOVER_PING) instead, and after
/// [`FAILOVER_SILENCE`](crate::link::FAILOVER_SILENCE) without a word from
/// the current instance (or a failed reconnection there) moves on to the
/// next one and registers there.
async fn registry_keeper<T: Tun>(ctx: Arc<Context<T>>, handle: Handle<T>) {
    let mut backoff = Duration::from_secs(1);
    // With several instances: failed reconnections in a row (a full round
    // of them backs off like one instance does).
    let mut misses = 0usize;
    // Just moved to another instance (see connect_registry_as).
    let mut moved = false;
    loop {
        let stale = ctx
            .link
            .session()
            .is_none_or(|s| s.created.elapsed() >= ctx.timing.rekey_after);
        if stale {
            match connect_registry_as(&ctx, &handle, !moved).await {
                Ok(()) => {
                    backoff = Duration::from_secs(1);
                    misses = 0;
                    moved = false;
                    // Peers may have moved while we could not ask.
                    handle.submit(|c| c.reconnect_all()).await;
                    controller::flush_outbox(&ctx, &handle).await;
                }
                Err(e) => {
                    match e {
                        LinkError::Assignment(_) => warn!("registry: {e}"),
                        _ => debug!("registry: {e}"),
                    }
                    if ctx.link.fails_over() && matches!(e, LinkError::Unreachable(_)) {
                        misses += 1;
                        moved = true;
                        let next = ctx.fail_over();
                        warn!(%next, "registry instance does not answer; moving to the next one");
                        if misses % ctx.link.join.endpoints().len() != 0 {
                            continue;
                        }
                    }
                    ctx.link.nap(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
        }
        if ctx.link.fails_over() {
            moved = watch_instance(&ctx, &handle).await;
            continue;
        }
        ctx.link.nap(Duration::from_secs(10)).await;
        if ctx.link.session().is_none() {
            continue; // woken: the transport changed
        }
        match ctx
            .link
            .call(&ctx.shared.udp, |req| ToRegistry::Ping { req })
            .await
        {
            Ok(FromRegistry::Pong { observed, .. }) => {
                ctx.link.set_observed(observed);
                controller::flush_outbox(&ctx, &handle).await;
            }
            _ => {
                warn!("registry stopped answering; reconnecting");
                ctx.link.drop_session();
            }
        }
    }
}

/// With several instances: pings the current one every second (without
/// waiting), sends the outbox every 10 s, and returns when the session is
/// gone, due for renewal, or the instance has been silent for
/// [`FAILOVER_SILENCE`](crate::link::FAILOVER_SILENCE) (it then moves the
/// link to the next instance and returns true).
async fn watch_instance<T: Tun>(ctx: &Context<T>, handle: &Handle<T>) -> bool {
    use crate::link::{FAILOVER_PING, FAILOVER_SILENCE};
    let mut ticks = 0u32;
    loop {
        ctx.link.nap(FAILOVER_PING).await;
        let Some(session) = ctx.link.session() else {
            return false; // woken: the transport changed
        };
        if session.created.elapsed() >= ctx.timing.rekey_after {
            return false;
        }
        let silent = ctx
            .link
            .last_contact()
            .is_none_or(|t| t.elapsed() >= FAILOVER_SILENCE);
        if silent {
            let at = ctx.link.endpoint();
            let next = ctx.fail_over();
            warn!(%at, %next, "registry instance stopped answering; moving to the next one");
            return true;
        }
        ctx.link.ping_nowait(&ctx.shared.udp).await;
        ticks += 1;
        if ticks % 10 == 0 {
            controller::flush_outbox(ctx, handle).await;
        }
    }
}

/// Keeps a session with the relay-only instance the registry named, if
/// any: while it is up, relayed traffic goes there instead of the registry.
async fn relay_keeper<T: Tun>(ctx: Arc<Context<T>>, handle: Handle<T>) {
    loop {
        let link = ctx.relay_link.read().clone();
        let Some(link) = link else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let stale = link
            .session()
            .is_none_or(|s| s.created.elapsed() >= ctx.timing.rekey_after);
        if stale {
            if let Err(e) = connect_relay(&ctx, &handle, &link).await {
                debug!(relay = %link.endpoint(), "relay: {e}");
                link.drop_session();
                ctx.shared.set_relay_only(Some(link.endpoint()), false);
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
            ctx.shared.set_relay_only(Some(link.endpoint()), true);
            info!(relay = %link.endpoint(), "attached to relay");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        if !matches!(
            link.call(&ctx.shared.udp, |req| ToRegistry::Ping { req })
                .await,
            Ok(FromRegistry::Pong { .. })
        ) {
            warn!(relay = %link.endpoint(), "relay stopped answering; relaying through the registry");
            link.drop_session();
            ctx.shared.set_relay_only(Some(link.endpoint()), false);
        }
    }
}

/// Runs the control socket server until the node stops: one task per
/// connection; each request is answered through the control task.
async fn serve_control<T: Tun>(
    ctx: Arc<Context<T>>,
    handle: Handle<T>,
    listener: tokio::net::UnixListener,
) {
    crate::control::serve(listener, move |req| {
        let (ctx, handle) = (ctx.clone(), handle.clone());
        async move { controller::request(&ctx, &handle, req).await }
    })
    .await;
}
