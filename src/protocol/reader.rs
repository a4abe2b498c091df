//! Cancel-safe reading of tagged messages from any byte stream, keeping leftover bytes buffered
//! between calls so a reader can be handed from one phase of a connection to the next.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::Decoder;

use super::{Frame, FrameCodec, ProtocolError};

/// Read size while a message is streaming in.
const READ_CHUNK: usize = 16 * 1024;
/// Buffer kept while waiting at a message boundary: idle connections stay cheap.
const IDLE_BUF: usize = 1024;

/// Reads whole frames from `R`. `next()` is cancel-safe: bytes already read stay buffered.
pub struct MessageReader<R> {
    inner: R,
    buf: BytesMut,
    codec: FrameCodec,
    /// The last read filled the buffer: data is streaming, read in big chunks.
    streaming: bool,
}

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub fn new(inner: R, buf: BytesMut, max_body: usize) -> Self {
        Self {
            inner,
            buf,
            codec: FrameCodec::new(max_body),
            streaming: false,
        }
    }

    /// The next complete frame, or `Ok(None)` at a clean end of stream between messages.
    pub async fn next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if self.buf.is_empty() && !self.streaming {
                // At a message boundary with nothing pending: keep only a small buffer.
                if self.buf.capacity() > 4 * READ_CHUNK {
                    self.buf = BytesMut::new();
                }
                self.buf.reserve(IDLE_BUF);
            } else if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            let spare = self.buf.capacity() - self.buf.len();
            let n = self.inner.read_buf(&mut self.buf).await?;
            // A read that filled the buffer means more is coming: read big chunks next.
            self.streaming = n == spare;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtocolError::Closed)
                };
            }
        }
    }

    /// Like `next`, but a clean end of stream is an error.
    pub async fn expect(&mut self) -> Result<Frame, ProtocolError> {
        self.next().await?.ok_or(ProtocolError::Closed)
    }

    /// Changes the largest body accepted from here on (a small cap before authentication).
    pub fn set_max_body(&mut self, max_body: usize) {
        self.codec = FrameCodec::new(max_body);
    }

    /// True when another complete frame is already buffered (so a batch of writes can wait).
    pub fn has_buffered_frame(&self) -> bool {
        matches!(self.codec.complete_len(&self.buf), Ok(Some(_)) | Err(_))
    }

    /// Gives back the stream and whatever was read but not yet consumed.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}
