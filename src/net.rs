//! Sockets and TLS: the stream type that is either plain TCP or TLS over it, the client-facing
//! TLS acceptor and the server-facing TLS connector (rustls with the ring provider).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{ProxyConfig, ServerTlsMode};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {what} from {path}: {message}")]
    Pem {
        what: &'static str,
        path: String,
        message: String,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Plain TCP or TLS over TCP. `T` is rustls' server or client stream.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl ClientStream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(t) => t.get_ref().0,
        }
    }
}

impl ServerStream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(t) => t.get_ref().0,
        }
    }
}

/// True when an idle socket has been closed by its peer or has unexpected bytes waiting (for an
/// idle server connection that is an error or a termination notice): either way, do not reuse.
pub fn idle_socket_is_dead(tcp: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    tcp.poll_peek(&mut cx, &mut buf).is_ready()
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, b),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsSetupError {
    let path = path.display().to_string();
    move |e| TlsSetupError::Pem {
        what,
        path,
        message: e.to_string(),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err("certificates", path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("certificates", path))?;
    if certs.is_empty() {
        return Err(TlsSetupError::Pem {
            what: "certificates",
            path: path.display().to_string(),
            message: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// The acceptor for client connections, when `client_tls_mode` is not `disable`.
pub fn client_tls_acceptor(p: &ProxyConfig) -> Result<Option<TlsAcceptor>, TlsSetupError> {
    let (Some(cert), Some(key)) = (&p.client_tls_cert, &p.client_tls_key) else {
        return Ok(None);
    };
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err("private key", key))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// The connector for server connections, when `server_tls_mode` is not `disable`.
pub fn server_tls_connector(p: &ProxyConfig) -> Result<Option<TlsConnector>, TlsSetupError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match p.server_tls_mode {
        ServerTlsMode::Disable => return Ok(None),
        ServerTlsMode::VerifyFull => {
            let mut roots = rustls::RootCertStore::empty();
            let ca = p.server_tls_ca.as_deref().unwrap_or(Path::new(""));
            for cert in read_certs(ca)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        ServerTlsMode::Prefer | ServerTlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
            .with_no_client_auth(),
    };
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, io::Error> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// `prefer` / `require`: encrypt, check the handshake signatures, but do not authenticate the
/// server's certificate (libpq's `sslmode=require` semantics).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
