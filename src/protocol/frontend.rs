//! Frontend (client → server) messages: tag constants and the typed views the proxy reads.
//! Encoders for messages the proxy sends to servers come from `postgres_protocol::message::frontend`.

use super::codec::get_cstr;
use super::{Frame, ProtocolError};

pub const BIND: u8 = b'B';
pub const CLOSE: u8 = b'C';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const PARSE: u8 = b'P';
/// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
pub const PASSWORD: u8 = b'p';
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';

/// True for the tags a v3 client may send once the session has started.
pub fn is_session_tag(tag: u8) -> bool {
    matches!(
        tag,
        BIND | CLOSE
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | DESCRIBE
            | EXECUTE
            | FLUSH
            | FUNCTION_CALL
            | PARSE
            | QUERY
            | SYNC
            | TERMINATE
    )
}

/// True for messages after which the server answers with ReadyForQuery.
pub fn expects_ready(tag: u8) -> bool {
    matches!(tag, QUERY | SYNC | FUNCTION_CALL)
}

/// `Query { sql }`, strictly UTF-8.
pub fn parse_query(frame: &Frame) -> Result<&str, ProtocolError> {
    let mut b = frame.body();
    get_cstr(&mut b)
}

/// `Query { sql }` for classification: text in the client's encoding, decoded with invalid
/// UTF-8 replaced (keywords and punctuation are ASCII in every encoding PostgreSQL allows
/// for clients).
pub fn query_text(frame: &Frame) -> Result<std::borrow::Cow<'_, str>, ProtocolError> {
    let mut b = frame.body();
    super::codec::get_text(&mut b)
}

/// SASLInitialResponse: mechanism name and the initial client response.
pub fn parse_sasl_initial(frame: &Frame) -> Result<(&str, &[u8]), ProtocolError> {
    let mut b = frame.body();
    let mechanism = get_cstr(&mut b)?;
    let [a, c, d, e, rest @ ..] = b else {
        return Err(ProtocolError::Malformed("short SASLInitialResponse"));
    };
    let len = i32::from_be_bytes([*a, *c, *d, *e]);
    match usize::try_from(len) {
        Ok(n) if n == rest.len() => Ok((mechanism, rest)),
        _ if len == -1 && rest.is_empty() => Ok((mechanism, rest)),
        _ => Err(ProtocolError::Malformed("bad SASLInitialResponse length")),
    }
}

/// PasswordMessage: a NUL-terminated password (or md5 hash).
pub fn parse_password(frame: &Frame) -> Result<&str, ProtocolError> {
    let mut b = frame.body();
    get_cstr(&mut b)
}
