//! Why a client session ended badly, and the one mapping from that to the ErrorResponse
//! (severity, SQLSTATE, message) the client sees.

use crate::auth::AuthError;
use crate::pool::PoolError;
use crate::protocol::ProtocolError;
use crate::protocol::backend::Severity;
use crate::protocol::sqlstate;
use crate::server::ServerError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("TLS is required for connections to this server")]
    TlsRequired,
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("database \"{0}\" does not exist")]
    UnknownDatabase(String),
    #[error("sorry, too many clients already")]
    TooManyClients,
    #[error("client_login_timeout: authentication did not complete in time")]
    LoginTimeout,
    #[error("user \"{0}\" is not allowed to use the admin console")]
    AdminDenied(String),
    #[error("the admin console speaks only the simple query protocol")]
    AdminProtocol,
    #[error("no {0} is available")]
    NoNode(&'static str),
    #[error("database \"{0}\" does not allow connections (DISABLE)")]
    Disabled(String),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("server connection lost: {0}")]
    ServerLost(String),
    #[error("terminating connection due to administrator command")]
    Shutdown,
}

impl ClientError {
    /// The server could not be reached at all (as opposed to refusing us).
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Pool(PoolError::Connect(
                ServerError::Connect { .. }
                | ServerError::ConnectTimeout { .. }
                | ServerError::Protocol(_),
            ))
            | ClientError::ServerLost(_) => true,
            // Shutting down, starting up, or restarting after a crash: not an answer to the
            // client's request, only a server that is not there at the moment.
            ClientError::Pool(PoolError::Connect(ServerError::Rejected(fields))) => {
                matches!(fields.code.as_str(), "57P01" | "57P02" | "57P03")
            }
            _ => false,
        }
    }

    /// The ErrorResponse to send, or `None` when the client is gone and nothing can be sent.
    pub fn response(&self) -> Option<(Severity, &str, String)> {
        let fatal = |code| Some((Severity::Fatal, code, self.to_string()));
        match self {
            ClientError::Protocol(ProtocolError::Closed | ProtocolError::Io(_)) => None,
            ClientError::Protocol(ProtocolError::UnsupportedProtocol { .. }) => {
                fatal(sqlstate::FEATURE_NOT_SUPPORTED)
            }
            ClientError::Protocol(_) => fatal(sqlstate::PROTOCOL_VIOLATION),
            ClientError::Auth(AuthError::Failed { .. }) => fatal(sqlstate::INVALID_PASSWORD),
            ClientError::Auth(AuthError::Protocol(
                ProtocolError::Closed | ProtocolError::Io(_),
            )) => None,
            ClientError::Auth(AuthError::Protocol(_)) => fatal(sqlstate::PROTOCOL_VIOLATION),
            ClientError::TlsRequired => fatal(sqlstate::INVALID_AUTHORIZATION),
            ClientError::TlsHandshake(_) => None,
            ClientError::UnknownDatabase(_) => fatal(sqlstate::INVALID_CATALOG_NAME),
            ClientError::AdminDenied(_) => fatal(sqlstate::INVALID_AUTHORIZATION),
            ClientError::AdminProtocol => fatal(sqlstate::PROTOCOL_VIOLATION),
            ClientError::TooManyClients => fatal(sqlstate::TOO_MANY_CONNECTIONS),
            ClientError::LoginTimeout => fatal(sqlstate::PROTOCOL_VIOLATION),
            ClientError::NoNode(_) | ClientError::Disabled(_) => {
                fatal(sqlstate::CANNOT_CONNECT_NOW)
            }
            ClientError::Pool(PoolError::CheckoutTimeout(_)) => fatal(sqlstate::QUERY_WAIT_TIMEOUT),
            ClientError::Pool(PoolError::Connect(ServerError::Rejected(fields))) => Some((
                Severity::Fatal,
                fields.code.as_str(),
                fields.message.clone(),
            )),
            ClientError::Pool(PoolError::Connect(_)) | ClientError::ServerLost(_) => {
                fatal(sqlstate::CONNECTION_FAILURE)
            }
            ClientError::Shutdown => fatal(sqlstate::ADMIN_SHUTDOWN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates() {
        let code = |e: ClientError| e.response().map(|(_, c, _)| c.to_owned());
        assert_eq!(
            code(ClientError::UnknownDatabase("x".into())).as_deref(),
            Some("3D000")
        );
        assert_eq!(code(ClientError::TooManyClients).as_deref(), Some("53300"));
        assert_eq!(
            code(AuthError::Failed { user: "u".into() }.into()).as_deref(),
            Some("28P01")
        );
        let big = ProtocolError::FrameTooLarge {
            tag: b'Q',
            len: 10,
            max: 5,
        };
        assert_eq!(code(big.into()).as_deref(), Some("08P01"));
        assert_eq!(code(ProtocolError::Closed.into()), None);
        assert_eq!(code(ClientError::Shutdown).as_deref(), Some("57P01"));
    }
}
