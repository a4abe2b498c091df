//! Transaction pooling with per-request routing. Between transactions the client holds no
//! server connection; each request is classified, routed (primary or a replica), served on a
//! borrowed connection until ReadyForQuery says idle, and the connection goes back. The proxy
//! answers a few things itself: `SET pgpilot.route`, a lone Sync, `DEALLOCATE`, `DISCARD ALL`,
//! and everything inside a transaction whose server was lost (until ROLLBACK).

use std::sync::Arc;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::cancel::CancelTarget;
use super::pipelined::Pipelined;
use super::prepared::ClientStatements;
use super::settings::Settings;
use super::unit::{Change, Unit, meaning};
use super::{ClientError, busy};
use crate::app::Shared;
use crate::config::{Config, ReplicaFallback, Routing};
use crate::pool::PooledConn;
use crate::protocol::backend::{self, Origin, Severity, TxStatus};
use crate::protocol::frontend;
use crate::protocol::{MessageReader, ProtocolError, sqlstate};
use crate::router::classify::{FunctionRules, Route};
use crate::router::{ClientRoute, LoadGuard, Target, decide, pick_replica, primary_wait};

/// How often a write waiting for the primary tries the elected one again.
const PRIMARY_RETRY: std::time::Duration = std::time::Duration::from_millis(250);

/// A borrowed server connection and what it is.
pub(super) struct Held<'s> {
    pub conn: PooledConn,
    pub on_replica: bool,
    pub _load: LoadGuard<'s>,
}

pub(super) struct Txn<'a, R, W> {
    pub shared: &'a Shared,
    pub config: Arc<Config>,
    pub rules: Arc<FunctionRules>,
    pub reader: &'a mut MessageReader<R>,
    pub writer: &'a mut W,
    pub database: &'a str,
    pub user: &'a str,
    pub routing: Routing,
    pub statements: ClientStatements,
    pub startup_settings: Settings,
    pub settings: Settings,
    pub route_setting: Route,
    pub session_read_only: bool,
    /// When this client last committed a write (read-your-writes).
    pub last_write: Option<Instant>,
    /// The server of the client's open transaction was lost: answered here until the client
    /// ends the transaction.
    pub lost_tx: Option<LostTx>,
    /// Extended-protocol messages are discarded up to the next Sync after an error.
    pub discard_until_sync: bool,
    pub status: TxStatus,
    pub pinned: bool,
    pub cancel: Arc<Mutex<Option<CancelTarget>>>,
    /// Requests read but not yet served (deferred or to be retried), oldest first.
    pub queue: std::collections::VecDeque<Unit>,
    /// A request whose messages are still arriving.
    pub incoming: Unit,
    /// This client's pool on each node (index in the node list), looked up once.
    pub pools: Vec<Option<Arc<crate::pool::Pool>>>,
    /// This database's traffic counters.
    pub stats: Arc<crate::stats::DbStats>,
    /// This client in `SHOW CLIENTS`; its `kill` token ends the session.
    pub client: Arc<crate::registry::ClientEntry>,
}

/// What the proxy does with a statement it may answer itself.
pub(super) enum LocalReply {
    /// The reply is written.
    Answered,
    /// The server must run it.
    Forward,
    /// It fails with this error; inside a transaction the server must raise it so that the
    /// transaction aborts there too.
    /// `origin` says where PostgreSQL raises the same error, when it is one of its own.
    Raise {
        code: &'static str,
        message: String,
        origin: Option<Origin>,
    },
}

/// A transaction whose server was lost: nothing more of it runs anywhere.
#[derive(Debug)]
pub struct LostTx {
    pub why: String,
    /// An error already answered one of the client's requests in it.
    pub told: bool,
}

/// How serving on one borrowed connection ended.
pub(super) enum BusyEnd {
    Released,
    /// The server failed before any of these requests' answers reached the client: try them
    /// elsewhere, in order.
    Retry(Vec<Unit>),
    /// The server failed mid-request; `readies` answers are still owed to the client.
    Lost {
        why: String,
        readies: usize,
        in_tx: bool,
    },
    /// The server died while the client was idle inside a transaction: its next request
    /// gets `08006` and the transaction is gone.
    TxLost(String),
    /// The server died holding session state the client relies on (pinned): the client is
    /// closed with FATAL `08006`.
    SessionLost(String),
    ClientGone,
    Protocol(ProtocolError),
    Shutdown,
}

impl<'a, R, W> Txn<'a, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub async fn run(&mut self) -> Result<(), ClientError> {
        loop {
            let unit = match self.queue.pop_front() {
                Some(u) => u,
                None => match self.read_unit().await? {
                    Some(u) => u,
                    None => return Ok(()),
                },
            };
            // Boxed: serving a request is a large state; an idle client (the usual case)
            // then holds only the read loop.
            Box::pin(self.serve(unit)).await?;
        }
    }

    /// Serves one request. Requests that arrived meanwhile and need their own routing, or that
    /// must be retried, go to the front of the queue.
    async fn serve(&mut self, unit: Unit) -> Result<(), ClientError> {
        let m = meaning(&unit, &self.statements, &self.rules);
        if self.answer_locally(&unit, &m).await? {
            return Ok(());
        }
        let target = if self.pinned {
            Target::Primary
        } else {
            self.target_of(&m)
        };
        let retryable = target == Target::Replica && m.intent.read_only && m.intent.begin.is_none();
        let mut exclude = Vec::new();
        let mut unit = unit;
        if self.shared.gate.is_paused(self.database) {
            self.client.set_state(crate::registry::WAITING);
            self.shared.gate.wait_resumed(self.database).await;
        }
        let mut chosen = match self.pipelined(&unit, &m, target).await? {
            Pipelined::Served => return Ok(()),
            Pipelined::NotTaken => None,
            Pipelined::Declined { node, on_replica } => Some((node, on_replica)),
        };
        // A primary that refuses connections is waited out: new requests proceed on the next
        // elected primary within failover_wait_timeout.
        let primary_deadline = Instant::now() + primary_wait(&self.config.cluster);
        loop {
            let picked = match chosen.take() {
                Some(n) => Ok(n),
                None => self.choose(target, &exclude).await,
            };
            let (node, on_replica) = match picked {
                Ok(n) => n,
                Err(e) => return self.fail_request(&e, unit.readies()).await,
            };
            let held = match self.checkout(node, on_replica, m.runs_nothing).await {
                Ok(h) => h,
                Err(_) if retryable && exclude.len() < 2 => {
                    exclude.push(node);
                    continue;
                }
                Err(e)
                    if !on_replica && e.is_unreachable() && Instant::now() < primary_deadline =>
                {
                    // Tell the prober at once: a crash is confirmed by probes, not by us.
                    self.shared.cluster.probe_now(node);
                    // A new primary is taken at once; the same one is tried again shortly
                    // (it may be restarting).
                    let name = self.shared.cluster.view().nodes[node].name.clone();
                    let retry_at = (Instant::now() + PRIMARY_RETRY).min(primary_deadline);
                    let elected = self
                        .shared
                        .cluster
                        .wait_for_new_primary(&name, retry_at)
                        .await;
                    if elected.is_none() && Instant::now() >= primary_deadline {
                        return self.fail_request(&e, unit.readies()).await;
                    }
                    continue;
                }
                Err(e) => return self.fail_request(&e, unit.readies()).await,
            };
            let may_retry = retryable && exclude.len() < 2;
            let end = busy::serve(self, held, unit, may_retry, &m).await;
            self.client.set_state(crate::registry::IDLE);
            match end {
                BusyEnd::Released => return Ok(()),
                BusyEnd::Retry(units) => {
                    exclude.push(node);
                    let mut units = units.into_iter();
                    let Some(first) = units.next() else {
                        return Ok(());
                    };
                    for (i, u) in units.enumerate() {
                        self.queue.insert(i, u);
                    }
                    unit = first;
                }
                BusyEnd::Lost {
                    why,
                    readies,
                    in_tx,
                } => {
                    self.shared.cluster.probe_now(node);
                    return self.report_lost(&why, readies, in_tx).await;
                }
                BusyEnd::TxLost(why) => {
                    self.shared.cluster.probe_now(node);
                    self.lost_tx = Some(LostTx { why, told: false });
                    return Ok(());
                }
                BusyEnd::SessionLost(why) => {
                    self.shared.cluster.probe_now(node);
                    return Err(ClientError::ServerLost(why));
                }
                BusyEnd::ClientGone => return Err(ProtocolError::Closed.into()),
                BusyEnd::Protocol(e) => return Err(e.into()),
                BusyEnd::Shutdown => return Err(ClientError::Shutdown),
            }
        }
    }

    /// Reads the next request; `None` when the client terminates.
    async fn read_unit(&mut self) -> Result<Option<Unit>, ClientError> {
        let mut unit = std::mem::take(&mut self.incoming);
        loop {
            let frame = tokio::select! {
                biased;
                _ = self.shared.shutdown.cancelled(), if unit.frames.is_empty() => {
                    return Err(ClientError::Shutdown);
                }
                _ = self.client.kill.cancelled() => return Err(ClientError::Shutdown),
                f = self.reader.next() => match f? {
                    Some(f) => f,
                    None => return Ok(None),
                },
            };
            match frame.tag {
                frontend::TERMINATE => return Ok(None),
                // CopyData/CopyDone/CopyFail outside COPY are ignored, as PostgreSQL does.
                frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => continue,
                tag if !frontend::is_session_tag(tag) => {
                    return Err(ProtocolError::Unexpected {
                        tag,
                        context: "from client",
                    }
                    .into());
                }
                frontend::SYNC if self.discard_until_sync => {
                    self.discard_until_sync = false;
                    self.ready().await?;
                    continue;
                }
                _ if self.discard_until_sync => continue,
                _ => {}
            }
            if unit.push(frame) {
                return Ok(Some(unit));
            }
        }
    }

    /// Requests the proxy answers itself. Returns true when answered.
    async fn answer_locally(
        &mut self,
        unit: &Unit,
        m: &super::unit::Meaning,
    ) -> Result<bool, ClientError> {
        let mut out = BytesMut::new();
        if let Some(LostTx { why, told }) = self.lost_tx.take() {
            // Nothing of the request runs: the transaction it belongs to is gone.
            if m.ends_tx_only && !m.commits {
                self.status = TxStatus::Idle;
                synthesize_ok(unit, "ROLLBACK", &mut out);
            } else if m.ends_tx_only {
                // Never the ROLLBACK tag PostgreSQL gives a COMMIT in a failed transaction:
                // a client that missed the earlier error (drivers ignore the answer to a
                // Close) would take it for a commit. A failed COMMIT ends the transaction.
                self.status = TxStatus::Idle;
                let msg = format!(
                    "server connection lost ({why}): the transaction was rolled back, not committed"
                );
                self.error_then_ready(&mut out, sqlstate::CONNECTION_FAILURE, &msg, unit);
            } else {
                self.status = TxStatus::Failed;
                if told {
                    let msg = "current transaction is aborted, commands ignored until end of transaction block";
                    self.error_then_ready(&mut out, "25P02", msg, unit);
                } else {
                    let msg = format!(
                        "server connection lost while the transaction was idle ({why}); the transaction was rolled back"
                    );
                    self.error_then_ready(&mut out, sqlstate::CONNECTION_FAILURE, &msg, unit);
                }
                self.lost_tx = Some(LostTx { why, told: true });
            }
            return self.send(&out).await.map(|_| true);
        }
        if unit.is_sync_only() {
            for f in &unit.frames {
                if f.tag == frontend::SYNC {
                    backend::ready_for_query(&mut out, self.status);
                }
            }
            return self.send(&out).await.map(|_| true);
        }
        match self.local_reply(m, &mut out) {
            LocalReply::Answered => self.send(&out).await.map(|_| true),
            LocalReply::Forward => Ok(false),
            LocalReply::Raise {
                code,
                message,
                origin,
            } => {
                // No transaction is open on any server: the error is the whole answer.
                backend::error_response_from(&mut out, Severity::Error, code, &message, origin);
                self.readies_after_error(&mut out, unit.readies());
                self.send(&out).await.map(|_| true)
            }
        }
    }

    /// The statements the proxy answers itself whether or not the client holds a server
    /// connection: `SET pgpilot.route`, `DEALLOCATE` (the client's statement names are not the
    /// server's), `DISCARD ALL` outside a transaction. In a failed transaction the server's
    /// own error is the right answer, and an unknown `DEALLOCATE` name inside a transaction
    /// must abort it on the server: those are forwarded.
    pub(super) fn local_reply(
        &mut self,
        m: &super::unit::Meaning,
        out: &mut BytesMut,
    ) -> LocalReply {
        if self.status == TxStatus::Failed || !m.single_statement {
            return LocalReply::Forward;
        }
        if let Some(route) = m.route_setting_only {
            let Some(r) = route else {
                return LocalReply::Raise {
                    code: sqlstate::INVALID_PARAMETER_VALUE,
                    message: "invalid value for parameter \"pgpilot.route\": use primary, replica or auto".into(),
                    origin: None,
                };
            };
            self.route_setting = r;
            backend::command_complete(out, "SET");
            backend::ready_for_query(out, self.status);
            return LocalReply::Answered;
        }
        if m.changes.len() != 1 {
            return LocalReply::Forward;
        }
        // A pinned session may hold statements made with SQL PREPARE, which only its server
        // knows: names the proxy does not know go there.
        let tag = match &m.changes[0] {
            Change::Deallocate { name }
                if !name.is_empty() && self.statements.get(name).is_some() =>
            {
                self.statements.remove(name);
                "DEALLOCATE"
            }
            Change::Deallocate { name } if self.status == TxStatus::Idle && !self.pinned => {
                return LocalReply::Raise {
                    code: sqlstate::UNDEFINED_PSTATEMENT,
                    message: format!("prepared statement \"{name}\" does not exist"),
                    origin: Some(Origin {
                        file: "prepare.c",
                        routine: "FetchPreparedStatement",
                    }),
                };
            }
            Change::DeallocateAll if !self.pinned => {
                self.statements.clear();
                "DEALLOCATE ALL"
            }
            Change::DiscardAll if self.status == TxStatus::Idle && !self.pinned => {
                self.statements.clear();
                self.settings = self.startup_settings.clone();
                self.route_setting = Route::Auto;
                self.session_read_only = false;
                "DISCARD ALL"
            }
            _ => return LocalReply::Forward,
        };
        backend::command_complete(out, tag);
        backend::ready_for_query(out, self.status);
        LocalReply::Answered
    }

    /// The node for `target`: an eligible replica, else the elected primary (waiting for one).
    pub(super) async fn choose(
        &self,
        target: Target,
        exclude: &[usize],
    ) -> Result<(usize, bool), ClientError> {
        let cluster = &self.config.cluster;
        if target == Target::Replica {
            let view = self.shared.cluster.view();
            let ryw = self.last_write;
            if let Some(i) = pick_replica(&view, cluster, &self.shared.load, ryw, exclude) {
                return Ok((i, true));
            }
            let waiting_for_own_write = ryw.is_some()
                && view
                    .primary()
                    .and_then(|p| p.sample.as_ref())
                    .is_none_or(|s| ryw.is_some_and(|w| s.started <= w));
            if cluster.replica_fallback == ReplicaFallback::Error && !waiting_for_own_write {
                return Err(ClientError::NoNode("replica"));
            }
        }
        // The usual case: a primary is known (no waiting, nothing cloned).
        if let Some(i) = self.shared.cluster.view().primary {
            return Ok((i, false));
        }
        let primary = self
            .shared
            .cluster
            .wait_for_primary(primary_wait(cluster))
            .await
            .ok_or(ClientError::NoNode("primary"))?;
        let index = self
            .shared
            .cluster
            .view()
            .index_of(&primary.name)
            .ok_or(ClientError::NoNode("primary"))?;
        Ok((index, false))
    }

    /// Borrows a connection on `node` and brings its settings in line with this client's.
    async fn checkout(
        &mut self,
        node: usize,
        on_replica: bool,
        runs_nothing: bool,
    ) -> Result<Held<'a>, ClientError> {
        let shared: &'a Shared = self.shared;
        let pool = self.pool_on(node)?;
        let waited = Instant::now();
        self.client.set_state(crate::registry::WAITING);
        let wait = self.config.proxy.query_wait_timeout.0;
        let checked_out = if runs_nothing {
            pool.checkout_to_prepare(wait).await
        } else {
            pool.checkout(wait).await
        };
        self.client.set_state(if checked_out.is_ok() {
            crate::registry::ACTIVE
        } else {
            crate::registry::IDLE
        });
        let mut conn = checked_out?;
        self.stats.wait(waited.elapsed());
        let fence = conn.fence();
        let server = conn.conn();
        // Biased: nothing is sent to a node fenced since the connection was opened.
        let applied = tokio::select! {
            biased;
            _ = fence.cancelled() => Err(ClientError::ServerLost("the node was fenced".into())),
            r = server.apply_settings(&self.settings) => r.map_err(|e| match e {
                crate::server::ServerError::Rejected(f) => ClientError::Pool(
                    crate::pool::PoolError::Connect(crate::server::ServerError::Rejected(f)),
                ),
                other => ClientError::ServerLost(other.to_string()),
            }),
        };
        if let Err(e) = applied {
            conn.discard().await;
            return Err(e);
        }
        let server = conn.conn();
        *self.cancel.lock() = Some(CancelTarget::Server {
            host: server.host.clone(),
            port: server.port,
            key: server.key,
        });
        Ok(Held {
            conn,
            on_replica,
            _load: shared.load.track(node),
        })
    }

    /// This client's pool on `node`, looked up once.
    pub(super) fn pool_on(&mut self, node: usize) -> Result<Arc<crate::pool::Pool>, ClientError> {
        if let Some(p) = self.pools.get(node).and_then(Option::as_ref) {
            return Ok(p.clone());
        }
        let view = self.shared.cluster.view();
        let status = view.nodes.get(node).ok_or(ClientError::NoNode("node"))?;
        let p = super::pool_for(self.shared, &self.config, status, self.database, self.user);
        if let Some(slot) = self.pools.get_mut(node) {
            *slot = Some(p.clone());
        }
        Ok(p)
    }

    pub(super) async fn send(&mut self, out: &[u8]) -> Result<(), ClientError> {
        self.writer
            .write_all(out)
            .await
            .map_err(|e| ClientError::Protocol(ProtocolError::Io(e)))
    }

    async fn ready(&mut self) -> Result<(), ClientError> {
        let mut out = BytesMut::new();
        backend::ready_for_query(&mut out, self.status);
        self.send(&out).await
    }

    /// An error for a request, then whatever ReadyForQuery the request expected; a partial
    /// extended request discards the client's messages up to its Sync.
    fn error_then_ready(&mut self, out: &mut BytesMut, code: &str, msg: &str, unit: &Unit) {
        backend::error_response(out, Severity::Error, code, msg);
        self.readies_after_error(out, unit.readies());
    }

    /// What follows an error the proxy gives for a request: its ReadyForQuery answers, or, when
    /// it has no Sync yet, skipping the rest of it until one comes.
    fn readies_after_error(&mut self, out: &mut BytesMut, readies: usize) {
        if readies == 0 {
            self.discard_until_sync = true;
        }
        for _ in 0..readies {
            backend::ready_for_query(out, self.status);
        }
    }

    /// A request that could not be served gets an ERROR (not FATAL): the client stays.
    async fn fail_request(&mut self, e: &ClientError, readies: usize) -> Result<(), ClientError> {
        let (_, code, message) =
            e.response()
                .unwrap_or((Severity::Error, sqlstate::INTERNAL_ERROR, e.to_string()));
        let mut out = BytesMut::new();
        backend::error_response(&mut out, Severity::Error, code, &message);
        self.readies_after_error(&mut out, readies);
        self.send(&out).await
    }

    /// The server died under a request: `08006`, and a transaction that was open is failed.
    pub(super) async fn report_lost(
        &mut self,
        why: &str,
        readies: usize,
        in_tx: bool,
    ) -> Result<(), ClientError> {
        if in_tx {
            self.lost_tx = Some(LostTx {
                why: why.to_owned(),
                told: true,
            });
            self.status = TxStatus::Failed;
        } else {
            self.status = TxStatus::Idle;
        }
        let mut out = BytesMut::new();
        let msg = format!("server connection lost: {why}");
        backend::error_response(
            &mut out,
            Severity::Error,
            sqlstate::CONNECTION_FAILURE,
            &msg,
        );
        self.readies_after_error(&mut out, readies);
        self.send(&out).await
    }
}

impl<R, W> Txn<'_, R, W> {
    /// Where a request that starts outside a transaction should go.
    pub(super) fn target_of(&self, m: &super::unit::Meaning) -> Target {
        let client = ClientRoute {
            database: self.routing,
            setting: self.route_setting,
            session_read_only: self.session_read_only,
        };
        decide(&m.intent, &client)
    }

    /// Applies a successful request's session changes to the client and its connection.
    pub(super) fn apply(
        &mut self,
        changes: &[Change],
        applied: &mut Settings,
        server_statements: &mut super::prepared::ServerStatements,
    ) {
        for c in changes {
            match c {
                Change::Set { name, statement } => {
                    self.settings.set(name, statement.clone());
                    applied.set(name, statement.clone());
                }
                Change::Reset { name } => {
                    self.settings.reset(name);
                    applied.reset(name);
                }
                Change::ResetAll => {
                    self.settings = self.startup_settings.clone();
                    *applied = Settings::default();
                }
                Change::DiscardAll => {
                    self.settings = self.startup_settings.clone();
                    self.statements.clear();
                    *applied = Settings::default();
                    server_statements.clear();
                    self.pinned = false;
                }
                Change::Deallocate { name } => self.statements.remove(name),
                Change::DeallocateAll => {
                    self.statements.clear();
                    server_statements.clear();
                }
                Change::Pin => self.pinned = true,
                Change::Route(r) => self.route_setting = *r,
                Change::SessionReadOnly {
                    read_only,
                    statement,
                } => {
                    self.session_read_only = *read_only;
                    self.settings
                        .set("default_transaction_read_only", statement.clone());
                    applied.set("default_transaction_read_only", statement.clone());
                }
            }
        }
    }
}

/// Answers a request made only of transaction-ending statements as the server would after the
/// transaction was lost: every message succeeds and the command tag is `tag`.
fn synthesize_ok(unit: &Unit, tag: &str, out: &mut BytesMut) {
    for f in &unit.frames {
        match f.tag {
            frontend::QUERY => {
                backend::command_complete(out, tag);
                backend::ready_for_query(out, TxStatus::Idle);
            }
            frontend::PARSE => crate::protocol::codec::write_message(out, b'1', |_| {}),
            frontend::BIND => crate::protocol::codec::write_message(out, b'2', |_| {}),
            frontend::DESCRIBE => crate::protocol::codec::write_message(out, b'n', |_| {}),
            frontend::EXECUTE => backend::command_complete(out, tag),
            frontend::CLOSE => crate::protocol::codec::write_message(out, b'3', |_| {}),
            frontend::SYNC => backend::ready_for_query(out, TxStatus::Idle),
            _ => {}
        }
    }
}
