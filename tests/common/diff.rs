//! The differential tester's parts: client conversations as byte-exact frontend messages, a
//! runner that records every backend message in a comparable form, a seeded generator of
//! conversations, and the comparison that names the first divergence with a reproduction.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::raw::{Msg, Raw};

/// One request: the messages sent at once, and the data a COPY FROM STDIN in it is fed.
#[derive(Debug, Clone)]
pub struct Step {
    /// What the step sends, for a reproduction.
    pub label: String,
    pub bytes: Vec<u8>,
    pub copy_rows: Option<Vec<u8>>,
    /// ReadyForQuery answers the step waits for (its Query and Sync messages); 0 for a
    /// pipeline without Sync, which waits for `until` instead.
    pub readies: usize,
    /// For a step without Sync: the backend message tag that ends its answer.
    pub until: Option<u8>,
}

/// Frontend message encoders (bytes, so text in any client encoding can be sent).
pub mod msg {
    fn put(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
        out.push(tag);
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
    }

    fn cstr(b: &mut Vec<u8>, s: &[u8]) {
        b.extend_from_slice(s);
        b.push(0);
    }

    pub fn query(out: &mut Vec<u8>, sql: &[u8]) {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        put(out, b'Q', &b);
    }

    pub fn parse(out: &mut Vec<u8>, name: &str, sql: &[u8]) {
        let mut b = Vec::new();
        cstr(&mut b, name.as_bytes());
        cstr(&mut b, sql);
        b.extend_from_slice(&0i16.to_be_bytes());
        put(out, b'P', &b);
    }

    /// Bind with text parameters and text results.
    pub fn bind(out: &mut Vec<u8>, portal: &str, statement: &str, params: &[&str]) {
        let mut b = Vec::new();
        cstr(&mut b, portal.as_bytes());
        cstr(&mut b, statement.as_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        put(out, b'B', &b);
    }

    pub fn describe(out: &mut Vec<u8>, kind: u8, name: &str) {
        let mut b = vec![kind];
        cstr(&mut b, name.as_bytes());
        put(out, b'D', &b);
    }

    pub fn execute(out: &mut Vec<u8>, portal: &str, max_rows: i32) {
        let mut b = Vec::new();
        cstr(&mut b, portal.as_bytes());
        b.extend_from_slice(&max_rows.to_be_bytes());
        put(out, b'E', &b);
    }

    pub fn close(out: &mut Vec<u8>, kind: u8, name: &str) {
        let mut b = vec![kind];
        cstr(&mut b, name.as_bytes());
        put(out, b'C', &b);
    }

    pub fn sync(out: &mut Vec<u8>) {
        put(out, b'S', &[]);
    }

    pub fn flush(out: &mut Vec<u8>) {
        put(out, b'H', &[]);
    }

    pub fn copy_data(out: &mut Vec<u8>, data: &[u8]) {
        put(out, b'd', data);
    }

    pub fn copy_done(out: &mut Vec<u8>) {
        put(out, b'c', &[]);
    }
}

impl Step {
    pub fn query(sql: &str) -> Step {
        Step::query_bytes(sql.as_bytes())
    }

    pub fn query_bytes(sql: &[u8]) -> Step {
        let mut bytes = Vec::new();
        msg::query(&mut bytes, sql);
        Step {
            label: format!("Q {}", escape(sql)),
            bytes,
            copy_rows: None,
            readies: 1,
            until: None,
        }
    }

    /// A simple-query COPY FROM STDIN fed `rows`.
    pub fn copy_in(sql: &str, rows: &str) -> Step {
        let mut s = Step::query(sql);
        s.label.push_str(&format!(" <- {rows:?}"));
        s.copy_rows = Some(rows.as_bytes().to_vec());
        s
    }

    /// Extended-protocol messages built by `build`, ending in Sync.
    pub fn extended(label: &str, build: impl FnOnce(&mut Vec<u8>)) -> Step {
        let mut bytes = Vec::new();
        build(&mut bytes);
        msg::sync(&mut bytes);
        Step {
            label: format!("X {label} / Sync"),
            bytes,
            copy_rows: None,
            readies: 1,
            until: None,
        }
    }

    /// Extended-protocol messages ending in Flush: the answer up to the backend message
    /// `until` must arrive without a Sync.
    pub fn flushed(label: &str, until: u8, build: impl FnOnce(&mut Vec<u8>)) -> Step {
        let mut bytes = Vec::new();
        build(&mut bytes);
        msg::flush(&mut bytes);
        Step {
            label: format!("X {label} / Flush"),
            bytes,
            copy_rows: None,
            readies: 0,
            until: Some(until),
        }
    }
}

impl Step {
    /// Extended-protocol messages with neither Sync nor Flush (libpq's pipeline mode): the
    /// answer up to `until` must come as the server executes them.
    pub fn unsynced(label: &str, until: u8, build: impl FnOnce(&mut Vec<u8>)) -> Step {
        let mut bytes = Vec::new();
        build(&mut bytes);
        Step {
            label: format!("X {label} (no Sync)"),
            bytes,
            copy_rows: None,
            readies: 0,
            until: Some(until),
        }
    }
}

/// Bytes as text: printable ASCII kept, the rest as `\xNN`.
pub fn escape(b: &[u8]) -> String {
    let mut s = String::new();
    for &c in b {
        if (0x20..0x7f).contains(&c) && c != b'\\' {
            s.push(c as char);
        } else {
            let _ = write!(s, "\\x{c:02x}");
        }
    }
    s
}

/// A backend message in a form that compares equal exactly when a client could not tell the
/// two apart. Allowed differences, each with its reason:
/// - BackendKeyData: the proxy gives each client a key of its own (cancel is mapped).
/// - the sender's pid in a NotificationResponse: the server process differs by design.
/// - an ErrorResponse's or NoticeResponse's line field: an error the proxy gives on the
///   server's behalf names PostgreSQL's file and routine (drivers act on the routine: pgJDBC
///   re-prepares after `0A000` only from `RevalidateCachedQuery`) but not the line, which
///   depends on the server's build.
/// - the ParameterStatus values of the startup phase are consumed by the login, not compared.
/// - a RowDescription's table OIDs: each run creates its table afresh.
pub fn normalize(m: &Msg) -> Option<String> {
    match m.tag {
        b'K' => None,
        b'E' | b'N' => {
            let mut s = format!("{} ", m.tag as char);
            let mut rest = m.body.as_slice();
            while let [k, tail @ ..] = rest {
                if *k == 0 {
                    break;
                }
                let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
                if *k != b'L' {
                    let _ = write!(s, "{}={} ", *k as char, escape(&tail[..end]));
                }
                rest = tail.get(end + 1..).unwrap_or_default();
            }
            Some(s)
        }
        b'A' => Some(format!("A {}", escape(m.body.get(4..).unwrap_or_default()))),
        b'T' => Some(format!("T {}", escape(&without_table_oids(&m.body)))),
        tag => Some(format!("{} {}", tag as char, escape(&m.body))),
    }
}

/// A RowDescription body with every field's table OID set to 0.
fn without_table_oids(body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    let mut at = 2;
    let fields = body
        .get(..2)
        .map_or(0, |c| i16::from_be_bytes([c[0], c[1]]));
    for _ in 0..fields {
        let Some(end) = out.get(at..).and_then(|r| r.iter().position(|&b| b == 0)) else {
            break;
        };
        at += end + 1;
        if let Some(oid) = out.get_mut(at..at + 4) {
            oid.fill(0);
        }
        at += 18;
    }
    out
}

/// What one conversation saw: the normalized answer to each step, in order. A step whose
/// answer did not come ends with `CLOSED` (the connection ended) or `TIMEOUT`.
pub type Transcript = Vec<Vec<String>>;

/// Runs `steps` on a new connection to `port` as (user, password, database).
pub async fn run(port: u16, login: (&str, &str, &str), steps: &[Step]) -> Transcript {
    run_with_fault(port, login, steps, usize::MAX, async {}).await
}

/// Like `run`, with `fault` done (awaited) just before step `at` is sent.
pub async fn run_with_fault(
    port: u16,
    login: (&str, &str, &str),
    steps: &[Step],
    at: usize,
    fault: impl std::future::Future<Output = ()>,
) -> Transcript {
    let mut raw = Raw::login(port, login.0, login.1, login.2).await;
    let mut out = Vec::new();
    let mut fault = Some(fault);
    for (i, step) in steps.iter().enumerate() {
        if i == at
            && let Some(f) = fault.take()
        {
            f.await;
        }
        let mut seen = Vec::new();
        let ended =
            tokio::time::timeout(Duration::from_secs(20), answer(&mut raw, step, &mut seen))
                .await
                .unwrap_or_else(|_| {
                    seen.push("TIMEOUT".into());
                    false
                });
        out.push(seen);
        if !ended {
            break;
        }
    }
    // Terminate, and wait until the server has closed: its session (and any lock it held)
    // is gone before the next run starts.
    let _ = raw.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while raw.recv().await.is_some() {}
    })
    .await;
    out
}

/// Sends one step and records its answer; false when the connection ended.
async fn answer(raw: &mut Raw, step: &Step, seen: &mut Vec<String>) -> bool {
    if raw.stream.write_all(&step.bytes).await.is_err() {
        seen.push("CLOSED".into());
        return false;
    }
    let mut readies = 0;
    loop {
        if step.readies > 0 && readies == step.readies {
            return true;
        }
        let Some(m) = raw.recv().await else {
            seen.push("CLOSED".into());
            return false;
        };
        if m.tag == b'G' {
            let mut copy = Vec::new();
            msg::copy_data(&mut copy, step.copy_rows.as_deref().unwrap_or_default());
            msg::copy_done(&mut copy);
            if raw.stream.write_all(&copy).await.is_err() {
                seen.push("CLOSED".into());
                return false;
            }
        }
        if m.tag == b'Z' {
            readies += 1;
        }
        let fatal = m.tag == b'E' && m.body.windows(7).any(|w| w == b"SFATAL\0");
        // A pipeline without Sync ends with its last answer or with the error that skips
        // the rest.
        let done = step.until.is_some_and(|t| t == m.tag || m.tag == b'E');
        seen.extend(normalize(&m));
        if fatal {
            // The server closes after a FATAL: the conversation is over.
            seen.push("CLOSED".into());
            return false;
        }
        if done {
            return true;
        }
    }
}

/// The index of the first step whose answers differ beyond the allowed differences.
pub fn divergence_index(direct: &Transcript, proxied: &Transcript) -> Option<usize> {
    (0..direct.len().max(proxied.len()))
        .find(|&i| direct.get(i) != proxied.get(i) && !allowed(direct.get(i), proxied.get(i)))
}

/// The first step whose answers differ, described with the conversation up to it.
pub fn first_divergence(
    steps: &[Step],
    direct: &Transcript,
    proxied: &Transcript,
) -> Option<String> {
    let n = direct.len().max(proxied.len());
    for i in 0..n {
        let (d, p) = (direct.get(i), proxied.get(i));
        if d == p || allowed(d, p) {
            continue;
        }
        let mut s = String::from("reproduction (each line one request):\n");
        for step in &steps[..=i.min(steps.len() - 1)] {
            let _ = writeln!(s, "  {}", step.label);
        }
        let short = |v: Option<&Vec<String>>| -> Vec<String> {
            v.map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|m| match m.char_indices().nth(300) {
                    Some((at, _)) => format!("{}...", &m[..at]),
                    None => m.clone(),
                })
                .collect()
        };
        let _ = writeln!(s, "direct:  {:?}", short(d));
        let _ = writeln!(s, "pgpilot: {:?}", short(p));
        return Some(s);
    }
    None
}

/// Answers that differ in a way the proxy cannot avoid and no client can be hurt by:
/// - in a transaction that had already failed, a statement the proxy must prepare again on
///   another server connection fails with `25P02` (PostgreSQL refuses a Parse there), where
///   PostgreSQL itself would first have checked a Bind's parameter count (`08P01`) or still
///   described a statement that returns no rows. The client is in a failed transaction
///   either way, and can only roll back.
/// - a Describe of a statement whose result shape changed: PostgreSQL sends the
///   ParameterDescription before its `0A000`; the proxy, which finds the change before the
///   statement runs, sends only the `0A000`.
fn allowed(direct: Option<&Vec<String>>, proxied: Option<&Vec<String>>) -> bool {
    let (Some(d), Some(p)) = (direct, proxied) else {
        return false;
    };
    let failed = |v: &Vec<String>| v.last().is_some_and(|z| z == "Z E");
    let aborted = matches!(p.as_slice(), [pe, _] if pe.contains("C=25P02 "))
        && failed(d)
        && failed(p)
        && !d.iter().any(|m| m.starts_with("D ") || m.starts_with("C "));
    let reshaped = d.len() == p.len() + 1
        && d[0].starts_with("t ")
        && d[1..] == p[..]
        && p[0].contains("C=0A000 ");
    aborted || reshaped
}

/// A small deterministic generator (xorshift64*): the same seed gives the same conversation
/// on every machine and crate version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
