//! Framing of tagged messages: a 5-byte header (tag, big-endian length including itself) and a
//! body that is never copied. The decoder rejects lengths below 4 and bodies above a cap.

use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Bytes in a tagged message header: one tag byte and a four-byte length.
pub const HEADER_LEN: usize = 5;

/// One tagged message. `raw` holds the whole message, header included, so forwarding it is a
/// single buffer append (or an O(1) `unsplit` when frames come from the same read buffer).
#[derive(Debug)]
pub struct Frame {
    pub tag: u8,
    raw: BytesMut,
}

impl Frame {
    /// The message body (after the length field).
    pub fn body(&self) -> &[u8] {
        &self.raw[HEADER_LEN..]
    }

    /// The whole message as it travels on the wire.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    pub fn into_raw(self) -> BytesMut {
        self.raw
    }

    /// Builds a frame from a complete encoded message (used for messages the proxy synthesises).
    pub fn from_raw(raw: BytesMut) -> Result<Self, ProtocolError> {
        let mut src = raw;
        match FrameCodec::new(usize::MAX).decode(&mut src)? {
            Some(frame) if src.is_empty() => Ok(frame),
            _ => Err(ProtocolError::Malformed("incomplete message")),
        }
    }
}

/// What can be wrong with bytes a peer sent. Each variant maps to SQLSTATE `08P01` (protocol
/// violation) except where noted by the caller.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type \"{}\"", char::from(*tag))]
    InvalidLength { tag: u8, len: usize },
    #[error("message of type \"{}\" is too large: {len} bytes, the limit is {max}", char::from(*tag))]
    FrameTooLarge { tag: u8, len: usize, max: usize },
    #[error("invalid startup packet length {0}")]
    InvalidStartupLength(usize),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("unexpected message type \"{}\" {context}", char::from(*tag))]
    Unexpected { tag: u8, context: &'static str },
    #[error("connection closed")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Decoder for tagged messages with a cap on the body size.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_body: usize,
}

impl FrameCodec {
    pub fn new(max_body: usize) -> Self {
        Self { max_body }
    }

    /// Checks whether `src` starts with a complete message without consuming it. Errors for a
    /// header that can never become valid.
    pub fn complete_len(&self, src: &[u8]) -> Result<Option<usize>, ProtocolError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = src[0];
        let len = u32::from_be_bytes([src[1], src[2], src[3], src[4]]) as usize;
        if len < 4 {
            return Err(ProtocolError::InvalidLength { tag, len });
        }
        if len - 4 > self.max_body {
            return Err(ProtocolError::FrameTooLarge {
                tag,
                len,
                max: self.max_body,
            });
        }
        let total = len + 1;
        Ok((src.len() >= total).then_some(total))
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        match self.complete_len(src)? {
            Some(total) => {
                let raw = src.split_to(total);
                Ok(Some(Frame { tag: raw[0], raw }))
            }
            None => {
                if src.len() >= HEADER_LEN {
                    let len = (&src[1..HEADER_LEN]).get_u32() as usize;
                    src.reserve(len + 1 - src.len());
                }
                Ok(None)
            }
        }
    }
}

/// Writes a tagged message: tag, a length placeholder, the body from `f`, then back-patches the
/// length.
pub fn write_message(buf: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    buf.extend_from_slice(&[tag, 0, 0, 0, 0]);
    let start = buf.len() - 4;
    f(buf);
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a NUL-terminated string.
pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    buf.extend_from_slice(s.as_bytes());
    buf.extend_from_slice(&[0]);
}

/// Reads a NUL-terminated string from the front of `src`, advancing it.
pub fn get_cstr<'a>(src: &mut &'a [u8]) -> Result<&'a str, ProtocolError> {
    let rest = *src;
    let bytes = get_cbytes(src)?;
    std::str::from_utf8(bytes).map_err(|_| {
        *src = rest;
        ProtocolError::Malformed("invalid UTF-8 in string")
    })
}

/// A NUL-terminated string as bytes: text in the client's encoding, which need not be UTF-8.
pub fn get_cbytes<'a>(src: &mut &'a [u8]) -> Result<&'a [u8], ProtocolError> {
    let end = src
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed("missing string terminator"))?;
    let s = &src[..end];
    *src = &src[end + 1..];
    Ok(s)
}

/// A NUL-terminated string decoded for reading (invalid UTF-8 replaced): for text the proxy
/// only inspects, such as SQL to classify or an error message to log.
pub fn get_text<'a>(src: &mut &'a [u8]) -> Result<std::borrow::Cow<'a, str>, ProtocolError> {
    get_cbytes(src).map(String::from_utf8_lossy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        write_message(&mut b, tag, |b| b.extend_from_slice(body));
        b
    }

    #[test]
    fn decodes_back_to_back_frames_and_waits_for_partial_ones() {
        let mut src = msg(b'Q', b"select 1\0");
        src.extend_from_slice(&msg(b'X', b""));
        let partial = msg(b'Q', b"select 2\0");
        src.extend_from_slice(&partial[..7]);
        let mut codec = FrameCodec::new(1024);
        let a = codec.decode(&mut src).unwrap().unwrap();
        assert_eq!((a.tag, a.body()), (b'Q', &b"select 1\0"[..]));
        let b = codec.decode(&mut src).unwrap().unwrap();
        assert_eq!((b.tag, b.body().len()), (b'X', 0));
        assert!(codec.decode(&mut src).unwrap().is_none());
        src.extend_from_slice(&partial[7..]);
        assert_eq!(
            codec.decode(&mut src).unwrap().unwrap().body(),
            b"select 2\0"
        );
    }

    #[test]
    fn rejects_short_and_oversized_lengths() {
        let mut short = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(matches!(
            FrameCodec::new(10).decode(&mut short),
            Err(ProtocolError::InvalidLength { len: 3, .. })
        ));
        let mut big = msg(b'd', &[0; 11]);
        assert!(matches!(
            FrameCodec::new(10).decode(&mut big),
            Err(ProtocolError::FrameTooLarge {
                len: 15,
                max: 10,
                ..
            })
        ));
    }

    #[test]
    fn cstr_roundtrip_and_missing_terminator() {
        let mut b = BytesMut::new();
        put_cstr(&mut b, "user");
        let mut s = &b[..];
        assert_eq!(get_cstr(&mut s).unwrap(), "user");
        assert!(s.is_empty());
        assert!(get_cstr(&mut &b"abc"[..]).is_err());
    }
}
