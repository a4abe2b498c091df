//! Untagged packets a client sends before the session starts: StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest. They carry no tag byte and are told apart by a 32-bit code.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::ProtocolError;
use super::codec::get_cstr;

/// PostgreSQL refuses startup packets longer than this; so do we.
pub const MAX_STARTUP_PACKET: usize = 10_000;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
const PROTOCOL_3_0: u32 = 3 << 16;

/// A backend key: the pair a client quotes in a CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: i32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel(BackendKey),
    Startup(StartupParams),
}

/// Parameters of a v3 StartupMessage, in the order the client sent them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StartupParams {
    /// Minor protocol version requested (3.x); the proxy speaks 3.0.
    pub minor_version: u16,
    pub params: Vec<(String, String)>,
}

impl StartupParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn user(&self) -> Option<&str> {
        self.get("user")
    }

    /// The database, which defaults to the user name as in PostgreSQL.
    pub fn database(&self) -> Option<&str> {
        self.get("database")
            .filter(|d| !d.is_empty())
            .or_else(|| self.user())
    }

    /// Protocol options (`_pq_.*`) the client asked for; the proxy supports none of them.
    pub fn protocol_options(&self) -> impl Iterator<Item = &str> {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.as_str())
    }
}

/// Decodes one startup-phase packet from the front of `src`; `Ok(None)` asks for more bytes.
pub fn decode_startup(src: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if src.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(ProtocolError::InvalidStartupLength(len));
    }
    if src.len() < len {
        return Ok(None);
    }
    let mut packet = src.split_to(len);
    packet.advance(4);
    let code = packet.get_u32();
    let body = &packet[..];
    let exact = |n: usize| {
        if body.len() == n {
            Ok(())
        } else {
            Err(ProtocolError::InvalidStartupLength(len))
        }
    };
    match code {
        SSL_REQUEST => exact(0).map(|_| Some(StartupPacket::Ssl)),
        GSSENC_REQUEST => exact(0).map(|_| Some(StartupPacket::GssEnc)),
        CANCEL_REQUEST => {
            exact(8)?;
            let mut b = body;
            let key = BackendKey {
                pid: b.get_i32(),
                secret: b.get_i32(),
            };
            Ok(Some(StartupPacket::Cancel(key)))
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(ProtocolError::UnsupportedProtocol { major, minor });
            }
            debug_assert!(code >= PROTOCOL_3_0);
            parse_params(body, minor).map(|p| Some(StartupPacket::Startup(p)))
        }
    }
}

fn parse_params(mut body: &[u8], minor_version: u16) -> Result<StartupParams, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let key = get_cstr(&mut body)?;
        if key.is_empty() {
            break;
        }
        let value = get_cstr(&mut body)?;
        params.push((key.to_owned(), value.to_owned()));
    }
    if !body.is_empty() {
        return Err(ProtocolError::Malformed(
            "trailing bytes after startup parameters",
        ));
    }
    let params = StartupParams {
        minor_version,
        params,
    };
    if params.user().is_none_or(str::is_empty) {
        return Err(ProtocolError::Malformed(
            "no PostgreSQL user name specified in startup packet",
        ));
    }
    Ok(params)
}

/// Reads one startup-phase packet from a stream, buffering in `buf`.
pub async fn read_startup<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<StartupPacket, ProtocolError> {
    loop {
        if let Some(p) = decode_startup(buf)? {
            return Ok(p);
        }
        buf.reserve(1024);
        if stream.read_buf(buf).await? == 0 {
            return Err(ProtocolError::Closed);
        }
    }
}

/// Encodes a StartupMessage (used by tests and the fuzz corpus).
pub fn encode_startup(params: &[(&str, &str)]) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(&[0, 0, 0, 0]);
    b.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in params {
        super::codec::put_cstr(&mut b, k);
        super::codec::put_cstr(&mut b, v);
    }
    b.extend_from_slice(&[0]);
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_kind() {
        let mut b = BytesMut::from(&[0, 0, 0, 8, 4, 210, 22, 47][..]);
        assert_eq!(decode_startup(&mut b).unwrap(), Some(StartupPacket::Ssl));
        let mut b = BytesMut::from(&[0, 0, 0, 8, 4, 210, 22, 48][..]);
        assert_eq!(decode_startup(&mut b).unwrap(), Some(StartupPacket::GssEnc));
        let mut b = BytesMut::from(&[0, 0, 0, 16, 4, 210, 22, 46, 0, 0, 0, 7, 0, 0, 0, 9][..]);
        let key = BackendKey { pid: 7, secret: 9 };
        assert_eq!(
            decode_startup(&mut b).unwrap(),
            Some(StartupPacket::Cancel(key))
        );
        let mut b = encode_startup(&[("user", "app"), ("database", "db")]);
        match decode_startup(&mut b).unwrap() {
            Some(StartupPacket::Startup(p)) => {
                assert_eq!((p.user(), p.database()), (Some("app"), Some("db")));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(b.is_empty());
    }

    #[test]
    fn rejects_v2_bad_lengths_and_missing_user() {
        let mut v2 = BytesMut::from(&[0, 0, 0, 9, 0, 2, 0, 0, 0][..]);
        assert!(matches!(
            decode_startup(&mut v2),
            Err(ProtocolError::UnsupportedProtocol { major: 2, minor: 0 })
        ));
        let mut huge = BytesMut::from(&[0, 1, 0, 0][..]);
        assert!(matches!(
            decode_startup(&mut huge),
            Err(ProtocolError::InvalidStartupLength(_))
        ));
        let mut nouser = encode_startup(&[("database", "x")]);
        assert!(decode_startup(&mut nouser).is_err());
        let mut partial = BytesMut::from(&encode_startup(&[("user", "a")])[..6]);
        assert_eq!(decode_startup(&mut partial).unwrap(), None);
    }

    #[test]
    fn database_defaults_to_user() {
        let mut b = encode_startup(&[("user", "app")]);
        let Some(StartupPacket::Startup(p)) = decode_startup(&mut b).unwrap() else {
            panic!("not a startup packet")
        };
        assert_eq!(p.database(), Some("app"));
    }
}
