//! The registry's TLS key for the TCP relay, and how a node checks it
//! against the join URL with no certificate authority.
//!
//! What is pinned is the registry's X25519 public key, the 64 hex digits
//! of the join URL, and nothing else. The registry signs its TLS handshakes
//! with the *same* secret scalar used as an Ed25519 key (the Edwards form
//! of the same point, as XEdDSA does): its certificate's public key maps
//! to the pinned X25519 key under the curves' birational map. A node does
//! not trust the certificate's bytes at all; it checks the handshake's
//! signature (TLS 1.3 CertificateVerify, over the transcript) under the
//! Edwards form of the pinned key, either sign of x (both belong to whoever
//! knows the scalar). So only the holder of the registry's secret can
//! complete a TLS handshake a node accepts; a certificate made from any
//! other key, or copied from the real registry, gets nowhere.
//!
//! The Ed25519 nonce key (the "hash prefix" an ordinary Ed25519 key gets
//! from hashing its seed) is derived from the secret under its own label,
//! so signatures stay deterministic and the nonce key never equals
//! anything else derived from the secret.

use curve25519_dalek::montgomery::MontgomeryPoint;
use ed25519_dalek::hazmat::{raw_sign, ExpandedSecretKey};
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha512};
use zeroize::Zeroizing;

/// Label of the nonce-key derivation.
const NONCE_LABEL: &[u8] = b"pilot-tun registry TLS nonce key v1";

/// The registry's TLS signing key.
pub struct TlsKey {
    expanded: ExpandedSecretKey,
    public: VerifyingKey,
}

impl TlsKey {
    /// The TLS key of the registry with this X25519 secret.
    pub fn from_registry_secret(secret: &[u8; 32]) -> Self {
        let mut bytes = Zeroizing::new([0u8; 64]);
        bytes[..32].copy_from_slice(secret);
        let nonce_key = Sha512::new()
            .chain_update(NONCE_LABEL)
            .chain_update(secret)
            .finalize();
        bytes[32..].copy_from_slice(&nonce_key[..32]);
        // Clamps the scalar exactly as X25519 does.
        let expanded = ExpandedSecretKey::from_bytes(&bytes);
        let public = VerifyingKey::from(&expanded);
        TlsKey { expanded, public }
    }

    /// The Ed25519 public key (for the certificate).
    pub fn public(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// An Ed25519 signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        raw_sign::<Sha512>(&self.expanded, msg, &self.public).to_bytes()
    }
}

/// True if `sig` is a valid Ed25519 signature over `msg` by the holder of
/// the registry key `pinned` (an X25519 public key).
pub fn verify_pinned(pinned: &[u8; 32], msg: &[u8], sig: &[u8]) -> bool {
    let Ok(sig) = Signature::from_slice(sig) else {
        return false;
    };
    let u = MontgomeryPoint(*pinned);
    [0u8, 1].into_iter().any(|sign| {
        u.to_edwards(sign)
            .and_then(|p| VerifyingKey::from_bytes(&p.compress().to_bytes()).ok())
            .is_some_and(|k| !k.is_weak() && k.verify_strict(msg, &sig).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    fn registry_public(secret: &[u8; 32]) -> [u8; 32] {
        let mut bytes = [0u8; 64];
        bytes[32..].copy_from_slice(secret);
        Identity::from_bytes(&bytes).static_public()
    }

    #[test]
    fn the_tls_key_is_the_pinned_key_in_edwards_form() {
        for seed in 1..20u8 {
            let secret = [seed; 32];
            let key = TlsKey::from_registry_secret(&secret);
            let pinned = registry_public(&secret);
            let edwards = VerifyingKey::from_bytes(&key.public()).unwrap();
            assert_eq!(edwards.to_montgomery().to_bytes(), pinned);
            let sig = key.sign(b"transcript");
            assert!(verify_pinned(&pinned, b"transcript", &sig));
            // Deterministic.
            assert_eq!(sig, key.sign(b"transcript"));
        }
    }

    #[test]
    fn another_key_or_message_is_refused() {
        let real = registry_public(&[1; 32]);
        let other = TlsKey::from_registry_secret(&[2; 32]);
        let sig = other.sign(b"transcript");
        assert!(!verify_pinned(&real, b"transcript", &sig));
        let key = TlsKey::from_registry_secret(&[1; 32]);
        let mut sig = key.sign(b"transcript");
        assert!(!verify_pinned(&real, b"other transcript", &sig));
        sig[10] ^= 1;
        assert!(!verify_pinned(&real, b"transcript", &sig));
        assert!(!verify_pinned(&real, b"transcript", &sig[..63]));
        // A pinned value that is no point, or a weak one, verifies nothing.
        assert!(!verify_pinned(
            &[0; 32],
            b"transcript",
            &key.sign(b"transcript")
        ));
    }
}
