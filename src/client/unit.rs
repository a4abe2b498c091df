//! Requests as the transaction-pooling session sees them: a simple Query, a FunctionCall, or
//! extended-protocol messages up to Sync (or Flush), routed as one unit. Also what a request
//! means for routing (`Intent`) and which session changes it makes when it succeeds.

use bytes::BytesMut;

use crate::protocol::backend::Origin;
use crate::protocol::codec::{put_cstr, write_message};
use crate::protocol::{Frame, frontend};
use crate::router::Intent;
use crate::router::classify::{Analysis, FunctionRules, Route, SessionChange, TxEnd, analyze};

use super::prepared::{
    ClientStatements, Parsed, StatementClass, bind_statement, parse_name, parse_query,
};

/// Messages routed together.
#[derive(Debug, Default)]
pub struct Unit {
    pub frames: Vec<Frame>,
    /// Sent before its end arrived (the rest follows on the same connection), as a server
    /// would take messages one by one.
    pub open: bool,
    /// Made by the proxy to raise one of PostgreSQL's errors on the server (so that an open
    /// transaction aborts there too): where PostgreSQL itself raises it.
    pub raised_at: Option<Origin>,
}

impl Unit {
    /// A request that makes the server raise `code` with `message`.
    pub fn raising(code: &str, message: &str, origin: Option<Origin>) -> Unit {
        let escaped = message.replace('\'', "''");
        let sql = format!(
            "DO $pgpilot$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{escaped}'; END$pgpilot$"
        );
        let mut raw = BytesMut::new();
        write_message(&mut raw, frontend::QUERY, |b| put_cstr(b, &sql));
        let mut unit = Unit {
            raised_at: origin,
            ..Unit::default()
        };
        if let Ok(frame) = Frame::from_raw(raw) {
            unit.push(frame);
        }
        unit
    }

    /// True once `frame` completes the unit.
    pub fn push(&mut self, frame: Frame) -> bool {
        let done = matches!(
            frame.tag,
            frontend::SYNC | frontend::QUERY | frontend::FUNCTION_CALL | frontend::FLUSH
        );
        self.frames.push(frame);
        done
    }

    /// Responses ending in ReadyForQuery the server will send.
    pub fn readies(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| frontend::expects_ready(f.tag))
            .count()
    }

    /// Ends with Flush, or was sent open: the rest of the request follows on the same
    /// connection.
    pub fn is_partial(&self) -> bool {
        self.open || self.frames.last().is_some_and(|f| f.tag == frontend::FLUSH)
    }

    /// Only Sync/Flush: nothing for a server to do.
    pub fn is_sync_only(&self) -> bool {
        self.frames
            .iter()
            .all(|f| matches!(f.tag, frontend::SYNC | frontend::FLUSH))
    }
}

/// A session change the proxy applies once the request that made it succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Set { name: String, statement: String },
    Reset { name: String },
    ResetAll,
    DiscardAll,
    Deallocate { name: String },
    DeallocateAll,
    Pin,
    Route(Route),
    SessionReadOnly { read_only: bool, statement: String },
}

impl Change {
    /// Whether a rollback undoes it. PostgreSQL's deallocations take effect at once.
    pub fn is_transactional(&self) -> bool {
        !matches!(self, Change::Deallocate { .. } | Change::DeallocateAll)
    }
}

/// What a unit means: routing intent, the changes it makes, whether every statement in it
/// only ends a transaction.
#[derive(Debug, Default)]
pub struct Meaning {
    pub intent: Intent,
    pub changes: Vec<Change>,
    pub ends_tx_only: bool,
    /// Some statement in it commits (COMMIT / END): with `ends_tx_only`, a commit request.
    pub commits: bool,
    /// A lone `SET pgpilot.route = ...`: answered by the proxy.
    pub route_setting_only: Option<Option<Route>>,
    /// What each Parse in the unit prepares, in order (so it is classified only once).
    pub parsed: Vec<Parsed>,
    /// A lone simple Query holding exactly one statement.
    pub single_statement: bool,
    /// Parse/Describe/Close only: nothing executes.
    pub runs_nothing: bool,
}

/// Records the session changes a statement text makes; returns its classification.
pub(super) fn changes_of<'s>(
    sql: &'s str,
    rules: &FunctionRules,
    out: &mut Vec<Change>,
) -> Analysis<'s> {
    let a = analyze(sql, rules);
    for c in &a.changes {
        out.push(match c {
            SessionChange::Set { name, statement } => Change::Set {
                name: (*name).to_owned(),
                statement: (*statement).to_owned(),
            },
            SessionChange::Reset { name } => Change::Reset {
                name: (*name).to_owned(),
            },
            SessionChange::ResetAll => Change::ResetAll,
            SessionChange::DiscardAll => Change::DiscardAll,
            SessionChange::Deallocate { name, quoted } => Change::Deallocate {
                name: if *quoted {
                    name.replace("\"\"", "\"")
                } else {
                    name.to_ascii_lowercase()
                },
            },
            SessionChange::DeallocateAll => Change::DeallocateAll,
        });
    }
    if let Some(r) = a.route_setting {
        out.push(Change::Route(r));
    }
    if let Some(ro) = a.session_read_only {
        let statement = format!(
            "SET default_transaction_read_only = {}",
            if ro { "on" } else { "off" }
        );
        out.push(Change::SessionReadOnly {
            read_only: ro,
            statement,
        });
    }
    if a.pins {
        out.push(Change::Pin);
    }
    a
}

/// Works out what `unit` means for this client.
pub fn meaning(unit: &Unit, statements: &ClientStatements, rules: &FunctionRules) -> Meaning {
    let mut m = Meaning {
        intent: Intent {
            read_only: true,
            ..Intent::default()
        },
        ends_tx_only: true,
        ..Meaning::default()
    };
    let mut saw_statement = false;
    for f in &unit.frames {
        match f.tag {
            frontend::QUERY | frontend::PARSE => {
                let text = if f.tag == frontend::QUERY {
                    frontend::query_text(f)
                } else {
                    parse_query(f).map(|(_, q)| q)
                };
                let Ok(sql) = text else {
                    // Unreadable: the server will reject it; route it as a write.
                    m.intent.read_only = false;
                    m.ends_tx_only = false;
                    continue;
                };
                let mut own = Vec::new();
                let a = changes_of(&sql, rules, &mut own);
                m.changes.extend(own.iter().cloned());
                if f.tag == frontend::PARSE {
                    m.parsed.push(Parsed {
                        class: StatementClass::from_analysis(&a),
                        changes: own,
                    });
                }
                m.intent.read_only &= a.read_only;
                m.intent.begin = m.intent.begin.or(a.begin);
                m.intent.hint = m.intent.hint.or(a.hint);
                m.intent.sticky |= a.pins;
                m.ends_tx_only &= a.ends_tx.is_some();
                m.commits |= a.ends_tx == Some(TxEnd::Commit);
                saw_statement = true;
                if f.tag == frontend::QUERY && a.statements == 1 {
                    m.single_statement = unit.frames.len() == 1;
                    if a.route_statement {
                        m.route_setting_only = Some(a.route_setting);
                    }
                }
            }
            frontend::BIND => {
                let earlier = bind_statement(f).ok().and_then(|name| {
                    let parsed_here = unit.frames.iter().any(|p| {
                        p.tag == frontend::PARSE && parse_name(p).is_ok_and(|n| n == name)
                    });
                    if parsed_here {
                        None
                    } else {
                        statements.get(name).cloned()
                    }
                });
                if let Some(stmt) = earlier {
                    // Executing a statement prepared earlier makes its session changes now.
                    m.changes.extend(stmt.changes.iter().cloned());
                    let class = stmt.class;
                    m.intent.read_only &= class.read_only;
                    m.intent.begin = m.intent.begin.or(class.begin);
                    m.ends_tx_only &= class.ends_tx.is_some();
                    m.commits |= class.ends_tx == Some(TxEnd::Commit);
                    saw_statement = true;
                } else if !unit.frames.iter().any(|p| p.tag == frontend::PARSE) {
                    // A statement we never saw: assume the worst.
                    m.intent.read_only = false;
                    m.ends_tx_only = false;
                }
            }
            frontend::FUNCTION_CALL => {
                m.intent.read_only = false;
                m.intent.sticky = true;
                m.ends_tx_only = false;
            }
            _ => {}
        }
    }
    let executes = unit.frames.iter().any(|f| {
        matches!(
            f.tag,
            frontend::BIND | frontend::EXECUTE | frontend::QUERY | frontend::FUNCTION_CALL
        )
    });
    m.runs_nothing = !executes;
    if !executes {
        // Parse/Describe/Close only: nothing runs, so any node can answer (a standby parses
        // and describes writes too), and nothing changes the session yet. This also keeps
        // clients that prepare synchronously from waiting on a busy primary pool.
        m.intent = Intent {
            read_only: true,
            ..Intent::default()
        };
        m.changes.clear();
        m.ends_tx_only = false;
    }
    if unit.is_partial() {
        m.intent.sticky = true;
    }
    m.ends_tx_only &= saw_statement;
    if m.route_setting_only.is_some() && unit.frames.len() != 1 {
        m.route_setting_only = None;
    }
    m
}
