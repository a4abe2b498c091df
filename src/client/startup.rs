//! The startup phase of a client connection: SSLRequest (TLS upgrade), GSSENCRequest (refused
//! with `N`), CancelRequest (forwarded to the server connection serving that client) and the
//! StartupMessage that opens a session.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::ClientError;
use crate::app::Shared;
use crate::config::ClientTlsMode;
use crate::net::{ClientStream, MaybeTls};
use crate::protocol::ProtocolError;
use crate::protocol::backend;
use crate::protocol::startup::{StartupPacket, StartupParams, read_startup};

pub(super) type Negotiated = (ClientStream, StartupParams, BytesMut);

/// Runs the startup phase. `Ok(None)` means the connection had nothing more to do (a cancel
/// request). Errors are reported to the client here, on whatever stream it has by then.
pub(super) async fn negotiate(
    tcp: TcpStream,
    shared: &Arc<Shared>,
    deadline: tokio::time::Instant,
) -> Result<Option<Negotiated>, ClientError> {
    let mut buf = BytesMut::with_capacity(1024);
    let phase = negotiate_on(MaybeTls::Plain(tcp), &mut buf, shared);
    let (stream, result) = match tokio::time::timeout_at(deadline, phase).await {
        Ok(done) => done,
        Err(_) => return Err(ProtocolError::Closed.into()),
    };
    match (stream, result) {
        (Some(stream), Ok(Some(params))) => Ok(Some((stream, params, buf))),
        (_, Ok(_)) => Ok(None),
        (stream, Err(e)) => {
            if let (Some(mut stream), Some((severity, code, message))) = (stream, e.response()) {
                let mut out = BytesMut::new();
                backend::error_response(&mut out, severity, code, &message);
                let _ = stream.write_all(&out).await;
                let _ = stream.shutdown().await;
            }
            Err(e)
        }
    }
}

type Phase = (
    Option<ClientStream>,
    Result<Option<StartupParams>, ClientError>,
);

async fn negotiate_on(mut stream: ClientStream, buf: &mut BytesMut, shared: &Arc<Shared>) -> Phase {
    let tls_mode = shared.config().proxy.client_tls_mode;
    macro_rules! fail {
        ($e:expr) => {
            return (Some(stream), Err($e.into()))
        };
    }
    macro_rules! write {
        ($bytes:expr) => {
            if let Err(e) = stream.write_all($bytes).await {
                return (None, Err(ProtocolError::Io(e).into()));
            }
        };
    }
    loop {
        let packet = match read_startup(&mut stream, buf).await {
            Ok(p) => p,
            Err(e) => fail!(e),
        };
        match packet {
            StartupPacket::Ssl | StartupPacket::GssEnc if !buf.is_empty() => {
                fail!(ProtocolError::Malformed(
                    "unencrypted data after encryption request"
                ))
            }
            StartupPacket::Ssl => {
                let acceptor = shared
                    .tls_acceptor
                    .as_ref()
                    .filter(|_| tls_mode != ClientTlsMode::Disable);
                stream = match (acceptor, stream) {
                    (Some(acceptor), MaybeTls::Plain(mut tcp)) => {
                        if let Err(e) = tcp.write_all(b"S").await {
                            return (None, Err(ProtocolError::Io(e).into()));
                        }
                        match acceptor.accept(tcp).await {
                            Ok(tls) => MaybeTls::Tls(Box::new(tls)),
                            Err(e) => return (None, Err(ClientError::TlsHandshake(e))),
                        }
                    }
                    (None, MaybeTls::Plain(mut tcp)) => {
                        if let Err(e) = tcp.write_all(b"N").await {
                            return (None, Err(ProtocolError::Io(e).into()));
                        }
                        MaybeTls::Plain(tcp)
                    }
                    (_, tls @ MaybeTls::Tls(_)) => {
                        stream = tls;
                        fail!(ProtocolError::Malformed(
                            "SSL request on an encrypted connection"
                        ))
                    }
                };
            }
            StartupPacket::GssEnc => write!(b"N"),
            StartupPacket::Cancel(key) => {
                forward_cancel(shared, key).await;
                return (None, Ok(None));
            }
            StartupPacket::Startup(params) => {
                if tls_mode == ClientTlsMode::Require && !stream.is_tls() {
                    fail!(ClientError::TlsRequired);
                }
                let options: Vec<&str> = params.protocol_options().collect();
                if params.minor_version > 0 || !options.is_empty() {
                    let mut out = BytesMut::new();
                    backend::negotiate_protocol_version(&mut out, 0, options.into_iter());
                    write!(&out);
                }
                return (Some(stream), Ok(Some(params)));
            }
        }
    }
}

async fn forward_cancel(shared: &Shared, key: crate::protocol::startup::BackendKey) {
    match shared.cancels.lookup(key).map(|t| t.resolve()) {
        Some(Some((host, port, key))) => {
            info!(host = %host, port, "forwarding cancel request");
            if let Err(e) = crate::server::send_cancel(&host, port, key).await {
                debug!(error = %e, "cancel request could not be delivered");
            }
        }
        Some(None) => debug!("cancel request for a pipelined request deferred or answered"),
        None => debug!("cancel request for an unknown key ignored"),
    }
}
