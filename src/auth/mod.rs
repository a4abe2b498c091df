//! Client authentication (the proxy as the server): SCRAM-SHA-256, md5, or trust when configured.
//! Server-side authentication (the proxy as a client) lives in `server.rs`.

pub mod scram;

use std::collections::HashMap;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::config::{AuthType, Config};
use crate::protocol::backend;
use crate::protocol::frontend::{self, parse_password, parse_sasl_initial};
use crate::protocol::{MessageReader, ProtocolError};
use scram::{ScramExchange, ScramVerifier};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password authentication failed for user \"{user}\"")]
    Failed { user: String },
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
}

impl From<std::io::Error> for AuthError {
    fn from(e: std::io::Error) -> Self {
        AuthError::Protocol(ProtocolError::Io(e))
    }
}

/// What the proxy knows about each user's secret, derived once from the config.
struct Secret {
    scram: ScramVerifier,
    plaintext: Option<String>,
}

pub struct Credentials {
    method: AuthType,
    users: HashMap<String, Secret>,
}

impl Credentials {
    pub fn from_config(config: &Config) -> Self {
        let users = config
            .users
            .iter()
            .map(|u| {
                let password = u.password.clone().unwrap_or_default();
                let secret = if u.password_is_verifier() {
                    Secret {
                        scram: ScramVerifier::parse(&password)
                            .unwrap_or_else(|_| ScramVerifier::mock(&u.name)),
                        plaintext: None,
                    }
                } else {
                    Secret {
                        scram: ScramVerifier::from_password(&password),
                        plaintext: Some(password),
                    }
                };
                (u.name.clone(), secret)
            })
            .collect();
        Credentials {
            method: config.proxy.auth_type,
            users,
        }
    }

    /// Runs the authentication exchange for `user`. On success the caller sends
    /// AuthenticationOk; on failure it sends the error.
    pub async fn authenticate<R, W>(
        &self,
        reader: &mut MessageReader<R>,
        writer: &mut W,
        user: &str,
    ) -> Result<(), AuthError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let secret = self.users.get(user);
        let failed = || AuthError::Failed {
            user: user.to_owned(),
        };
        match self.method {
            AuthType::Trust => secret.map(|_| ()).ok_or_else(failed),
            AuthType::Md5 => {
                let salt: [u8; 4] = rand::random();
                let mut out = BytesMut::new();
                backend::authentication_md5(&mut out, salt);
                writer.write_all(&out).await?;
                let frame = expect_password(reader).await?;
                let given = parse_password(&frame)?;
                let expected = secret.and_then(|s| s.plaintext.as_deref()).map(|pw| {
                    postgres_protocol::authentication::md5_hash(
                        user.as_bytes(),
                        pw.as_bytes(),
                        salt,
                    )
                });
                match expected {
                    Some(e) if e == given => Ok(()),
                    _ => Err(failed()),
                }
            }
            AuthType::ScramSha256 => {
                let verifier = secret
                    .map(|s| s.scram.clone())
                    .unwrap_or_else(|| ScramVerifier::mock(user));
                let mut out = BytesMut::new();
                backend::authentication_sasl(&mut out, &[scram::MECHANISM]);
                writer.write_all(&out).await?;
                let frame = expect_password(reader).await?;
                let (mechanism, data) = parse_sasl_initial(&frame)?;
                if mechanism != scram::MECHANISM {
                    return Err(ProtocolError::Malformed("unsupported SASL mechanism").into());
                }
                let exchange = ScramExchange::start(verifier, data).map_err(|_| failed())?;
                out.clear();
                backend::authentication_sasl_continue(&mut out, exchange.server_first().as_bytes());
                writer.write_all(&out).await?;
                let frame = expect_password(reader).await?;
                let server_final = exchange.finish(frame.body()).map_err(|_| failed())?;
                if secret.is_none() {
                    return Err(failed());
                }
                out.clear();
                backend::authentication_sasl_final(&mut out, server_final.as_bytes());
                writer.write_all(&out).await?;
                Ok(())
            }
        }
    }
}

async fn expect_password<R: AsyncRead + Unpin>(
    reader: &mut MessageReader<R>,
) -> Result<crate::protocol::Frame, ProtocolError> {
    let frame = reader.expect().await?;
    if frame.tag != frontend::PASSWORD {
        return Err(ProtocolError::Unexpected {
            tag: frame.tag,
            context: "during authentication",
        });
    }
    Ok(frame)
}
