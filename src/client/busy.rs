//! Serving requests on one borrowed server connection until it can go back: forwards the
//! client's requests (statements renamed, missing Parses injected), passes responses back in
//! batches (swallowing answers to injected messages), follows COPY, applies session changes
//! when their request succeeds, notices a request that must be routed elsewhere, and, when the
//! server dies before any of the unanswered requests' answers reached the client, hands those
//! requests back to be retried on another node.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::prepared::{
    Disposition, Expect, Rewriter, SHAPE_CHANGED, SHAPE_CHANGED_AT, ServerStatements,
    check_request, copy_in_started, failed_parses, on_check_answer, on_response, unanswered_parses,
    unchecked_statements,
};
use super::settings::Settings;
use super::txn::{BusyEnd, Held, LocalReply, Txn};
use super::unit::{Change, Meaning, Unit, meaning};
use crate::config::ReadYourWrites;
use crate::net::ServerStream;
use crate::protocol::backend::{
    self, ErrorFields, Origin, ReadyForQuery, TxStatus, parse_parameter_status,
};
use crate::protocol::codec::get_cstr;
use crate::protocol::frontend;
use crate::protocol::{Frame, MessageReader, ProtocolError};
use crate::router::Target;
use crate::server::{MAX_SERVER_MESSAGE, ServerConn};

const COPY_IN_RESPONSE: u8 = b'G';
/// Why a connection whose node was fenced is given up.
const FENCED: &str = "its node was fenced after a failover";

/// What to do with the connection afterwards.
enum Disposal {
    GiveBack,
    /// Pinned session state (LISTEN, temp tables, locks): `DISCARD ALL` first.
    Reset,
    Close,
}

/// Per-ReadyForQuery bookkeeping: the changes the request makes and whether it wrote.
struct Pending {
    changes: Vec<Change>,
    wrote: bool,
    began: bool,
    sent: Instant,
    /// The request is an error raised for the proxy: its ErrorResponse is shown as raised here.
    origin: Option<Origin>,
}

enum Event {
    Server(Result<Option<Frame>, ProtocolError>),
    Client(Result<Option<Frame>, ProtocolError>),
    ShutdownStarted,
    Forced,
    /// The node was fenced: its connections must not be used any more.
    Fenced,
}

enum Gone {
    Client,
    Server(String),
}

pub(super) async fn serve<R, W>(
    txn: &mut Txn<'_, R, W>,
    mut held: Held<'_>,
    first: Unit,
    may_retry: bool,
    first_meaning: &Meaning,
) -> BusyEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let on_replica = held.on_replica;
    let fence = held.conn.fence();
    let (end, disposal) = {
        let conn = held.conn.conn();
        let ServerConn {
            stream,
            buf,
            statements,
            applied,
            params,
            ..
        } = conn;
        let (srd, swr) = tokio::io::split(stream);
        let mut server = MessageReader::new(srd, std::mem::take(buf), MAX_SERVER_MESSAGE);
        let mut drive = Drive {
            swr,
            statements,
            applied,
            params,
            expect: VecDeque::new(),
            pending: VecDeque::new(),
            backups: VecDeque::new(),
            head_forwarded: false,
            carry: Vec::new(),
            tentative: Vec::new(),
            outstanding: 0,
            partial: false,
            copy_in: false,
            errored: false,
            wrote_in_tx: false,
            began_in_flight: false,
            saw_rollback: false,
            on_replica,
            tx_started: None,
            fence,
        };
        let result = drive
            .run(txn, &mut server, first, first_meaning, may_retry)
            .await;
        *buf = server.into_parts().1;
        result
    };
    *txn.cancel.lock() = None;
    match disposal {
        Disposal::GiveBack => held.conn.give_back(),
        Disposal::Reset => held.conn.release().await,
        Disposal::Close => held.conn.discard().await,
    }
    end
}

struct Drive<'c> {
    swr: WriteHalf<&'c mut ServerStream>,
    statements: &'c mut ServerStatements,
    applied: &'c mut Settings,
    params: &'c mut Vec<(String, String)>,
    expect: VecDeque<Expect>,
    pending: VecDeque<Pending>,
    /// A copy of each request still awaiting its answer, when it may be retried elsewhere.
    backups: VecDeque<Option<Unit>>,
    /// Part of the oldest unanswered request's answer already reached the client.
    head_forwarded: bool,
    /// Changes of a request sent without Sync (Flush), applied with the next answer.
    carry: Vec<Change>,
    /// Changes made inside an open transaction: kept unless it rolls back.
    tentative: Vec<Change>,
    outstanding: usize,
    partial: bool,
    copy_in: bool,
    errored: bool,
    wrote_in_tx: bool,
    began_in_flight: bool,
    saw_rollback: bool,
    on_replica: bool,
    /// When the transaction being served began (its first request was sent while idle).
    tx_started: Option<Instant>,
    /// Cancelled when the connection's node is fenced: every wait for the server ends.
    fence: tokio_util::sync::CancellationToken,
}

impl Drive<'_> {
    async fn run<R, W>(
        &mut self,
        txn: &mut Txn<'_, R, W>,
        server: &mut MessageReader<ReadHalf<&mut ServerStream>>,
        first: Unit,
        first_meaning: &Meaning,
        may_retry: bool,
    ) -> (BusyEnd, Disposal)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if let Err(e) = self
            .send(txn, server, first, first_meaning, may_retry)
            .await
        {
            return self.lost(txn, e);
        }
        // A request that must be routed afresh waits on the session queue; stop reading.
        let mut deferred = false;
        let mut deadline: Option<Instant> = None;
        loop {
            if self.outstanding == 0 && !self.partial && !self.copy_in {
                let idle = txn.status == TxStatus::Idle;
                if std::mem::take(&mut deferred) {
                    if idle {
                        return (BusyEnd::Released, self.idle_disposal(txn));
                    }
                    // Inside a transaction the request belongs to this connection after all.
                    let Some(u) = txn.queue.pop_back() else {
                        continue;
                    };
                    let m = meaning(&u, &txn.statements, &txn.rules);
                    if let Err(e) = self.send(txn, server, u, &m, false).await {
                        return self.lost(txn, e);
                    }
                    continue;
                }
                if idle && deadline.is_some() {
                    return (BusyEnd::Shutdown, Disposal::Close);
                }
                if idle && !txn.pinned {
                    return (BusyEnd::Released, Disposal::GiveBack);
                }
            }
            let event = tokio::select! {
                biased;
                _ = sleep_until_opt(deadline) => Event::Forced,
                _ = txn.shared.shutdown.cancelled(), if deadline.is_none() => Event::ShutdownStarted,
                _ = self.fence.cancelled() => Event::Fenced,
                _ = txn.client.kill.cancelled() => Event::Forced,
                r = server.next() => Event::Server(r),
                // While an answer is on its way the client is not polled (each poll would cost a
                // read that finds nothing); pipelined requests wait in the socket meanwhile.
                r = txn.reader.next(), if !deferred
                    && (self.outstanding == 0 || self.copy_in || self.partial) => Event::Client(r),
            };
            match event {
                Event::Forced => return (BusyEnd::Shutdown, Disposal::Close),
                Event::Fenced => {
                    return self.lost(txn, FENCED.into());
                }
                Event::ShutdownStarted => {
                    deadline = Some(Instant::now() + txn.config.proxy.shutdown_timeout.0);
                }
                Event::Server(r) => {
                    let frame = match r {
                        Ok(Some(f)) => f,
                        Ok(None) => return self.lost(txn, "server closed the connection".into()),
                        Err(e) => return self.lost(txn, e.to_string()),
                    };
                    match self.relay_responses(txn, server, frame).await {
                        Ok(()) => {}
                        Err(Gone::Client) => return (BusyEnd::ClientGone, Disposal::Close),
                        Err(Gone::Server(why)) => return self.lost(txn, why),
                    }
                }
                Event::Client(r) => {
                    let frame = match r {
                        Ok(Some(f)) => f,
                        Ok(None) | Err(ProtocolError::Closed | ProtocolError::Io(_)) => {
                            return (BusyEnd::ClientGone, self.gone_disposal(txn));
                        }
                        Err(e) => return (BusyEnd::Protocol(e), Disposal::Close),
                    };
                    if self.copy_in && is_copy_traffic(frame.tag) {
                        if matches!(frame.tag, frontend::COPY_DONE | frontend::COPY_FAIL) {
                            self.copy_in = false;
                        }
                        if let Err(e) = self.swr.write_all(frame.raw()).await {
                            return self.lost(txn, e.to_string());
                        }
                        continue;
                    }
                    match frame.tag {
                        frontend::TERMINATE => {
                            return (BusyEnd::ClientGone, self.gone_disposal(txn));
                        }
                        frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => continue,
                        tag if !frontend::is_session_tag(tag) => {
                            let e = ProtocolError::Unexpected {
                                tag,
                                context: "from client",
                            };
                            return (BusyEnd::Protocol(e), Disposal::Close);
                        }
                        _ => {}
                    }
                    // Partly read requests live on the session: they survive a lost server.
                    if !txn.incoming.push(frame) {
                        // Where routing is settled (a transaction, a pinned session), what
                        // the client sent so far goes on when nothing more is buffered, as
                        // a server executes messages as they arrive: a pipeline without Sync
                        // gets its answers.
                        let settled = txn.status != TxStatus::Idle || txn.pinned;
                        if !settled || txn.reader.has_buffered_frame() {
                            continue;
                        }
                        txn.incoming.open = true;
                    }
                    let mut unit = std::mem::take(&mut txn.incoming);
                    let mut m = meaning(&unit, &txn.statements, &txn.rules);
                    if self.outstanding == 0 && !self.partial {
                        // What the proxy answers without a connection it answers the same
                        // way with one.
                        let mut out = BytesMut::new();
                        match txn.local_reply(&m, &mut out) {
                            LocalReply::Answered => {
                                if txn.writer.write_all(&out).await.is_err() {
                                    return (BusyEnd::ClientGone, self.gone_disposal(txn));
                                }
                                continue;
                            }
                            LocalReply::Forward => {}
                            LocalReply::Raise {
                                code,
                                message,
                                origin,
                            } => {
                                // The transaction must abort on the server as well.
                                unit = Unit::raising(code, &message, origin);
                                m = meaning(&unit, &txn.statements, &txn.rules);
                            }
                        }
                    }
                    let in_tx = txn.status != TxStatus::Idle || self.began_in_flight;
                    let wants_primary = txn.target_of(&m) == Target::Primary;
                    if self.on_replica && !in_tx && !txn.pinned && wants_primary {
                        // Not sent anywhere yet: queued on the session, served after this.
                        txn.queue.push_back(unit);
                        deferred = true;
                        continue;
                    }
                    let retryable = self.on_replica
                        && !in_tx
                        && m.intent.read_only
                        && m.intent.begin.is_none()
                        && !unit.is_partial();
                    if let Err(e) = self.send(txn, server, unit, &m, retryable).await {
                        return self.lost(txn, e);
                    }
                }
            }
        }
    }

    /// Rewrites and sends one request.
    async fn send<R, W>(
        &mut self,
        txn: &mut Txn<'_, R, W>,
        server: &mut MessageReader<ReadHalf<&mut ServerStream>>,
        unit: Unit,
        m: &Meaning,
        retryable: bool,
    ) -> Result<(), String> {
        let checked = self.check_shapes(txn, server, &unit).await;
        let raised;
        let (unit, m) = if checked.as_ref().is_ok_and(|ok| !ok) {
            // PostgreSQL's answer for a statement whose result shape changed; inside a
            // transaction it aborts it on the server too.
            let raise = Unit::raising(
                crate::protocol::sqlstate::FEATURE_NOT_SUPPORTED,
                SHAPE_CHANGED,
                Some(SHAPE_CHANGED_AT),
            );
            raised = meaning(&raise, &txn.statements, &txn.rules);
            (raise, &raised)
        } else {
            (unit, m)
        };
        let readies = unit.readies();
        let partial = unit.is_partial();
        let origin = unit.raised_at;
        let sent = Instant::now();
        if txn.status == TxStatus::Idle && self.tx_started.is_none() {
            self.tx_started = Some(sent);
        }
        txn.stats
            .received(unit.frames.iter().map(|f| f.raw().len()).sum());
        let mut out = BytesMut::new();
        let rewritten = checked.and_then(|_| {
            let mut rw = Rewriter {
                client: &mut txn.statements,
                server: self.statements,
                expect: &mut self.expect,
                rules: &txn.rules,
                max_prepared: txn.config.proxy.max_prepared_statements,
                parsed: m.parsed.iter(),
                refuse_unverified: false,
                unverified: false,
            };
            unit.frames
                .iter()
                .try_for_each(|f| rw.push(f, &mut out))
                .map_err(|e| e.to_string())
        });
        let wrote = !self.on_replica && !m.intent.read_only;
        let began = m.intent.begin.is_some();
        let mut changes = m.changes.clone();
        if readies == 0 {
            self.carry.append(&mut changes);
        } else {
            changes.splice(0..0, std::mem::take(&mut self.carry));
            // The request itself is the backup when it may be retried elsewhere.
            let mut backup = (retryable && readies == 1).then_some(unit);
            for i in 0..readies {
                let last = i + 1 == readies;
                let changes = if last {
                    std::mem::take(&mut changes)
                } else {
                    Vec::new()
                };
                self.pending.push_back(Pending {
                    changes,
                    wrote,
                    began,
                    sent,
                    origin,
                });
                self.backups
                    .push_back(if last { backup.take() } else { None });
            }
        }
        self.began_in_flight |= began;
        self.outstanding += readies;
        self.partial = partial;
        // Booked as owed before any failure counts: a server lost during the shape check
        // retries the request elsewhere or answers it, never drops it.
        rewritten?;
        self.swr.write_all(&out).await.map_err(|e| e.to_string())
    }

    /// Before a request executes statements this connection must prepare again, checks that
    /// their result shape is still the one the client prepared (one round trip, only then).
    /// False when the request must fail with `0A000` instead.
    async fn check_shapes<R, W>(
        &mut self,
        txn: &Txn<'_, R, W>,
        server: &mut MessageReader<ReadHalf<&mut ServerStream>>,
        unit: &Unit,
    ) -> Result<bool, String> {
        let stmts = match unchecked_statements(&unit.frames, &txn.statements, self.statements) {
            Ok(s) if s.is_empty() => return Ok(true),
            Ok(s) => s,
            Err(_) => return Ok(false),
        };
        let max = txn.config.proxy.max_prepared_statements;
        let (out, _) = check_request(&stmts, self.statements, max);
        self.swr.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut next = 0;
        loop {
            let read = tokio::select! {
                r = server.next() => r,
                _ = self.fence.cancelled() => return Err(FENCED.into()),
            };
            let frame = match read {
                Ok(Some(f)) => f,
                Ok(None) => return Err("server closed the connection".into()),
                Err(e) => return Err(e.to_string()),
            };
            if frame.tag == backend::READY_FOR_QUERY {
                break;
            }
            on_check_answer(frame.tag, frame.body(), &stmts, &mut next, self.statements);
        }
        Ok(!stmts.iter().any(|s| s.broken.load(Ordering::Relaxed)))
    }

    /// Forwards `first` and every further response already buffered, in one write.
    async fn relay_responses<R, W>(
        &mut self,
        txn: &mut Txn<'_, R, W>,
        server: &mut MessageReader<ReadHalf<&mut ServerStream>>,
        first: Frame,
    ) -> Result<(), Gone>
    where
        W: AsyncWrite + Unpin,
    {
        let mut batch = BytesMut::new();
        let mut frame = first;
        // What this batch does for the oldest requests, recorded once the client has it.
        let mut answered = 0usize;
        let mut touched = false;
        // Where the last complete answer in `batch` ends.
        let mut complete = 0usize;
        loop {
            if matches!(
                frame.tag,
                backend::ERROR_RESPONSE | backend::NOTICE_RESPONSE
            ) {
                let fields = ErrorFields::parse(&frame).map_err(|e| Gone::Server(e.to_string()))?;
                if fields.is_goodbye(frame.tag) {
                    // A dying backend flushes what it had buffered (a BindComplete, a few
                    // rows) before its goodbye. When the request cut short may run again
                    // elsewhere, that part stays here: the client sees one whole answer.
                    let retried = self.backups.get(answered).is_some_and(Option::is_some);
                    let keep = if retried { complete } else { batch.len() };
                    let touched = touched && !retried;
                    self.deliver(txn, &batch[..keep], answered, touched).await?;
                    return Err(Gone::Server(fields.message));
                }
                if frame.tag == backend::ERROR_RESPONSE {
                    self.errored = true;
                    txn.shared.stats.error(&fields.code);
                    for (client, server) in failed_parses(&self.expect) {
                        txn.statements.parse_failed(&client, server.as_deref());
                    }
                }
                // The client knows its statements by its own names, not the proxy's; and an
                // error raised for the proxy is shown as PostgreSQL's own.
                let raised_for_proxy = self.pending.front().and_then(|p| p.origin);
                let rewritten = match raised_for_proxy {
                    Some(o) => backend::reoriginate(&frame, o),
                    None => backend::rewrite_message(&frame, |m| txn.statements.unrename(m)),
                };
                if let Some(raw) = rewritten
                    && let Ok(f) = Frame::from_raw(raw)
                {
                    frame = f;
                }
            }
            let disposition =
                on_response(frame.tag, frame.body(), &mut self.expect, self.statements);
            match frame.tag {
                backend::READY_FOR_QUERY => {
                    let status =
                        ReadyForQuery::parse(&frame).map_err(|e| Gone::Server(e.to_string()))?;
                    self.on_ready(txn, status);
                }
                backend::COMMAND_COMPLETE => {
                    let mut body = frame.body();
                    self.saw_rollback = get_cstr(&mut body).is_ok_and(|t| t == "ROLLBACK");
                }
                backend::PARAMETER_STATUS => {
                    if let Ok((k, v)) = parse_parameter_status(&frame) {
                        ServerConn::set_param(self.params, k, v);
                    }
                }
                COPY_IN_RESPONSE => {
                    self.copy_in = true;
                    if copy_in_started(&mut self.expect) {
                        // The request completes with the Sync the client sends after
                        // CopyDone: keep the connection until then.
                        self.partial = true;
                        self.outstanding = self.outstanding.saturating_sub(1);
                        self.backups.pop_front();
                        if let Some(p) = self.pending.pop_front() {
                            self.carry.extend(p.changes);
                        }
                    }
                }
                _ => {}
            }
            if disposition == Disposition::Forward {
                let ready = frame.tag == backend::READY_FOR_QUERY;
                if ready {
                    answered += 1;
                }
                touched = !ready;
                batch.unsplit(frame.into_raw());
                if ready {
                    complete = batch.len();
                }
            }
            if !server.has_buffered_frame() {
                break;
            }
            frame = match server.next().await {
                Ok(Some(f)) => f,
                Ok(None) => return Err(Gone::Server("server closed the connection".into())),
                Err(e) => return Err(Gone::Server(e.to_string())),
            };
        }
        self.deliver(txn, &batch, answered, touched).await
    }

    /// Writes a batch to the client and records how far the answers got.
    async fn deliver<R, W>(
        &mut self,
        txn: &mut Txn<'_, R, W>,
        batch: &[u8],
        answered: usize,
        touched: bool,
    ) -> Result<(), Gone>
    where
        W: AsyncWrite + Unpin,
    {
        if batch.is_empty() {
            return Ok(());
        }
        txn.writer
            .write_all(batch)
            .await
            .map_err(|_| Gone::Client)?;
        txn.stats.sent(batch.len());
        for _ in 0..answered {
            self.backups.pop_front();
        }
        self.head_forwarded = if answered > 0 {
            touched
        } else {
            self.head_forwarded || touched
        };
        Ok(())
    }

    fn on_ready<R, W>(&mut self, txn: &mut Txn<'_, R, W>, status: TxStatus) {
        self.outstanding = self.outstanding.saturating_sub(1);
        let now = Instant::now();
        let p = self.pending.pop_front().unwrap_or(Pending {
            changes: Vec::new(),
            wrote: false,
            began: false,
            sent: now,
            origin: None,
        });
        txn.stats.query(now.duration_since(p.sent));
        if !self.errored {
            let (now, later): (Vec<Change>, Vec<Change>) =
                p.changes.into_iter().partition(|c| !c.is_transactional());
            if !now.is_empty() {
                txn.apply(&now, self.applied, self.statements);
            }
            self.tentative.extend(later);
            self.wrote_in_tx |= p.wrote;
        }
        self.errored = false;
        if self.pending.iter().all(|p| !p.began) {
            self.began_in_flight = false;
        }
        txn.status = status;
        if status == TxStatus::Idle {
            if let Some(started) = self.tx_started.take() {
                txn.stats.transaction(now.duration_since(started));
            }
            if !self.pending.is_empty() {
                // Pipelined requests behind it start the next transaction.
                self.tx_started = Some(now);
            }
            if !self.saw_rollback {
                let changes = std::mem::take(&mut self.tentative);
                txn.apply(&changes, self.applied, self.statements);
                if self.wrote_in_tx && txn.config.cluster.read_your_writes == ReadYourWrites::Lsn {
                    txn.last_write = Some(Instant::now());
                }
            }
            self.tentative.clear();
            self.wrote_in_tx = false;
            self.saw_rollback = false;
        }
    }

    fn idle_disposal<R, W>(&self, txn: &Txn<'_, R, W>) -> Disposal {
        if txn.pinned {
            Disposal::Reset
        } else {
            Disposal::GiveBack
        }
    }

    /// The client left: an idle connection can be reused, anything else is closed.
    fn gone_disposal<R, W>(&self, txn: &Txn<'_, R, W>) -> Disposal {
        let idle = self.outstanding == 0 && !self.partial && !self.copy_in;
        if idle && txn.status == TxStatus::Idle {
            self.idle_disposal(txn)
        } else {
            Disposal::Close
        }
    }

    fn lost<R, W>(&mut self, txn: &mut Txn<'_, R, W>, why: String) -> (BusyEnd, Disposal) {
        // Parses the server never answered did not happen: retried, they are sent again.
        for (client, server) in unanswered_parses(&self.expect) {
            txn.statements.parse_failed(&client, server.as_deref());
        }
        if txn.pinned {
            // Session state (LISTEN, locks, temp tables, SET ROLE) went with the server and
            // cannot be rebuilt: the client is closed, as a direct connection would be.
            return (BusyEnd::SessionLost(why), Disposal::Close);
        }
        if self.outstanding == 0 && !self.partial && !self.copy_in {
            if txn.status != TxStatus::Idle {
                // The client is idle inside a transaction: nothing is owed yet, but the
                // transaction is gone and its next request must learn it.
                return (BusyEnd::TxLost(why), Disposal::Close);
            }
            // Idle outside a transaction, nothing owed: the client notices nothing.
            return (BusyEnd::Released, Disposal::Close);
        }
        // Nothing of the unanswered requests reached the client and all may run elsewhere.
        let retry = !self.head_forwarded
            && !self.backups.is_empty()
            && self.backups.iter().all(Option::is_some);
        if retry {
            let units = std::mem::take(&mut self.backups)
                .into_iter()
                .flatten()
                .collect();
            return (BusyEnd::Retry(units), Disposal::Close);
        }
        let in_tx = txn.status != TxStatus::Idle || self.began_in_flight;
        (
            BusyEnd::Lost {
                why,
                readies: self.outstanding,
                in_tx,
            },
            Disposal::Close,
        )
    }
}

/// Messages that belong to a COPY FROM STDIN in progress (the server ignores Flush and Sync
/// until it ends).
fn is_copy_traffic(tag: u8) -> bool {
    matches!(
        tag,
        frontend::COPY_DATA
            | frontend::COPY_DONE
            | frontend::COPY_FAIL
            | frontend::FLUSH
            | frontend::SYNC
    )
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
