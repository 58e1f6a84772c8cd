//! The control API's types: every request the CLI sends to the daemon, every
//! answer, and every document `--json` prints. The daemon builds these
//! structs and the CLI reads them, so the schema documented in the README
//! ("JSON output") is this file; tests pin the two together.
//!
//! A leaf module: it uses std, serde and a few pilot-proto enums, nothing
//! else of this crate. Fields may be added over time; a field that exists
//! keeps its name, type and meaning.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use pilot_proto::messages::NatType;
use pilot_proto::policy::Grant;
use pilot_proto::ports::Scope;
use pilot_proto::session::CipherSuite;
use pilot_proto::trust;
use serde::{Deserialize, Serialize};

/// A command for the daemon: one JSON line `{"cmd": "<name>", ...}` on the
/// control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Address, id, registry, peers: answered with [`Status`].
    Status,
    /// Every known peer with trust state and tunnel figures: [`Peer`]s.
    Peers,
    /// Ask a peer for mutual trust: [`TrustChange`].
    TrustRequest {
        /// Hostname, address or node id.
        peer: String,
        /// Note for the peer's operator.
        note: String,
        /// What the peer may open on us (absent: everything).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allow: Option<Scope>,
        /// Seconds from now until our grant ends (absent: never).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_in_secs: Option<u64>,
        /// What we ask to open on the peer (shown to its operator).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        want: Option<Scope>,
    },
    /// Requests waiting for our answer: [`PendingRequest`]s.
    TrustPending,
    /// Approve a peer: [`TrustChange`].
    TrustApprove {
        /// Hostname, address or node id.
        peer: String,
        /// What the peer may open on us (absent: everything).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allow: Option<Scope>,
        /// Seconds from now until the grant ends (absent: never).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_in_secs: Option<u64>,
    },
    /// Refuse a peer's request: [`TrustChange`].
    TrustDeny {
        /// Hostname, address or node id.
        peer: String,
    },
    /// Withdraw trust; ends the session at once: [`TrustChange`].
    TrustRevoke {
        /// Hostname, address or node id.
        peer: String,
    },
    /// All trust records: [`TrustEntry`]s.
    TrustList,
    /// Round trips through the tunnel to a trusted peer: [`PingReport`].
    Ping {
        /// Hostname, address or node id.
        peer: String,
        /// How many echoes.
        count: u32,
    },
    /// Whether traffic would pass to and from a peer, and what decides:
    /// [`Explanation`].
    Explain {
        /// Hostname, address or node id.
        peer: String,
        /// The traffic to judge (`tcp/22`, `udp/53`, `icmp`); absent: only
        /// the grants.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traffic: Option<String>,
    },
    /// Installs this node's owner certificate (armored text): [`CertInfo`].
    CertInstall {
        /// The certificate, as `owner sign` wrote it.
        cert: String,
    },
    /// This node's certificate: [`CertInfo`].
    CertShow,
    /// Adds a policy rule: [`PolicyRule`].
    PolicyAllow {
        /// The owner's public key.
        owner: String,
        /// The tag a peer's certificate must carry.
        tag: String,
        /// What a matching peer may open (absent: everything).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ports: Option<Scope>,
        /// Seconds from now until the rule ends (absent: never).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_in_secs: Option<u64>,
    },
    /// The policy rules: [`PolicyRule`]s.
    PolicyList,
    /// Removes a policy rule: the remaining [`PolicyRule`]s.
    PolicyRemove {
        /// The rule's id.
        id: u32,
    },
    /// Hands an owner's revocation (armored) to the daemon, which sends it
    /// to the registry and applies it: [`RevocationReport`].
    OwnerRevoke {
        /// The revocation, as `owner revoke` made it.
        revocation: String,
    },
    /// Rotates this node's identity (new keys, a succession signed by
    /// the old and the new key); the daemon restarts under the new identity
    /// at once, keeping its address and name: [`IdentityRotated`].
    IdentityRotate,
    /// Stop the daemon: [`Stopping`].
    Down,
}

/// The most echoes one `ping` sends (more are clamped to this).
pub const MAX_PING_COUNT: u32 = 100;

/// The daemon's answer to one request.
pub type Response = Result<Reply, ApiError>;

/// A successful answer; which variant depends on the request (see
/// [`Request`]). It serializes as the bare document, which is what
/// `--json` prints.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// To `status` (and what `up --json` prints).
    Status(Box<Status>),
    /// To `peers`.
    Peers(Vec<Peer>),
    /// To `trust pending`.
    Pending(Vec<PendingRequest>),
    /// To `trust list`.
    TrustList(Vec<TrustEntry>),
    /// To `trust request|approve|deny|revoke`.
    Trust(TrustChange),
    /// To `ping`.
    Ping(PingReport),
    /// To `explain`.
    Explain(Explanation),
    /// To `cert install` and `cert show`.
    Cert(CertInfo),
    /// To `policy list` and `policy remove`.
    Policy(Vec<PolicyRule>),
    /// To `policy allow`.
    Rule(PolicyRule),
    /// To `owner revoke`.
    Revocation(RevocationReport),
    /// To `identity rotate`.
    Rotated(IdentityRotated),
    /// To `down`.
    Down(Stopping),
}

impl Reply {
    /// Reads the document the daemon sent for `req`.
    pub fn decode(req: &Request, data: serde_json::Value) -> Result<Reply, serde_json::Error> {
        use serde_json::from_value;
        Ok(match req {
            Request::Status => Reply::Status(from_value(data)?),
            Request::Peers => Reply::Peers(from_value(data)?),
            Request::TrustPending => Reply::Pending(from_value(data)?),
            Request::TrustList => Reply::TrustList(from_value(data)?),
            Request::TrustRequest { .. }
            | Request::TrustApprove { .. }
            | Request::TrustDeny { .. }
            | Request::TrustRevoke { .. } => Reply::Trust(from_value(data)?),
            Request::Ping { .. } => Reply::Ping(from_value(data)?),
            Request::Explain { .. } => Reply::Explain(from_value(data)?),
            Request::CertInstall { .. } | Request::CertShow => Reply::Cert(from_value(data)?),
            Request::PolicyList | Request::PolicyRemove { .. } => Reply::Policy(from_value(data)?),
            Request::PolicyAllow { .. } => Reply::Rule(from_value(data)?),
            Request::OwnerRevoke { .. } => Reply::Revocation(from_value(data)?),
            Request::IdentityRotate => Reply::Rotated(from_value(data)?),
            Request::Down => Reply::Down(from_value(data)?),
        })
    }
}

/// `Reply` -> the document of one kind, for callers that know which
/// request they sent: `let s: Status = reply.try_into()?`.
macro_rules! reply_into {
    ($($variant:ident => $ty:ty),* $(,)?) => {$(
        impl TryFrom<Reply> for $ty {
            type Error = Reply;
            fn try_from(r: Reply) -> Result<Self, Reply> {
                match r {
                    Reply::$variant(v) => Ok(v.into()),
                    other => Err(other),
                }
            }
        }
    )*};
}
reply_into! {
    Status => Status,
    Peers => Vec<Peer>,
    Pending => Vec<PendingRequest>,
    TrustList => Vec<TrustEntry>,
    Trust => TrustChange,
    Ping => PingReport,
    Explain => Explanation,
    Cert => CertInfo,
    Policy => Vec<PolicyRule>,
    Rule => PolicyRule,
    Revocation => RevocationReport,
    Rotated => IdentityRotated,
    Down => Stopping,
}

impl From<Box<Status>> for Status {
    fn from(b: Box<Status>) -> Status {
        *b
    }
}

/// One line the daemon writes back on the control socket:
/// `{"ok": true, "data": <document>}` or
/// `{"ok": false, "error": "<sentence>", "code": "<code>"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// True on success.
    pub ok: bool,
    /// On failure: what went wrong, in a sentence that says what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// On failure: the machine-readable reason (absent from daemons older
    /// than the code: read as [`ErrorCode::Failed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    /// On success: the document ([`Reply`]).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Envelope {
    /// The line for a response.
    pub fn of(resp: &Response) -> Envelope {
        match resp {
            Ok(reply) => Envelope {
                ok: true,
                error: None,
                code: None,
                // Serializing these plain structs to a Value cannot fail: no
                // map has non-string keys and no custom Serialize errs.
                data: serde_json::to_value(reply).unwrap_or_default(),
            },
            Err(e) => Envelope {
                ok: false,
                error: Some(e.error.clone()),
                code: Some(e.code),
                data: serde_json::Value::Null,
            },
        }
    }

    /// The response for `req` this line carries.
    pub fn into_response(self, req: &Request) -> Result<Response, serde_json::Error> {
        if self.ok {
            return Reply::decode(req, self.data).map(Ok);
        }
        Ok(Err(ApiError {
            code: self.code.unwrap_or(ErrorCode::Failed),
            error: self
                .error
                .unwrap_or_else(|| "the daemon gave no reason".into()),
        }))
    }
}

/// A failed request: the reason for programs and the sentence for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable reason.
    pub code: ErrorCode,
    /// What went wrong and what to do next.
    pub error: String,
}

impl ApiError {
    /// An error with this code and sentence.
    pub fn new(code: ErrorCode, error: impl Into<String>) -> Self {
        ApiError {
            code,
            error: error.into(),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)
    }
}

impl std::error::Error for ApiError {}

/// Why a command failed, for programs. Each maps to an exit code
/// ([`ErrorCode::exit_code`]); the code is finer than the exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Anything no finer code covers (the sentence says what). Exit 1.
    Failed,
    /// Bad command-line arguments, including a string that cannot name a
    /// peer. Exit 2.
    Usage,
    /// No daemon runs for this state directory. Exit 3.
    NotRunning,
    /// The control socket or /dev/net/tun needs root (or CAP_NET_ADMIN).
    /// Exit 4.
    PermissionDenied,
    /// The daemon did not answer in time, or did not come up in time.
    /// Exit 5.
    Timeout,
    /// The registry cannot be reached right now; try again later. Exit 5.
    RegistryUnreachable,
    /// The daemon's answer did not parse (another version of pilot-tun?).
    /// Exit 1.
    Protocol,
    /// No node has that hostname, address or node id. Exit 1.
    UnknownPeer,
    /// The command needs a peer both sides trust. Exit 1.
    NotTrusted,
    /// The daemon refused the request as given (this node itself named as
    /// peer, a note too long). Exit 1.
    InvalidRequest,
    /// `up`: a daemon already runs for this state directory. Exit 1.
    AlreadyRunning,
    /// `up`: /dev/net/tun is missing. Exit 1.
    NoTun,
    /// `up`: the daemon could not start (the sentence and the log say
    /// why). Exit 1.
    StartFailed,
}

/// Exit codes a program can rely on.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// The command failed; the error's `code` says why.
    pub const FAILED: u8 = 1;
    /// Bad arguments.
    pub const USAGE: u8 = 2;
    /// No daemon runs for this state directory.
    pub const NOT_RUNNING: u8 = 3;
    /// Permission denied: run with sudo.
    pub const PERMISSION: u8 = 4;
    /// Timed out or unreachable: worth retrying later.
    pub const TRY_AGAIN: u8 = 5;
}

impl ErrorCode {
    /// The process exit code for this reason.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorCode::Usage => exit::USAGE,
            ErrorCode::NotRunning => exit::NOT_RUNNING,
            ErrorCode::PermissionDenied => exit::PERMISSION,
            ErrorCode::Timeout | ErrorCode::RegistryUnreachable => exit::TRY_AGAIN,
            ErrorCode::Failed
            | ErrorCode::Protocol
            | ErrorCode::UnknownPeer
            | ErrorCode::NotTrusted
            | ErrorCode::InvalidRequest
            | ErrorCode::AlreadyRunning
            | ErrorCode::NoTun
            | ErrorCode::StartFailed => exit::FAILED,
        }
    }
}

/// What `--json` prints (on stdout) when a command fails, for errors of
/// the daemon and of the CLI alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReport {
    /// Always false.
    pub ok: bool,
    /// What went wrong and what to do next.
    pub error: String,
    /// Machine-readable reason.
    pub code: ErrorCode,
}

impl From<&ApiError> for ErrorReport {
    fn from(e: &ApiError) -> Self {
        ErrorReport {
            ok: false,
            error: e.error.clone(),
            code: e.code,
        }
    }
}

/// The answer to `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Our overlay address (0.0.0.0 before the registry assigned one).
    pub address: Ipv4Addr,
    /// The overlay network, e.g. "10.77.0.0/16".
    pub network: Option<String>,
    /// Our node id (32 hex digits).
    pub node_id: String,
    /// The hostname the registry bound to us.
    pub hostname: Option<String>,
    /// The local UDP address of the tunnel socket.
    pub listen: Option<SocketAddr>,
    /// The registry session.
    pub registry: RegistryStatus,
    /// Where relayed traffic goes (the registry or a relay-only instance).
    pub relay: SocketAddr,
    /// Our NAT type, as last measured.
    pub nat: Nat,
    /// Our endpoint as the registry sees it.
    pub public_endpoint: Option<SocketAddr>,
    /// Peer counts.
    pub peers: PeerCounts,
    /// Trust requests waiting for our answer.
    pub pending_requests: u64,
    /// The data cipher for sessions we start.
    pub cipher: Cipher,
    /// Offloads in use.
    pub offload: Offload,
    /// The daemon's process id.
    pub pid: u32,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Packets dropped, by reason.
    pub drops: DropCounts,
    /// The TUN MTU in use: the smallest route MTU towards the registry and
    /// the peers minus the tunnel's overhead, capped by `--mtu`.
    pub mtu: u16,
    /// `--mtu`, if given.
    pub mtu_cap: Option<u16>,
    /// True if the underlay is narrower than the TUN MTU's floor needs (the
    /// outer datagrams of the largest packets are then fragmented).
    pub underlay_below_mtu_floor: bool,
    /// Local packets larger than their peer's path allows, by what became
    /// of them.
    pub too_big: TooBigCounts,
    /// The public endpoint the gateway maps to our tunnel port (PCP,
    /// NAT-PMP or UPnP IGD), if it does (left out when it does not, and by
    /// daemons from before port mapping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mapping: Option<SocketAddr>,
    /// The protocol that made [`Status::port_mapping`] (left out without a
    /// mapping, and by daemons from before PCP and UPnP IGD, which only
    /// spoke NAT-PMP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mapping_protocol: Option<PortMappingProtocol>,
    /// The overlay's DNS server, while it runs (left out with `--no-dns`,
    /// when it could not start, and by daemons from before DNS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsStatus>,
    /// Our IPv6 overlay address, while the TUN carries it (left out when
    /// IPv6 is off: a TUN MTU below 1280, IPv6 disabled on the host; and by
    /// daemons from before IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// The overlay's IPv6 prefix (a ULA /48), with [`Status::address6`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network6: Option<String>,
    /// The TCP relay, while UDP to the registry is blocked and the node
    /// reaches it over TCP with TLS (left out otherwise, and by daemons
    /// from before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_relay: Option<TcpRelayStatus>,
    /// Gossip with trusted peers (left out with `--no-gossip`, and by
    /// daemons from before gossip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gossip: Option<GossipStatus>,
}

/// Gossip with trusted peers, in [`Status`]: what it holds and what came
/// of it since the daemon started.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipStatus {
    /// Peers' signed endpoint records held.
    pub records: u64,
    /// Records taken from peers (newer, signed, of a node we trust).
    pub records_taken: u64,
    /// "Where is" questions we answered.
    pub answered: u64,
    /// Peers without a session found through another peer.
    pub found: u64,
    /// Withdrawals passed on to their subject.
    pub passed_on: u64,
    /// Withdrawals about us applied.
    pub applied: u64,
    /// Messages refused: malformed, forged, old, over a peer's rate, or
    /// asking for what the asker is not entitled to.
    pub refused: u64,
}

/// The TCP relay in use, in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpRelayStatus {
    /// The registry's TCP address (the join URL's `?tcp=` port).
    pub address: SocketAddr,
    /// Seconds since the node moved to it.
    pub since_secs: u64,
    /// Why.
    pub why: String,
}

/// The overlay's DNS server, in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// Where it answers: our overlay address, port 53.
    pub address: SocketAddr,
    /// The overlay interface (where systemd-resolved gets the server).
    pub interface: String,
    /// The overlay's domain (`pilot`: names are `<hostname>.pilot`).
    pub domain: String,
    /// How the host's resolver sends it the domain's questions:
    /// `systemd-resolved` (per-link DNS on the interface, set by the
    /// daemon) or `none` (see `hint`).
    pub host_resolver: String,
    /// With `host_resolver` `none`: what to add so programs use it.
    pub hint: Option<String>,
    /// Names it can answer (ours and approved peers').
    pub names: u64,
    /// Questions answered.
    pub answered: u64,
    /// Queries dropped unanswered because they did not come from this
    /// host (a peer asking through its tunnel).
    pub dropped_not_local: u64,
}

/// What became of local packets too big for their peer's path, in
/// [`Status`]. None is dropped unless its send fails.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TooBigCounts {
    /// ICMP "fragmentation needed" answers written to the TUN (for packets
    /// with "don't fragment").
    pub icmp_sent: u64,
    /// IPv4 packets without "don't fragment", sent as inner fragments.
    pub fragmented_inner: u64,
    /// Packets sent in an outer datagram the underlay may fragment.
    pub fragmented_outer: u64,
    /// Of those, the sends that failed: the only ones dropped.
    pub send_failed: u64,
}

/// The registry session, in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryStatus {
    /// The join URL.
    pub url: String,
    /// True while the registry answers.
    pub reachable: bool,
    /// Seconds since the registry last answered.
    pub last_contact_secs: Option<u64>,
    /// Our endpoint as the registry sees it.
    pub observed_endpoint: Option<SocketAddr>,
    /// The registry instance in use ("ip:port"): one of the join URL's
    /// endpoints (with several, the node moves to the next when this one
    /// stops answering).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
}

/// Peer counts, in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounts {
    /// Nodes with a trust record.
    pub known: u64,
    /// Peers both sides approved.
    pub trusted: u64,
    /// Trusted peers with a current session.
    pub connected: u64,
}

/// Offloads, in [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offload {
    /// UDP segmentation offload (one send call per run of datagrams).
    pub udp_gso: bool,
}

/// Drop counters, in [`Status`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounts {
    /// Data packets that failed authentication or named no session.
    pub auth: u64,
    /// Data packets replayed or too old.
    pub replay: u64,
    /// Inner packets whose addresses were not the peer's and ours.
    pub inner_address: u64,
    /// Handshakes from keys we do not trust.
    pub untrusted_handshake: u64,
    /// Handshakes refused: bad MAC, Noise failure, replayed timestamp.
    pub bad_handshake: u64,
    /// Handshakes over the per-source rate limit.
    pub rate_limited: u64,
    /// Initiations answered with a cookie instead of a handshake: this node
    /// was under load (a legitimate initiator sends again with the cookie).
    /// (Absent from older daemons.)
    #[serde(default)]
    pub cookie_sent: u64,
    /// Local packets to untrusted or unknown addresses (answered with ICMP).
    pub refused_local: u64,
    /// Datagrams of no known kind.
    pub malformed: u64,
    /// Datagrams the slow path refused: its queue was full (in items or in
    /// bytes), as under a handshake flood. (Absent from older daemons.)
    #[serde(default)]
    pub queue_full: u64,
    /// Packets from peers outside the grant this node gave them (or
    /// belonging to no open flow), dropped after decryption. (Absent from
    /// older daemons.)
    #[serde(default)]
    pub policy_in: u64,
    /// Local packets outside the grant a peer gave this node, refused
    /// before encryption (answered with ICMP administratively prohibited).
    /// (Absent from older daemons.)
    #[serde(default)]
    pub policy_out: u64,
}

/// `audit show`: the audit log's entries (read from the state directory,
/// not verified: `audit verify` does that).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditShow {
    /// The entries, oldest first (with `--since`, those written since).
    pub entries: Vec<AuditEntry>,
    /// Lines that are not entries (`audit verify` says more).
    pub unreadable: Vec<AuditLine>,
}

/// One entry of the audit log, in [`AuditShow`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its place in the chain, from 0.
    pub seq: u64,
    /// Unix time it was written.
    pub time: u64,
    /// The same time, RFC 3339 UTC.
    pub utc: String,
    /// What happened (the README's "Audit log" lists the kinds).
    pub kind: String,
    /// The facts, as written.
    pub details: serde_json::Value,
    /// The file it is in.
    pub file: String,
    /// Its line in that file, from 1.
    pub line: u64,
}

/// A line of the audit log and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLine {
    /// The file.
    pub file: String,
    /// The line in it, from 1.
    pub line: u64,
    /// What is wrong.
    pub problem: String,
}

/// `audit verify`: whether the audit log is intact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerify {
    /// True if every line verified (and the expected head is there).
    pub ok: bool,
    /// The files read, oldest first.
    pub files: Vec<String>,
    /// The node's Ed25519 public key (hex) that checked the signatures.
    pub key: String,
    /// The seq of the oldest entry kept (0 unless older files were
    /// rotated away).
    pub first_seq: Option<u64>,
    /// Lines that verified (before the first bad one).
    pub lines: u64,
    /// The last checkpoint that verified: every line up to it is signed.
    pub signed_head: Option<String>,
    /// Entries after it that verified: chained, but not signed yet.
    pub unsigned_after: u64,
    /// The `--expect-head` given.
    pub expect_head: Option<String>,
    /// What is wrong, when not `ok`.
    pub problem: Option<String>,
    /// The first bad line, when one is to blame.
    pub bad_line: Option<AuditLine>,
    /// Seqs of `log-damaged` entries: damaged files the daemon set aside.
    pub damaged: Vec<u64>,
}

/// `audit head`: the last signed head, to keep elsewhere and give back to
/// `audit verify --expect-head`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// `<seq>:<sha256 hex>`.
    pub head: String,
    /// Its seq.
    pub seq: u64,
    /// Entries written after it, not signed yet.
    pub unsigned_after: u64,
}

/// Our NAT type, in [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Nat {
    /// Not measured (yet).
    #[serde(rename = "unknown")]
    Unknown,
    /// No NAT.
    #[serde(rename = "none")]
    None,
    /// One public endpoint for every destination ("easy").
    #[serde(rename = "endpoint-independent")]
    EndpointIndependent,
    /// A public port per destination ("hard", symmetric).
    #[serde(rename = "per-destination (hard)")]
    PerDestination,
}

impl From<NatType> for Nat {
    fn from(n: NatType) -> Nat {
        match n {
            NatType::Unknown => Nat::Unknown,
            NatType::None => Nat::None,
            NatType::EndpointIndependent => Nat::EndpointIndependent,
            NatType::PerDestination => Nat::PerDestination,
        }
    }
}

/// `netcheck`: what the network between this host and its registry
/// allows, measured from a UDP socket of its own (with or without a
/// daemon running), plus what a running daemon reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Netcheck {
    /// The registry probed (from the join URL).
    pub registry: SocketAddr,
    /// True if the registry answered over UDP (STUN or the handshake).
    pub udp: bool,
    /// True if the registry completed the handshake, proving it holds the
    /// join URL's key; false if it answered STUN but never the handshake
    /// (a wrong key in the join URL); null if nothing answered.
    pub registry_key_ok: Option<bool>,
    /// Our NAT type, as seen from this probe's socket.
    pub nat: Nat,
    /// Our endpoint as the registry's port saw this probe's socket.
    pub public_endpoint: Option<SocketAddr>,
    /// The same, seen by the registry's second STUN port (another port
    /// than `public_endpoint`: the NAT maps per destination).
    pub public_endpoint_alt: Option<SocketAddr>,
    /// Round trips of control pings to the registry, in milliseconds; null
    /// where no answer came.
    pub registry_rtt_ms: Vec<Option<f64>>,
    /// The relay-only instance, if one is configured.
    pub relay: Option<RelayCheck>,
    /// Port mapping protocols on the default gateway.
    pub port_mapping: PortMapping,
    /// What the daemon of `--state-dir` reports, if one runs.
    pub daemon: Option<DaemonNet>,
    /// What is wrong and what to do, when something is.
    pub problem: Option<String>,
}

/// A relay instance's round trips, in [`Netcheck`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RelayCheck {
    /// Its address.
    pub addr: SocketAddr,
    /// Round trips of control pings, in milliseconds (null: no answer).
    pub rtt_ms: Vec<Option<f64>>,
}

/// The protocol a gateway port mapping was made with, in [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortMappingProtocol {
    /// PCP (RFC 6887), a MAP request on UDP 5351.
    Pcp,
    /// NAT-PMP (RFC 6886), on UDP 5351.
    NatPmp,
    /// UPnP IGD: found by SSDP, AddPortMapping over SOAP.
    UpnpIgd,
}

impl fmt::Display for PortMappingProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pcp => "PCP",
            Self::NatPmp => "NAT-PMP",
            Self::UpnpIgd => "UPnP IGD",
        })
    }
}

/// Which port mapping protocol answered on the default gateway (UDP 5351),
/// in [`Netcheck`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// The default gateway probed (null: no default route).
    pub gateway: Option<Ipv4Addr>,
    /// NAT-PMP (RFC 6886) answered.
    pub nat_pmp: bool,
    /// PCP (RFC 6887) answered.
    pub pcp: bool,
    /// The external address NAT-PMP reported.
    pub external_address: Option<Ipv4Addr>,
}

/// The network as a running daemon sees it, in [`Netcheck`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonNet {
    /// Its NAT type, as last measured.
    pub nat: Nat,
    /// Its tunnel socket's public endpoint (what peers use).
    pub public_endpoint: Option<SocketAddr>,
    /// True while the registry answers it.
    pub registry_reachable: bool,
}

/// A data cipher, in [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    /// AES-256-GCM.
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305.
    #[serde(rename = "chacha20-poly1305")]
    Chacha20Poly1305,
}

impl From<CipherSuite> for Cipher {
    fn from(c: CipherSuite) -> Cipher {
        match c {
            CipherSuite::Aes256Gcm => Cipher::Aes256Gcm,
            CipherSuite::ChaCha20Poly1305 => Cipher::Chacha20Poly1305,
        }
    }
}

/// One peer in the answer to `peers`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    /// Its node id.
    pub node_id: String,
    /// Its hostname.
    pub hostname: Option<String>,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// The trust state between us.
    pub trust: TrustState,
    /// Where its packets go now (trusted peers only).
    pub endpoint: Option<Endpoint>,
    /// The kind of that path.
    pub path: Option<PathKind>,
    /// Why it is relayed, when it is.
    pub relay_reason: Option<String>,
    /// Last measured round trip through the tunnel, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// True while a session is current.
    pub session: bool,
    /// Seconds since the last completed handshake.
    pub last_handshake_secs: Option<u64>,
    /// Inner bytes received from it.
    pub rx_bytes: u64,
    /// Inner bytes sent to it.
    pub tx_bytes: u64,
    /// The largest inner packet its path carries now (at most the TUN
    /// MTU); absent for a peer without a session.
    pub mtu: Option<u16>,
    /// The largest outer datagram its path carries, once probed.
    pub path_mtu: Option<u16>,
    /// Path MTU discovery: "searching", "confirmed" or "unconfirmed" (no
    /// answers to probes).
    pub path_mtu_state: Option<String>,
    /// What it may open on us, while we approve it. (Absent from older
    /// daemons.)
    #[serde(default)]
    pub granted: Option<GrantView>,
    /// What we may open on it, by its signed statement, while it approves
    /// us. (Absent from older daemons.)
    #[serde(default)]
    pub granted_us: Option<GrantView>,
    /// Its IPv6 overlay address, derived from `address` (left out while
    /// this node carries no IPv6, and by daemons from before IPv6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<Ipv6Addr>,
    /// `tcp` while its relayed packets travel over the TCP relay (UDP is
    /// blocked here); left out otherwise, and by daemons from before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_transport: Option<String>,
}

/// A grant as `peers`, `trust list` and `explain` show it: what it opens
/// and until when. A grant that ended opens `none`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// What it opens now: `all`, `none`, or a list such as
    /// `tcp/8080,tcp/9000-9100,udp/53,icmp`.
    pub scope: Scope,
    /// Unix time it ends (absent: never).
    pub expires_at: Option<u64>,
}

impl GrantView {
    /// The view of `g` at `unix`.
    pub fn of(g: &Grant, unix: u64) -> Self {
        let live = g.expires_at.is_none_or(|t| unix < t);
        GrantView {
            scope: if live { g.scope.clone() } else { Scope::none() },
            expires_at: g.expires_at,
        }
    }
}

impl fmt::Display for GrantView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.scope)?;
        if let Some(t) = self.expires_at {
            write!(f, " until {}", pilot_proto::lifetime::utc(t))?;
        }
        Ok(())
    }
}

/// An owner certificate, in `cert show`, `cert install` and `owner sign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// The node it certifies.
    pub node_id: String,
    /// The owner's public key.
    pub owner: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Unix time it was signed.
    pub issued_at: u64,
    /// Unix time it ends.
    pub expires_at: u64,
    /// Valid now for this node (`owner sign`: for the node named).
    pub valid: bool,
}

/// `identity rotate`: the identity retired and the one that continues it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRotated {
    /// The retired node id (refused by the registry and the peers from now
    /// on).
    pub old_node_id: String,
    /// The new node id.
    pub new_node_id: String,
    /// How many rotations this node has made, this one included.
    pub rotation: u64,
    /// The overlay address, which stays.
    pub address: String,
    /// Peers whose trust moves to the new id (they are told through the
    /// registry, signed by both keys).
    pub peers_told: usize,
}

/// A policy rule, in `policy list` and `policy allow`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    /// Its id (for `policy remove`; never reused).
    pub id: u32,
    /// The owner whose certificates it trusts.
    pub owner: String,
    /// The tag a certificate must carry.
    pub tag: String,
    /// What a matching peer may open here.
    pub ports: Scope,
    /// Unix time it ends (absent: never).
    pub expires_at: Option<u64>,
}

/// The answer to `owner revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationReport {
    /// The owner that revoked.
    pub owner: String,
    /// The node revoked (with every successor).
    pub node_id: String,
    /// True if the registry took it (it spreads it to every node online).
    pub delivered: bool,
    /// Why it did not, if it did not.
    pub delivery_error: Option<String>,
    /// True if this node keeps it (a rule of this node names the owner).
    pub kept_here: bool,
    /// Peers this node withdrew its approval from because of it.
    pub withdrawn: Vec<String>,
}

/// The owner key `owner new` wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerKeyInfo {
    /// The public key, for `policy allow --owner`.
    pub owner: String,
    /// Where the secret key is (mode 0600).
    pub file: String,
}

/// The answer to `explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The peer's node id.
    pub peer: String,
    /// Its hostname.
    pub hostname: Option<String>,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// The trust state between us.
    pub state: TrustState,
    /// The traffic judged, as given (`tcp/22`), if any.
    pub traffic: Option<String>,
    /// What the peer may open on us, and the verdict on `traffic`.
    pub inbound: DirectionExplained,
    /// What we may open on the peer, and the verdict on `traffic`.
    pub outbound: DirectionExplained,
}

/// One direction of an [`Explanation`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionExplained {
    /// What is open now (`none` unless both sides approve).
    pub scope: Scope,
    /// When the earliest part of it ends, if it does.
    pub until: Option<u64>,
    /// Whether `traffic` would pass (absent without `traffic`).
    pub passes: Option<bool>,
    /// What decided: `manual grant`, `the peer's grant`, `rule 3`, or why
    /// nothing passes (`not granted`, `not trusted: pending`, `revoked`).
    pub decided_by: String,
}

/// Where a peer's packets go: a UDP endpoint, or the relay. In JSON,
/// "ip:port" or "relay".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// Straight to this UDP endpoint.
    Direct(SocketAddr),
    /// Through the relay.
    Relay,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Direct(a) => write!(f, "{a}"),
            Endpoint::Relay => f.write_str("relay"),
        }
    }
}

impl Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "relay" {
            return Ok(Endpoint::Relay);
        }
        s.parse().map(Endpoint::Direct).map_err(|_| {
            serde::de::Error::custom(format!("{s:?} is neither \"relay\" nor an ip:port"))
        })
    }
}

/// The kind of a peer's path, in [`Peer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Straight to the peer.
    Direct,
    /// Through the relay.
    Relay,
}

impl From<pilot_proto::path::Path> for Endpoint {
    fn from(p: pilot_proto::path::Path) -> Endpoint {
        match p {
            pilot_proto::path::Path::Direct(a) => Endpoint::Direct(a),
            pilot_proto::path::Path::Relay => Endpoint::Relay,
        }
    }
}

impl From<Endpoint> for PathKind {
    fn from(e: Endpoint) -> PathKind {
        match e {
            Endpoint::Direct(_) => PathKind::Direct,
            Endpoint::Relay => PathKind::Relay,
        }
    }
}

/// The trust state between us and another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrustState {
    /// Both approved: packets flow.
    Trusted,
    /// It asked us; we have not answered.
    Pending,
    /// We asked (or approved); it has not answered.
    Requested,
    /// We approved; it refused.
    DeniedByPeer,
    /// We approved; it withdrew its approval.
    RevokedByPeer,
    /// We refused.
    Denied,
    /// We withdrew our approval.
    Revoked,
    /// No decision either way.
    None,
}

impl TrustState {
    /// The state from our decision and theirs.
    pub fn of(ours: trust::Decision, theirs: trust::Decision) -> TrustState {
        use trust::Decision as D;
        match (ours, theirs) {
            (D::Approved, D::Approved) => TrustState::Trusted,
            (D::None, D::Approved) => TrustState::Pending,
            (D::Approved, D::None) => TrustState::Requested,
            (D::Approved, D::Denied) => TrustState::DeniedByPeer,
            (D::Approved, D::Revoked) => TrustState::RevokedByPeer,
            (D::Denied, _) => TrustState::Denied,
            (D::Revoked, _) => TrustState::Revoked,
            (D::None, D::None | D::Denied | D::Revoked) => TrustState::None,
        }
    }
}

impl fmt::Display for TrustState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The serde name is the word the CLI shows.
        let v = serde_json::to_value(self).unwrap_or_default();
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// One side's decision, in [`TrustEntry`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Nothing said yet.
    None,
    /// Approved (by a request or an approval).
    Approved,
    /// Refused a request.
    Denied,
    /// Withdrew an earlier approval.
    Revoked,
}

impl From<trust::Decision> for Decision {
    fn from(d: trust::Decision) -> Decision {
        match d {
            trust::Decision::None => Decision::None,
            trust::Decision::Approved => Decision::Approved,
            trust::Decision::Denied => Decision::Denied,
            trust::Decision::Revoked => Decision::Revoked,
        }
    }
}

/// One request in the answer to `trust pending`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRequest {
    /// The asking node's id.
    pub node_id: String,
    /// Its hostname.
    pub hostname: Option<String>,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// The note on its request.
    pub note: Option<String>,
    /// What it asks to open on us, if it said. (Absent from older daemons.)
    #[serde(default)]
    pub want: Option<Scope>,
    /// What it lets us open on it. (Absent from older daemons.)
    #[serde(default)]
    pub offers: Option<GrantView>,
}

/// One record in the answer to `trust list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustEntry {
    /// The node's id.
    pub node_id: String,
    /// Its hostname.
    pub hostname: Option<String>,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// The trust state between us.
    pub state: TrustState,
    /// Our decision about it.
    pub ours: Decision,
    /// Its decision about us.
    pub theirs: Decision,
    /// What it may open on us, while we approve it. (Absent from older
    /// daemons.)
    #[serde(default)]
    pub granted: Option<GrantView>,
    /// What we may open on it, while it approves us. (Absent from older
    /// daemons.)
    #[serde(default)]
    pub granted_us: Option<GrantView>,
}

/// The answer to `trust request|approve|deny|revoke`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustChange {
    /// The peer's node id.
    pub peer: String,
    /// Its hostname.
    pub hostname: Option<String>,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// The trust state now.
    pub state: TrustState,
    /// True if packets may flow now.
    pub trusted: bool,
    /// True if the registry took the statement for the peer.
    pub delivered: bool,
    /// Why it did not (a withdrawal still took effect here).
    pub delivery_error: Option<String>,
}

/// The answer to `ping`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PingReport {
    /// The peer's node id.
    pub peer: String,
    /// Its hostname.
    pub hostname: Option<String>,
    /// Its overlay address.
    pub address: Ipv4Addr,
    /// The path after the last echo.
    pub path: Option<Endpoint>,
    /// Why it is relayed, when it is.
    pub relay_reason: Option<String>,
    /// One entry per echo: the round trip in milliseconds, or null if no
    /// answer came.
    pub rtt_ms: Vec<Option<f64>>,
}

impl PingReport {
    /// True if at least one echo came back.
    pub fn answered(&self) -> bool {
        self.rtt_ms.iter().any(Option::is_some)
    }
}

/// The answer to `down`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopping {
    /// Always true: the daemon is stopping.
    pub stopping: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    const ID_A: &str = "140a67f3f7622d9b6c1aea0abb8702a5";
    const ID_B: &str = "5f0b6d8e2c4a19377a1e0c9d3b2f4e61";

    fn status() -> Status {
        Status {
            address: Ipv4Addr::new(10, 77, 92, 132),
            network: Some("10.77.0.0/16".into()),
            node_id: ID_A.into(),
            hostname: Some("alpha".into()),
            listen: Some("0.0.0.0:41641".parse().unwrap()),
            registry: RegistryStatus {
                url: "pilot://3d436da5a0f1c1e1d2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6b32a61@203.0.113.5:7946".into(),
                reachable: true,
                last_contact_secs: Some(4),
                observed_endpoint: Some("198.51.100.7:41641".parse().unwrap()),
                endpoint: Some("203.0.113.5:7946".parse().unwrap()),
            },
            relay: "203.0.113.5:7946".parse().unwrap(),
            nat: Nat::EndpointIndependent,
            public_endpoint: Some("198.51.100.7:41641".parse().unwrap()),
            peers: PeerCounts {
                known: 3,
                trusted: 2,
                connected: 1,
            },
            pending_requests: 1,
            cipher: Cipher::Aes256Gcm,
            offload: Offload { udp_gso: true },
            pid: 19505,
            uptime_secs: 3600,
            drops: DropCounts {
                auth: 0,
                replay: 2,
                inner_address: 0,
                untrusted_handshake: 5,
                bad_handshake: 1,
                rate_limited: 0,
                cookie_sent: 0,
                refused_local: 3,
                malformed: 0,
                queue_full: 0,
                policy_in: 0,
                policy_out: 1,
            },
            mtu: 1380,
            mtu_cap: None,
            underlay_below_mtu_floor: false,
            too_big: TooBigCounts {
                icmp_sent: 2,
                fragmented_inner: 0,
                fragmented_outer: 2,
                send_failed: 0,
            },
            port_mapping: Some("203.0.113.10:41641".parse().unwrap()),
            port_mapping_protocol: Some(PortMappingProtocol::Pcp),
            dns: Some(DnsStatus {
                address: "10.77.92.132:53".parse().unwrap(),
                interface: "pilot0".into(),
                domain: "pilot".into(),
                host_resolver: "none".into(),
                hint: Some(DNS_HINT_EXAMPLE.into()),
                names: 3,
                answered: 12,
                dropped_not_local: 0,
            }),
            address6: Some("fd3c:9a41:7e02::a4d:5c84".parse().unwrap()),
            network6: Some("fd3c:9a41:7e02::/48".into()),
            tcp_relay: Some(TcpRelayStatus {
                address: "203.0.113.5:443".parse().unwrap(),
                since_secs: 95,
                why: TCP_WHY_EXAMPLE.into(),
            }),
            gossip: Some(GossipStatus {
                records: 2,
                records_taken: 5,
                answered: 1,
                found: 1,
                passed_on: 0,
                applied: 0,
                refused: 0,
            }),
        }
    }

    const TCP_WHY_EXAMPLE: &str =
        "no UDP answer from the registry at 203.0.113.5:7946: UDP looks blocked";

    const DNS_HINT_EXAMPLE: &str = "systemd-resolved is not running: add `nameserver 10.77.92.132` as the first line of /etc/resolv.conf (or run `pilot-tun dns print`)";

    fn peers() -> Vec<Peer> {
        vec![
            Peer {
                node_id: ID_B.into(),
                hostname: Some("beta".into()),
                address: Ipv4Addr::new(10, 77, 84, 77),
                trust: TrustState::Trusted,
                endpoint: Some(Endpoint::Direct("192.0.2.12:33967".parse().unwrap())),
                path: Some(PathKind::Direct),
                relay_reason: None,
                rtt_ms: Some(0.191),
                session: true,
                last_handshake_secs: Some(12),
                rx_bytes: 252,
                tx_bytes: 279,
                mtu: Some(1380),
                path_mtu: Some(1440),
                path_mtu_state: Some("confirmed".into()),
                granted: Some(all()),
                granted_us: Some(scoped()),
                address6: Some("fd3c:9a41:7e02::a4d:544d".parse().unwrap()),
                relay_transport: None,
            },
            Peer {
                node_id: "9a1c0e5d7b3f42618e0d2c4b6a8f1e3d".into(),
                hostname: Some("gamma".into()),
                address: Ipv4Addr::new(10, 77, 116, 1),
                trust: TrustState::Trusted,
                endpoint: Some(Endpoint::Relay),
                path: Some(PathKind::Relay),
                relay_reason: Some("both NATs map per destination".into()),
                rtt_ms: Some(1.25),
                session: true,
                last_handshake_secs: Some(40),
                rx_bytes: 1_048_576,
                tx_bytes: 65_536,
                mtu: Some(1360),
                path_mtu: Some(1440),
                path_mtu_state: Some("searching".into()),
                granted: Some(all()),
                granted_us: Some(all()),
                address6: Some("fd3c:9a41:7e02::a4d:7401".parse().unwrap()),
                relay_transport: None,
            },
            Peer {
                node_id: "0b7e2d4f6a8c1e3f5a7c9e1b3d5f7a9c".into(),
                hostname: None,
                address: Ipv4Addr::new(10, 77, 3, 9),
                trust: TrustState::Pending,
                endpoint: None,
                path: None,
                relay_reason: None,
                rtt_ms: None,
                session: false,
                last_handshake_secs: None,
                rx_bytes: 0,
                tx_bytes: 0,
                mtu: None,
                path_mtu: None,
                path_mtu_state: None,
                granted: None,
                granted_us: Some(all()),
                address6: Some("fd3c:9a41:7e02::a4d:309".parse().unwrap()),
                relay_transport: None,
            },
            Peer {
                node_id: "d41c8e2a6f0b3d5c7e9a1b3c5d7e9f0a".into(),
                hostname: Some("delta".into()),
                address: Ipv4Addr::new(10, 77, 40, 2),
                trust: TrustState::Trusted,
                endpoint: Some(Endpoint::Relay),
                path: Some(PathKind::Relay),
                relay_reason: Some(TCP_WHY_EXAMPLE.into()),
                rtt_ms: Some(2.4),
                session: true,
                last_handshake_secs: Some(8),
                rx_bytes: 4096,
                tx_bytes: 2048,
                mtu: Some(1360),
                path_mtu: None,
                path_mtu_state: Some("searching".into()),
                granted: Some(all()),
                granted_us: Some(all()),
                address6: Some("fd3c:9a41:7e02::a4d:2802".parse().unwrap()),
                relay_transport: Some("tcp".into()),
            },
        ]
    }

    fn pending() -> Vec<PendingRequest> {
        vec![PendingRequest {
            node_id: ID_A.into(),
            hostname: Some("alpha".into()),
            address: Ipv4Addr::new(10, 77, 92, 132),
            note: Some("build agent needs the cache".into()),
            want: Some("tcp/8080".parse().unwrap()),
            offers: Some(all()),
        }]
    }

    fn all() -> GrantView {
        GrantView {
            scope: Scope::all(),
            expires_at: None,
        }
    }

    fn scoped() -> GrantView {
        GrantView {
            scope: "tcp/8080,icmp".parse().unwrap(),
            expires_at: Some(1_798_675_200),
        }
    }

    const OWNER: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

    fn owner_new() -> OwnerKeyInfo {
        OwnerKeyInfo {
            owner: OWNER.into(),
            file: "owner.key".into(),
        }
    }

    fn cert_info() -> CertInfo {
        CertInfo {
            node_id: ID_A.into(),
            owner: OWNER.into(),
            tags: vec!["build".into(), "ci".into()],
            issued_at: 1_796_083_200,
            expires_at: 1_798_675_200,
            valid: true,
        }
    }

    fn identity_rotated() -> IdentityRotated {
        IdentityRotated {
            old_node_id: ID_A.into(),
            new_node_id: "5c3e0f9d1b2a4c6e8f7a9b0c1d2e3f40".into(),
            rotation: 1,
            address: "10.77.92.132".into(),
            peers_told: 2,
        }
    }

    fn policy_list() -> Vec<PolicyRule> {
        vec![
            PolicyRule {
                id: 1,
                owner: OWNER.into(),
                tag: "build".into(),
                ports: "tcp/8080,icmp".parse().unwrap(),
                expires_at: None,
            },
            PolicyRule {
                id: 3,
                owner: OWNER.into(),
                tag: "ci".into(),
                ports: "tcp/9000-9100".parse().unwrap(),
                expires_at: Some(1_796_169_600),
            },
        ]
    }

    fn revocation_report() -> RevocationReport {
        RevocationReport {
            owner: OWNER.into(),
            node_id: ID_A.into(),
            delivered: true,
            delivery_error: None,
            kept_here: true,
            withdrawn: vec![ID_A.into()],
        }
    }

    fn explanation() -> Explanation {
        Explanation {
            peer: ID_B.into(),
            hostname: Some("beta".into()),
            address: Ipv4Addr::new(10, 77, 84, 77),
            state: TrustState::Trusted,
            traffic: Some("tcp/22".into()),
            inbound: DirectionExplained {
                scope: Scope::all(),
                until: None,
                passes: Some(true),
                decided_by: "manual grant".into(),
            },
            outbound: DirectionExplained {
                scope: "tcp/8080,icmp".parse().unwrap(),
                until: Some(1_798_675_200),
                passes: Some(false),
                decided_by: "not granted".into(),
            },
        }
    }

    fn trust_list() -> Vec<TrustEntry> {
        vec![
            TrustEntry {
                node_id: ID_B.into(),
                hostname: Some("beta".into()),
                address: Ipv4Addr::new(10, 77, 84, 77),
                state: TrustState::Trusted,
                ours: Decision::Approved,
                theirs: Decision::Approved,
                granted: Some(all()),
                granted_us: Some(scoped()),
            },
            TrustEntry {
                node_id: "0b7e2d4f6a8c1e3f5a7c9e1b3d5f7a9c".into(),
                hostname: None,
                address: Ipv4Addr::new(10, 77, 3, 9),
                state: TrustState::Pending,
                ours: Decision::None,
                theirs: Decision::Approved,
                granted: None,
                granted_us: Some(all()),
            },
        ]
    }

    fn trust_change() -> TrustChange {
        TrustChange {
            peer: ID_B.into(),
            hostname: Some("beta".into()),
            address: Ipv4Addr::new(10, 77, 84, 77),
            state: TrustState::Revoked,
            trusted: false,
            delivered: false,
            delivery_error: Some(
                "the registry at 203.0.113.5:7946 is unreachable (no answer); try again when it is up"
                    .into(),
            ),
        }
    }

    fn ping() -> PingReport {
        PingReport {
            peer: ID_B.into(),
            hostname: Some("beta".into()),
            address: Ipv4Addr::new(10, 77, 84, 77),
            path: Some(Endpoint::Direct("192.0.2.12:33967".parse().unwrap())),
            relay_reason: None,
            rtt_ms: vec![Some(0.191), None, Some(0.204)],
        }
    }

    const HASH: &str = "9c1f3e5a7b2d4f6081a3c5e7092b4d6f8a1c3e5b7d9f0a2c4e6081b3d5f7a9c1";
    const HEAD: &str = "1300:4be0c2f1d3a5e7f9b1c3d5e7f90a2b4c6d8e0f1a3b5c7d9e1f2a4b6c8d0e2f41";

    fn audit_show() -> AuditShow {
        AuditShow {
            entries: vec![
                AuditEntry {
                    seq: 1314,
                    time: 1_750_000_000,
                    utc: "2025-06-15T15:06:40Z".into(),
                    kind: "approve".into(),
                    details: json!({
                        "address": "10.77.92.132",
                        "delivered": true,
                        "hostname": "alpha",
                        "kind": "approve",
                        "peer": ID_A,
                        "seq": 1_750_000_000_123_456u64,
                        "state": "trusted",
                        "statement": HASH,
                    }),
                    file: "/var/lib/pilot-tun/audit.jsonl".into(),
                    line: 15,
                },
                AuditEntry {
                    seq: 1315,
                    time: 1_750_000_021,
                    utc: "2025-06-15T15:07:01Z".into(),
                    kind: "handshake-refused-count".into(),
                    details: json!({
                        "count": 212,
                        "minute": 1_749_999_960u64,
                        "reason": "rate-limited",
                        "source": "198.51.100.7",
                    }),
                    file: "/var/lib/pilot-tun/audit.jsonl".into(),
                    line: 16,
                },
            ],
            unreadable: vec![],
        }
    }

    fn audit_verify() -> AuditVerify {
        let problem = "changed after it was written (the next line recorded another hash for it)";
        AuditVerify {
            ok: false,
            files: vec![
                "/var/lib/pilot-tun/audit.jsonl.1".into(),
                "/var/lib/pilot-tun/audit.jsonl".into(),
            ],
            key: "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29".into(),
            first_seq: Some(0),
            lines: 1316,
            signed_head: Some(HEAD.into()),
            unsigned_after: 15,
            expect_head: None,
            problem: Some(format!("/var/lib/pilot-tun/audit.jsonl line 17: {problem}")),
            bad_line: Some(AuditLine {
                file: "/var/lib/pilot-tun/audit.jsonl".into(),
                line: 17,
                problem: problem.into(),
            }),
            damaged: vec![],
        }
    }

    fn audit_head() -> AuditHead {
        AuditHead {
            head: HEAD.into(),
            seq: 1300,
            unsigned_after: 16,
        }
    }

    fn netcheck() -> Netcheck {
        Netcheck {
            registry: "203.0.113.5:7946".parse().unwrap(),
            udp: true,
            registry_key_ok: Some(true),
            nat: Nat::EndpointIndependent,
            public_endpoint: Some("198.51.100.7:40112".parse().unwrap()),
            public_endpoint_alt: Some("198.51.100.7:40112".parse().unwrap()),
            registry_rtt_ms: vec![Some(12.41), Some(11.87), Some(12.02)],
            relay: Some(RelayCheck {
                addr: "203.0.113.6:7946".parse().unwrap(),
                rtt_ms: vec![Some(14.2), None, Some(13.9)],
            }),
            port_mapping: PortMapping {
                gateway: Some(Ipv4Addr::new(192, 168, 1, 1)),
                nat_pmp: true,
                pcp: false,
                external_address: Some(Ipv4Addr::new(198, 51, 100, 7)),
            },
            daemon: Some(DaemonNet {
                nat: Nat::EndpointIndependent,
                public_endpoint: Some("198.51.100.7:41641".parse().unwrap()),
                registry_reachable: true,
            }),
            problem: None,
        }
    }

    fn error() -> ErrorReport {
        ErrorReport {
            ok: false,
            error: "no pilot-tun daemon is running for state directory /var/lib/pilot-tun (start one with `sudo pilot-tun up`, or name its directory with --state-dir)".into(),
            code: ErrorCode::NotRunning,
        }
    }

    /// Every `--json` document, by the name of its block in the README.
    fn examples() -> Vec<(&'static str, String)> {
        fn pretty<T: Serialize>(v: &T) -> String {
            serde_json::to_string_pretty(v).unwrap()
        }
        vec![
            ("status", pretty(&status())),
            ("peers", pretty(&peers())),
            ("trust-pending", pretty(&pending())),
            ("trust-list", pretty(&trust_list())),
            ("trust-change", pretty(&trust_change())),
            ("ping", pretty(&ping())),
            ("explain", pretty(&explanation())),
            ("owner-new", pretty(&owner_new())),
            ("cert", pretty(&cert_info())),
            ("policy-list", pretty(&policy_list())),
            ("owner-revoke", pretty(&revocation_report())),
            ("identity-rotate", pretty(&identity_rotated())),
            ("down", pretty(&Stopping { stopping: true })),
            ("audit-show", pretty(&audit_show())),
            ("audit-verify", pretty(&audit_verify())),
            ("audit-head", pretty(&audit_head())),
            ("netcheck", pretty(&netcheck())),
            ("error", pretty(&error())),
        ]
    }

    /// The ```json block after `<!-- schema: NAME -->` in the README.
    fn readme_block(readme: &str, name: &str) -> String {
        let marker = format!("<!-- schema: {name} -->");
        let at = readme
            .find(&marker)
            .unwrap_or_else(|| panic!("README.md has no {marker}"));
        let rest = &readme[at + marker.len()..];
        let start = rest
            .find("```json\n")
            .expect("a ```json block after the marker")
            + 8;
        let end = rest[start..].find("\n```").expect("the block ends");
        rest[start..start + end].to_string()
    }

    fn readme() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        std::fs::read_to_string(path).expect("README.md")
    }

    #[test]
    fn readme_documents_every_json_output_exactly() {
        let readme = readme();
        for (name, json) in examples() {
            assert_eq!(
                readme_block(&readme, name),
                json,
                "README.md's {name} example differs from what the code prints"
            );
        }
    }

    /// Round trip through the types: nothing lost, nothing added.
    fn round_trip<T: Serialize + serde::de::DeserializeOwned>(v: &T) {
        let text = serde_json::to_string(v).unwrap();
        let back: T = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
    }

    #[test]
    fn every_document_round_trips() {
        round_trip(&status());
        round_trip(&peers());
        round_trip(&pending());
        round_trip(&trust_list());
        round_trip(&trust_change());
        round_trip(&ping());
        round_trip(&explanation());
        round_trip(&owner_new());
        round_trip(&cert_info());
        round_trip(&policy_list());
        round_trip(&revocation_report());
        round_trip(&identity_rotated());
        round_trip(&error());
        round_trip(&audit_show());
        round_trip(&audit_verify());
        round_trip(&audit_head());
        round_trip(&netcheck());
    }

    #[test]
    fn the_fields_scripts_read_keep_their_names() {
        // netns-tests/*.sh and scripts/*.sh read these; renaming one breaks them.
        let s = serde_json::to_value(status()).unwrap();
        for k in [
            "address", "pid", "listen", "drops", "relay", "nat", "node_id",
        ] {
            assert!(s.get(k).is_some(), "status.{k}");
        }
        assert_eq!(s["registry"]["reachable"], true);
        assert_eq!(s["offload"]["udp_gso"], true);
        for k in ["untrusted_handshake", "bad_handshake", "replay", "auth"] {
            assert!(s["drops"].get(k).is_some(), "status.drops.{k}");
        }
        let p = serde_json::to_value(peers()).unwrap();
        assert_eq!(p[0]["endpoint"], "192.0.2.12:33967");
        assert_eq!(p[0]["path"], "direct");
        assert_eq!(p[1]["endpoint"], "relay");
        assert_eq!(p[1]["path"], "relay");
        assert_eq!(p[1]["relay_reason"], "both NATs map per destination");
        for k in ["hostname", "trust", "session", "tx_bytes"] {
            assert!(p[0].get(k).is_some(), "peers[].{k}");
        }
        let t = serde_json::to_value(trust_list()).unwrap();
        assert_eq!(t[0]["state"], "trusted");
        assert_eq!(t[0]["hostname"], "beta");
        let q = serde_json::to_value(pending()).unwrap();
        assert_eq!(q[0]["hostname"], "alpha");
    }

    #[test]
    fn requests_on_the_socket() {
        let cases = [
            (Request::Status, json!({"cmd": "status"})),
            (Request::Peers, json!({"cmd": "peers"})),
            (
                Request::TrustRequest {
                    peer: "beta".into(),
                    note: "hi".into(),
                    allow: None,
                    expires_in_secs: None,
                    want: None,
                },
                json!({"cmd": "trust_request", "peer": "beta", "note": "hi"}),
            ),
            (Request::TrustPending, json!({"cmd": "trust_pending"})),
            (
                Request::TrustApprove {
                    peer: "a".into(),
                    allow: None,
                    expires_in_secs: None,
                },
                json!({"cmd": "trust_approve", "peer": "a"}),
            ),
            (
                Request::TrustDeny { peer: "a".into() },
                json!({"cmd": "trust_deny", "peer": "a"}),
            ),
            (
                Request::TrustRevoke { peer: "a".into() },
                json!({"cmd": "trust_revoke", "peer": "a"}),
            ),
            (Request::TrustList, json!({"cmd": "trust_list"})),
            (
                Request::Ping {
                    peer: "beta".into(),
                    count: 3,
                },
                json!({"cmd": "ping", "peer": "beta", "count": 3}),
            ),
            (Request::Down, json!({"cmd": "down"})),
        ];
        for (req, want) in cases {
            assert_eq!(serde_json::to_value(&req).unwrap(), want);
            assert_eq!(serde_json::from_value::<Request>(want).unwrap(), req);
        }
    }

    #[test]
    fn envelopes_on_the_socket() {
        let ok: Response = Ok(Reply::Down(Stopping { stopping: true }));
        let line = serde_json::to_string(&Envelope::of(&ok)).unwrap();
        assert_eq!(line, r#"{"ok":true,"data":{"stopping":true}}"#);
        let back: Envelope = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_response(&Request::Down).unwrap(), ok);

        let err: Response = Err(ApiError::new(ErrorCode::UnknownPeer, "cannot find zeta"));
        let line = serde_json::to_string(&Envelope::of(&err)).unwrap();
        assert_eq!(
            line,
            r#"{"ok":false,"error":"cannot find zeta","code":"unknown_peer"}"#
        );
        let back: Envelope = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_response(&Request::Status).unwrap(), err);

        // A daemon from before the codes: `data: null` and no code.
        let old: Envelope =
            serde_json::from_str(r#"{"ok":false,"error":"nope","data":null}"#).unwrap();
        assert_eq!(
            old.into_response(&Request::Peers).unwrap(),
            Err(ApiError::new(ErrorCode::Failed, "nope"))
        );
    }

    #[test]
    fn replies_decode_by_request() {
        let cases: Vec<(Request, Reply)> = vec![
            (Request::Status, Reply::Status(Box::new(status()))),
            (Request::Peers, Reply::Peers(peers())),
            (Request::TrustPending, Reply::Pending(pending())),
            (Request::TrustList, Reply::TrustList(trust_list())),
            (
                Request::TrustRevoke {
                    peer: "beta".into(),
                },
                Reply::Trust(trust_change()),
            ),
            (
                Request::Ping {
                    peer: "beta".into(),
                    count: 3,
                },
                Reply::Ping(ping()),
            ),
            (Request::Down, Reply::Down(Stopping { stopping: true })),
        ];
        for (req, reply) in cases {
            let v = serde_json::to_value(&reply).unwrap();
            assert_eq!(Reply::decode(&req, v).unwrap(), reply, "{req:?}");
        }
        // The wrong document for the request is an error, not a guess.
        let v = serde_json::to_value(peers()).unwrap();
        assert!(Reply::decode(&Request::Status, v).is_err());
        let s: Status = Reply::Status(Box::new(status())).try_into().unwrap();
        assert_eq!(s, status());
        assert!(Vec::<Peer>::try_from(Reply::Down(Stopping { stopping: true })).is_err());
    }

    #[test]
    fn endpoint_text() {
        for (text, e) in [
            ("relay", Endpoint::Relay),
            (
                "192.0.2.1:7",
                Endpoint::Direct("192.0.2.1:7".parse().unwrap()),
            ),
            (
                "[2001:db8::1]:7",
                Endpoint::Direct("[2001:db8::1]:7".parse().unwrap()),
            ),
        ] {
            assert_eq!(serde_json::to_value(e).unwrap(), text);
            assert_eq!(serde_json::from_value::<Endpoint>(json!(text)).unwrap(), e);
        }
        for bad in [json!("direct"), json!(""), json!(7), json!("192.0.2.1")] {
            assert!(
                serde_json::from_value::<Endpoint>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn words_match_pilot_proto() {
        use pilot_proto::identity::Identity;
        use pilot_proto::trust::{Decision as D, TrustRecord};
        let all = [D::None, D::Approved, D::Denied, D::Revoked];
        for ours in all {
            for theirs in all {
                let rec = TrustRecord {
                    ours,
                    theirs,
                    ..TrustRecord::new(
                        Identity::from_bytes(&[7; 64]).public(),
                        Ipv4Addr::new(10, 77, 0, 1),
                        None,
                    )
                };
                let state = TrustState::of(ours, theirs);
                assert_eq!(state.to_string(), rec.state(), "{ours:?}/{theirs:?}");
                assert_eq!(serde_json::to_value(state).unwrap(), rec.state());
            }
            assert_eq!(
                serde_json::to_value(Decision::from(ours)).unwrap(),
                format!("{ours:?}").to_lowercase()
            );
        }
        for n in [
            NatType::Unknown,
            NatType::None,
            NatType::EndpointIndependent,
            NatType::PerDestination,
        ] {
            assert_eq!(serde_json::to_value(Nat::from(n)).unwrap(), n.name());
        }
        assert_eq!(
            serde_json::to_value(Cipher::from(CipherSuite::Aes256Gcm)).unwrap(),
            "aes-256-gcm"
        );
        assert_eq!(
            serde_json::to_value(Cipher::from(CipherSuite::ChaCha20Poly1305)).unwrap(),
            "chacha20-poly1305"
        );
    }

    #[test]
    fn exit_codes_are_stable() {
        let want = [
            (ErrorCode::Failed, "failed", 1),
            (ErrorCode::Usage, "usage", 2),
            (ErrorCode::NotRunning, "not_running", 3),
            (ErrorCode::PermissionDenied, "permission_denied", 4),
            (ErrorCode::Timeout, "timeout", 5),
            (ErrorCode::RegistryUnreachable, "registry_unreachable", 5),
            (ErrorCode::Protocol, "protocol", 1),
            (ErrorCode::UnknownPeer, "unknown_peer", 1),
            (ErrorCode::NotTrusted, "not_trusted", 1),
            (ErrorCode::InvalidRequest, "invalid_request", 1),
            (ErrorCode::AlreadyRunning, "already_running", 1),
            (ErrorCode::NoTun, "no_tun", 1),
            (ErrorCode::StartFailed, "start_failed", 1),
        ];
        let readme = readme();
        for (code, word, exit) in want {
            assert_eq!(serde_json::to_value(code).unwrap(), Value::from(word));
            assert_eq!(code.exit_code(), exit, "{word}");
            let row = format!("| `{word}` | {exit} |");
            assert!(readme.contains(&row), "README.md lacks the row {row:?}");
        }
    }
}
