//! The registry control protocol.
//!
//! Control messages travel inside an ordinary tunnel session between a node
//! and the registry (Noise IK towards the registry's pinned key), so they are
//! encrypted, authenticated and replay-protected like data. On top of that,
//! everything that changes state is signed by the node's identity and carries
//! a sequence number that must grow ([`Signed`]): the registry stores and
//! forwards trust statements, but it cannot forge one, and an old statement
//! replayed later is refused by the registry and by the receiving node.
//!
//! Encoding is `postcard`; [`decode`] never panics on hostile bytes.

use std::net::{Ipv4Addr, SocketAddr};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cert::{OwnerPublic, Tag};
use crate::identity::{self, Identity, NodeId, PublicIdentity};
use crate::policy::Grant;
use crate::ports::Scope;

/// Longest note on a trust request, in bytes.
pub const MAX_NOTE: usize = 256;
/// Most endpoints a node lists or a registry returns.
pub const MAX_ENDPOINTS: usize = 8;
/// Largest control message, so one always fits one datagram.
pub const MAX_MESSAGE: usize = 1200;

const STATEMENT_DOMAIN: &[u8] = b"pilot-tun/v1/statement";
const REGISTRATION_DOMAIN: &[u8] = b"pilot-tun/v1/registration";

/// A control message could not be decoded or encoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Malformed bytes.
    #[error("malformed control message: {0}")]
    Decode(#[from] postcard::Error),
    /// Encoded message too large for one datagram.
    #[error("control message too large ({0} bytes)")]
    TooLarge(usize),
}

/// Decodes a control message; trailing bytes are refused.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let (v, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(CodecError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(v)
}

/// Encodes a control message.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let v = postcard::to_allocvec(msg)?;
    if v.len() > MAX_MESSAGE {
        return Err(CodecError::TooLarge(v.len()));
    }
    Ok(v)
}

/// A value and its signer's signature over its encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed<T> {
    /// The signed value.
    pub body: T,
    /// Ed25519 signature over the domain and `postcard(body)`.
    pub sig: Vec<u8>,
}

/// A value that knows its signature domain and signer.
pub trait Signable: Serialize {
    /// Signature domain of this kind of value.
    const DOMAIN: &'static [u8];
    /// The identity that must have signed it.
    fn signer(&self) -> &PublicIdentity;
}

impl<T: Signable> Signed<T> {
    /// Signs `body` with `id`. The caller makes sure `body.signer()` is `id`.
    pub fn sign(body: T, id: &Identity) -> Self {
        // postcard encoding of our own plain structs cannot fail.
        let bytes = postcard::to_allocvec(&body).expect("encode own message");
        let sig = id.sign(T::DOMAIN, &bytes);
        Signed { body, sig }
    }

    /// True if the signature is the signer's and the signer's tunnel key is
    /// bound to it.
    pub fn verify(&self) -> bool {
        let Ok(bytes) = postcard::to_allocvec(&self.body) else {
            return false;
        };
        let signer = self.body.signer();
        signer.binding_valid() && identity::verify(&signer.ed_public, T::DOMAIN, &bytes, &self.sig)
    }
}

/// What a trust statement says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatementKind {
    /// "I approve you, and ask you to approve me", with a note for the
    /// operator on the other side.
    Request {
        /// Free text shown in `trust pending`.
        note: String,
    },
    /// "I approve you" (answer to a request).
    Approve,
    /// "I refuse your request."
    Deny,
    /// "I no longer trust you." Ends any session at once.
    Revoke,
    /// `Request` with a scope: what the signer lets the peer open on it
    /// (and until when), and what it would like to open on the peer (shown
    /// to the operator there; asking grants nothing). Sent only when a
    /// scope or an expiry is given, so nodes that predate scopes still read
    /// every plain request.
    RequestScoped {
        /// Free text shown in `trust pending`.
        note: String,
        /// What the peer may open on the signer.
        allow: Grant,
        /// What the signer asks to open on the peer.
        want: Option<Scope>,
    },
    /// `Approve` with a scope and an expiry (see `RequestScoped`).
    ApproveScoped {
        /// What the peer may open on the signer.
        allow: Grant,
    },
    /// "My policy rules admit your certificate: I approve you with this
    /// grant; here is my certificate, so that yours may admit me." Made by
    /// the signer's node itself, never typed; the receiver checks `cert`
    /// against its own rules before it answers in kind.
    Policy {
        /// The signer's owner certificate ([`crate::cert::Certificate::to_bytes`]).
        cert: Vec<u8>,
        /// What the peer may open on the signer (the union of the signer's
        /// matching rules, ending no later than the receiver's certificate).
        allow: Grant,
    },
    /// "I continue the identity named in `succession` (signed by it and by
    /// me), and I approve you as it did." Made by a node's daemon after
    /// `identity rotate`, for every peer its old identity approved; the
    /// receiver moves its record of the old id to the signer only if the
    /// succession verifies and its new id is the signer. Added last, so the
    /// kinds above keep their wire encoding.
    Succeed {
        /// The succession statement ([`crate::succession::Succession::to_bytes`]).
        succession: Vec<u8>,
        /// What the peer may open on the signer (as the old id granted).
        allow: Grant,
        /// The signer's owner certificate, when policy rules made the
        /// approval (issued to an id of its lineage).
        cert: Option<Vec<u8>>,
    },
}

impl StatementKind {
    /// A request granting `allow` and asking for `want`, in the plain form
    /// when it grants everything for good and asks nothing in particular.
    pub fn request(note: String, allow: Grant, want: Option<Scope>) -> Self {
        if allow == Grant::everything() && want.is_none() {
            StatementKind::Request { note }
        } else {
            StatementKind::RequestScoped { note, allow, want }
        }
    }

    /// An approval granting `allow`, in the plain form when that is
    /// everything for good.
    pub fn approve(allow: Grant) -> Self {
        if allow == Grant::everything() {
            StatementKind::Approve
        } else {
            StatementKind::ApproveScoped { allow }
        }
    }

    /// True for the statements that grant trust.
    pub fn approves(&self) -> bool {
        self.grant().is_some()
    }

    /// What the signer lets the peer open on it: everything for the plain
    /// forms, nothing (`None`) for a refusal or a withdrawal.
    pub fn grant(&self) -> Option<Grant> {
        match self {
            StatementKind::Request { .. } | StatementKind::Approve => Some(Grant::everything()),
            StatementKind::RequestScoped { allow, .. }
            | StatementKind::ApproveScoped { allow }
            | StatementKind::Policy { allow, .. }
            | StatementKind::Succeed { allow, .. } => Some(allow.clone()),
            StatementKind::Deny | StatementKind::Revoke => None,
        }
    }

    /// The note of a request.
    pub fn note(&self) -> Option<&str> {
        match self {
            StatementKind::Request { note } | StatementKind::RequestScoped { note, .. } => {
                Some(note)
            }
            _ => None,
        }
    }

    /// What a request asks to open on the receiver, if it says.
    pub fn want(&self) -> Option<&Scope> {
        match self {
            StatementKind::RequestScoped { want, .. } => want.as_ref(),
            _ => None,
        }
    }

    /// A short name for logs and the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            StatementKind::Request { .. } | StatementKind::RequestScoped { .. } => "request",
            StatementKind::Approve | StatementKind::ApproveScoped { .. } => "approve",
            StatementKind::Policy { .. } => "policy",
            StatementKind::Succeed { .. } => "succeed",
            StatementKind::Deny => "deny",
            StatementKind::Revoke => "revoke",
        }
    }
}

/// A trust decision of one node about another, signed by the first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// What is said.
    pub kind: StatementKind,
    /// Who says it (must be the signer).
    pub from: PublicIdentity,
    /// About whom.
    pub to: NodeId,
    /// Grows with every statement `from` makes; a receiver refuses one that
    /// is not newer than the last it accepted from the same signer.
    pub seq: u64,
}

impl Signable for Statement {
    const DOMAIN: &'static [u8] = STATEMENT_DOMAIN;
    fn signer(&self) -> &PublicIdentity {
        &self.from
    }
}

/// A node's registration: proves it holds both keys, names it, lists where
/// it can be reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The node's public identity.
    pub identity: PublicIdentity,
    /// Hostname to claim (first come), if any.
    pub hostname: Option<String>,
    /// Grows with every registration; an older one is refused.
    pub seq: u64,
    /// UDP endpoints on the node's own interfaces (candidates for peers).
    pub local_endpoints: Vec<SocketAddr>,
    /// How the node's NAT maps, as far as it could tell.
    pub nat: NatType,
}

/// How a node's NAT (if any) maps its UDP socket to public endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NatType {
    /// Not measured (yet).
    #[default]
    Unknown,
    /// No NAT: the public endpoint is one of the node's own.
    None,
    /// One public endpoint for every destination ("easy" NAT): hole
    /// punching works.
    EndpointIndependent,
    /// A different public port per destination ("hard", symmetric NAT):
    /// hole punching towards it rarely works; relay.
    PerDestination,
}

impl NatType {
    /// A short name for the CLI.
    pub fn name(self) -> &'static str {
        match self {
            NatType::Unknown => "unknown",
            NatType::None => "none",
            NatType::EndpointIndependent => "endpoint-independent",
            NatType::PerDestination => "per-destination (hard)",
        }
    }
}

impl Signable for Registration {
    const DOMAIN: &'static [u8] = REGISTRATION_DOMAIN;
    fn signer(&self) -> &PublicIdentity {
        &self.identity
    }
}

/// How a CLI user names a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerRef {
    /// A node id.
    Id(NodeId),
    /// An overlay address.
    Addr(Ipv4Addr),
    /// A hostname.
    Name(String),
}

impl std::str::FromStr for PeerRef {
    type Err = std::convert::Infallible;
    /// Node id if it is 32 hex digits, address if it parses as IPv4,
    /// hostname otherwise.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(id) = s.parse::<NodeId>() {
            Ok(PeerRef::Id(id))
        } else if let Ok(a) = s.parse::<Ipv4Addr>() {
            Ok(PeerRef::Addr(a))
        } else {
            Ok(PeerRef::Name(s.to_ascii_lowercase()))
        }
    }
}

impl std::fmt::Display for PeerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerRef::Id(id) => write!(f, "{id}"),
            PeerRef::Addr(a) => write!(f, "{a}"),
            PeerRef::Name(n) => f.write_str(n),
        }
    }
}

/// What the registry tells about a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Keys (the node checks the binding itself).
    pub identity: PublicIdentity,
    /// Permanent overlay address.
    pub address: Ipv4Addr,
    /// Claimed hostname.
    pub hostname: Option<String>,
    /// Where it can be reached; empty unless that node approved the asker.
    pub endpoints: Vec<SocketAddr>,
    /// Its NAT type, as it reported it.
    pub nat: NatType,
}

/// Node to registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToRegistry {
    /// Register (first message of every control session).
    Register {
        /// Request id, echoed in the answer.
        req: u32,
        /// The signed registration.
        reg: Signed<Registration>,
    },
    /// Look up a peer.
    Lookup {
        /// Request id.
        req: u32,
        /// Whom.
        peer: PeerRef,
    },
    /// Hand a signed trust statement to the registry for delivery.
    Statement {
        /// Request id.
        req: u32,
        /// The statement.
        statement: Signed<Statement>,
    },
    /// A pushed item was received and stored; the registry may forget it.
    Ack {
        /// The push id.
        push: u64,
    },
    /// Liveness check (and NAT keepalive).
    Ping {
        /// Request id.
        req: u32,
    },
    /// Publishes this node's owner certificate ([`Certificate::to_bytes`]),
    /// replacing the one published before, so that nodes whose policy
    /// rules name its owner and one of its tags find it. Answered `Ok`, or
    /// `Error(Invalid)` when it does not verify for the sender (its owner's
    /// signature, its holder, its expiry). The registry checks only that it
    /// is well-formed: every node checks a certificate itself before it
    /// trusts anything because of it.
    ///
    /// [`Certificate::to_bytes`]: crate::cert::Certificate::to_bytes
    PublishCert {
        /// Request id.
        req: u32,
        /// The certificate.
        cert: Vec<u8>,
    },
    /// The published certificates from `owner` that carry `tag` and have
    /// not expired, in holder id order, after `after`: answered with
    /// `Certs` (a page; ask again after the last holder while `more`).
    FindCerts {
        /// Request id.
        req: u32,
        /// The owner.
        owner: OwnerPublic,
        /// The tag.
        tag: Tag,
        /// Only holders with a larger node id.
        after: Option<NodeId>,
    },
    /// Hands an owner's revocation ([`Revocation::to_bytes`]) to the
    /// registry, which keeps it for good and sends it at once to every node
    /// with a session (`Revoked`). Answered `Ok`, or `Error(Invalid)` when
    /// its signature does not verify.
    ///
    /// [`Revocation::to_bytes`]: crate::cert::Revocation::to_bytes
    PublishRevocation {
        /// Request id.
        req: u32,
        /// The revocation.
        revocation: Vec<u8>,
    },
    /// The revocations kept from `owner`, in revoked node id order, after
    /// `after`: answered with `Revocations` (a page, as `Certs`).
    FindRevocations {
        /// Request id.
        req: u32,
        /// The owner.
        owner: OwnerPublic,
        /// Only revoked nodes with a larger id.
        after: Option<NodeId>,
    },
    /// Sent by a rotated node before it registers under its new identity,
    /// on a control session that proves the new tunnel key: the succession
    /// ([`crate::succession::Succession::to_bytes`]) moves the old id's
    /// address and hostname to the new id, and the old id is refused from
    /// then on. Answered `Ok` (also for an exact resend), or an error:
    /// `Invalid` (does not verify, or not for this session's key),
    /// `NotFound` (the old id is not registered here) or `Retired` (the
    /// old id already has another successor, or the new one is already
    /// registered).
    Succeed {
        /// Request id.
        req: u32,
        /// The succession statement.
        succession: Vec<u8>,
    },
    /// `Register` with a join token (from the join URL's `?token=`): a
    /// registry started with `--require-token` registers a node id it does
    /// not know only with a valid one, and uses it up by one. A known node
    /// needs none (the token is then not used). Sent only when the node
    /// has a token, so registries that predate tokens still read every
    /// plain registration. Added last, so the variants above keep their
    /// wire encoding.
    RegisterWithToken {
        /// Request id.
        req: u32,
        /// The signed registration.
        reg: Signed<Registration>,
        /// The join token.
        token: [u8; 16],
    },
    /// The answer to [`FromRegistry::PathCheck`], sent from where the
    /// check arrived. Not answered. Added last, as `RegisterWithToken`.
    PathConfirm {
        /// The check's token.
        token: u64,
    },
}

/// Why the registry refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or badly signed.
    Invalid,
    /// Sequence number not newer than one already seen.
    Replayed,
    /// No such node.
    NotFound,
    /// Send `Register` first.
    NotRegistered,
    /// The address pool is exhausted.
    PoolExhausted,
    /// Registry storage failed.
    Internal,
    /// The registry is too busy to take the request now (its storage
    /// queue is full); nothing was stored. Retry after a short pause.
    /// Added last, so the codes above keep their wire encoding.
    Busy,
    /// The identity was succeeded by another (`identity rotate`): it is
    /// refused from then on; its successor holds its address and name.
    Retired,
}

/// Registry to node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromRegistry {
    /// Registration accepted.
    Registered {
        /// Request id.
        req: u32,
        /// The node's permanent address.
        address: Ipv4Addr,
        /// The overlay network's prefix length.
        prefix_len: u8,
        /// The hostname now bound to the node, if any.
        hostname: Option<String>,
        /// Why the requested hostname was not granted, if it was not.
        hostname_refused: Option<String>,
        /// The node's endpoint as the registry sees it.
        observed: SocketAddr,
        /// Relays to use besides the registry's own port (same key).
        relays: Vec<SocketAddr>,
    },
    /// Answer to a lookup.
    Peer {
        /// Request id.
        req: u32,
        /// The peer.
        info: PeerInfo,
    },
    /// Request done.
    Ok {
        /// Request id.
        req: u32,
    },
    /// Request refused.
    Error {
        /// Request id.
        req: u32,
        /// Why.
        code: ErrorCode,
        /// For humans.
        message: String,
    },
    /// Something for the node, kept by the registry until acknowledged.
    Push {
        /// Id to acknowledge.
        id: u64,
        /// What.
        item: PushItem,
    },
    /// A peer is trying to reach this node right now: send handshakes to
    /// these endpoints at once, so both NATs open (hole punching).
    Punch {
        /// The peer (this node approved it).
        peer: NodeId,
        /// Its endpoints.
        endpoints: Vec<SocketAddr>,
        /// Its NAT type.
        nat: NatType,
    },
    /// Answer to a ping.
    Pong {
        /// Request id.
        req: u32,
        /// The node's endpoint as the registry sees it.
        observed: SocketAddr,
    },
    /// Answer to `FindCerts`: certificates ([`Certificate::to_bytes`]),
    /// unverified (check each).
    ///
    /// [`Certificate::to_bytes`]: crate::cert::Certificate::to_bytes
    Certs {
        /// Request id.
        req: u32,
        /// This page, in holder id order.
        certs: Vec<Vec<u8>>,
        /// More follow: ask again after the last holder.
        more: bool,
    },
    /// Answer to `FindRevocations`: revocations, unverified (check each).
    Revocations {
        /// Request id.
        req: u32,
        /// This page, in revoked node id order.
        revocations: Vec<Vec<u8>>,
        /// More follow: ask again after the last revoked node.
        more: bool,
    },
    /// An owner's revocation just handed to the registry, sent once to
    /// every node with a session (not acknowledged: a node that missed it
    /// asks with `FindRevocations` when it connects).
    Revoked {
        /// The revocation, unverified.
        revocation: Vec<u8>,
    },
    /// A return-routability check: the registry heard the node's newest
    /// datagram from this address and moves the node there (its pushes,
    /// its relayed traffic) only once the node answers `PathConfirm` with
    /// the token from that address. Also sent once on each new session: a
    /// node that answers it is held to the check from then on (a node
    /// that predates it ignores the message, and moves as before). Added
    /// last, so the variants above keep their wire encoding.
    PathCheck {
        /// Echoed in `PathConfirm`.
        token: u64,
    },
}

/// What the registry pushes to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushItem {
    /// A trust statement another node made about this one, with the
    /// address and hostname the registry knows the signer by.
    Statement {
        /// The signed statement.
        statement: Signed<Statement>,
        /// The signer's overlay address.
        address: Ipv4Addr,
        /// The signer's hostname.
        hostname: Option<String>,
    },
}

/// Checks a hostname: 1-63 of `a-z`, `0-9`, `-`, not starting or ending
/// with `-`, and not parseable as an address or a node id.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.parse::<Ipv4Addr>().is_err()
        && name.parse::<NodeId>().is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Identity {
        Identity::from_bytes(&[n; 64])
    }

    #[test]
    fn statement_signature_binds_every_field() {
        let a = id(1);
        let b = id(2);
        let st = Statement {
            kind: StatementKind::Request {
                note: "build agent".into(),
            },
            from: a.public(),
            to: b.node_id(),
            seq: 7,
        };
        let signed = Signed::sign(st, &a);
        assert!(signed.verify());

        let mut forged = signed.clone();
        forged.body.kind = StatementKind::Approve;
        assert!(!forged.verify(), "kind changed");
        let mut forged = signed.clone();
        forged.body.seq = 8;
        assert!(!forged.verify(), "seq changed");
        let mut forged = signed.clone();
        forged.body.to = a.node_id();
        assert!(!forged.verify(), "recipient changed");
        // A registry that signs with its own key cannot pass as `a`.
        let mut forged = signed.clone();
        forged.sig = b.sign(
            STATEMENT_DOMAIN,
            &postcard::to_allocvec(&forged.body).unwrap(),
        );
        assert!(!forged.verify(), "signed by someone else");
    }

    #[test]
    fn registration_signature_is_not_a_statement_signature() {
        let a = id(1);
        let reg = Signed::sign(
            Registration {
                identity: a.public(),
                hostname: Some("alpha".into()),
                seq: 1,
                local_endpoints: vec!["192.0.2.1:5000".parse().unwrap()],
                nat: NatType::EndpointIndependent,
            },
            &a,
        );
        assert!(reg.verify());
        let bytes = encode(&ToRegistry::Register { req: 1, reg }).unwrap();
        let back: ToRegistry = decode(&bytes).unwrap();
        let ToRegistry::Register { reg, .. } = back else {
            panic!("wrong variant")
        };
        assert!(reg.verify());
    }

    #[test]
    fn encoding_fixture() {
        // The wire bytes are part of the protocol: pin a small one.
        let bytes = encode(&ToRegistry::Ping { req: 300 }).unwrap();
        assert_eq!(bytes, vec![4, 0xac, 0x02]);
        let bytes = encode(&ToRegistry::Ack { push: 1 }).unwrap();
        assert_eq!(bytes, vec![3, 1]);
    }

    #[test]
    fn a_registration_with_a_token_is_the_last_variant_and_carries_it() {
        let a = id(1);
        let reg = Signed::sign(
            Registration {
                identity: a.public(),
                hostname: None,
                seq: 1,
                local_endpoints: vec![],
                nat: NatType::None,
            },
            &a,
        );
        let plain = encode(&ToRegistry::Register {
            req: 1,
            reg: reg.clone(),
        })
        .unwrap();
        let msg = ToRegistry::RegisterWithToken {
            req: 1,
            reg,
            token: [7; 16],
        };
        let bytes = encode(&msg).unwrap();
        // Variant 10 (after Succeed), then the registration as in
        // `Register`, then the 16 token bytes.
        assert_eq!(bytes[0], 10);
        assert_eq!(bytes[1..bytes.len() - 16], plain[1..]);
        assert_eq!(bytes[bytes.len() - 16..], [7; 16]);
        assert_eq!(decode::<ToRegistry>(&bytes).unwrap(), msg);
    }

    #[test]
    fn path_checks_are_added_last_so_older_variants_keep_their_bytes() {
        // Variant 10 of `FromRegistry` (after `Revoked`) and 11 of
        // `ToRegistry` (after `RegisterWithToken`), then the token as a
        // varint (300 = 0xac 0x02).
        let check = FromRegistry::PathCheck { token: 300 };
        let confirm = ToRegistry::PathConfirm { token: 300 };
        assert_eq!(encode(&check).unwrap(), [10, 0xac, 0x02]);
        assert_eq!(encode(&confirm).unwrap(), [11, 0xac, 0x02]);
        assert_eq!(decode::<FromRegistry>(&[10, 0xac, 0x02]).unwrap(), check);
        assert_eq!(decode::<ToRegistry>(&[11, 0xac, 0x02]).unwrap(), confirm);
        // A variant past the last is an error the reader drops, not a
        // panic: what a node from before the checks does with `PathCheck`.
        assert!(decode::<ToRegistry>(&[12, 1]).is_err());
    }

    #[test]
    fn error_codes_keep_their_wire_bytes() {
        // Variant index on the wire: a new code goes last, the old ones keep
        // their bytes, so older nodes still read every earlier error.
        let codes = [
            ErrorCode::Invalid,
            ErrorCode::Replayed,
            ErrorCode::NotFound,
            ErrorCode::NotRegistered,
            ErrorCode::PoolExhausted,
            ErrorCode::Internal,
            ErrorCode::Busy,
        ];
        for (i, code) in codes.into_iter().enumerate() {
            let bytes = encode(&FromRegistry::Error {
                req: 1,
                code,
                message: String::new(),
            })
            .unwrap();
            assert_eq!(bytes, vec![3, 1, i as u8, 0], "{code:?}");
            assert_eq!(
                decode::<FromRegistry>(&bytes).unwrap(),
                FromRegistry::Error {
                    req: 1,
                    code,
                    message: String::new(),
                }
            );
        }
    }

    #[test]
    fn hostile_bytes_are_errors() {
        assert!(decode::<ToRegistry>(&[]).is_err());
        assert!(decode::<ToRegistry>(&[99]).is_err());
        assert!(decode::<ToRegistry>(&[4, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode::<ToRegistry>(&[4, 1, 0]).is_err(), "trailing byte");
        assert!(decode::<FromRegistry>(&vec![0u8; 5000]).is_err());
    }

    #[test]
    fn peer_ref_parsing() {
        let a = id(1);
        assert_eq!(
            a.node_id().to_string().parse::<PeerRef>().unwrap(),
            PeerRef::Id(a.node_id())
        );
        assert_eq!(
            "10.77.0.5".parse::<PeerRef>().unwrap(),
            PeerRef::Addr(Ipv4Addr::new(10, 77, 0, 5))
        );
        assert_eq!(
            "Builder-1".parse::<PeerRef>().unwrap(),
            PeerRef::Name("builder-1".into())
        );
    }

    #[test]
    fn hostnames() {
        assert!(valid_hostname("agent-7"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("-x"));
        assert!(!valid_hostname("UPPER"));
        assert!(!valid_hostname("10.0.0.1"));
        assert!(!valid_hostname(&"a".repeat(64)));
        assert!(!valid_hostname("a.b"));
    }
}
