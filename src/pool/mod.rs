//! Server connection pools keyed by (node, database, user), and the RAII guard through which a
//! client borrows a connection: `release()` resets it and checks it back in; dropping the guard
//! without releasing closes the connection, so a broken one is never handed to the next client.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::backend::TxStatus;
use crate::registry::{Registry, ServerEntry, now_ms};
use crate::server::{ConnectParams, ServerConn, ServerError};

mod lane;
pub mod login;
pub use lane::{Lane, REPLY_BATCHES, Reply, Rewritten, Ticket};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub node: Arc<str>,
    pub database: Arc<str>,
    pub user: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("query_wait_timeout: no server connection became free within {0:?}")]
    CheckoutTimeout(Duration),
    #[error(transparent)]
    Connect(#[from] ServerError),
}

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub size: usize,
    /// Server connections kept open even when idle (topped up by `maintain`).
    pub min_size: usize,
    pub idle_timeout: Duration,
    pub lifetime: Duration,
}

impl PoolSettings {
    pub fn from_config(p: &crate::config::ProxyConfig) -> Self {
        PoolSettings {
            size: p.pool_size,
            min_size: p.min_pool_size,
            idle_timeout: p.server_idle_timeout.0,
            lifetime: p.server_lifetime.0,
        }
    }
}

/// Extra connections per pool for requests that run nothing.
pub const PREPARE_RESERVE: usize = 2;
/// How long a request that runs nothing waits for one of the pool's own connections first.
const PREPARE_WAIT: Duration = Duration::from_millis(50);

pub struct Pool {
    pub key: PoolKey,
    connect: ConnectParams,
    /// Replaced by a reload; read lock-free on every checkout.
    settings: ArcSwap<PoolSettings>,
    /// Permits still to take away after a reload made the pool smaller.
    shrink: AtomicUsize,
    permits: Arc<Semaphore>,
    /// Extra connections for requests that run nothing (see `checkout_to_prepare`).
    reserve: Arc<Semaphore>,
    idle: Mutex<Vec<ServerConn>>,
    /// Server connections opened over the pool's life.
    opened: AtomicUsize,
    /// Server connections closed over the pool's life.
    closed: AtomicUsize,
    /// Clients waiting for a connection to free up.
    waiting: AtomicUsize,
    servers: Arc<Registry<ServerEntry>>,
    /// RECONNECT: connections opened before this are closed instead of reused.
    reconnect_before: ArcSwapOption<Instant>,
    /// Cancelled (and replaced) when the node is fenced: sessions on its connections end.
    abort: Mutex<CancellationToken>,
    /// Connections shared by pipelined requests (see `lane`).
    lanes: Mutex<Vec<Arc<Lane>>>,
    /// Signalled when a client starts waiting for a connection: idle lanes give theirs back.
    wanted: tokio::sync::Notify,
    /// What logins were told, for logins that find every connection busy.
    pub login: login::LoginParams,
}

impl Pool {
    pub fn new(
        key: PoolKey,
        connect: ConnectParams,
        settings: PoolSettings,
        servers: Arc<Registry<ServerEntry>>,
    ) -> Arc<Self> {
        Arc::new(Pool {
            key,
            connect,
            permits: Arc::new(Semaphore::new(settings.size)),
            reserve: Arc::new(Semaphore::new(PREPARE_RESERVE)),
            settings: ArcSwap::from_pointee(settings),
            shrink: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            opened: AtomicUsize::new(0),
            closed: AtomicUsize::new(0),
            abort: Mutex::new(CancellationToken::new()),
            waiting: AtomicUsize::new(0),
            servers,
            reconnect_before: ArcSwapOption::empty(),
            lanes: Mutex::new(Vec::new()),
            wanted: tokio::sync::Notify::new(),
            login: Default::default(),
        })
    }

    /// Borrows a connection, waiting up to `wait` for one to free up.
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<PooledConn, PoolError> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.waiting.fetch_add(1, Ordering::Relaxed);
                self.wanted.notify_waiters();
                let got = tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                got.map_err(|_| PoolError::CheckoutTimeout(wait))?
                    .map_err(|_| PoolError::CheckoutTimeout(wait))?
            }
        };
        self.take(permit).await
    }

    /// A connection if one is free now (idle, or a permit to open one); `None` when the pool
    /// is saturated.
    pub async fn checkout_now(self: &Arc<Self>) -> Option<Result<PooledConn, PoolError>> {
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        Some(self.take(permit).await)
    }

    /// A connection for a request that runs nothing (Parse, Describe, Close: no statement
    /// executes, no lock is held for long). After a short wait for one of the pool's own, it
    /// may take one of `PREPARE_RESERVE` extra connections: clients that prepare
    /// synchronously (pgbench, libpq's PQprepare) can otherwise wait on connections held by
    /// clients of their own blocked thread until `query_wait_timeout`.
    pub async fn checkout_to_prepare(
        self: &Arc<Self>,
        wait: Duration,
    ) -> Result<PooledConn, PoolError> {
        if let Ok(Ok(conn)) =
            tokio::time::timeout(PREPARE_WAIT.min(wait), self.checkout(wait)).await
        {
            return Ok(conn);
        }
        let rest = wait.saturating_sub(PREPARE_WAIT);
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = tokio::time::timeout(rest, async {
            tokio::select! {
                p = self.permits.clone().acquire_owned() => p,
                p = self.reserve.clone().acquire_owned() => p,
            }
        })
        .await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let permit = permit
            .map_err(|_| PoolError::CheckoutTimeout(wait))?
            .map_err(|_| PoolError::CheckoutTimeout(wait))?;
        self.take(permit).await
    }

    /// An idle connection that is still good, without waiting; the permit back when none is.
    fn take_idle(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
    ) -> Result<PooledConn, OwnedSemaphorePermit> {
        let now = Instant::now();
        let settings = self.settings();
        loop {
            let Some(conn) = self.idle.lock().pop() else {
                return Err(permit);
            };
            let expired = now.duration_since(conn.created) >= settings.lifetime
                || now.duration_since(conn.last_used) >= settings.idle_timeout;
            if expired || conn.fence.is_cancelled() || conn.is_dead() {
                self.closed.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(conn.close());
                continue;
            }
            return Ok(self.lend(conn, permit));
        }
    }

    /// A connection for a permit already held: an idle one that is still good, or a new one.
    async fn take(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Result<PooledConn, PoolError> {
        let permit = match self.take_idle(permit) {
            Ok(conn) => return Ok(conn),
            Err(permit) => permit,
        };
        // Boxed: opening a connection (TLS, authentication) is a large, rare state.
        let conn = Box::pin(self.connect()).await?;
        Ok(self.lend(conn, permit))
    }

    fn lend(self: &Arc<Self>, conn: ServerConn, permit: OwnedSemaphorePermit) -> PooledConn {
        if let Some(r) = &conn.registered {
            r.entry.set_active(true);
        }
        PooledConn {
            conn: Some(conn),
            pool: self.clone(),
            _permit: permit,
        }
    }

    /// Opens a server connection and lists it in `SHOW SERVERS`.
    async fn connect(&self) -> Result<ServerConn, ServerError> {
        // A connect to a node that gets fenced meanwhile (a dead container's address may not
        // even answer with a reset) gives up at once instead of at server_connect_timeout.
        let abort = self.abort_token();
        let mut conn = tokio::select! {
            c = ServerConn::connect(&self.connect) => c?,
            _ = abort.cancelled() => {
                return Err(ServerError::Connect {
                    addr: self.connect.addr(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the node was fenced",
                    ),
                });
            }
        };
        self.opened.fetch_add(1, Ordering::Relaxed);
        // The token of the moment the connect began: a fence while it was under way ends it
        // as soon as it is borrowed.
        conn.fence = abort;
        let entry = |_| ServerEntry {
            node: self.key.node.to_string(),
            user: self.key.user.to_string(),
            database: self.key.database.to_string(),
            addr: conn.host.clone(),
            port: conn.port,
            local: conn.local,
            remote_pid: conn.key.pid,
            tls: conn.is_tls(),
            connect_ms: now_ms(),
            request_ms: Default::default(),
            active: Default::default(),
        };
        conn.registered = Some(self.servers.register(entry));
        Ok(conn)
    }

    /// Server connections opened so far.
    pub fn opened(&self) -> usize {
        self.opened.load(Ordering::Relaxed)
    }

    /// Server connections open now (idle or in use).
    pub fn open(&self) -> usize {
        self.opened()
            .saturating_sub(self.closed.load(Ordering::Relaxed))
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime` (keeping
    /// `min_pool_size`) and opens connections up to `min_pool_size`.
    pub async fn maintain(self: &Arc<Self>) {
        let now = Instant::now();
        let pending = self.shrink.load(Ordering::Relaxed);
        if pending > 0 {
            let taken = self.permits.forget_permits(pending);
            self.shrink.fetch_sub(taken, Ordering::Relaxed);
        }
        let settings = self.settings();
        let stale: Vec<ServerConn> = {
            let mut idle = self.idle.lock();
            let open = self.open();
            let mut keep = Vec::with_capacity(idle.len());
            let mut stale = Vec::new();
            for conn in idle.drain(..) {
                let too_old = now.duration_since(conn.created) >= settings.lifetime;
                let unused = now.duration_since(conn.last_used) >= settings.idle_timeout;
                let above_min = open.saturating_sub(stale.len()) > settings.min_size;
                if too_old || conn.is_dead() || (unused && above_min) {
                    stale.push(conn);
                } else {
                    keep.push(conn);
                }
            }
            *idle = keep;
            stale
        };
        self.closed.fetch_add(stale.len(), Ordering::Relaxed);
        for conn in stale {
            conn.close().await;
        }
        while self.open() < settings.min_size.min(settings.size) {
            match self.connect().await {
                Ok(conn) => self.check_in(conn),
                Err(e) => {
                    tracing::debug!(pool = %self.key.node, error = %e, "could not pre-open a server connection");
                    break;
                }
            }
        }
    }

    /// Cancelled when every connection of this pool must be dropped (the node was fenced).
    /// A connection keeps the token of its opening (`PooledConn::fence`): one borrowed just
    /// before a fence is aborted with the rest.
    fn abort_token(&self) -> CancellationToken {
        self.abort.lock().clone()
    }

    /// Ends every session on this pool's connections and closes the idle ones; returns how
    /// many connections were open.
    pub fn abort_all(&self) -> usize {
        let active = self.active_count();
        std::mem::take(&mut *self.abort.lock()).cancel();
        self.login.clear();
        let idle = std::mem::take(&mut *self.idle.lock());
        self.closed.fetch_add(idle.len(), Ordering::Relaxed);
        active + idle.len()
    }

    pub fn waiting_count(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    pub fn active_count(&self) -> usize {
        let outstanding = self.settings().size + self.shrink.load(Ordering::Relaxed);
        outstanding.saturating_sub(self.permits.available_permits())
    }

    pub fn settings(&self) -> PoolSettings {
        **self.settings.load()
    }

    /// A reload's new size and timeouts: a larger pool grows at once, a smaller one as
    /// connections come back.
    pub fn resize(&self, next: PoolSettings) {
        let old = self.settings.swap(Arc::new(next)).size;
        if next.size > old {
            let mut grow = next.size - old;
            // Cancel a pending shrink first.
            let pending = self.shrink.load(Ordering::Relaxed);
            let cancel = pending.min(grow);
            self.shrink.fetch_sub(cancel, Ordering::Relaxed);
            grow -= cancel;
            self.permits.add_permits(grow);
        } else if next.size < old {
            let cut = old - next.size;
            let taken = self.permits.forget_permits(cut);
            self.shrink.fetch_add(cut - taken, Ordering::Relaxed);
        }
    }

    /// RECONNECT: closes idle connections now and every lent one when it comes back.
    pub fn reconnect(&self) {
        self.reconnect_before.store(Some(Arc::new(Instant::now())));
        let idle = std::mem::take(&mut *self.idle.lock());
        self.closed.fetch_add(idle.len(), Ordering::Relaxed);
    }

    /// A connection opened at `created` predates a RECONNECT.
    fn is_stale(&self, created: Instant) -> bool {
        self.reconnect_before
            .load()
            .as_deref()
            .is_some_and(|cutoff| created <= *cutoff)
    }

    fn check_in(&self, mut conn: ServerConn) {
        if self.is_stale(conn.created) || conn.fence.is_cancelled() {
            self.closed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        conn.last_used = Instant::now();
        if let Some(r) = &conn.registered {
            r.entry.set_active(false);
        }
        self.idle.lock().push(conn);
    }
}

/// A borrowed server connection.
pub struct PooledConn {
    conn: Option<ServerConn>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl PooledConn {
    pub fn conn(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("a PooledConn holds its connection until released")
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Cancelled when this connection's node is fenced (even if the fence came between the
    /// checkout and the first request).
    pub fn fence(&self) -> CancellationToken {
        self.conn
            .as_ref()
            .map(|c| c.fence.clone())
            .unwrap_or_default()
    }

    /// Resets the session state (`DISCARD ALL`) and returns the connection to the pool; a
    /// connection that fails the reset is closed instead.
    pub async fn release(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let fence = conn.fence.clone();
        let reset = tokio::select! {
            r = conn.simple_query("DISCARD ALL") => r.ok(),
            _ = fence.cancelled() => None,
        };
        match reset {
            Some(TxStatus::Idle) => {
                conn.forget_session_state(true);
                self.pool.check_in(conn);
            }
            _ => {
                self.pool.closed.fetch_add(1, Ordering::Relaxed);
                conn.close().await;
            }
        }
    }

    /// Returns an idle connection as it is (transaction pooling: its settings and prepared
    /// statements are tracked, not reset).
    pub fn give_back(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.check_in(conn);
        }
    }

    /// Closes the connection instead of returning it.
    pub async fn discard(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.closed.fetch_add(1, Ordering::Relaxed);
            conn.close().await;
        }
    }
}

impl Drop for PooledConn {
    /// A guard dropped without `release`, `give_back` or `discard` closes its connection.
    fn drop(&mut self) {
        if self.conn.take().is_some() {
            self.pool.closed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// All pools, created on first use.
#[derive(Default)]
pub struct Pools {
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Every open server connection, for `SHOW SERVERS`.
    pub servers: Arc<Registry<ServerEntry>>,
}

impl Pools {
    pub fn get_or_create(
        &self,
        key: PoolKey,
        make: impl FnOnce() -> (ConnectParams, PoolSettings),
    ) -> Arc<Pool> {
        let mut map = self.map.lock();
        map.entry(key.clone())
            .or_insert_with(|| {
                let (connect, settings) = make();
                Pool::new(key, connect, settings, self.servers.clone())
            })
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map.lock().values().cloned().collect()
    }

    fn of_node(&self, node: &str) -> Vec<Arc<Pool>> {
        let map = self.map.lock();
        map.values()
            .filter(|p| &*p.key.node == node)
            .cloned()
            .collect()
    }

    /// Drops every connection to `node` (fencing); returns how many there were.
    pub fn abort_node(&self, node: &str) -> usize {
        self.of_node(node).iter().map(|p| p.abort_all()).sum()
    }

    /// Pools serving `database`, or all of them.
    pub fn of_database(&self, database: Option<&str>) -> Vec<Arc<Pool>> {
        let map = self.map.lock();
        map.values()
            .filter(|p| database.is_none_or(|d| &*p.key.database == d))
            .cloned()
            .collect()
    }

    /// Connections to `node` currently lent to clients.
    pub fn active_on(&self, node: &str) -> usize {
        self.of_node(node).iter().map(|p| p.active_count()).sum()
    }
}
