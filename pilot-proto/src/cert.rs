//! Owner certificates and owner revocations: the signatures that let one
//! operator key vouch for many nodes at once.
//!
//! An operator keeps an [`OwnerKey`] (Ed25519) off the nodes. It signs a
//! [`Certificate`] binding a node id to a few [`Tag`]s for a bounded time;
//! nodes whose policy rules name that owner and one of those tags admit the
//! node without an approval. It signs a [`Revocation`] to withdraw a node id
//! (and every successor of it) for good. The registry may carry both, but it
//! cannot make either: only the owner key can.
//!
//! Both objects have a versioned binary form (a version byte, then postcard)
//! for the wire and an armoured text form for files.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};

use crate::armor::{self, ArmorError};
use crate::hex;
use crate::identity::{self, NodeId};
use crate::lifetime::{self, DAY};

/// Lifetime of a certificate when the operator gives none.
pub const DEFAULT_LIFETIME: u64 = 30 * DAY;
/// Longest lifetime a certificate may have: certificates always expire, and
/// renewal is signing again.
pub const MAX_LIFETIME: u64 = 365 * DAY;
/// Most tags on one certificate. Small, because the certificate travels in
/// the handshake payload and must leave room in one datagram.
pub const MAX_TAGS: usize = 8;
/// Longest tag, in bytes.
pub const MAX_TAG_LEN: usize = 32;
/// How far ahead of our clock a certificate's issue time may be: the owner's
/// host and ours do not agree to the second.
pub const CLOCK_SKEW: u64 = 300;
/// Largest encoded certificate or revocation (the largest possible one is
/// about 400 bytes).
pub const MAX_ENCODED: usize = 512;

const CERT_VERSION: u8 = 1;
const REVOCATION_VERSION: u8 = 1;
const CERT_DOMAIN: &[u8] = b"pilot-tun/v1/owner-certificate";
const REVOCATION_DOMAIN: &[u8] = b"pilot-tun/v1/owner-revocation";
const OWNER_PREFIX: &str = "pilot-owner:";
const OWNER_SECRET_PREFIX: &str = "pilot-owner-secret:";
const CERT_LABEL: &str = "CERTIFICATE";
const REVOCATION_LABEL: &str = "REVOCATION";

/// An owner's secret signing key. Never on a node.
pub struct OwnerKey {
    signing: SigningKey,
}

impl OwnerKey {
    /// The key from its 32 secret bytes (fresh keys pass 32 random bytes).
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        OwnerKey {
            signing: SigningKey::from_bytes(secret),
        }
    }

    /// The 32 secret bytes.
    pub fn secret(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// The public half, which nodes name in their rules.
    pub fn public(&self) -> OwnerPublic {
        OwnerPublic(self.signing.verifying_key().to_bytes())
    }

    /// The key file's text: `pilot-owner-secret:<64 hex digits>` and a newline.
    pub fn to_text(&self) -> String {
        format!("{OWNER_SECRET_PREFIX}{}\n", hex::encode(&self.secret()))
    }

    /// Reads [`OwnerKey::to_text`].
    pub fn from_text(text: &str) -> Result<Self, BadOwnerKey> {
        text.trim()
            .strip_prefix(OWNER_SECRET_PREFIX)
            .and_then(hex::decode_array::<32>)
            .map(|s| OwnerKey::from_secret(&s))
            .ok_or(BadOwnerKey::Secret)
    }

    /// Signs `msg` under `domain`, framed like [`identity::Identity::sign`]
    /// so that [`identity::verify`] checks it.
    fn sign(&self, domain: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(domain.len() + 1 + msg.len());
        buf.extend_from_slice(domain);
        buf.push(0);
        buf.extend_from_slice(msg);
        self.signing.sign(&buf).to_bytes().to_vec()
    }
}

/// Shows only the public half: a secret never reaches a log.
impl fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerKey({})", self.public())
    }
}

/// An owner's public key; printed as `pilot-owner:<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerPublic(pub [u8; 32]);

impl fmt::Display for OwnerPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{OWNER_PREFIX}{}", hex::encode(&self.0))
    }
}

impl fmt::Debug for OwnerPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerPublic({self})")
    }
}

/// A string is not an owner key.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadOwnerKey {
    /// Not `pilot-owner:<64 hex digits>`.
    #[error("not an owner public key (expected pilot-owner: and 64 hex digits)")]
    Public,
    /// Not `pilot-owner-secret:<64 hex digits>`.
    #[error("not an owner key file (expected pilot-owner-secret: and 64 hex digits)")]
    Secret,
}

impl FromStr for OwnerPublic {
    type Err = BadOwnerKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .strip_prefix(OWNER_PREFIX)
            .and_then(hex::decode_array::<32>)
            .map(OwnerPublic)
            .ok_or(BadOwnerKey::Public)
    }
}

/// Text in human-readable formats (JSON state files), 32 raw bytes on the wire.
impl Serialize for OwnerPublic {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for OwnerPublic {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(OwnerPublic(<[u8; 32]>::deserialize(d)?))
        }
    }
}

/// A tag: 1 to [`MAX_TAG_LEN`] of `a-z`, `0-9` and `-`, not starting or
/// ending with `-` (a DNS label, shorter). Checked on every construction,
/// decoding included.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

/// A tag or tag list is malformed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// An empty tag (`build,,ci`).
    #[error("empty tag")]
    Empty,
    /// Longer than [`MAX_TAG_LEN`].
    #[error("tag '{0}' is longer than {MAX_TAG_LEN} characters")]
    TooLong(String),
    /// A character outside `a-z0-9-`, or `-` at an end.
    #[error("tag '{0}' may hold only a-z, 0-9 and '-' (not at either end)")]
    Syntax(String),
    /// More than [`MAX_TAGS`].
    #[error("{0} tags; a certificate carries at most {MAX_TAGS}")]
    TooMany(usize),
}

impl Tag {
    /// The tag's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Tag {
    type Error = TagError;
    fn try_from(s: String) -> Result<Self, TagError> {
        if s.is_empty() {
            return Err(TagError::Empty);
        }
        if s.len() > MAX_TAG_LEN {
            return Err(TagError::TooLong(s));
        }
        let ok = s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok || s.starts_with('-') || s.ends_with('-') {
            return Err(TagError::Syntax(s));
        }
        Ok(Tag(s))
    }
}

impl From<Tag> for String {
    fn from(t: Tag) -> String {
        t.0
    }
}

impl FromStr for Tag {
    type Err = TagError;
    fn from_str(s: &str) -> Result<Self, TagError> {
        Tag::try_from(s.to_string())
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tag({})", self.0)
    }
}

/// Parses a comma-separated tag list (`build,ci`) into sorted, distinct tags.
pub fn parse_tags(list: &str) -> Result<Vec<Tag>, TagError> {
    let mut tags = list
        .split(',')
        .map(|t| t.trim().parse())
        .collect::<Result<Vec<Tag>, _>>()?;
    tags.sort();
    tags.dedup();
    if tags.len() > MAX_TAGS {
        return Err(TagError::TooMany(tags.len()));
    }
    Ok(tags)
}

/// Bytes are not a certificate or revocation.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Empty input.
    #[error("empty input")]
    Empty,
    /// A format version this build does not know.
    #[error("unknown format version {0} (this build reads version 1)")]
    Version(u8),
    /// More than [`MAX_ENCODED`] bytes.
    #[error("{0} bytes is too large for a certificate or revocation")]
    TooLarge(usize),
    /// Malformed, truncated, or a malformed tag inside.
    #[error("malformed: {0}")]
    Malformed(#[from] postcard::Error),
    /// Bytes after the object.
    #[error("{0} unexpected bytes after the object")]
    Trailing(usize),
    /// More than [`MAX_TAGS`] tags.
    #[error("{0} tags; a certificate carries at most {MAX_TAGS}")]
    TooManyTags(usize),
    /// The text armour is broken.
    #[error(transparent)]
    Armor(#[from] ArmorError),
}

/// Decodes `version byte || postcard(T)`, refusing anything else.
fn decode_versioned<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    version: u8,
) -> Result<T, DecodeError> {
    let (&v, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if bytes.len() > MAX_ENCODED {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    if v != version {
        return Err(DecodeError::Version(v));
    }
    let (value, trailing) = postcard::take_from_bytes(rest)?;
    if !trailing.is_empty() {
        return Err(DecodeError::Trailing(trailing.len()));
    }
    Ok(value)
}

fn encode_versioned<T: Serialize>(value: &T, version: u8) -> Vec<u8> {
    let mut out = vec![version];
    // postcard encoding of our own plain structs into a Vec cannot fail.
    out.extend(postcard::to_allocvec(value).expect("encode own object"));
    out
}

fn body_bytes<T: Serialize>(body: &T) -> Vec<u8> {
    // As above: encoding our own plain struct cannot fail.
    postcard::to_allocvec(body).expect("encode own object")
}

/// What a certificate says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertBody {
    /// The owner that signs it.
    pub owner: OwnerPublic,
    /// The node it is about.
    pub node: NodeId,
    /// The node's tags, sorted and distinct.
    pub tags: Vec<Tag>,
    /// Unix time it was signed.
    pub issued_at: u64,
    /// Unix time from which it is no longer valid.
    pub expires_at: u64,
}

/// A certificate: an owner's signed statement that a node carries some tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// What is certified.
    pub body: CertBody,
    /// The owner's Ed25519 signature over the domain and `postcard(body)`.
    pub sig: Vec<u8>,
}

/// The owner refused to sign a certificate.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IssueError {
    /// Longer than [`MAX_LIFETIME`].
    #[error("a certificate lives at most 365d; {} asked (renew by signing again)", lifetime::format(*.0))]
    TooLong(u64),
    /// A lifetime of zero.
    #[error("a certificate needs a lifetime of at least 1s")]
    Zero,
    /// No tags: a certificate that matches no rule is useless.
    #[error("a certificate needs at least one tag")]
    NoTags,
    /// More than [`MAX_TAGS`].
    #[error(transparent)]
    Tags(#[from] TagError),
}

/// A certificate was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// Signed by (or naming) another owner than the rule's.
    #[error("certificate is from owner {found}, not {expected}")]
    WrongOwner {
        /// The owner the rule names.
        expected: OwnerPublic,
        /// The owner the certificate names.
        found: OwnerPublic,
    },
    /// The signature is not the owner's over these contents.
    #[error("certificate signature is invalid (forged or altered)")]
    BadSignature,
    /// About another node.
    #[error("certificate is for node {cert_for}, not {peer}")]
    OtherNode {
        /// Whom the certificate names.
        cert_for: NodeId,
        /// Who presented it.
        peer: NodeId,
    },
    /// Past its expiry.
    #[error("certificate expired at {}", lifetime::utc(*.0))]
    Expired(u64),
    /// Issued in the future (beyond [`CLOCK_SKEW`]).
    #[error("certificate is not valid before {} (check the clocks)", lifetime::utc(*.0))]
    NotYetValid(u64),
    /// Its validity is longer than [`MAX_LIFETIME`], or negative.
    #[error("certificate validity is longer than 365 days or ends before it starts")]
    BadLifetime,
    /// More than [`MAX_TAGS`] tags (only a hand-built value can have them:
    /// decoding refuses them).
    #[error("certificate carries more than {MAX_TAGS} tags")]
    TooManyTags,
}

/// A certificate that passed [`Certificate::verify`] for one node at one
/// time. Only verification makes one, so a value of this type is proof.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedCert {
    cert: Certificate,
    holder: NodeId,
}

impl VerifiedCert {
    /// The owner that vouches.
    pub fn owner(&self) -> &OwnerPublic {
        &self.cert.body.owner
    }
    /// The tags it grants.
    pub fn tags(&self) -> &[Tag] {
        &self.cert.body.tags
    }
    /// Unix time it stops being valid.
    pub fn expires_at(&self) -> u64 {
        self.cert.body.expires_at
    }
    /// The node it was verified for: the certified node, or a verified
    /// successor of it.
    pub fn holder(&self) -> NodeId {
        self.holder
    }
    /// The certificate itself.
    pub fn certificate(&self) -> &Certificate {
        &self.cert
    }
}

impl Certificate {
    /// Signs a certificate for `node` with `tags`, valid from `issued_at`
    /// for `lifetime` seconds (at most [`MAX_LIFETIME`]).
    pub fn issue(
        owner: &OwnerKey,
        node: NodeId,
        mut tags: Vec<Tag>,
        issued_at: u64,
        lifetime: u64,
    ) -> Result<Self, IssueError> {
        if lifetime == 0 {
            return Err(IssueError::Zero);
        }
        if lifetime > MAX_LIFETIME {
            return Err(IssueError::TooLong(lifetime));
        }
        tags.sort();
        tags.dedup();
        if tags.is_empty() {
            return Err(IssueError::NoTags);
        }
        if tags.len() > MAX_TAGS {
            return Err(TagError::TooMany(tags.len()).into());
        }
        let body = CertBody {
            owner: owner.public(),
            node,
            tags,
            issued_at,
            expires_at: issued_at.saturating_add(lifetime),
        };
        let sig = owner.sign(CERT_DOMAIN, &body_bytes(&body));
        Ok(Certificate { body, sig })
    }

    /// Checks that this certificate, signed by `owner`, names `node` and is
    /// valid at `now`.
    pub fn verify(
        &self,
        owner: &OwnerPublic,
        node: &NodeId,
        now: u64,
    ) -> Result<VerifiedCert, CertError> {
        self.verify_inherited(owner, node, &[], now)
    }

    /// Like [`Certificate::verify`], but also accepts a certificate for any
    /// id in `ancestry`: the verified predecessors of `node` (from the
    /// succession chain, oldest first). A certificate follows its node
    /// through identity rotations until it expires: the owner vouched for
    /// whoever holds the node's key, a succession proves that holder moved to
    /// the new key, and the expiry bounds how long that proof is trusted
    /// without the owner looking again.
    pub fn verify_inherited(
        &self,
        owner: &OwnerPublic,
        node: &NodeId,
        ancestry: &[NodeId],
        now: u64,
    ) -> Result<VerifiedCert, CertError> {
        let b = &self.body;
        if &b.owner != owner {
            return Err(CertError::WrongOwner {
                expected: *owner,
                found: b.owner,
            });
        }
        if !identity::verify(&owner.0, CERT_DOMAIN, &body_bytes(b), &self.sig) {
            return Err(CertError::BadSignature);
        }
        if &b.node != node && !ancestry.contains(&b.node) {
            return Err(CertError::OtherNode {
                cert_for: b.node,
                peer: *node,
            });
        }
        if b.expires_at <= b.issued_at || b.expires_at - b.issued_at > MAX_LIFETIME {
            return Err(CertError::BadLifetime);
        }
        if b.tags.len() > MAX_TAGS {
            return Err(CertError::TooManyTags);
        }
        if now >= b.expires_at {
            return Err(CertError::Expired(b.expires_at));
        }
        if now.saturating_add(CLOCK_SKEW) < b.issued_at {
            return Err(CertError::NotYetValid(b.issued_at));
        }
        Ok(VerifiedCert {
            cert: self.clone(),
            holder: *node,
        })
    }

    /// The versioned binary form (at most [`MAX_ENCODED`] bytes).
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self, CERT_VERSION)
    }

    /// Reads [`Certificate::to_bytes`]; never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let cert: Certificate = decode_versioned(bytes, CERT_VERSION)?;
        if cert.body.tags.len() > MAX_TAGS {
            return Err(DecodeError::TooManyTags(cert.body.tags.len()));
        }
        Ok(cert)
    }

    /// The file form: armoured bytes under a readable summary.
    pub fn to_armored(&self) -> String {
        let b = &self.body;
        let tags: Vec<&str> = b.tags.iter().map(Tag::as_str).collect();
        let comments = [
            format!("node    {}", b.node),
            format!("tags    {}", tags.join(",")),
            format!("owner   {}", b.owner),
            format!(
                "valid   {} .. {}",
                lifetime::utc(b.issued_at),
                lifetime::utc(b.expires_at)
            ),
        ];
        armor::encode(CERT_LABEL, &comments, &self.to_bytes())
    }

    /// Reads [`Certificate::to_armored`].
    pub fn from_armored(text: &str) -> Result<Self, DecodeError> {
        Self::from_bytes(&armor::decode(CERT_LABEL, text)?)
    }

    /// SHA-256 of the binary form, to name it in logs.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.to_bytes())
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What a revocation says: "node X is withdrawn, as of T".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    /// The owner that revokes.
    pub owner: OwnerPublic,
    /// The node withdrawn, with every successor it has or will have.
    pub node: NodeId,
    /// Unix time it was signed (for humans and ordering; a revocation never
    /// lapses).
    pub revoked_at: u64,
}

/// An owner's signed withdrawal of a node id. It is permanent: a node whose
/// key leaked comes back as a new identity with a new certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// What is revoked.
    pub body: RevocationBody,
    /// The owner's Ed25519 signature over the domain and `postcard(body)`.
    pub sig: Vec<u8>,
}

/// A revocation was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    /// From another owner than the one asked about.
    #[error("revocation is from owner {found}, not {expected}")]
    WrongOwner {
        /// The owner the caller trusts.
        expected: OwnerPublic,
        /// The owner the revocation names.
        found: OwnerPublic,
    },
    /// The signature is not the owner's.
    #[error("revocation signature is invalid (forged or altered)")]
    BadSignature,
}

impl Revocation {
    /// Signs the withdrawal of `node` at `revoked_at`.
    pub fn sign(owner: &OwnerKey, node: NodeId, revoked_at: u64) -> Self {
        let body = RevocationBody {
            owner: owner.public(),
            node,
            revoked_at,
        };
        let sig = owner.sign(REVOCATION_DOMAIN, &body_bytes(&body));
        Revocation { body, sig }
    }

    /// Checks that `owner` signed this revocation.
    pub fn verify(&self, owner: &OwnerPublic) -> Result<(), RevocationError> {
        if &self.body.owner != owner {
            return Err(RevocationError::WrongOwner {
                expected: *owner,
                found: self.body.owner,
            });
        }
        if !identity::verify(
            &owner.0,
            REVOCATION_DOMAIN,
            &body_bytes(&self.body),
            &self.sig,
        ) {
            return Err(RevocationError::BadSignature);
        }
        Ok(())
    }

    /// True if this (verified) revocation applies to `node`, whose verified
    /// predecessors are `ancestry` (from its succession chain): revoking an
    /// id revokes every successor of it, so a rotation cannot escape it.
    pub fn covers(&self, node: &NodeId, ancestry: &[NodeId]) -> bool {
        &self.body.node == node || ancestry.contains(&self.body.node)
    }

    /// The versioned binary form.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self, REVOCATION_VERSION)
    }

    /// Reads [`Revocation::to_bytes`]; never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned(bytes, REVOCATION_VERSION)
    }

    /// The file form.
    pub fn to_armored(&self) -> String {
        let b = &self.body;
        let comments = [
            format!("revoked node {}", b.node),
            format!("by owner     {}", b.owner),
            format!("at           {}", lifetime::utc(b.revoked_at)),
        ];
        armor::encode(REVOCATION_LABEL, &comments, &self.to_bytes())
    }

    /// Reads [`Revocation::to_armored`].
    pub fn from_armored(text: &str) -> Result<Self, DecodeError> {
        Self::from_bytes(&armor::decode(REVOCATION_LABEL, text)?)
    }

    /// SHA-256 of the binary form, to name it in logs.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_750_000_000;

    fn owner(n: u8) -> OwnerKey {
        OwnerKey::from_secret(&[n; 32])
    }

    fn node(n: u8) -> NodeId {
        NodeId([n; 16])
    }

    fn tags(list: &str) -> Vec<Tag> {
        parse_tags(list).unwrap()
    }

    fn cert(o: &OwnerKey, n: NodeId) -> Certificate {
        Certificate::issue(o, n, tags("ci,build"), NOW, DEFAULT_LIFETIME).unwrap()
    }

    #[test]
    fn issued_certificate_verifies_and_says_what_was_signed() {
        let o = owner(1);
        let c = cert(&o, node(7));
        let v = c.verify(&o.public(), &node(7), NOW + 10).unwrap();
        assert_eq!(v.owner(), &o.public());
        assert_eq!(v.tags(), &tags("build,ci")[..]);
        assert_eq!(v.expires_at(), NOW + 30 * DAY);
        assert_eq!(v.holder(), node(7));
    }

    #[test]
    fn wrong_owner_is_refused_whether_named_or_only_signed() {
        let (o, other) = (owner(1), owner(2));
        let c = cert(&o, node(7));
        assert_eq!(
            c.verify(&other.public(), &node(7), NOW),
            Err(CertError::WrongOwner {
                expected: other.public(),
                found: o.public()
            })
        );
        // Signed by `other` but claiming to be from `o`.
        let mut forged = cert(&other, node(7));
        forged.body.owner = o.public();
        assert_eq!(
            forged.verify(&o.public(), &node(7), NOW),
            Err(CertError::BadSignature)
        );
    }

    #[test]
    fn time_limits_are_enforced() {
        let o = owner(1);
        let c = cert(&o, node(7));
        let p = o.public();
        let end = NOW + DEFAULT_LIFETIME;
        assert!(c.verify(&p, &node(7), end - 1).is_ok());
        assert_eq!(c.verify(&p, &node(7), end), Err(CertError::Expired(end)));
        assert_eq!(
            c.verify(&p, &node(7), u64::MAX),
            Err(CertError::Expired(end))
        );
        // A little clock skew is forgiven, more is not.
        assert!(c.verify(&p, &node(7), NOW - CLOCK_SKEW).is_ok());
        assert_eq!(
            c.verify(&p, &node(7), NOW - CLOCK_SKEW - 1),
            Err(CertError::NotYetValid(NOW))
        );
        assert_eq!(c.verify(&p, &node(7), 0), Err(CertError::NotYetValid(NOW)));
    }

    #[test]
    fn lifetimes_are_bounded_when_signing_and_when_verifying() {
        let o = owner(1);
        assert_eq!(
            Certificate::issue(&o, node(1), tags("a"), NOW, MAX_LIFETIME + 1),
            Err(IssueError::TooLong(MAX_LIFETIME + 1))
        );
        assert_eq!(
            Certificate::issue(&o, node(1), tags("a"), NOW, 0),
            Err(IssueError::Zero)
        );
        assert!(Certificate::issue(&o, node(1), tags("a"), NOW, MAX_LIFETIME).is_ok());
        assert_eq!(
            Certificate::issue(&o, node(1), vec![], NOW, DAY),
            Err(IssueError::NoTags)
        );
        // A certificate some other tool signed for ten years is refused,
        // even though the owner's signature is good.
        let mut body = cert(&o, node(1)).body;
        body.expires_at = NOW + 3650 * DAY;
        let long = Certificate {
            sig: o.sign(CERT_DOMAIN, &body_bytes(&body)),
            body,
        };
        assert_eq!(
            long.verify(&o.public(), &node(1), NOW),
            Err(CertError::BadLifetime)
        );
        let mut body = cert(&o, node(1)).body;
        body.expires_at = body.issued_at;
        let empty = Certificate {
            sig: o.sign(CERT_DOMAIN, &body_bytes(&body)),
            body,
        };
        assert_eq!(
            empty.verify(&o.public(), &node(1), NOW),
            Err(CertError::BadLifetime)
        );
    }

    #[test]
    fn tampering_with_any_field_breaks_the_signature() {
        let o = owner(1);
        let p = o.public();
        let c = cert(&o, node(7));
        let mut t = c.clone();
        t.body.tags.push("admin".parse().unwrap());
        assert_eq!(t.verify(&p, &node(7), NOW), Err(CertError::BadSignature));
        let mut t = c.clone();
        t.body.tags[0] = "prod".parse().unwrap();
        assert_eq!(t.verify(&p, &node(7), NOW), Err(CertError::BadSignature));
        let mut t = c.clone();
        t.body.expires_at += 1;
        assert_eq!(t.verify(&p, &node(7), NOW), Err(CertError::BadSignature));
        let mut t = c.clone();
        t.body.issued_at -= 1;
        assert_eq!(t.verify(&p, &node(7), NOW), Err(CertError::BadSignature));
        let mut t = c.clone();
        t.body.node = node(8);
        assert_eq!(t.verify(&p, &node(8), NOW), Err(CertError::BadSignature));
        let mut t = c.clone();
        t.sig[10] ^= 1;
        assert_eq!(t.verify(&p, &node(7), NOW), Err(CertError::BadSignature));
        let mut t = c;
        t.sig.truncate(63);
        assert_eq!(t.verify(&p, &node(7), NOW), Err(CertError::BadSignature));
    }

    #[test]
    fn another_nodes_certificate_is_refused() {
        let o = owner(1);
        let c = cert(&o, node(7));
        assert_eq!(
            c.verify(&o.public(), &node(8), NOW),
            Err(CertError::OtherNode {
                cert_for: node(7),
                peer: node(8)
            })
        );
    }

    #[test]
    fn a_certificate_follows_its_node_through_successions_only() {
        let o = owner(1);
        let c = cert(&o, node(1));
        let p = o.public();
        // node(3) succeeded node(2), which succeeded node(1).
        let v = c
            .verify_inherited(&p, &node(3), &[node(1), node(2)], NOW)
            .unwrap();
        assert_eq!(v.holder(), node(3));
        // ... until it expires.
        assert!(matches!(
            c.verify_inherited(&p, &node(3), &[node(1), node(2)], NOW + DEFAULT_LIFETIME),
            Err(CertError::Expired(_))
        ));
        // A chain that does not contain the certified node proves nothing.
        assert!(matches!(
            c.verify_inherited(&p, &node(3), &[node(2)], NOW),
            Err(CertError::OtherNode { .. })
        ));
    }

    #[test]
    fn tag_syntax() {
        for good in ["a", "build", "ci-2", "0", &"x".repeat(MAX_TAG_LEN)] {
            assert!(good.parse::<Tag>().is_ok(), "{good}");
        }
        assert_eq!("".parse::<Tag>(), Err(TagError::Empty));
        let long = "x".repeat(MAX_TAG_LEN + 1);
        assert_eq!(long.parse::<Tag>(), Err(TagError::TooLong(long.clone())));
        for bad in ["Build", "-a", "a-", "a_b", "a.b", "a b", "é", "a,b"] {
            assert_eq!(
                bad.parse::<Tag>(),
                Err(TagError::Syntax(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(parse_tags("ci, build,ci").unwrap(), tags("build,ci"));
        assert_eq!(parse_tags("a,,b"), Err(TagError::Empty));
        assert_eq!(parse_tags("a,b,c,d,e,f,g,h,i"), Err(TagError::TooMany(9)));
        assert_eq!(parse_tags("a,b,c,d,e,f,g,h").unwrap().len(), MAX_TAGS);
    }

    #[test]
    fn binary_and_armored_forms_round_trip() {
        let o = owner(1);
        let c = Certificate::issue(
            &o,
            node(7),
            tags(
                &(0..MAX_TAGS)
                    .map(|i| format!("{i}{}", "t".repeat(MAX_TAG_LEN - 1)))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            u64::MAX - MAX_LIFETIME,
            MAX_LIFETIME,
        )
        .unwrap();
        let bytes = c.to_bytes();
        assert!(bytes.len() <= MAX_ENCODED, "{} bytes", bytes.len());
        assert_eq!(bytes[0], CERT_VERSION);
        assert_eq!(Certificate::from_bytes(&bytes).unwrap(), c);
        let text = c.to_armored();
        assert!(text.contains("-----BEGIN PILOT-TUN CERTIFICATE-----"));
        assert!(text.contains(&format!("# node    {}", node(7))));
        assert_eq!(Certificate::from_armored(&text).unwrap(), c);
        // The summary lines are not trusted: editing them changes nothing.
        let edited = text.replace("# node    ", "# node    ffff");
        assert_eq!(Certificate::from_armored(&edited).unwrap(), c);
        assert!(matches!(
            Revocation::from_armored(&text),
            Err(DecodeError::Armor(ArmorError::NoBegin(_)))
        ));
    }

    #[test]
    fn truncated_extended_or_foreign_bytes_are_refused() {
        let o = owner(1);
        let bytes = cert(&o, node(7)).to_bytes();
        for n in 0..bytes.len() {
            assert!(Certificate::from_bytes(&bytes[..n]).is_err(), "prefix {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            Certificate::from_bytes(&longer),
            Err(DecodeError::Trailing(1))
        ));
        let mut v2 = bytes.clone();
        v2[0] = 2;
        assert!(matches!(
            Certificate::from_bytes(&v2),
            Err(DecodeError::Version(2))
        ));
        assert!(matches!(
            Certificate::from_bytes(&vec![1; MAX_ENCODED + 1]),
            Err(DecodeError::TooLarge(_))
        ));
        // A bad tag inside signed bytes is refused at decoding.
        let mut bad = cert(&o, node(7));
        bad.body.tags = vec![Tag("Not-Valid".into())];
        assert!(matches!(
            Certificate::from_bytes(&bad.to_bytes()),
            Err(DecodeError::Malformed(_))
        ));
        let mut many = cert(&o, node(7));
        many.body.tags = (0..=MAX_TAGS).map(|i| Tag(format!("t{i}"))).collect();
        assert!(matches!(
            Certificate::from_bytes(&many.to_bytes()),
            Err(DecodeError::TooManyTags(9))
        ));
        assert_eq!(
            many.verify(&o.public(), &node(7), NOW),
            Err(CertError::BadSignature)
        );
    }

    #[test]
    fn owner_key_text_forms() {
        let o = owner(5);
        let p = o.public();
        let text = p.to_string();
        assert!(text.starts_with("pilot-owner:") && text.len() == 12 + 64);
        assert_eq!(text.parse::<OwnerPublic>(), Ok(p));
        assert_eq!(
            "pilot-owner:zz".parse::<OwnerPublic>(),
            Err(BadOwnerKey::Public)
        );
        assert_eq!(
            hex::encode(&p.0).parse::<OwnerPublic>(),
            Err(BadOwnerKey::Public)
        );
        let secret = o.to_text();
        assert_eq!(OwnerKey::from_text(&secret).unwrap().public(), p);
        assert!(
            OwnerKey::from_text(&text).is_err(),
            "a public key is no secret"
        );
        assert!(!format!("{o:?}").contains(&hex::encode(&o.secret())));
    }

    #[test]
    fn revocation_verifies_only_for_its_owner_and_covers_successors() {
        let (o, other) = (owner(1), owner(2));
        let r = Revocation::sign(&o, node(1), NOW);
        assert_eq!(r.verify(&o.public()), Ok(()));
        assert_eq!(
            r.verify(&other.public()),
            Err(RevocationError::WrongOwner {
                expected: other.public(),
                found: o.public()
            })
        );
        // Made by `other`, claiming to be from `o`.
        let mut forged = Revocation::sign(&other, node(1), NOW);
        forged.body.owner = o.public();
        assert_eq!(
            forged.verify(&o.public()),
            Err(RevocationError::BadSignature)
        );
        // Retargeted at another node.
        let mut moved = r.clone();
        moved.body.node = node(2);
        assert_eq!(
            moved.verify(&o.public()),
            Err(RevocationError::BadSignature)
        );
        assert!(r.covers(&node(1), &[]));
        assert!(r.covers(&node(3), &[node(1), node(2)]));
        assert!(r.covers(&node(3), &[node(2), node(1)]));
        assert!(!r.covers(&node(2), &[]));
        assert!(!r.covers(&node(3), &[node(2)]));
    }

    #[test]
    fn revocation_forms_round_trip_and_refuse_garbage() {
        let r = Revocation::sign(&owner(1), node(1), NOW);
        assert_eq!(Revocation::from_bytes(&r.to_bytes()).unwrap(), r);
        assert_eq!(Revocation::from_armored(&r.to_armored()).unwrap(), r);
        let bytes = r.to_bytes();
        for n in 0..bytes.len() {
            assert!(Revocation::from_bytes(&bytes[..n]).is_err());
        }
        // A certificate's bytes are not a revocation: the version byte
        // matches, but the layout does not.
        let c = cert(&owner(1), node(1)).to_bytes();
        assert!(Revocation::from_bytes(&c).is_err());
        assert_ne!(r.digest(), [0; 32]);
    }

    proptest::proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Certificate::from_bytes(&bytes);
            let _ = Revocation::from_bytes(&bytes);
            let mut v1 = bytes.clone();
            v1.insert(0, 1);
            let _ = Certificate::from_bytes(&v1);
            let _ = Revocation::from_bytes(&v1);
        }

        #[test]
        fn flipping_any_bit_of_a_certificate_is_caught(pos in 0usize..400, bit in 0u8..8) {
            let o = owner(1);
            let c = cert(&o, node(7));
            let mut bytes = c.to_bytes();
            let pos = pos % bytes.len();
            bytes[pos] ^= 1 << bit;
            if let Ok(d) = Certificate::from_bytes(&bytes) {
                // It decoded into something else: it must not verify as
                // the original node's certificate with the original tags.
                let v = d.verify(&o.public(), &node(7), NOW);
                proptest::prop_assert!(v.is_err() || d == c);
            }
        }
    }
}
