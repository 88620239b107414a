//! Enrollment: how an agent gets its identity without a certificate being made and
//! copied by hand (docs/protocol.md, "Enrollment").
//!
//! The collector's operator creates single-use, expiring tokens
//! (`weilan-collector enroll create`). A token carries, besides its id and secret,
//! the SHA-256 of the Weilan CA certificate, so the agent — which has no CA yet —
//! can tell the real collector from an impostor. The agent generates its key (the
//! private key never leaves the workstation), sends a certificate signing request with
//! the token over TLS, and receives its certificate and the CA. One JSON object a line
//! each way.

use serde::{Deserialize, Serialize};

/// The token format's first field.
pub const TOKEN_PREFIX: &str = "wl1";

/// The enrollment port's default.
pub const DEFAULT_PORT: u16 = 8884;

/// Requests and responses are at most this long (a CSR and two certificates).
pub const MAX_LINE: usize = 64 * 1024;

/// A parsed enrollment token: `wl1.<id>.<secret>.<ca-sha256>` (id 16 hex digits,
/// secret and CA digest 32 bytes each, base64url without padding).
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: [u8; 32],
    pub ca_sha256: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, not even in a debug line.
        f.debug_struct("Token")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

impl Token {
    pub fn encode(&self) -> String {
        use base64::Engine as _;
        format!(
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.id,
            b64().encode(self.secret),
            b64().encode(self.ca_sha256)
        )
    }

    pub fn parse(text: &str) -> Result<Token, String> {
        use base64::Engine as _;
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [prefix, id, secret, ca] = parts.as_slice() else {
            return Err("not an enrollment token (wl1.ID.SECRET.CA)".into());
        };
        if *prefix != TOKEN_PREFIX {
            return Err(format!("unknown token format `{prefix}`"));
        }
        if id.len() != 16 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("the token id is not 16 hex digits".into());
        }
        let bytes = |what: &str, s: &str| -> Result<[u8; 32], String> {
            b64()
                .decode(s)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or_else(|| format!("the token's {what} is not 32 bytes of base64url"))
        };
        Ok(Token {
            id: id.to_string(),
            secret: bytes("secret", secret)?,
            ca_sha256: bytes("CA digest", ca)?,
        })
    }

    /// SHA-256 (hex) of the secret: what the collector keeps (never the secret).
    pub fn secret_digest(&self) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &self.secret))
    }
}

/// Agent → collector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub v: u32,
    /// The whole token; empty for a renewal.
    #[serde(default)]
    pub token: String,
    /// A renewal: no token, the connection's client certificate (enrolled, not
    /// revoked, for `agent_id`) is the authority; the new certificate keeps its groups.
    #[serde(default)]
    pub renew: bool,
    /// The agent id asked for (becomes the certificate's common name).
    pub agent_id: String,
    /// PKCS#10 certificate signing request (PEM) for the agent's own key.
    pub csr: String,
}

/// Collector → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// The agent's certificate (PEM), on success.
    #[serde(default)]
    pub cert: Option<String>,
    /// The Weilan CA (PEM), on success.
    #[serde(default)]
    pub ca: Option<String>,
    /// Host groups the token gave.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Why it was refused, otherwise.
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_named() {
        let t = Token {
            id: "0123456789abcdef".into(),
            secret: [7; 32],
            ca_sha256: [9; 32],
        };
        let text = t.encode();
        assert!(text.starts_with("wl1.0123456789abcdef."));
        assert_eq!(Token::parse(&text).unwrap(), t);
        assert!(!format!("{t:?}").contains("BwcH"), "no secret in Debug");
        assert!(Token::parse("wl2.a.b.c").unwrap_err().contains("format"));
        assert!(Token::parse("nonsense")
            .unwrap_err()
            .contains("not an enrollment token"));
        let short = text.replace("0123456789abcdef", "0123");
        assert!(Token::parse(&short).unwrap_err().contains("16 hex"));
        let cut = &text[..text.len() - 3];
        assert!(Token::parse(cut).unwrap_err().contains("CA digest"));
    }
}
