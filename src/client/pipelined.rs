//! The pipelined path for one request: an autocommit read-only simple query, a self-contained
//! extended request on the unnamed statement, or an execution of one of the client's named
//! statements rides a shared lane (see `pool::lane`) instead of borrowing a server connection
//! of its own, and its answer is streamed back as the lane hands it over. A request no lane
//! takes, or whose lane fails before any of its answer reached the client, goes the ordinary
//! way.

use std::collections::VecDeque;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::ClientError;
use super::cancel::CancelTarget;
use super::prepared::{Rewriter, ServerStatements, executes_named, is_self_contained};
use super::txn::Txn;
use super::unit::{Meaning, Unit};
use crate::pool::{REPLY_BATCHES, Reply, Rewritten};
use crate::protocol::backend::TxStatus;
use crate::protocol::frontend;
use crate::registry::{ACTIVE, IDLE};
use crate::router::Target;

/// Longer queries are sent the ordinary way (keeps what a lane writes at once small).
const MAX_QUERY: usize = 8 * 1024;

/// What became of a request offered to a lane.
pub(super) enum Pipelined {
    Served,
    /// No lane took it: serve it the ordinary way.
    NotTaken,
    /// Its statement must be checked first: serve it the ordinary way on this node.
    Declined {
        node: usize,
        on_replica: bool,
    },
}

/// How a request rides a lane.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Sent as it is.
    Plain,
    /// Rewritten against the lane's statements (the client's named statement).
    Named,
}

impl<R, W> Txn<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Serves `unit` on a lane when it may ride one; false when it must go the ordinary way.
    pub(super) async fn pipelined(
        &mut self,
        unit: &Unit,
        m: &Meaning,
        target: Target,
    ) -> Result<Pipelined, ClientError> {
        let depth = self.config.proxy.pipeline_depth;
        if depth == 0 {
            return Ok(Pipelined::NotTaken);
        }
        let sent_bytes = unit.frames.iter().map(|f| f.raw().len()).sum();
        let Some(shape) = self.may_pipeline(unit, m, sent_bytes) else {
            return Ok(Pipelined::NotTaken);
        };
        let Ok((node, on_replica)) = self.choose(target, &[]).await else {
            return Ok(Pipelined::NotTaken);
        };
        let Ok(pool) = self.pool_on(node) else {
            return Ok(Pipelined::NotTaken);
        };
        let (tx, mut rx) = mpsc::channel(REPLY_BATCHES);
        let unverified = std::cell::Cell::new(false);
        let named = shape == Shape::Named;
        let max_prepared = self.config.proxy.max_prepared_statements;
        let (client, rules) = (&mut self.statements, &self.rules);
        let rewrite = |server: Option<&mut ServerStatements>| -> Option<Rewritten> {
            let mut out = BytesMut::with_capacity(sent_bytes);
            let mut expect = VecDeque::new();
            match server {
                // Named statements get the client's server-side names, and Parses the lane's
                // connection lacks, as on a connection of its own.
                Some(server) if named => {
                    let mut rw = Rewriter {
                        client,
                        server,
                        expect: &mut expect,
                        rules,
                        max_prepared,
                        parsed: m.parsed.iter(),
                        refuse_unverified: true,
                        unverified: false,
                    };
                    for f in &unit.frames {
                        rw.push(f, &mut out).ok()?;
                    }
                    if rw.unverified {
                        // Its shape must be checked before it runs: not on a lane.
                        unverified.set(true);
                        return None;
                    }
                }
                None if !named => {
                    for f in &unit.frames {
                        out.extend_from_slice(f.raw());
                    }
                }
                _ => return None,
            }
            Some((out, expect))
        };
        let Some(ticket) = pool.pipeline(&self.settings, depth, named, rewrite, tx) else {
            // Declined for a check the ordinary path makes: there, on the node chosen here
            // (choosing again would move on, and keep the statement off this node's lanes).
            return Ok(if unverified.get() {
                Pipelined::Declined { node, on_replica }
            } else {
                Pipelined::NotTaken
            });
        };
        if let (Some(parse), Some(parsed)) = (
            unit.frames.iter().find(|f| f.tag == frontend::PARSE),
            m.parsed.first(),
        ) {
            self.statements.set_unnamed(parse, parsed.clone());
        }
        let _load = self.shared.load.track(node);
        let sent = Instant::now();
        *self.cancel.lock() = Some(CancelTarget::Lane(ticket.clone()));
        self.client.set_state(ACTIVE);
        self.stats.received(sent_bytes);
        self.stats.pipelined();
        // KILL_CLIENT, or a shutdown whose grace ran out, ends the session now; the statement
        // is cancelled so the requests behind it on the lane go on.
        let client = self.client.clone();
        let shutdown = &self.shared.shutdown;
        let grace = self.config.proxy.shutdown_timeout.0;
        let forced = async {
            tokio::select! {
                _ = client.kill.cancelled() => {}
                _ = super::grace_ran_out(shutdown, grace) => {}
            }
        };
        tokio::pin!(forced);
        let mut forwarded = false;
        let result = loop {
            let reply = tokio::select! {
                biased;
                r = rx.recv() => r,
                _ = &mut forced => {
                    ticket.cancel();
                    break Err(ClientError::Shutdown);
                }
            };
            match reply {
                Some(Reply::Data { bytes, ready }) => {
                    if let Some(status) = ready {
                        self.status = status;
                    }
                    self.send(&bytes).await?;
                    self.stats.sent(bytes.len());
                    forwarded = true;
                    if ready.is_some() {
                        let took = sent.elapsed();
                        self.stats.query(took);
                        self.stats.transaction(took);
                        break Ok(Pipelined::Served);
                    }
                }
                Some(Reply::Lost(why)) if forwarded => {
                    break self
                        .report_lost(&why, 1, false)
                        .await
                        .map(|_| Pipelined::Served);
                }
                None if forwarded => {
                    let why = "pipelined server connection closed";
                    break self
                        .report_lost(why, 1, false)
                        .await
                        .map(|_| Pipelined::Served);
                }
                // Nothing reached the client: serve it the ordinary way.
                Some(Reply::Lost(_)) | None => break Ok(Pipelined::NotTaken),
            }
        };
        *self.cancel.lock() = None;
        self.client.set_state(IDLE);
        result
    }

    /// Only requests that leave no trace on the session may share a connection: one simple
    /// Query, a self-contained unnamed extended request, or an execution of one of the
    /// client's named statements; read-only, outside a transaction, not opening one, changing
    /// no setting.
    fn may_pipeline(&self, unit: &Unit, m: &Meaning, size: usize) -> Option<Shape> {
        let shape = match unit.frames.as_slice() {
            [frame] if frame.tag == frontend::QUERY => Shape::Plain,
            frames if is_self_contained(frames) => Shape::Plain,
            frames if executes_named(frames, &self.statements) => Shape::Named,
            _ => return None,
        };
        let ok = size <= MAX_QUERY
            && self.status == TxStatus::Idle
            && !self.pinned
            && self.lost_tx.is_none()
            && m.intent.read_only
            && m.intent.begin.is_none()
            && !m.intent.sticky
            && m.changes.is_empty()
            && m.route_setting_only.is_none();
        ok.then_some(shape)
    }
}
