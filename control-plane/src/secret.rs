//! Admin tokens: generation, hashing and roles.
//!
//! A token is `tga_` and 64 hex digits (32 random bytes); it exists in
//! plaintext only in the response that creates it. The store keeps its SHA-256, and lookups hash
//! the presented token, so a leaked database holds nothing usable.

use sha2::{Digest, Sha256};

/// What an admin token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads only.
    Viewer,
    /// A gateway: reads the feed (snapshot and changes), sends usage and reads a period's
    /// usage (`/v1/gateway/*`), and nothing else.
    Gateway,
}

impl Role {
    /// The stored and wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Gateway => "gateway",
        }
    }

    /// Parses the stored and wire form.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "admin" => Some(Role::Admin),
            "viewer" => Some(Role::Viewer),
            "gateway" => Some(Role::Gateway),
            _ => None,
        }
    }
}

/// A plaintext admin token; `Debug` does not print it.
pub struct PlainToken(String);

impl std::fmt::Debug for PlainToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlainToken(<redacted>)")
    }
}

impl PlainToken {
    /// A new random token.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        Self(format!("tga_{}", hex::encode(bytes)))
    }

    /// The token, to show once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Hex SHA-256 of a token, as stored.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_long_distinct_and_hidden_from_debug() {
        let a = PlainToken::generate();
        let b = PlainToken::generate();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), 4 + 64);
        assert!(!format!("{a:?}").contains(&a.expose()[4..]));
        assert_eq!(hash(a.expose()).len(), 64);
    }
}
