//! Sans-IO core of pilot-tun.
//!
//! Nothing in this crate opens a socket, reads the clock or makes a system
//! call of its own (the only exceptions are the ephemeral keys `snow` draws for
//! every handshake). Time is always an argument, randomness for long-term keys
//! is passed in by the caller, and every parser of network bytes returns an
//! error instead of panicking. That makes every rule here unit-testable on a
//! simulated clock.
//!
//! Modules:
//! - [`wire`]: the tunnel datagram formats (handshake, data) as checked views.
//! - [`stun`]: RFC 8489 Binding requests and responses.
//! - [`replay`]: the sliding anti-replay window.
//! - [`session`]: per-direction data keys (AES-256-GCM or ChaCha20-Poly1305).
//! - [`handshake`]: the Noise IK handshake (through `snow`) and the cheap MAC
//!   that guards it.
//! - [`timers`]: rekey, keepalive and handshake-retry rules.
//! - [`identity`]: Ed25519 identities, node ids, the X25519 binding.
//! - [`messages`]: the registry control protocol and signed trust statements.
//! - [`trust`]: the local trust store and its transitions.
//! - [`overlay`]: the bounds on the overlay network a registry hands out.
//! - [`cookie`]: cookie replies, so a responder under load spends no
//!   Diffie-Hellman on forged source addresses.
//! - [`peer`]: one peer's tunnel as a state machine (handshakes, sessions,
//!   path, timers, queue), driven by `handle_*` calls and polled for output.
//! - [`packet`]: the few IPv4 facts the data plane needs, ICMP errors, and
//!   IPv4 fragmentation.
//! - [`mtu`]: tunnel overhead per path, the TUN MTU, and what to do with a
//!   packet that does not fit its peer's path.
//! - [`pmtu`]: each peer's path MTU, found with probes.
//! - [`dns`]: DNS answers for the overlay's names (A, AAAA, PTR; NXDOMAIN
//!   and REFUSED), from the names a node may tell.
//! - [`ipv6`]: the overlay's IPv6 addresses (a ULA /48 per network, a /128
//!   per node), IPv6 packet facts and ICMPv6 errors.
//! - [`streamframe`]: datagrams over a byte stream (the TCP relay), with
//!   a 2-byte length each.
//! - [`tlskey`]: the registry's TLS key for the TCP relay, the same key the
//!   join URL pins, and the check of a TLS signature against the pin.
//!
//! Fleet trust (issue 9; wired into the daemon step by step):
//! - [`cert`]: owner keys, certificates binding a node id to tags, owner
//!   revocations; [`armor`] and [`lifetime`] are their text forms.
//! - [`ports`] and [`policy`]: port scopes, rules and grants, and the
//!   per-packet decision; [`flow`]: the bounded tables that let replies and
//!   later fragments through; [`filter`]: one peer's packet filter built
//!   from both (in the daemon for scoped and expiring manual grants).
//! - [`succession`]: identity rotation signed by the old and the new key.
//! - [`audit`]: the hash-chained, signed audit log; [`aggregate`]: bounded
//!   per-minute counting of repeated events for it.

pub mod admission;
pub mod aggregate;
pub mod armor;
pub mod audit;
pub mod cert;
pub mod cookie;
pub mod dns;
pub mod filter;
pub mod flow;
pub mod frame;
pub mod gossip;
pub mod gro;
pub mod handshake;
pub mod hex;
pub mod identity;
pub mod ipv6;
pub mod join;
pub mod lifetime;
pub mod messages;
pub mod mtu;
pub mod natpmp;
pub mod overlay;
pub mod packet;
pub mod path;
pub mod pcp;
pub mod peer;
pub mod pmtu;
pub mod policy;
pub mod ports;
pub mod ratelimit;
pub mod replay;
pub mod session;
pub mod streamframe;
pub mod stun;
pub mod succession;
pub mod timers;
pub mod tlskey;
pub mod trust;
pub mod wire;

/// The wire protocol's version, shown by `--version` on both binaries.
///
/// It names everything two programs must agree on to talk: the datagram
/// formats in [`wire`] and [`stun`] use, the Noise handshake in
/// [`handshake`] (its pattern and prologue, which carries this number), and
/// the encoding of the registry messages in [`messages`]. Bump it with any
/// change an older node or registry cannot read or would misread; a new
/// optional field appended where old readers ignore it, or anything that only
/// changes local behaviour, does not bump it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Overlay MTU on a 1500-byte underlay: 1500 - 20 (IPv4) - 8 (UDP) - 16 (our
/// header) - 16 (AEAD tag) = 1440, with 20 bytes left for an IPv6 underlay or
/// a relay header.
pub const DEFAULT_MTU: u16 = 1420;

/// Default overlay network handed out by a registry.
pub const DEFAULT_NETWORK: &str = "10.77.0.0/16";
