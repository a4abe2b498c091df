//! One backend connection: connect (TCP, optional TLS), startup and authentication as the
//! client's user (SCRAM-SHA-256, md5 or cleartext), the server's ParameterStatus values and
//! BackendKeyData, and small simple-query helpers used between clients (SET, DISCARD ALL).

use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::client::prepared::ServerStatements;
use crate::client::settings::Settings;
use crate::net::{MaybeTls, ServerStream, idle_socket_is_dead, server_name};
use crate::protocol::backend::{
    self, ErrorFields, ReadyForQuery, TxStatus, parse_backend_key, parse_parameter_status,
};
use crate::protocol::codec::get_cstr;
use crate::protocol::startup::BackendKey;
use crate::protocol::{Frame, MessageReader, ProtocolError};

/// Largest message accepted from a server (PostgreSQL's own allocation limit is 1 GB).
pub const MAX_SERVER_MESSAGE: usize = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("could not connect to server {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {addr}")]
    ConnectTimeout { addr: String },
    #[error("server {addr} does not support TLS, which is required")]
    TlsUnsupported { addr: String },
    #[error("TLS handshake with server {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("server requested a password for user \"{user}\" but none is configured")]
    NoPassword { user: String },
    #[error("server requested unsupported authentication method {0}")]
    UnsupportedAuth(i32),
    #[error("SCRAM authentication with the server failed: {0}")]
    Scram(std::io::Error),
    #[error("{0}")]
    Rejected(ErrorFields),
    #[error("server protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

impl From<std::io::Error> for ServerError {
    fn from(e: std::io::Error) -> Self {
        ServerError::Protocol(ProtocolError::Io(e))
    }
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnectParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    pub tls: Option<TlsConnector>,
    /// With a connector: true = fail when the server refuses TLS (require / verify-full).
    pub tls_required: bool,
    pub connect_timeout: Duration,
}

impl ConnectParams {
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

pub struct ServerConn {
    pub(crate) stream: ServerStream,
    pub(crate) buf: BytesMut,
    pub(crate) params: Vec<(String, String)>,
    /// Prepared statements this connection holds (transaction pooling).
    pub(crate) statements: ServerStatements,
    /// Session settings clients have applied on this connection.
    pub(crate) applied: Settings,
    pub key: BackendKey,
    pub host: String,
    pub port: u16,
    pub created: Instant,
    pub last_used: Instant,
    /// The local end of the TCP connection.
    pub local: Option<std::net::SocketAddr>,
    /// Listed in `SHOW SERVERS` while it lives (set by the pool that opened it).
    pub(crate) registered: Option<crate::registry::Registered<crate::registry::ServerEntry>>,
    /// Cancelled when the node it was opened to is fenced: whoever waits on this connection
    /// stops waiting. Set by the pool that opened it, before anyone can borrow it.
    pub(crate) fence: tokio_util::sync::CancellationToken,
}

impl ServerConn {
    pub async fn connect(p: &ConnectParams) -> Result<Self, ServerError> {
        let addr = p.addr();
        let tcp = tokio::time::timeout(p.connect_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| ServerError::ConnectTimeout { addr: addr.clone() })?
            .map_err(|source| ServerError::Connect {
                addr: addr.clone(),
                source,
            })?;
        tcp.set_nodelay(true)?;
        let local = tcp.local_addr().ok();
        let stream = tokio::time::timeout(p.connect_timeout, negotiate_tls(tcp, p))
            .await
            .map_err(|_| ServerError::ConnectTimeout { addr: addr.clone() })??;
        let now = Instant::now();
        let mut conn = ServerConn {
            stream,
            buf: BytesMut::with_capacity(8192),
            params: Vec::new(),
            statements: ServerStatements::default(),
            applied: Settings::default(),
            key: BackendKey { pid: 0, secret: 0 },
            host: p.host.clone(),
            port: p.port,
            created: now,
            last_used: now,
            local,
            registered: None,
            fence: Default::default(),
        };
        tokio::time::timeout(p.connect_timeout, conn.startup(p))
            .await
            .map_err(|_| ServerError::ConnectTimeout { addr })??;
        Ok(conn)
    }

    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_param(params: &mut Vec<(String, String)>, name: String, value: String) {
        match params.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => params.push((name, value)),
        }
    }

    /// True when an idle connection must not be handed out again.
    pub fn is_dead(&self) -> bool {
        !self.buf.is_empty() || idle_socket_is_dead(self.stream.tcp())
    }

    async fn send(&mut self, buf: &[u8]) -> Result<(), ServerError> {
        self.stream.write_all(buf).await?;
        Ok(())
    }

    async fn read(&mut self) -> Result<Frame, ServerError> {
        let mut reader = MessageReader::new(
            &mut self.stream,
            std::mem::take(&mut self.buf),
            MAX_SERVER_MESSAGE,
        );
        let frame = reader.expect().await;
        self.buf = reader.into_parts().1;
        Ok(frame?)
    }

    async fn startup(&mut self, p: &ConnectParams) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        let params = [("user", p.user.as_str()), ("database", p.database.as_str())];
        frontend::startup_message(params.iter().copied(), &mut out)?;
        self.send(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read().await?;
            match frame.tag {
                backend::AUTHENTICATION => {
                    let reply = self.authenticate(&frame, p, &mut scram)?;
                    if !reply.is_empty() {
                        self.send(&reply).await?;
                    }
                }
                backend::PARAMETER_STATUS => {
                    let (k, v) = parse_parameter_status(&frame)?;
                    Self::set_param(&mut self.params, k, v);
                }
                backend::BACKEND_KEY_DATA => self.key = parse_backend_key(&frame)?,
                backend::ERROR_RESPONSE => {
                    return Err(ServerError::Rejected(ErrorFields::parse(&frame)?));
                }
                backend::NOTICE_RESPONSE | backend::NEGOTIATE_PROTOCOL_VERSION => {}
                backend::READY_FOR_QUERY => return Ok(()),
                tag => {
                    return Err(ProtocolError::Unexpected {
                        tag,
                        context: "during server startup",
                    }
                    .into());
                }
            }
        }
    }

    /// Answers one Authentication message; returns the bytes to send (possibly none).
    fn authenticate(
        &self,
        frame: &Frame,
        p: &ConnectParams,
        scram: &mut Option<ScramSha256>,
    ) -> Result<BytesMut, ServerError> {
        let body = frame.body();
        let [a, b, c, d, data @ ..] = body else {
            return Err(ProtocolError::Malformed("short Authentication message").into());
        };
        let code = i32::from_be_bytes([*a, *b, *c, *d]);
        let password = || {
            p.password
                .as_deref()
                .ok_or_else(|| ServerError::NoPassword {
                    user: p.user.clone(),
                })
        };
        let mut out = BytesMut::new();
        match code {
            0 => {}
            3 => frontend::password_message(password()?.as_bytes(), &mut out)?,
            5 => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| ProtocolError::Malformed("bad md5 salt"))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    p.user.as_bytes(),
                    password()?.as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut out)?;
            }
            10 => {
                let mut rest = data;
                let mut offered = false;
                while !rest.is_empty() && rest[0] != 0 {
                    offered |= get_cstr(&mut rest)? == crate::auth::scram::MECHANISM;
                }
                if !offered {
                    return Err(ServerError::UnsupportedAuth(code));
                }
                let client =
                    ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response(
                    crate::auth::scram::MECHANISM,
                    client.message(),
                    &mut out,
                )?;
                *scram = Some(client);
            }
            11 => {
                let client = scram.as_mut().ok_or(ServerError::UnsupportedAuth(code))?;
                client.update(data).map_err(ServerError::Scram)?;
                frontend::sasl_response(client.message(), &mut out)?;
            }
            12 => {
                let mut client = scram.take().ok_or(ServerError::UnsupportedAuth(code))?;
                client.finish(data).map_err(ServerError::Scram)?;
            }
            other => return Err(ServerError::UnsupportedAuth(other)),
        }
        Ok(out)
    }

    /// Runs `sql` with the simple protocol and waits for ReadyForQuery. Server errors come back
    /// as `Rejected`; the connection is still usable afterwards if the status is idle.
    pub async fn simple_query(&mut self, sql: &str) -> Result<TxStatus, ServerError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(&out).await?;
        let mut error = None;
        loop {
            let frame = self.read().await?;
            match frame.tag {
                backend::ERROR_RESPONSE => error = Some(ErrorFields::parse(&frame)?),
                backend::PARAMETER_STATUS => {
                    let (k, v) = parse_parameter_status(&frame)?;
                    Self::set_param(&mut self.params, k, v);
                }
                backend::READY_FOR_QUERY => {
                    let status = ReadyForQuery::parse(&frame)?;
                    return match error {
                        Some(e) => Err(ServerError::Rejected(e)),
                        None => Ok(status),
                    };
                }
                _ => {}
            }
        }
    }

    /// Brings the session in line with `wanted`, with one round trip when they differ.
    pub async fn apply_settings(&mut self, wanted: &Settings) -> Result<(), ServerError> {
        let Some(sql) = wanted.diff_from(&self.applied) else {
            return Ok(());
        };
        match self.simple_query(&sql).await {
            Ok(TxStatus::Idle) => {
                self.applied = wanted.clone();
                Ok(())
            }
            Ok(_) => Err(ProtocolError::Malformed("settings left a transaction open").into()),
            Err(e) => Err(e),
        }
    }

    /// Forgets session state after `DISCARD ALL` (or `RESET ALL` for settings only).
    pub fn forget_session_state(&mut self, statements: bool) {
        self.applied = Settings::default();
        if statements {
            self.statements = ServerStatements::default();
        }
    }

    /// Sends Terminate and closes (best effort).
    pub async fn close(mut self) {
        let mut out = BytesMut::new();
        frontend::terminate(&mut out);
        let _ = tokio::time::timeout(Duration::from_millis(100), self.send(&out)).await;
    }
}

async fn negotiate_tls(tcp: TcpStream, p: &ConnectParams) -> Result<ServerStream, ServerError> {
    let Some(connector) = &p.tls else {
        return Ok(MaybeTls::Plain(tcp));
    };
    let mut tcp = tcp;
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out).await?;
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => {
            let name = server_name(&p.host)?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|source| ServerError::Tls {
                    addr: p.addr(),
                    source,
                })?;
            Ok(MaybeTls::Tls(Box::new(tls)))
        }
        b'N' if !p.tls_required => Ok(MaybeTls::Plain(tcp)),
        b'N' => Err(ServerError::TlsUnsupported { addr: p.addr() }),
        _ => Err(ProtocolError::Malformed("bad answer to SSLRequest").into()),
    }
}

/// Sends a CancelRequest for `key` to the server at `host:port`.
pub async fn send_cancel(host: &str, port: u16, key: BackendKey) -> std::io::Result<()> {
    let mut tcp = TcpStream::connect((host, port)).await?;
    let mut out = BytesMut::new();
    frontend::cancel_request(key.pid, key.secret, &mut out);
    tcp.write_all(&out).await?;
    // The server closes the connection after reading the request.
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut sink)).await;
    Ok(())
}
