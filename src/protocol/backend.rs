//! Backend (server → client) messages: tag constants, the typed views the proxy reads, and
//! encoders for the messages the proxy writes to clients itself.

use bytes::{BufMut, BytesMut};

use super::codec::{get_cstr, get_text, put_cstr, write_message};
use super::startup::BackendKey;
use super::{Frame, ProtocolError};

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const DATA_ROW: u8 = b'D';
pub const EMPTY_QUERY: u8 = b'I';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NO_DATA: u8 = b'n';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const PARAMETER_STATUS: u8 = b'S';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ROW_DESCRIPTION: u8 = b'T';

/// Transaction status carried by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// `ReadyForQuery { status }`: the transaction boundary.
pub struct ReadyForQuery;

impl ReadyForQuery {
    pub fn parse(frame: &Frame) -> Result<TxStatus, ProtocolError> {
        match frame.body() {
            b"I" => Ok(TxStatus::Idle),
            b"T" => Ok(TxStatus::InTransaction),
            b"E" => Ok(TxStatus::Failed),
            _ => Err(ProtocolError::Malformed("bad ReadyForQuery status")),
        }
    }
}

pub fn parse_backend_key(frame: &Frame) -> Result<BackendKey, ProtocolError> {
    match frame.body() {
        [a, b, c, d, e, f, g, h] => Ok(BackendKey {
            pid: i32::from_be_bytes([*a, *b, *c, *d]),
            secret: i32::from_be_bytes([*e, *f, *g, *h]),
        }),
        _ => Err(ProtocolError::Malformed("bad BackendKeyData")),
    }
}

pub fn parse_parameter_status(frame: &Frame) -> Result<(String, String), ProtocolError> {
    let mut b = frame.body();
    let name = get_cstr(&mut b)?.to_owned();
    let value = get_cstr(&mut b)?.to_owned();
    Ok((name, value))
}

/// The fields of an ErrorResponse or NoticeResponse that the proxy cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    /// The backend is going away, not just failing a request: FATAL or PANIC errors, and the
    /// WARNING notices PostgreSQL 14+ sends before an immediate shutdown or crash restart
    /// (`57P01` admin shutdown, `57P02` crash shutdown). `tag` is the message's.
    pub fn is_goodbye(&self, tag: u8) -> bool {
        if tag == ERROR_RESPONSE {
            matches!(self.severity.as_str(), "FATAL" | "PANIC")
        } else {
            matches!(self.code.as_str(), "57P01" | "57P02")
        }
    }

    pub fn parse(frame: &Frame) -> Result<Self, ProtocolError> {
        let mut b = frame.body();
        let mut out = ErrorFields::default();
        while let [kind, rest @ ..] = b {
            if *kind == 0 {
                break;
            }
            b = rest;
            // Messages come in the client's encoding: read, never required to be UTF-8.
            let value = get_text(&mut b)?;
            match kind {
                b'V' => out.severity = value.into_owned(),
                b'S' if out.severity.is_empty() => out.severity = value.into_owned(),
                b'C' => out.code = value.into_owned(),
                b'M' => out.message = value.into_owned(),
                _ => {}
            }
        }
        Ok(out)
    }
}

impl std::fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.severity, self.message, self.code)
    }
}

/// An ErrorResponse or NoticeResponse with its message field (`M`) replaced by what `f`
/// makes of it; `None` when `f` changes nothing. Other fields are kept byte for byte.
pub fn rewrite_message(frame: &Frame, f: impl Fn(&[u8]) -> Option<Vec<u8>>) -> Option<BytesMut> {
    // Find the message field and ask `f`; only a changed message rebuilds the frame.
    let body = frame.body();
    let mut b = body;
    let mut at = 0;
    let (start, end, replaced) = loop {
        let [kind, rest @ ..] = b else {
            return None;
        };
        if *kind == 0 {
            return None;
        }
        let mut tail = rest;
        let value = super::codec::get_cbytes(&mut tail).ok()?;
        let start = at + 1;
        let end = start + value.len();
        if *kind == b'M' {
            break (start, end, f(value)?);
        }
        at = end + 1;
        b = tail;
    };
    let mut out = BytesMut::new();
    write_message(&mut out, frame.tag, |buf| {
        buf.extend_from_slice(&body[..start]);
        buf.extend_from_slice(&replaced);
        buf.extend_from_slice(&body[end..]);
    });
    Some(out)
}

/// Severity of an error the proxy raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    error_response_from(buf, severity, code, message, None);
}

/// Where in PostgreSQL an error the proxy gives on the server's behalf is raised. Drivers act
/// on it: pgJDBC re-prepares after `0A000` only when the routine is `RevalidateCachedQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub file: &'static str,
    pub routine: &'static str,
}

/// An ErrorResponse, with PostgreSQL's file and routine fields when it stands for one of
/// PostgreSQL's own errors (the line is left out: it depends on the server's build).
pub fn error_response_from(
    buf: &mut BytesMut,
    severity: Severity,
    code: &str,
    message: &str,
    origin: Option<Origin>,
) {
    write_message(buf, ERROR_RESPONSE, |b| {
        for (kind, value) in [
            (b'S', severity.as_str()),
            (b'V', severity.as_str()),
            (b'C', code),
        ] {
            b.put_u8(kind);
            put_cstr(b, value);
        }
        b.put_u8(b'M');
        put_cstr(b, message);
        put_origin(b, origin);
        b.put_u8(0);
    });
}

fn put_origin(b: &mut BytesMut, origin: Option<Origin>) {
    if let Some(o) = origin {
        b.put_u8(b'F');
        put_cstr(b, o.file);
        b.put_u8(b'R');
        put_cstr(b, o.routine);
    }
}

/// An ErrorResponse raised on the server for the proxy (a `DO … RAISE`) made to look as
/// PostgreSQL's own: severity, code and message kept byte for byte; the PL/pgSQL context and
/// source location replaced by `origin`. `None` when the frame is not an ErrorResponse.
pub fn reoriginate(frame: &Frame, origin: Origin) -> Option<BytesMut> {
    if frame.tag != ERROR_RESPONSE {
        return None;
    }
    let mut b = frame.body();
    let mut out = BytesMut::new();
    write_message(&mut out, ERROR_RESPONSE, |buf| {
        while let [kind, rest @ ..] = b {
            if *kind == 0 {
                break;
            }
            let mut tail = rest;
            let Ok(value) = super::codec::get_cbytes(&mut tail) else {
                break;
            };
            if matches!(kind, b'S' | b'V' | b'C' | b'M') {
                buf.put_u8(*kind);
                buf.extend_from_slice(value);
                buf.put_u8(0);
            }
            b = tail;
        }
        put_origin(buf, Some(origin));
        buf.put_u8(0);
    });
    Some(out)
}

/// A NOTICE with a message and an optional detail (used by the admin console).
pub fn notice(buf: &mut BytesMut, message: &str, detail: Option<&str>) {
    write_message(buf, NOTICE_RESPONSE, |b| {
        for (kind, value) in [(b'S', "NOTICE"), (b'V', "NOTICE"), (b'C', "00000")] {
            b.put_u8(kind);
            put_cstr(b, value);
        }
        b.put_u8(b'M');
        put_cstr(b, message);
        if let Some(d) = detail {
            b.put_u8(b'D');
            put_cstr(b, d);
        }
        b.put_u8(0);
    });
}

pub fn empty_query(buf: &mut BytesMut) {
    write_message(buf, EMPTY_QUERY, |_| {});
}

pub fn authentication_ok(buf: &mut BytesMut) {
    write_message(buf, AUTHENTICATION, |b| b.put_i32(0));
}

pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    write_message(buf, AUTHENTICATION, |b| {
        b.put_i32(5);
        b.extend_from_slice(&salt);
    });
}

pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    write_message(buf, AUTHENTICATION, |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, AUTHENTICATION, |b| {
        b.put_i32(11);
        b.extend_from_slice(data);
    });
}

pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, AUTHENTICATION, |b| {
        b.put_i32(12);
        b.extend_from_slice(data);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    write_message(buf, PARAMETER_STATUS, |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, key: BackendKey) {
    write_message(buf, BACKEND_KEY_DATA, |b| {
        b.put_i32(key.pid);
        b.put_i32(key.secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    write_message(buf, READY_FOR_QUERY, |b| b.put_u8(status.byte()));
}

/// NegotiateProtocolVersion: the newest minor version we support and the options we ignore.
pub fn negotiate_protocol_version<'a>(
    buf: &mut BytesMut,
    minor: i32,
    unsupported: impl ExactSizeIterator<Item = &'a str>,
) {
    write_message(buf, NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(minor);
        b.put_i32(unsupported.len() as i32);
        for opt in unsupported {
            put_cstr(b, opt);
        }
    });
}

/// RowDescription of text columns (used by the admin console).
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    write_message(buf, ROW_DESCRIPTION, |b| {
        b.put_i16(columns.len() as i16);
        for name in columns {
            put_cstr(b, name);
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1);
            b.put_i32(-1);
            b.put_i16(0); // text format
        }
    });
}

pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    write_message(buf, DATA_ROW, |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            match v {
                Some(s) => {
                    b.put_i32(s.len() as i32);
                    b.extend_from_slice(s.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    write_message(buf, COMMAND_COMPLETE, |b| put_cstr(b, tag));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_message_changes_only_the_message_field() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Error,
            "08P01",
            "statement \"pgp1_2\" requires 0",
        );
        let frame = Frame::from_raw(b).unwrap();
        assert!(rewrite_message(&frame, |_| None).is_none());
        let out = rewrite_message(&frame, |m| {
            Some(
                String::from_utf8_lossy(m)
                    .replace("pgp1_2", "s1")
                    .into_bytes(),
            )
        })
        .unwrap();
        let f = ErrorFields::parse(&Frame::from_raw(out).unwrap()).unwrap();
        assert_eq!(
            (f.severity.as_str(), f.code.as_str(), f.message.as_str()),
            ("ERROR", "08P01", "statement \"s1\" requires 0")
        );
    }

    #[test]
    fn reoriginate_keeps_the_error_and_replaces_where_it_was_raised() {
        let mut raw = BytesMut::new();
        write_message(&mut raw, ERROR_RESPONSE, |b| {
            for (k, v) in [
                (b'S', "FEHLER"),
                (b'V', "ERROR"),
                (b'C', "0A000"),
                (b'M', "cached plan must not change result type"),
                (b'W', "PL/pgSQL function inline_code_block line 1 at RAISE"),
                (b'F', "pl_exec.c"),
                (b'L', "3911"),
                (b'R', "exec_stmt_raise"),
            ] {
                b.put_u8(k);
                put_cstr(b, v);
            }
            b.put_u8(0);
        });
        let origin = Origin {
            file: "plancache.c",
            routine: "RevalidateCachedQuery",
        };
        let out = reoriginate(&Frame::from_raw(raw).unwrap(), origin).unwrap();
        let mut expected = BytesMut::new();
        write_message(&mut expected, ERROR_RESPONSE, |b| {
            for (k, v) in [
                (b'S', "FEHLER"),
                (b'V', "ERROR"),
                (b'C', "0A000"),
                (b'M', "cached plan must not change result type"),
                (b'F', "plancache.c"),
                (b'R', "RevalidateCachedQuery"),
            ] {
                b.put_u8(k);
                put_cstr(b, v);
            }
            b.put_u8(0);
        });
        assert_eq!(out, expected);
        let mut notice_raw = BytesMut::new();
        notice(&mut notice_raw, "hello", None);
        assert!(reoriginate(&Frame::from_raw(notice_raw).unwrap(), origin).is_none());
    }

    #[test]
    fn error_response_roundtrips_through_the_view() {
        let mut b = BytesMut::new();
        error_response(
            &mut b,
            Severity::Fatal,
            "28P01",
            "password authentication failed",
        );
        let frame = Frame::from_raw(b).unwrap();
        let f = ErrorFields::parse(&frame).unwrap();
        assert_eq!((f.severity.as_str(), f.code.as_str()), ("FATAL", "28P01"));
        assert_eq!(f.message, "password authentication failed");
    }

    #[test]
    fn ready_for_query_and_key_views() {
        let mut b = BytesMut::new();
        ready_for_query(&mut b, TxStatus::Failed);
        assert_eq!(
            ReadyForQuery::parse(&Frame::from_raw(b).unwrap()).unwrap(),
            TxStatus::Failed
        );
        let mut b = BytesMut::new();
        let key = BackendKey {
            pid: 42,
            secret: -7,
        };
        backend_key_data(&mut b, key);
        assert_eq!(
            parse_backend_key(&Frame::from_raw(b).unwrap()).unwrap(),
            key
        );
    }
}
