//! Bucket keys. Parts that name a person (subject, patient) must never be stored in clear, in
//! memory or in Redis: with a [`KeyHasher`] every key is stored as a truncated HMAC-SHA256 under
//! a configured secret, so the store holds nothing that can be turned back into an id without
//! the secret.

use aws_lc_rs::hmac;

/// The least secret length, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

/// HMAC-SHA256 under a secret, truncated to 128 bits, lower-case hex.
pub struct KeyHasher {
    key: hmac::Key,
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHasher(<secret>)")
    }
}

impl KeyHasher {
    /// A hasher under `secret` (at least [`MIN_SECRET_BYTES`] bytes).
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the secret must be at least {MIN_SECRET_BYTES} bytes long"
            ));
        }
        Ok(KeyHasher {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// The stored form of `data`: 32 hex characters.
    pub fn hash(&self, data: &[u8]) -> String {
        let tag = hmac::sign(&self.key, data);
        hex::encode(&tag.as_ref()[..16])
    }
}

/// Join key parts unambiguously (length-prefixed: `3:abc|1:x`), so `("a|b", "c")` and
/// `("a", "b|c")` never meet.
pub fn compose<'a>(parts: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, p) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push('|');
        }
        out.push_str(&p.len().to_string());
        out.push(':');
        out.push_str(p);
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hashes_are_keyed_stable_and_opaque() {
        let h = KeyHasher::new(b"0123456789abcdef-secret").unwrap();
        let other = KeyHasher::new(b"another-secret-of-16+").unwrap();
        let a = h.hash(b"subject=patient-123");
        assert_eq!(a, h.hash(b"subject=patient-123"));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("patient"));
        assert_ne!(a, other.hash(b"subject=patient-123"), "keyed");
        assert_ne!(a, h.hash(b"subject=patient-124"));
        assert!(KeyHasher::new(b"short").is_err());
        assert_eq!(format!("{h:?}"), "KeyHasher(<secret>)");
    }

    #[test]
    fn composition_is_unambiguous() {
        assert_ne!(compose(["a|b", "c"]), compose(["a", "b|c"]));
        assert_eq!(compose(["ab", ""]), "2:ab|0:");
    }
}
