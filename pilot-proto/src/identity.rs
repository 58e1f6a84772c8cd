//! Node identities.
//!
//! A node is an Ed25519 key pair; its [`NodeId`] is the first 16 bytes of the
//! SHA-256 of the public key, so an id names exactly one key. The tunnel
//! handshake uses a separate X25519 static key whose public half is bound to
//! the identity by an Ed25519 signature ([`PublicIdentity::binding`]); anyone
//! who knows the identity can check that binding without trusting the registry.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::hex;

/// Signature domain for the X25519 binding.
const BINDING_DOMAIN: &[u8] = b"pilot-tun/v1/static-key-binding";

/// The stable name of a node: SHA-256(Ed25519 public key)[..16].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 16]);

/// Hex text in human-readable formats (JSON state files), 16 raw bytes in
/// binary ones (the wire).
impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            Ok(NodeId(<[u8; 16]>::deserialize(d)?))
        }
    }
}

impl NodeId {
    /// The id of an Ed25519 public key.
    pub fn from_ed25519(public: &[u8; 32]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, public);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest.as_ref()[..16]);
        NodeId(id)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// A string is not a node id.
#[derive(Debug, thiserror::Error)]
#[error("not a node id (expected 32 hex digits)")]
pub struct BadNodeId;

impl FromStr for NodeId {
    type Err = BadNodeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        hex::decode_array::<16>(s).map(NodeId).ok_or(BadNodeId)
    }
}

/// A node's secret keys. Never leaves the state directory, and is wiped
/// from memory when dropped (the Ed25519 key wipes itself).
pub struct Identity {
    signing: SigningKey,
    static_secret: [u8; 32],
    static_public: [u8; 32],
}

/// Length of [`Identity::to_bytes`].
pub const IDENTITY_BYTES: usize = 64;

impl Identity {
    /// Builds an identity from 64 bytes of secret material (32 for Ed25519,
    /// 32 for X25519). Fresh identities pass 64 random bytes.
    pub fn from_bytes(bytes: &[u8; IDENTITY_BYTES]) -> Self {
        let mut ed = Zeroizing::new([0u8; 32]);
        ed.copy_from_slice(&bytes[..32]);
        let mut x = [0u8; 32];
        x.copy_from_slice(&bytes[32..]);
        // StaticSecret wipes itself (and takes `x` by value).
        let secret = x25519_dalek::StaticSecret::from(x);
        x.zeroize();
        let static_public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Identity {
            signing: SigningKey::from_bytes(&ed),
            static_secret: secret.to_bytes(),
            static_public,
        }
    }

    /// The secret material, for the key file (wiped when dropped).
    pub fn to_bytes(&self) -> Zeroizing<[u8; IDENTITY_BYTES]> {
        let mut out = Zeroizing::new([0u8; IDENTITY_BYTES]);
        out[..32].copy_from_slice(self.signing.as_bytes());
        out[32..].copy_from_slice(&self.static_secret);
        out
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_ed25519(&self.ed_public())
    }

    /// The Ed25519 public key.
    pub fn ed_public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The X25519 static public key used by the tunnel handshake.
    pub fn static_public(&self) -> [u8; 32] {
        self.static_public
    }

    /// The X25519 static secret, for the Noise handshake.
    pub fn static_secret(&self) -> &[u8; 32] {
        &self.static_secret
    }

    /// Signs `msg` under a domain string, so a signature made for one purpose
    /// can never be presented as another.
    pub fn sign(&self, domain: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(domain.len() + 1 + msg.len());
        buf.extend_from_slice(domain);
        buf.push(0);
        buf.extend_from_slice(msg);
        self.signing.sign(&buf).to_bytes().to_vec()
    }

    /// The public half, with the signed X25519 binding.
    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            ed_public: self.ed_public(),
            static_public: self.static_public,
            binding: self.sign(BINDING_DOMAIN, &self.static_public),
        }
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.static_secret.zeroize();
    }
}

impl ZeroizeOnDrop for Identity {}

/// Checks an Ed25519 signature made by [`Identity::sign`].
pub fn verify(ed_public: &[u8; 32], domain: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(ed_public) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(sig) else {
        return false;
    };
    let mut buf = Vec::with_capacity(domain.len() + 1 + msg.len());
    buf.extend_from_slice(domain);
    buf.push(0);
    buf.extend_from_slice(msg);
    key.verify_strict(&buf, &sig).is_ok()
}

/// What everyone may know about a node: its keys and the proof that the
/// X25519 key belongs to the Ed25519 identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicIdentity {
    /// Ed25519 public key.
    pub ed_public: [u8; 32],
    /// X25519 static public key.
    pub static_public: [u8; 32],
    /// Ed25519 signature over the X25519 key.
    pub binding: Vec<u8>,
}

impl PublicIdentity {
    /// The node id of this identity.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_ed25519(&self.ed_public)
    }

    /// True if the X25519 key is really bound to the Ed25519 key.
    pub fn binding_valid(&self) -> bool {
        verify(
            &self.ed_public,
            BINDING_DOMAIN,
            &self.static_public,
            &self.binding,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn test_identity(seed: u8) -> Identity {
        Identity::from_bytes(&[seed; IDENTITY_BYTES])
    }

    #[test]
    fn node_id_is_hash_of_key_and_parses_back() {
        let id = test_identity(7);
        let nid = id.node_id();
        assert_eq!(nid, id.public().node_id());
        let text = nid.to_string();
        assert_eq!(text.len(), 32);
        assert_eq!(text.parse::<NodeId>().unwrap(), nid);
        assert!("xyz".parse::<NodeId>().is_err());
    }

    #[test]
    fn key_bytes_round_trip() {
        let id = test_identity(9);
        let again = Identity::from_bytes(&id.to_bytes());
        assert_eq!(again.ed_public(), id.ed_public());
        assert_eq!(again.static_public(), id.static_public());
    }

    #[test]
    fn secret_keys_are_wiped_when_dropped() {
        // Compile-time: the identity and the bytes it gives out wipe
        // themselves (reading freed memory to check it would be UB).
        fn wiped<T: ZeroizeOnDrop>(_: &T) {}
        let id = test_identity(4);
        wiped(&id);
        wiped(&id.to_bytes());
    }

    #[test]
    fn binding_detects_substituted_static_key() {
        let a = test_identity(1);
        let b = test_identity(2);
        let mut p = a.public();
        assert!(p.binding_valid());
        p.static_public = b.static_public();
        assert!(!p.binding_valid(), "a registry cannot swap the tunnel key");
    }

    #[test]
    fn signature_domains_are_separate() {
        let a = test_identity(3);
        let sig = a.sign(b"one", b"msg");
        assert!(verify(&a.ed_public(), b"one", b"msg", &sig));
        assert!(!verify(&a.ed_public(), b"two", b"msg", &sig));
        assert!(!verify(&a.ed_public(), b"one", b"msh", &sig));
        assert!(!verify(&a.ed_public(), b"one", b"msg", &sig[..63]));
    }
}
