//! Server side of SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL speaks it, sans-IO: the client
//! task feeds it the client's messages and writes what it returns.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

pub const MECHANISM: &str = "SCRAM-SHA-256";
const NONCE_LEN: usize = 18;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    #[error("SCRAM proof does not match")]
    BadProof,
    #[error("invalid SCRAM verifier")]
    BadVerifier,
}

/// What the server stores: a pg_authid-style `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

impl ScramVerifier {
    pub fn parse(s: &str) -> Result<Self, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadVerifier)?;
        let (iter_salt, keys) = rest.split_once('$').ok_or(ScramError::BadVerifier)?;
        let (iter, salt) = iter_salt.split_once(':').ok_or(ScramError::BadVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadVerifier)?;
        let decode = |s: &str| B64.decode(s).map_err(|_| ScramError::BadVerifier);
        let v = ScramVerifier {
            iterations: iter.parse().map_err(|_| ScramError::BadVerifier)?,
            salt: decode(salt)?,
            stored_key: decode(stored)?,
            server_key: decode(server)?,
        };
        if v.stored_key.len() != 32 || v.server_key.len() != 32 || v.iterations == 0 {
            return Err(ScramError::BadVerifier);
        }
        Ok(v)
    }

    /// Derives a verifier from a plaintext password (SASLprep applied, random salt).
    pub fn from_password(password: &str) -> Self {
        let text = postgres_protocol::password::scram_sha_256(password.as_bytes());
        Self::parse(&text).unwrap_or_else(|_| Self::mock(password))
    }

    /// A verifier no password matches, used for unknown users so that the exchange looks the
    /// same as for a real one and reveals nothing.
    pub fn mock(seed: &str) -> Self {
        let salt = Sha256::digest(format!("pgpilot-mock-salt:{seed}").as_bytes())[..16].to_vec();
        let random: [u8; 32] = rand::random();
        ScramVerifier {
            iterations: 4096,
            salt,
            stored_key: random.to_vec(),
            server_key: random.to_vec(),
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// One SCRAM exchange after the client-first message.
#[derive(Debug)]
pub struct ScramExchange {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl ScramExchange {
    /// Handles the client-first message; returns the exchange and the server-first message.
    pub fn start(verifier: ScramVerifier, client_first: &[u8]) -> Result<Self, ScramError> {
        let text = std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("utf-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("gs2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("channel binding flag")),
        }
        let (_authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("gs2 header"))?;
        let gs2_header = text[..text.len() - bare.len()].to_owned();
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b','))
            .ok_or(ScramError::Malformed("client nonce"))?;
        let server_nonce: [u8; NONCE_LEN] = rand::random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok(Self {
            verifier,
            client_first_bare: bare.to_owned(),
            server_first,
            gs2_header,
            nonce,
        })
    }

    pub fn server_first(&self) -> &str {
        &self.server_first
    }

    /// Checks the client-final message; returns the server-final message on success.
    pub fn finish(&self, client_final: &[u8]) -> Result<String, ScramError> {
        let text = std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("utf-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let channel = channel.ok_or(ScramError::Malformed("missing channel binding"))?;
        if B64.decode(channel).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::NonceMismatch);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof encoding"))?;
        if proof.len() != 32 {
            return Err(ScramError::BadProof);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        let stored = Sha256::digest(&client_key);
        if !constant_time_eq(&stored, &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(server_password: &str, client_password: &str) -> Result<(), ScramError> {
        let verifier = ScramVerifier::from_password(server_password);
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let server = ScramExchange::start(verifier, client.message())?;
        client
            .update(server.server_first().as_bytes())
            .map_err(|_| ScramError::BadProof)?;
        let server_final = server.finish(client.message())?;
        client
            .finish(server_final.as_bytes())
            .map_err(|_| ScramError::BadProof)
    }

    #[test]
    fn real_client_authenticates_and_verifies_the_server() {
        exchange("app-secret", "app-secret").unwrap();
        assert_eq!(exchange("app-secret", "wrong"), Err(ScramError::BadProof));
    }

    #[test]
    fn parses_pg_authid_verifiers() {
        let text = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&text).unwrap();
        assert_eq!(v.iterations, 4096);
        assert!(ScramVerifier::parse("SCRAM-SHA-256$4096:abc").is_err());
        assert!(ScramVerifier::parse("md5abc").is_err());
    }

    #[test]
    fn mock_verifier_never_matches() {
        let mut client = ScramSha256::new(b"anything", ChannelBinding::unsupported());
        let server = ScramExchange::start(ScramVerifier::mock("ghost"), client.message()).unwrap();
        client.update(server.server_first().as_bytes()).unwrap();
        assert_eq!(server.finish(client.message()), Err(ScramError::BadProof));
    }

    #[test]
    fn rejects_garbage_and_channel_binding_requests() {
        let v = ScramVerifier::from_password("x");
        assert!(ScramExchange::start(v.clone(), b"garbage").is_err());
        assert_eq!(
            ScramExchange::start(v, b"p=tls-server-end-point,,n=,r=abc").unwrap_err(),
            ScramError::ChannelBinding
        );
    }
}
