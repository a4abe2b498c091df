//! What PostgreSQL remembers about a prepared statement that a re-Parse on another server
//! connection could silently change: whether its Parse failed (then it never existed), the
//! client's names in server messages, and its result shape (checked before it is prepared
//! again; a change gives `0A000`, as PostgreSQL's cached plan does).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::{
    ClientStatements, Expect, ServerStatements, Statement, bind_view, encode_target, target_view,
};
use crate::protocol::backend::Origin;
use crate::protocol::codec::write_message;
use crate::protocol::{Frame, frontend};

/// The error PostgreSQL gives for a prepared statement whose result shape changed.
pub const SHAPE_CHANGED: &str = "cached plan must not change result type";
/// Where PostgreSQL raises it; pgJDBC re-prepares and retries only an error from there.
pub const SHAPE_CHANGED_AT: Origin = Origin {
    file: "plancache.c",
    routine: "RevalidateCachedQuery",
};

/// A request executes a statement whose result shape changed since the client prepared it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{SHAPE_CHANGED}")]
pub struct ShapeChanged;

/// The client's Parses an ErrorResponse undoes: the one that failed and those the server
/// skips up to the next Sync, as (client name, server name); "" names the unnamed statement.
/// Call before `on_response` consumes the expectations.
pub fn failed_parses(expect: &VecDeque<Expect>) -> Vec<(String, Option<String>)> {
    client_parses(
        expect
            .iter()
            .take_while(|e| !matches!(e, Expect::Ready { .. })),
    )
}

/// Every client Parse still unanswered when the server was lost: none of them completed, so
/// none may leave a statement behind (a retry sends them again).
pub fn unanswered_parses(expect: &VecDeque<Expect>) -> Vec<(String, Option<String>)> {
    client_parses(expect.iter())
}

fn client_parses<'a>(expect: impl Iterator<Item = &'a Expect>) -> Vec<(String, Option<String>)> {
    expect
        .filter_map(|e| match e {
            Expect::Parse {
                injected: false,
                name,
                client: Some(c),
            } => Some((c.clone(), name.clone())),
            _ => None,
        })
        .collect()
}

impl ClientStatements {
    /// Forgets a statement whose Parse failed: it never existed for PostgreSQL.
    pub fn parse_failed(&mut self, client: &str, server: Option<&str>) {
        if client.is_empty() {
            self.unnamed = None;
        } else if self
            .named
            .get(client)
            .is_some_and(|s| Some(s.server_name.as_str()) == server)
        {
            self.named.remove(client);
        }
    }

    /// The client's name for one of its statements' server-side names.
    pub fn client_name_of(&self, server_name: &str) -> Option<&str> {
        self.named
            .iter()
            .find(|(_, s)| s.server_name == server_name)
            .map(|(n, _)| n.as_str())
    }

    /// `text` (a server message) with the proxy's quoted statement names put back as the
    /// client's; `None` when it names none.
    pub fn unrename(&self, text: &[u8]) -> Option<Vec<u8>> {
        const OPEN: &[u8] = b"\"pgp";
        let mut out = Vec::new();
        let mut rest = text;
        let mut changed = false;
        while let Some(at) = rest.windows(OPEN.len()).position(|w| w == OPEN) {
            let name_start = at + 1;
            let Some(len) = rest[name_start..].iter().position(|&b| b == b'"') else {
                break;
            };
            let name = std::str::from_utf8(&rest[name_start..name_start + len]).ok();
            out.extend_from_slice(&rest[..name_start]);
            match name.and_then(|n| self.client_name_of(n)) {
                Some(client) => {
                    out.extend_from_slice(client.as_bytes());
                    changed = true;
                }
                None => out.extend_from_slice(&rest[name_start..name_start + len]),
            }
            rest = &rest[name_start + len..];
        }
        out.extend_from_slice(rest);
        changed.then_some(out)
    }
}

/// The client's statements that `frames` executes (Bind) or describes, whose shape is known
/// and which the connection lacks: they must be prepared and checked before the request
/// runs. `Err(ShapeChanged)` when one is known to have changed shape (PostgreSQL then
/// refuses to execute or describe it).
pub fn unchecked_statements(
    frames: &[Frame],
    client: &ClientStatements,
    server: &ServerStatements,
) -> Result<Vec<Arc<Statement>>, ShapeChanged> {
    let mut out: Vec<Arc<Statement>> = Vec::new();
    for f in frames {
        let name = match f.tag {
            frontend::BIND => match bind_view(f) {
                Ok((_, s, _)) => s,
                Err(_) => continue,
            },
            frontend::DESCRIBE => match target_view(f) {
                Ok((b'S', s)) => s,
                _ => continue,
            },
            frontend::PARSE => return Ok(out),
            _ => continue,
        };
        let Some(stmt) = (!name.is_empty()).then(|| client.named.get(name)).flatten() else {
            continue;
        };
        if stmt.broken.load(Ordering::Relaxed) {
            return Err(ShapeChanged);
        }
        if stmt.shape.get().is_some()
            && !server.names.contains_key(&stmt.server_name)
            && !out.iter().any(|s| Arc::ptr_eq(s, stmt))
        {
            out.push(stmt.clone());
        }
    }
    Ok(out)
}

/// Prepares `stmts` on a connection and describes them, then Sync: the check before a
/// re-Parse. The connection's set records them; `on_check_answer` settles each one.
pub fn check_request(
    stmts: &[Arc<Statement>],
    server: &mut ServerStatements,
    max_prepared: usize,
) -> (BytesMut, usize) {
    let mut out = BytesMut::new();
    let mut closes = 0;
    for stmt in stmts {
        if let Some(evicted) = server.insert(stmt.server_name.clone(), max_prepared) {
            encode_target(&mut out, frontend::CLOSE, b'S', &evicted);
            closes += 1;
        }
        out.extend_from_slice(&stmt.parse);
        encode_target(&mut out, frontend::DESCRIBE, b'S', &stmt.server_name);
    }
    write_message(&mut out, frontend::SYNC, |_| {});
    (out, closes)
}

/// Settles the answer to `check_request`, one server message at a time; `next` is the index
/// of the statement being answered. A changed shape marks the statement broken; an error
/// (the server skips the rest) leaves the unanswered ones unprepared.
pub fn on_check_answer(
    tag: u8,
    body: &[u8],
    stmts: &[Arc<Statement>],
    next: &mut usize,
    server: &mut ServerStatements,
) {
    use crate::protocol::backend;
    match tag {
        backend::ROW_DESCRIPTION | backend::NO_DATA => {
            if let Some(stmt) = stmts.get(*next) {
                let now: &[u8] = if tag == backend::NO_DATA { &[] } else { body };
                if stmt.shape.get().is_some_and(|then| then.as_slice() != now) {
                    stmt.broken.store(true, Ordering::Relaxed);
                }
            }
            *next += 1;
        }
        backend::ERROR_RESPONSE => {
            for stmt in stmts.get(*next..).unwrap_or_default() {
                server.remove(&stmt.server_name);
            }
            *next = stmts.len();
        }
        _ => {}
    }
}
