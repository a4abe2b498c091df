//! Serving requests on one borrowed server connection until it can go back: forwards the
//! client's requests (statements renamed, missing Parses injected), passes responses back in
//! batches (swallowing answers to injected messages), follows COPY, applies session changes
//! when their request succeeds, and notices a request that must be routed elsewhere.

use std::collections::VecDeque;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

use super::prepared::{
    Disposition, Expect, Rewriter, ServerStatements, copy_in_started, on_response,
};
use super::settings::Settings;
use super::txn::{BusyEnd, Held, Txn};
use super::unit::{Change, Meaning, Unit, meaning};
use crate::config::ReadYourWrites;
use crate::net::ServerStream;
use crate::protocol::backend::{
    self, ErrorFields, ReadyForQuery, TxStatus, parse_parameter_status,
};
use crate::protocol::codec::get_cstr;
use crate::protocol::frontend;
use crate::protocol::{MessageReader, ProtocolError};
use crate::router::Target;
use crate::server::{MAX_SERVER_MESSAGE, ServerConn};

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
}

enum Event {
    Server(Result<Option<crate::protocol::Frame>, ProtocolError>),
    Client(Result<Option<crate::protocol::Frame>, ProtocolError>),
    ShutdownStarted,
    Forced,
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
    let backup = if may_retry {
        first.duplicate().ok()
    } else {
        None
    };
    let on_replica = held.on_replica;
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
        let mut state = Drive {
            swr,
            statements,
            applied,
            params,
            expect: VecDeque::new(),
            pending: VecDeque::new(),
            carry: Vec::new(),
            tentative: Vec::new(),
            outstanding: 0,
            partial: false,
            copy_in: false,
            errored: false,
            wrote_in_tx: false,
            began_in_flight: false,
            saw_rollback: false,
            forwarded_any: false,
            on_replica,
        };
        let result = state
            .run(txn, &mut server, first, first_meaning, backup)
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
    forwarded_any: bool,
    on_replica: bool,
}

impl Drive<'_> {
    async fn run<R, W>(
        &mut self,
        txn: &mut Txn<'_, R, W>,
        server: &mut MessageReader<ReadHalf<&mut ServerStream>>,
        first: Unit,
        first_meaning: &Meaning,
        backup: Option<Unit>,
    ) -> (BusyEnd, Disposal)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if let Err(e) = self
            .send(txn, first, first_meaning.changes.clone(), first_meaning)
            .await
        {
            return self.lost(txn, e, backup);
        }
        let mut backup = backup;
        let mut incoming = Unit::default();
        let mut deferred: Option<Unit> = None;
        let mut deadline: Option<Instant> = None;
        loop {
            if self.outstanding == 0 && !self.partial && !self.copy_in {
                let idle = txn.status == TxStatus::Idle;
                if let Some(u) = deferred.take() {
                    if idle {
                        return (BusyEnd::Deferred(u), self.idle_disposal(txn));
                    }
                    // Inside a transaction the request belongs to this connection after all.
                    let m = meaning(&u, &txn.statements, &txn.rules);
                    let changes = m.changes.clone();
                    if let Err(e) = self.send(txn, u, changes, &m).await {
                        return self.lost(txn, e, None);
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
                r = server.next() => Event::Server(r),
                r = txn.reader.next(), if deferred.is_none() => Event::Client(r),
            };
            match event {
                Event::Forced => return (BusyEnd::Shutdown, Disposal::Close),
                Event::ShutdownStarted => {
                    deadline = Some(Instant::now() + txn.config.proxy.shutdown_timeout.0);
                }
                Event::Server(r) => {
                    let frame = match r {
                        Ok(Some(f)) => f,
                        Ok(None) => {
                            return self.lost(txn, "server closed the connection".into(), backup);
                        }
                        Err(e) => return self.lost(txn, e.to_string(), backup),
                    };
                    match self.relay_responses(txn, server, frame).await {
                        Ok(true) => backup = None,
                        Ok(false) => {}
                        Err(Gone::Client) => return (BusyEnd::ClientGone, Disposal::Close),
                        Err(Gone::Server(why)) => return self.lost(txn, why, backup),
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
                    if self.copy_in
                        && matches!(
                            frame.tag,
                            frontend::COPY_DATA
                                | frontend::COPY_DONE
                                | frontend::COPY_FAIL
                                | frontend::FLUSH
                                | frontend::SYNC
                        )
                    {
                        if matches!(frame.tag, frontend::COPY_DONE | frontend::COPY_FAIL) {
                            self.copy_in = false;
                        }
                        if let Err(e) = self.swr.write_all(frame.raw()).await {
                            return self.lost(txn, e.to_string(), None);
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
                    if !incoming.push(frame) {
                        continue;
                    }
                    let unit = std::mem::take(&mut incoming);
                    let m = meaning(&unit, &txn.statements, &txn.rules);
                    let in_tx = txn.status != TxStatus::Idle || self.began_in_flight;
                    if self.on_replica
                        && !in_tx
                        && !txn.pinned
                        && txn.target_of(&m) == Target::Primary
                    {
                        deferred = Some(unit);
                        continue;
                    }
                    let changes = m.changes.clone();
                    if let Err(e) = self.send(txn, unit, changes, &m).await {
                        return self.lost(txn, e, None);
                    }
                }
            }
        }
    }

    /// Rewrites and sends one request.
    async fn send<R, W>(
        &mut self,
        txn: &mut Txn<'_, R, W>,
        unit: Unit,
        mut changes: Vec<Change>,
        m: &Meaning,
    ) -> Result<(), String> {
        let readies = unit.readies();
        let partial = unit.is_partial();
        let mut out = BytesMut::new();
        {
            let mut rw = Rewriter {
                client: &mut txn.statements,
                server: self.statements,
                expect: &mut self.expect,
                rules: &txn.rules,
                max_prepared: txn.config.proxy.max_prepared_statements,
            };
            for f in unit.frames {
                rw.push(f, &mut out).map_err(|e| e.to_string())?;
            }
        }
        let wrote = !self.on_replica && !m.intent.read_only;
        let began = m.intent.begin.is_some();
        if readies == 0 {
            self.carry.append(&mut changes);
        } else {
            changes.splice(0..0, std::mem::take(&mut self.carry));
            for i in 0..readies {
                let changes = if i + 1 == readies {
                    std::mem::take(&mut changes)
                } else {
                    Vec::new()
                };
                self.pending.push_back(Pending {
                    changes,
                    wrote,
                    began,
                });
            }
        }
        self.began_in_flight |= began;
        self.outstanding += readies;
        self.partial = partial;
        self.swr.write_all(&out).await.map_err(|e| e.to_string())
    }

    /// Forwards `first` and every further response already buffered, in one write. Returns
    /// whether anything reached the client.
    async fn relay_responses<R, W>(
        &mut self,
        txn: &mut Txn<'_, R, W>,
        server: &mut MessageReader<ReadHalf<&mut ServerStream>>,
        first: crate::protocol::Frame,
    ) -> Result<bool, Gone>
    where
        W: AsyncWrite + Unpin,
    {
        let mut batch = BytesMut::new();
        let mut frame = first;
        loop {
            let disposition = on_response(frame.tag, &mut self.expect, self.statements);
            match frame.tag {
                backend::READY_FOR_QUERY => {
                    let status =
                        ReadyForQuery::parse(&frame).map_err(|e| Gone::Server(e.to_string()))?;
                    self.on_ready(txn, status);
                }
                backend::ERROR_RESPONSE => {
                    // FATAL/PANIC means the backend is going away (shutdown, crash, terminate):
                    // the connection is lost, not just this request.
                    let fields =
                        ErrorFields::parse(&frame).map_err(|e| Gone::Server(e.to_string()))?;
                    if matches!(fields.severity.as_str(), "FATAL" | "PANIC") {
                        if !batch.is_empty() {
                            txn.writer
                                .write_all(&batch)
                                .await
                                .map_err(|_| Gone::Client)?;
                            self.forwarded_any = true;
                        }
                        return Err(Gone::Server(fields.message));
                    }
                    self.errored = true;
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
                        // The request only completes with the Sync the client sends after
                        // CopyDone: keep the connection until then.
                        self.partial = true;
                        self.outstanding = self.outstanding.saturating_sub(1);
                        if let Some(p) = self.pending.pop_front() {
                            self.carry.extend(p.changes);
                        }
                    }
                }
                _ => {}
            }
            if disposition == Disposition::Forward {
                batch.unsplit(frame.into_raw());
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
        if batch.is_empty() {
            return Ok(false);
        }
        txn.writer
            .write_all(&batch)
            .await
            .map_err(|_| Gone::Client)?;
        self.forwarded_any = true;
        Ok(true)
    }

    fn on_ready<R, W>(&mut self, txn: &mut Txn<'_, R, W>, status: TxStatus) {
        self.outstanding = self.outstanding.saturating_sub(1);
        let p = self.pending.pop_front().unwrap_or(Pending {
            changes: Vec::new(),
            wrote: false,
            began: false,
        });
        if !self.errored {
            self.tentative.extend(p.changes);
            self.wrote_in_tx |= p.wrote;
        }
        self.errored = false;
        if self.pending.iter().all(|p| !p.began) {
            self.began_in_flight = false;
        }
        txn.status = status;
        if status == TxStatus::Idle {
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
        if self.outstanding == 0 && !self.partial && !self.copy_in && txn.status == TxStatus::Idle {
            self.idle_disposal(txn)
        } else {
            Disposal::Close
        }
    }

    fn lost<R, W>(
        &mut self,
        txn: &Txn<'_, R, W>,
        why: String,
        backup: Option<Unit>,
    ) -> (BusyEnd, Disposal) {
        if let Some(unit) = backup.filter(|_| !self.forwarded_any) {
            return (BusyEnd::Retry(unit), Disposal::Close);
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

const COPY_IN_RESPONSE: u8 = b'G';

enum Gone {
    Client,
    Server(String),
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
