//! Statement classification for routing: is this SQL text provably read-only, does it open a
//! transaction (and is that read-only), does it carry a routing hint, does it change session
//! state the proxy must track, or must it pin the client to its server connection.
//!
//! Conservative by construction: anything not proven read-only goes to the primary. The work is
//! one pass over the tokens with no allocation and a fixed-size statement head.

use std::collections::HashSet;

use super::lexer::{Lexer, Token};

/// A routing hint from a leading `/* pgpilot:primary */` or `/* pgpilot:replica */` comment,
/// or the value of `SET pgpilot.route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Primary,
    Replica,
    Auto,
}

/// A change to session state that the proxy tracks or must react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionChange<'a> {
    /// `SET [SESSION] name = value`: the statement text to replay elsewhere.
    Set {
        name: &'a str,
        statement: &'a str,
    },
    Reset {
        name: &'a str,
    },
    ResetAll,
    DiscardAll,
    /// `name` as written: a quoted identifier's contents, or a word PostgreSQL folds to
    /// lower case.
    Deallocate {
        name: &'a str,
        quoted: bool,
    },
    DeallocateAll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis<'a> {
    /// Every statement is proven read-only (safe on a hot standby).
    pub read_only: bool,
    /// The text opens a transaction block; `Some(true)` when it is declared READ ONLY.
    pub begin: Option<bool>,
    /// `/* pgpilot:... */` hint.
    pub hint: Option<Route>,
    /// `SET pgpilot.route = ...` (answered by the proxy); `None` for a value it does not know.
    pub route_setting: Option<Route>,
    /// A `SET pgpilot.route` statement was seen, whatever its value.
    pub route_statement: bool,
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY | READ WRITE`.
    pub session_read_only: Option<bool>,
    /// LISTEN, session advisory locks, `WITH HOLD` cursors, temp tables, SQL `PREPARE`.
    pub pins: bool,
    /// Session changes in statement order (at most a few; more are summarised by `pins`).
    pub changes: Vec<SessionChange<'a>>,
    pub statements: usize,
    /// A single statement that ends the transaction block: COMMIT / END or ROLLBACK / ABORT
    /// (not `ROLLBACK TO`, `… PREPARED` or `… AND CHAIN`, which leave a transaction open or
    /// act on another one).
    pub ends_tx: Option<TxEnd>,
}

/// How a statement ends the transaction block it runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxEnd {
    Commit,
    Rollback,
}

/// Functions that make an otherwise read-only statement a write.
#[derive(Debug, Clone)]
pub struct FunctionRules {
    extra_write: HashSet<String>,
    read_only: HashSet<String>,
}

const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "pg_notify",
    "set_config",
    "txid_current",
    "pg_current_xact_id",
    "pg_promote",
    "dblink_exec",
    "pg_create_restore_point",
    "pg_switch_wal",
    "pg_logical_emit_message",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_import_system_collations",
    "pg_advisory_xact_lock",
    "pg_advisory_xact_lock_shared",
    "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared",
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
];

/// Session-level advisory locks outlive the transaction: they pin the client.
const SESSION_LOCK_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

impl Default for FunctionRules {
    fn default() -> Self {
        FunctionRules::new(&[], &[])
    }
}

impl FunctionRules {
    /// `write_functions` extends the built-in list; `read_only_functions` removes names from it.
    pub fn new(write_functions: &[String], read_only_functions: &[String]) -> Self {
        FunctionRules {
            extra_write: write_functions
                .iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
            read_only: read_only_functions
                .iter()
                .map(|f| f.to_ascii_lowercase())
                .collect(),
        }
    }

    fn is_write(&self, name: &str) -> bool {
        let mut buf = [0u8; 64];
        let Some(lower) = lowercase(name, &mut buf) else {
            return !self.extra_write.is_empty()
                && self.extra_write.contains(&name.to_ascii_lowercase());
        };
        if !self.read_only.is_empty() && self.read_only.contains(lower) {
            return false;
        }
        WRITE_FUNCTIONS.contains(&lower)
            || SESSION_LOCK_FUNCTIONS.contains(&lower)
            || lower.starts_with("lo_")
            || (!self.extra_write.is_empty() && self.extra_write.contains(lower))
    }
}

fn lowercase<'b>(s: &str, buf: &'b mut [u8; 64]) -> Option<&'b str> {
    let bytes = s.as_bytes();
    let out = buf.get_mut(..bytes.len())?;
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

const HEAD: usize = 8;

/// What one statement has shown so far.
#[derive(Default)]
struct Scan<'a> {
    head: [Option<Token<'a>>; HEAD],
    len: usize,
    start: usize,
    end: usize,
    depth: usize,
    prev: Option<Token<'a>>,
    write_keyword: bool,
    write_function: bool,
    session_lock: bool,
    analyze: bool,
    with_hold: bool,
    temp: bool,
    top_level_from: bool,
    to_stdout: bool,
    read_only_words: bool,
    read_write_words: bool,
}

impl<'a> Scan<'a> {
    fn word(&self, i: usize) -> &'a str {
        match self.head.get(i).copied().flatten() {
            Some(Token::Word(w)) => w,
            _ => "",
        }
    }

    fn is(&self, i: usize, kw: &str) -> bool {
        self.word(i).eq_ignore_ascii_case(kw)
    }

    fn push(&mut self, tok: Token<'a>, start: usize, end: usize, rules: &FunctionRules) {
        if self.len == 0 {
            self.start = start;
        }
        self.end = end;
        if self.len < HEAD {
            self.head[self.len] = Some(tok);
        }
        self.len += 1;
        match tok {
            Token::Punct(b'(') => {
                if let Some(Token::Word(name)) = self.prev {
                    if rules.is_write(name) {
                        self.write_function = true;
                    }
                    let mut buf = [0u8; 64];
                    if lowercase(name, &mut buf)
                        .is_some_and(|n| SESSION_LOCK_FUNCTIONS.contains(&n))
                    {
                        self.session_lock = true;
                    }
                }
                self.depth += 1;
            }
            Token::Punct(b')') => self.depth = self.depth.saturating_sub(1),
            Token::Word(w) => {
                let kw = |k: &str| w.eq_ignore_ascii_case(k);
                if kw("insert")
                    || kw("update")
                    || kw("delete")
                    || kw("merge")
                    || kw("into")
                    || kw("share")
                {
                    self.write_keyword = true;
                }
                if kw("analyze") || kw("analyse") {
                    self.analyze = true;
                }
                if kw("hold") && self.prev.is_some_and(|p| p.is_word("with")) {
                    self.with_hold = true;
                }
                let after = |k: &str| self.prev.is_some_and(|p| p.is_word(k));
                if (kw("temp") || kw("temporary")) && (self.len <= 3 || after("into")) {
                    self.temp = true;
                }
                if kw("from") && self.depth == 0 {
                    self.top_level_from = true;
                }
                if kw("stdout") && self.prev.is_some_and(|p| p.is_word("to")) {
                    self.to_stdout = true;
                }
                if self.prev.is_some_and(|p| p.is_word("read")) {
                    if kw("only") {
                        self.read_only_words = true;
                    } else if kw("write") {
                        self.read_write_words = true;
                    }
                }
            }
            _ => {}
        }
        self.prev = Some(tok);
    }
}

/// The first token after `=` or `TO` in a SET statement's head.
fn set_value<'a>(scan: &Scan<'a>) -> Option<Token<'a>> {
    let mut seen_eq = false;
    for tok in scan.head.iter().take(scan.len.min(HEAD)).flatten() {
        if seen_eq {
            return Some(*tok);
        }
        if matches!(tok, Token::Punct(b'=')) || tok.is_word("to") {
            seen_eq = true;
        }
    }
    None
}

fn parse_route(tok: Option<Token<'_>>) -> Option<Route> {
    let text = match tok? {
        Token::Str(s) | Token::Word(s) | Token::Quoted(s) => s,
        _ => return None,
    };
    if text.eq_ignore_ascii_case("primary") {
        Some(Route::Primary)
    } else if text.eq_ignore_ascii_case("replica") {
        Some(Route::Replica)
    } else if text.eq_ignore_ascii_case("auto") || text.eq_ignore_ascii_case("default") {
        Some(Route::Auto)
    } else {
        None
    }
}

fn parse_hint(comment: &str) -> Option<Route> {
    let c = comment.trim();
    let value = c
        .get(..8)
        .filter(|p| p.eq_ignore_ascii_case("pgpilot:"))
        .map(|_| &c[8..])?;
    match parse_route(Some(Token::Word(value.trim())))? {
        Route::Auto => None,
        r => Some(r),
    }
}

/// Classifies SQL text (one or more statements).
pub fn analyze<'a>(sql: &'a str, rules: &FunctionRules) -> Analysis<'a> {
    let mut lx = Lexer::new(sql);
    let hint = lx.skip_trivia().and_then(parse_hint);
    let mut a = Analysis {
        read_only: true,
        begin: None,
        hint,
        route_setting: None,
        route_statement: false,
        session_read_only: None,
        pins: false,
        changes: Vec::new(),
        statements: 0,
        ends_tx: None,
    };
    let mut scan = Scan::default();
    loop {
        lx.skip_trivia();
        let start = lx.position();
        let tok = lx.next();
        let end = lx.position();
        match tok {
            None => {
                finish(&mut a, &scan, sql);
                break;
            }
            Some(Token::Punct(b';')) => {
                finish(&mut a, &scan, sql);
                scan = Scan::default();
            }
            Some(t) => scan.push(t, start, end, rules),
        }
    }
    if a.statements == 0 {
        // Empty text is harmless anywhere.
        a.read_only = true;
    }
    if a.statements != 1 {
        a.ends_tx = None;
    }
    a
}

fn finish<'a>(a: &mut Analysis<'a>, s: &Scan<'a>, sql: &'a str) {
    if s.len == 0 {
        return;
    }
    a.statements += 1;
    let text = sql.get(s.start..s.end).unwrap_or("");
    let reads = !s.write_keyword && !s.write_function;
    let read_only = match s.word(0).to_ascii_lowercase().as_str() {
        "select" | "values" | "table" | "with" => {
            a.pins |= s.temp;
            reads
        }
        "show" => true,
        "explain" => !s.analyze || reads,
        "copy" => s.to_stdout && !s.top_level_from && !s.write_function,
        "begin" | "start" => {
            // Opening a transaction is harmless anywhere; routing looks at `begin`.
            a.begin = Some(s.read_only_words && !s.read_write_words);
            true
        }
        verb @ ("commit" | "end" | "rollback" | "abort") => {
            if s.is(1, "prepared") {
                // Two-phase commit of another transaction: a write, never inside a block.
                false
            } else {
                let to_savepoint =
                    s.is(1, "to") || (s.is(2, "to") && (s.is(1, "work") || s.is(1, "transaction")));
                let chained = (1..HEAD).any(|i| s.is(i, "chain") && !s.is(i - 1, "no"));
                let how = if matches!(verb, "commit" | "end") {
                    TxEnd::Commit
                } else {
                    TxEnd::Rollback
                };
                a.ends_tx = (!to_savepoint && !chained).then_some(how);
                true
            }
        }
        "set" => classify_set(a, s, text),
        "reset" => {
            if s.is(1, "all") {
                push_change(a, SessionChange::ResetAll);
            } else if s.is(1, "session") && s.is(2, "authorization") {
                a.pins = true;
            } else {
                push_change(a, SessionChange::Reset { name: s.word(1) });
            }
            true
        }
        "discard" => {
            if s.is(1, "all") {
                push_change(a, SessionChange::DiscardAll);
            }
            true
        }
        "deallocate" => {
            let i = if s.is(1, "prepare") { 2 } else { 1 };
            if s.is(i, "all") {
                push_change(a, SessionChange::DeallocateAll);
            } else {
                let (name, quoted) = match s.head.get(i).copied().flatten() {
                    Some(Token::Quoted(q)) => (q, true),
                    _ => (s.word(i), false),
                };
                push_change(a, SessionChange::Deallocate { name, quoted });
            }
            true
        }
        "listen" | "prepare" => {
            a.pins = true;
            false
        }
        "declare" => {
            a.pins |= s.with_hold;
            false
        }
        "create" => {
            a.pins |= s.temp;
            false
        }
        _ => false,
    };
    if s.session_lock {
        a.pins = true;
    }
    a.read_only &= read_only;
}

fn push_change<'a>(a: &mut Analysis<'a>, change: SessionChange<'a>) {
    if a.changes.len() < 64 {
        a.changes.push(change);
    } else {
        a.pins = true;
    }
}

/// SET statements: pgpilot's own setting, session characteristics, tracked session settings.
/// Returns whether the statement may run on a replica.
fn classify_set<'a>(a: &mut Analysis<'a>, s: &Scan<'a>, text: &'a str) -> bool {
    if s.is(1, "local") || s.is(1, "transaction") || s.is(1, "constraints") {
        return true;
    }
    if s.is(1, "session") && s.is(2, "characteristics") {
        a.session_read_only = Some(s.read_only_words && !s.read_write_words);
        return true;
    }
    if s.is(1, "session") && s.is(2, "authorization") || s.is(1, "role") {
        // Identity changes must not leak between clients: keep the connection.
        a.pins = true;
        return false;
    }
    let i = if s.is(1, "session") { 2 } else { 1 };
    let name = s.word(i);
    let dotted = matches!(
        s.head.get(i + 1).copied().flatten(),
        Some(Token::Punct(b'.'))
    );
    if dotted && name.eq_ignore_ascii_case("pgpilot") && s.is(i + 2, "route") {
        a.route_statement = true;
        a.route_setting = parse_route(set_value(s));
        if a.route_setting.is_none() {
            a.read_only = false;
        }
        return true;
    }
    if !name.is_empty() && !dotted {
        push_change(
            a,
            SessionChange::Set {
                name,
                statement: text,
            },
        );
    } else if dotted {
        push_change(
            a,
            SessionChange::Set {
                name: text,
                statement: text,
            },
        );
    }
    true
}

#[cfg(test)]
mod tests;
