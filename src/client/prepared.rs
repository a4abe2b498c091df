//! Prepared statements under transaction pooling. A client's named statements get server-side
//! names of the proxy's own (`pgp<client>_<hash>`); each server connection keeps a bounded LRU of
//! the names it holds. When a client's Bind, Describe or Close reaches a connection that lacks
//! the statement, the recorded Parse is sent first and its ParseComplete swallowed. The unnamed
//! statement is re-sent the same way when the client's last unnamed Parse ran elsewhere.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, BytesMut};

use super::unit::{Change, changes_of};
use crate::protocol::codec::{get_cbytes, get_cstr, put_cstr, write_message};
use crate::protocol::frontend;
use crate::protocol::{Frame, ProtocolError};
use crate::router::classify::{FunctionRules, TxEnd};

/// What routing needs to know about a statement, computed once at Parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatementClass {
    pub read_only: bool,
    pub begin: Option<bool>,
    pub pins: bool,
    /// ROLLBACK / COMMIT / ABORT / END.
    pub ends_tx: Option<TxEnd>,
}

impl StatementClass {
    #[cfg(test)]
    pub fn of(sql: &str, rules: &FunctionRules) -> Self {
        Self::from_analysis(&crate::router::classify::analyze(sql, rules))
    }

    pub fn from_analysis(a: &crate::router::classify::Analysis<'_>) -> Self {
        StatementClass {
            read_only: a.read_only,
            begin: a.begin,
            pins: a.pins,
            ends_tx: a.ends_tx,
        }
    }
}

#[derive(Debug)]
pub struct Statement {
    pub server_name: String,
    /// The Parse message as sent to servers (with `server_name`).
    pub parse: BytesMut,
    pub class: StatementClass,
    /// Session changes the statement makes each time it is executed (`SET ...` prepared once
    /// and executed by name).
    pub changes: Vec<Change>,
    /// The result description the statement had when the client prepared it (a
    /// RowDescription body, empty for NoData). PostgreSQL refuses to run a prepared statement
    /// whose result shape changed since (`0A000`); a re-Parse on another connection must too.
    pub shape: OnceLock<Vec<u8>>,
    /// Its shape changed: every execution fails with `0A000`, as PostgreSQL's does.
    pub broken: AtomicBool,
}

/// One client's statements.
#[derive(Debug)]
pub struct ClientStatements {
    client_id: u64,
    named: HashMap<String, Arc<Statement>>,
    /// The last unnamed Parse: a sequence number and the message.
    unnamed: Option<(u64, Arc<Statement>)>,
    seq: u64,
}

impl ClientStatements {
    pub fn new(client_id: u64) -> Self {
        ClientStatements {
            client_id,
            named: HashMap::new(),
            unnamed: None,
            seq: 0,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Statement>> {
        if name.is_empty() {
            self.unnamed.as_ref().map(|(_, s)| s)
        } else {
            self.named.get(name)
        }
    }

    pub fn clear(&mut self) {
        self.named.clear();
        self.unnamed = None;
    }

    /// Records the client's latest unnamed Parse (sent through the rewriter, or past it on a
    /// pipelined lane), so a later Bind of the unnamed statement finds it.
    pub fn set_unnamed(&mut self, frame: &Frame, parsed: Parsed) {
        self.seq += 1;
        let stmt = Statement {
            server_name: String::new(),
            parse: BytesMut::from(frame.raw()),
            class: parsed.class,
            changes: parsed.changes,
            shape: OnceLock::new(),
            broken: AtomicBool::new(false),
        };
        self.unnamed = Some((self.seq, Arc::new(stmt)));
    }

    pub fn remove(&mut self, name: &str) {
        self.named.remove(name);
    }

    pub fn len(&self) -> usize {
        self.named.len()
    }

    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }

    /// A server-side name for a new Parse. Never reused: a name the client closes and
    /// prepares again with other text must not find the old statement on a connection that
    /// still holds it.
    fn server_name(&mut self) -> String {
        self.seq += 1;
        format!("pgp{:x}_{:x}", self.client_id, self.seq)
    }
}

/// The statements one server connection holds, least recently used first out.
#[derive(Debug, Default)]
pub struct ServerStatements {
    names: HashMap<String, u64>,
    tick: u64,
    /// Whose unnamed statement the connection holds: (client id, sequence).
    unnamed_owner: Option<(u64, u64)>,
}

impl ServerStatements {
    fn touch(&mut self, name: &str) -> bool {
        self.tick += 1;
        match self.names.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Records `name`; returns the least recently used name to close when over `max`.
    fn insert(&mut self, name: String, max: usize) -> Option<String> {
        self.tick += 1;
        self.names.insert(name, self.tick);
        if self.names.len() <= max.max(1) {
            return None;
        }
        let oldest = self
            .names
            .iter()
            .min_by_key(|(_, t)| **t)
            .map(|(n, _)| n.clone())?;
        self.names.remove(&oldest);
        Some(oldest)
    }

    fn remove(&mut self, name: &str) {
        self.names.remove(name);
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The connection's unnamed statement is no longer any client's (it is now someone's whose
    /// statement the proxy does not track).
    pub fn forget_unnamed(&mut self) {
        self.unnamed_owner = None;
    }

    /// Forgets everything (after `DISCARD ALL` / `DEALLOCATE ALL` ran on the server).
    pub fn clear(&mut self) {
        self.names.clear();
        self.unnamed_owner = None;
    }
}

/// A response the proxy must account for, in the order the server will answer.
#[derive(Debug)]
pub enum Expect {
    /// ParseComplete; `name` is the server-side name added to the connection's set;
    /// `client` the client's name for a Parse the client sent ("" for the unnamed statement).
    Parse {
        injected: bool,
        name: Option<String>,
        client: Option<String>,
    },
    /// CloseComplete; `name` is the statement removed from the set.
    Close {
        injected: bool,
        name: Option<String>,
    },
    /// The answer to a Describe: ParameterDescription (of a statement) and then
    /// RowDescription or NoData. An injected one records the statement's shape.
    Describe {
        statement: bool,
        record: Option<Arc<Statement>>,
    },
    /// ReadyForQuery (after Sync, Query or FunctionCall); `sync` for a Sync, which the
    /// server ignores while in COPY FROM STDIN.
    Ready { sync: bool },
}

/// What to do with a server response.
#[derive(Debug, PartialEq, Eq)]
pub enum Disposition {
    Forward,
    Swallow,
}

/// Rewrites client messages for one server connection and tracks the responses to expect.
pub struct Rewriter<'a> {
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub expect: &'a mut VecDeque<Expect>,
    pub rules: &'a FunctionRules,
    pub max_prepared: usize,
    /// Classifications already made for the Parses being pushed, in order.
    pub parsed: std::slice::Iter<'a, Parsed>,
    /// Refuse to prepare again, unchecked, a statement whose shape is known, or to run one
    /// whose shape changed: `unverified` is set and the connection's set is left as it was
    /// (a lane cannot check first).
    pub refuse_unverified: bool,
    pub unverified: bool,
}

/// What a Parse prepares: its routing class and the session changes executing it makes.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub class: StatementClass,
    pub changes: Vec<Change>,
}

struct ParseView<'a> {
    name: &'a str,
    /// In the client's encoding: forwarded as bytes, decoded only to classify.
    query: &'a [u8],
    rest: &'a [u8],
}

fn parse_view(frame: &Frame) -> Result<ParseView<'_>, ProtocolError> {
    let mut b = frame.body();
    let name = get_cstr(&mut b)?;
    let query = get_cbytes(&mut b)?;
    Ok(ParseView {
        name,
        query,
        rest: b,
    })
}

/// The statement a Bind refers to, with the portal name and the rest of the body.
fn bind_view(frame: &Frame) -> Result<(&str, &str, &[u8]), ProtocolError> {
    let mut b = frame.body();
    let portal = get_cstr(&mut b)?;
    let statement = get_cstr(&mut b)?;
    Ok((portal, statement, b))
}

/// Describe / Close: `S` (statement) or `P` (portal) and a name.
fn target_view(frame: &Frame) -> Result<(u8, &str), ProtocolError> {
    let [kind, rest @ ..] = frame.body() else {
        return Err(ProtocolError::Malformed("empty Describe/Close"));
    };
    let mut b = rest;
    Ok((*kind, get_cstr(&mut b)?))
}

/// The statement name and SQL of a Parse message (for classification without a rewrite).
pub fn parse_query(frame: &Frame) -> Result<(&str, std::borrow::Cow<'_, str>), ProtocolError> {
    parse_view(frame).map(|p| (p.name, String::from_utf8_lossy(p.query)))
}

/// The statement name of a Parse message.
pub fn parse_name(frame: &Frame) -> Result<&str, ProtocolError> {
    parse_view(frame).map(|p| p.name)
}

/// The statement name a Bind refers to.
pub fn bind_statement(frame: &Frame) -> Result<&str, ProtocolError> {
    bind_view(frame).map(|(_, s, _)| s)
}

/// A complete extended request that needs nothing from the server's state: Parse of the
/// unnamed statement, Bind of it to the unnamed portal, an optional Describe of either, Execute
/// of that portal, Sync.
pub fn is_self_contained(frames: &[Frame]) -> bool {
    matches!(frames.split_first(), Some((parse, rest))
        if parse.tag == frontend::PARSE
            && parse_name(parse).is_ok_and(str::is_empty)
            && runs_unnamed_portal(rest) == Some(""))
}

/// An execution of one of the client's named statements through the unnamed portal: Bind,
/// an optional Describe of that portal or statement, Execute, Sync.
pub fn executes_named(frames: &[Frame], client: &ClientStatements) -> bool {
    runs_unnamed_portal(frames).is_some_and(|s| !s.is_empty() && client.named.contains_key(s))
}

/// Bind to the unnamed portal, an optional Describe of that portal or of the bound statement,
/// Execute of the portal, Sync: the bound statement's name.
fn runs_unnamed_portal(frames: &[Frame]) -> Option<&str> {
    let (bind, rest) = frames.split_first()?;
    if bind.tag != frontend::BIND {
        return None;
    }
    let (portal, statement, _) = bind_view(bind).ok()?;
    let describe = |f: &Frame| {
        f.tag == frontend::DESCRIBE
            && target_view(f)
                .is_ok_and(|(k, n)| (k == b'P' && n.is_empty()) || (k == b'S' && n == statement))
    };
    let execute = |f: &Frame| f.tag == frontend::EXECUTE && f.body().first() == Some(&0);
    let sync = |f: &Frame| f.tag == frontend::SYNC;
    let shape = match rest {
        [e, s] => execute(e) && sync(s),
        [d, e, s] => describe(d) && execute(e) && sync(s),
        _ => false,
    };
    (portal.is_empty() && shape).then_some(statement)
}

/// Describe/Close target when it is a statement.
pub fn statement_target(frame: &Frame) -> Result<Option<&str>, ProtocolError> {
    target_view(frame).map(|(k, n)| (k == b'S').then_some(n))
}

fn encode_parse(out: &mut BytesMut, name: &str, query: &[u8], rest: &[u8]) {
    write_message(out, frontend::PARSE, |b| {
        put_cstr(b, name);
        b.extend_from_slice(query);
        b.put_u8(0);
        b.extend_from_slice(rest);
    });
}

fn encode_target(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    write_message(out, tag, |b| {
        b.put_u8(kind);
        put_cstr(b, name);
    });
}

impl Rewriter<'_> {
    /// Appends what the server must receive for `frame` to `out`.
    pub fn push(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), ProtocolError> {
        match frame.tag {
            frontend::PARSE => {
                let p = parse_view(frame)?;
                let Parsed { class, changes } = match self.parsed.next() {
                    Some(known) => known.clone(),
                    None => {
                        let mut changes = Vec::new();
                        let sql = String::from_utf8_lossy(p.query);
                        let a = changes_of(&sql, self.rules, &mut changes);
                        Parsed {
                            class: StatementClass::from_analysis(&a),
                            changes,
                        }
                    }
                };
                if p.name.is_empty() {
                    self.client.set_unnamed(frame, Parsed { class, changes });
                    self.server.unnamed_owner = Some((self.client.client_id, self.client.seq));
                    out.extend_from_slice(frame.raw());
                    self.expect.push_back(Expect::Parse {
                        injected: false,
                        name: None,
                        client: Some(String::new()),
                    });
                    return Ok(());
                }
                if let Some(existing) = self.ensure(p.name, out) {
                    // PostgreSQL refuses a name in use (42P05): the server says so itself,
                    // for the statement this connection now holds under that name.
                    encode_parse(out, &existing, p.query, p.rest);
                    self.expect.push_back(Expect::Parse {
                        injected: false,
                        name: None,
                        client: None,
                    });
                    return Ok(());
                }
                let server_name = self.client.server_name();
                let mut parse = BytesMut::new();
                encode_parse(&mut parse, &server_name, p.query, p.rest);
                self.add_to_server(&server_name, out);
                out.extend_from_slice(&parse);
                self.expect.push_back(Expect::Parse {
                    injected: false,
                    name: Some(server_name.clone()),
                    client: Some(p.name.to_owned()),
                });
                let stmt = Arc::new(Statement {
                    server_name,
                    parse,
                    class,
                    changes,
                    shape: OnceLock::new(),
                    broken: AtomicBool::new(false),
                });
                // Learn its result shape in the same round trip (the answer is swallowed).
                encode_target(out, frontend::DESCRIBE, b'S', &stmt.server_name);
                self.expect.push_back(Expect::Describe {
                    statement: true,
                    record: Some(stmt.clone()),
                });
                self.client.named.insert(p.name.to_owned(), stmt);
            }
            frontend::BIND => {
                let (portal, statement, rest) = bind_view(frame)?;
                match self.ensure(statement, out) {
                    Some(server_name) => write_message(out, frontend::BIND, |b| {
                        put_cstr(b, portal);
                        put_cstr(b, &server_name);
                        b.extend_from_slice(rest);
                    }),
                    None => out.extend_from_slice(frame.raw()),
                }
            }
            frontend::DESCRIBE => {
                let (kind, name) = target_view(frame)?;
                match (kind == b'S').then(|| self.ensure(name, out)).flatten() {
                    Some(server_name) => encode_target(out, frontend::DESCRIBE, b'S', &server_name),
                    None => out.extend_from_slice(frame.raw()),
                }
                self.expect.push_back(Expect::Describe {
                    statement: kind == b'S',
                    record: None,
                });
            }
            frontend::CLOSE => {
                let (kind, name) = target_view(frame)?;
                let known = (kind == b'S' && !name.is_empty())
                    .then(|| self.client.named.remove(name))
                    .flatten();
                match known {
                    Some(stmt) => {
                        encode_target(out, frontend::CLOSE, b'S', &stmt.server_name);
                        self.server.remove(&stmt.server_name);
                        self.expect.push_back(Expect::Close {
                            injected: false,
                            name: None,
                        });
                    }
                    None => {
                        out.extend_from_slice(frame.raw());
                        self.expect.push_back(Expect::Close {
                            injected: false,
                            name: None,
                        });
                    }
                }
            }
            frontend::QUERY => {
                // A simple Query destroys the unnamed statement.
                self.server.unnamed_owner = None;
                out.extend_from_slice(frame.raw());
                self.expect.push_back(Expect::Ready { sync: false });
            }
            frontend::SYNC => {
                out.extend_from_slice(frame.raw());
                self.expect.push_back(Expect::Ready { sync: true });
            }
            frontend::FUNCTION_CALL => {
                out.extend_from_slice(frame.raw());
                self.expect.push_back(Expect::Ready { sync: false });
            }
            _ => out.extend_from_slice(frame.raw()),
        }
        Ok(())
    }

    /// Makes sure the server holds the client's statement `name`; returns the server-side name
    /// to use, or `None` to forward the message unchanged (unnamed or unknown statements).
    fn ensure(&mut self, name: &str, out: &mut BytesMut) -> Option<String> {
        if name.is_empty() {
            if let Some((seq, stmt)) = &self.client.unnamed {
                let me = (self.client.client_id, *seq);
                if self.server.unnamed_owner != Some(me) {
                    out.extend_from_slice(&stmt.parse);
                    self.expect.push_back(Expect::Parse {
                        injected: true,
                        name: None,
                        client: None,
                    });
                    self.server.unnamed_owner = Some(me);
                }
            }
            return None;
        }
        let stmt = self.client.named.get(name)?.clone();
        if stmt.broken.load(Ordering::Relaxed) {
            // Only the ordinary path gives PostgreSQL's answer (0A000) for it.
            self.unverified = true;
            if self.refuse_unverified {
                return Some(stmt.server_name.clone());
            }
        }
        if !self.server.touch(&stmt.server_name) {
            if stmt.shape.get().is_some() {
                self.unverified = true;
                if self.refuse_unverified {
                    return Some(stmt.server_name.clone());
                }
            }
            self.add_to_server(&stmt.server_name, out);
            out.extend_from_slice(&stmt.parse);
            self.expect.push_back(Expect::Parse {
                injected: true,
                name: Some(stmt.server_name.clone()),
                client: None,
            });
        }
        Some(stmt.server_name.clone())
    }

    /// Records a statement on the server, closing the least recently used one when full.
    fn add_to_server(&mut self, server_name: &str, out: &mut BytesMut) {
        if let Some(evicted) = self
            .server
            .insert(server_name.to_owned(), self.max_prepared)
        {
            encode_target(out, frontend::CLOSE, b'S', &evicted);
            self.expect.push_back(Expect::Close {
                injected: true,
                name: Some(evicted),
            });
        }
    }
}

/// Accounts for one server response: whether to pass it to the client.
pub fn on_response(
    tag: u8,
    body: &[u8],
    expect: &mut VecDeque<Expect>,
    server: &mut ServerStatements,
) -> Disposition {
    use crate::protocol::backend;
    match tag {
        backend::PARAMETER_DESCRIPTION => match expect.front() {
            Some(Expect::Describe {
                record: Some(_), ..
            }) => Disposition::Swallow,
            _ => Disposition::Forward,
        },
        backend::ROW_DESCRIPTION | backend::NO_DATA
            if matches!(expect.front(), Some(Expect::Describe { .. })) =>
        {
            match expect.pop_front() {
                Some(Expect::Describe {
                    record: Some(stmt), ..
                }) => {
                    let shape = if tag == backend::NO_DATA {
                        Vec::new()
                    } else {
                        body.to_vec()
                    };
                    let _ = stmt.shape.set(shape);
                    Disposition::Swallow
                }
                _ => Disposition::Forward,
            }
        }
        b'1' => match expect.pop_front() {
            Some(Expect::Parse { injected: true, .. }) => Disposition::Swallow,
            _ => Disposition::Forward,
        },
        b'3' => match expect.pop_front() {
            Some(Expect::Close { injected: true, .. }) => Disposition::Swallow,
            _ => Disposition::Forward,
        },
        backend::ERROR_RESPONSE => {
            // The server skips everything up to the next Sync: undo what those would have done.
            while let Some(e) = expect.front() {
                match e {
                    Expect::Ready { .. } => break,
                    Expect::Parse { name: Some(n), .. } => server.remove(n),
                    Expect::Close { name: Some(n), .. } => {
                        server.names.insert(n.clone(), 0);
                    }
                    _ => {}
                }
                expect.pop_front();
            }
            Disposition::Forward
        }
        backend::READY_FOR_QUERY => {
            while let Some(e) = expect.pop_front() {
                if matches!(e, Expect::Ready { .. }) {
                    break;
                }
            }
            Disposition::Forward
        }
        _ => Disposition::Forward,
    }
}

/// COPY FROM STDIN started: a Sync the client already sent is ignored by the server during the
/// copy, so it will not be answered. Returns true when one was dropped from the expectations.
pub fn copy_in_started(expect: &mut VecDeque<Expect>) -> bool {
    match expect
        .iter()
        .position(|e| matches!(e, Expect::Ready { .. }))
    {
        Some(i) if matches!(expect[i], Expect::Ready { sync: true }) => {
            expect.remove(i);
            true
        }
        _ => false,
    }
}

mod shape;
pub use shape::{
    SHAPE_CHANGED, SHAPE_CHANGED_AT, ShapeChanged, check_request, failed_parses, on_check_answer,
    unanswered_parses, unchecked_statements,
};

#[cfg(test)]
mod tests;
