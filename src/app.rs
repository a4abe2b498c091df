//! Wires the subsystems together: binds the listener, starts the probes, accepts clients, and
//! shuts down gracefully (stop accepting, let sessions reach an idle point within
//! `shutdown_timeout`, then `57P01` to the rest).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::auth::Credentials;
use crate::client::cancel::CancelRegistry;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::net::{TlsSetupError, client_tls_acceptor, server_tls_connector};
use crate::pool::Pools;
use crate::router::Load;
use crate::router::classify::FunctionRules;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// State shared by every client task, the probes and (later) the admin console.
pub struct Shared {
    config: ArcSwap<Config>,
    credentials: ArcSwap<Credentials>,
    pub tls_acceptor: Option<TlsAcceptor>,
    pub tls_connector: Option<TlsConnector>,
    pub cluster: Arc<Cluster>,
    pub pools: Pools,
    /// Requests in flight per node (index in the config's node order).
    pub load: Load,
    rules: ArcSwap<FunctionRules>,
    pub next_client_id: AtomicU64,
    pub cancels: CancelRegistry,
    /// Connected clients, checked against `max_client_conn`.
    pub clients: AtomicUsize,
    /// Connections still logging in, kept apart from `clients` (and also bounded by
    /// `max_client_conn`) so that stalled logins never lock authenticated clients out.
    pub logins: AtomicUsize,
    /// Cancelled when a graceful shutdown begins.
    pub shutdown: CancellationToken,
    config_path: parking_lot::Mutex<Option<std::path::PathBuf>>,
    /// PAUSE / DISABLE switches per database.
    pub gate: crate::gate::Gate,
    /// Every client session, for SHOW CLIENTS and KILL.
    pub sessions: crate::registry::Registry<crate::registry::ClientEntry>,
    /// Traffic counters per database (SHOW STATS, /metrics).
    pub stats: crate::stats::Stats,
    /// Cancelled by the admin console's SHUTDOWN: the proxy shuts down gracefully.
    pub stop: CancellationToken,
    /// SHUTDOWN WAIT_FOR_CLIENTS: no new connections, then wait until every client left.
    pub wait_for_clients: std::sync::atomic::AtomicBool,
    /// Failover history and the lock that serialises promotions.
    pub failover: crate::failover::Failover,
}

impl Shared {
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.load_full()
    }

    pub fn rules(&self) -> Arc<FunctionRules> {
        self.rules.load_full()
    }

    /// Makes `config` the one new sessions and requests see (a reload).
    pub fn install_config(&self, config: Config) {
        self.credentials
            .store(Arc::new(Credentials::from_config(&config)));
        self.rules.store(Arc::new(FunctionRules::new(
            &config.cluster.write_functions,
            &config.cluster.read_only_functions,
        )));
        self.cluster.set_config(config.cluster.clone());
        self.config.store(Arc::new(config));
    }

    /// The file RELOAD and SIGHUP re-read.
    pub fn config_path(&self) -> Option<std::path::PathBuf> {
        self.config_path.lock().clone()
    }
}

/// A bound, not yet serving proxy. Tests bind on port 0 and read `local_addr()`.
pub struct Proxy {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// The Prometheus endpoint, when `[metrics] listen` is set.
    metrics: Option<TcpListener>,
    tracker: TaskTracker,
}

impl Proxy {
    pub async fn bind(config: Config) -> Result<Self, AppError> {
        let addr = config.proxy.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AppError::Bind { addr, source })?;
        let metrics = match config.metrics.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::Bind { addr, source })?,
            ),
            None => None,
        };
        let rules = FunctionRules::new(
            &config.cluster.write_functions,
            &config.cluster.read_only_functions,
        );
        let nodes = config.nodes.len();
        let shared = Arc::new(Shared {
            tls_acceptor: client_tls_acceptor(&config.proxy)?,
            tls_connector: server_tls_connector(&config.proxy)?,
            cluster: Cluster::with_config(&config.nodes, config.cluster.clone()),
            credentials: ArcSwap::from_pointee(Credentials::from_config(&config)),
            config: ArcSwap::from_pointee(config),
            pools: Pools::default(),
            load: Load::new(nodes.max(crate::cluster::MAX_NODES)),
            rules: ArcSwap::from_pointee(rules),
            next_client_id: AtomicU64::new(1),
            cancels: CancelRegistry::default(),
            clients: AtomicUsize::new(0),
            logins: AtomicUsize::new(0),
            shutdown: CancellationToken::new(),
            failover: crate::failover::Failover::default(),
            stop: CancellationToken::new(),
            wait_for_clients: Default::default(),
            stats: crate::stats::Stats::default(),
            sessions: Default::default(),
            gate: Default::default(),
            config_path: Default::default(),
        });
        if shared.config().cluster.coordinator != crate::config::Coordinator::None {
            // Until the coordinator says this instance leads, it only follows.
            shared.failover.set_leader(false, None);
        }
        Ok(Proxy {
            shared,
            listener,
            metrics,
            tracker: TaskTracker::new(),
        })
    }

    /// The file `RELOAD` and SIGHUP re-read.
    pub fn set_config_path(&self, path: impl Into<std::path::PathBuf>) {
        *self.shared.config_path.lock() = Some(path.into());
    }

    /// The Prometheus endpoint's address, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.shared.config().proxy.listen)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Proxy {
            shared,
            listener,
            metrics,
            tracker,
        } = self;
        let probes = CancellationToken::new();
        let background = TaskTracker::new();
        shared
            .cluster
            .spawn_probes(&shared.config().cluster, &background, &probes);
        background.spawn(maintain_pools(shared.clone(), probes.clone()));
        background.spawn(crate::failover::run(shared.clone(), probes.clone()));
        #[cfg(feature = "etcd")]
        if shared.config().cluster.coordinator == crate::config::Coordinator::Etcd {
            background.spawn(crate::coordinator::run(shared.clone(), probes.clone()));
        }
        if let Some(m) = metrics {
            background.spawn(crate::metrics::serve(shared.clone(), m, probes.clone()));
        }
        info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "pgpilot listening");
        tokio::pin!(shutdown);
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).ok();
        // As PgBouncer: SIGUSR1 is PAUSE (every database), SIGUSR2 is RESUME.
        let mut usr1 = signal(SignalKind::user_defined1()).ok();
        let mut usr2 = signal(SignalKind::user_defined2()).ok();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = shared.stop.cancelled() => break,
                _ = hangup(&mut hup) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        match crate::reload::reload(&shared).await {
                            Ok(notes) => info!(?notes, "SIGHUP: configuration reloaded"),
                            Err(e) => warn!(error = %e, "SIGHUP: reload refused"),
                        }
                    });
                }
                _ = hangup(&mut usr1) => {
                    shared.gate.pause(None);
                    info!("SIGUSR1: paused (as PAUSE): new requests wait until SIGUSR2 or RESUME");
                }
                _ = hangup(&mut usr2) => {
                    shared.gate.resume(None);
                    info!("SIGUSR2: resumed (as RESUME)");
                }
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        tracker.spawn(crate::client::serve(tcp, peer, shared.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        if shared
            .wait_for_clients
            .load(std::sync::atomic::Ordering::Acquire)
        {
            info!(
                "SHUTDOWN WAIT_FOR_CLIENTS: no new connections, waiting for every client to leave"
            );
            while shared.clients.load(std::sync::atomic::Ordering::Acquire) > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        info!("shutting down: no new connections, waiting for sessions to finish");
        shared.shutdown.cancel();
        tracker.close();
        // Client tasks end themselves within shutdown_timeout; probes stop once they have.
        let grace = shared.config().proxy.shutdown_timeout.0 + Duration::from_secs(1);
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!("some client tasks did not finish within the shutdown grace period");
        }
        probes.cancel();
        background.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), background.wait()).await;
        info!("pgpilot stopped");
    }
}

/// Every second: closes idle server connections past their limits and keeps
/// `min_pool_size` open in every pool that exists; every `stats_period`: rolls the averages.
async fn maintain_pools(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    shared.stats.roll();
    let mut rolled = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if rolled.elapsed() >= shared.config().proxy.stats_period.0 {
            shared.stats.roll();
            rolled = tokio::time::Instant::now();
        }
        for pool in shared.pools.all() {
            pool.maintain().await;
        }
    }
}

/// Binds and serves `config` (read from `path`, which RELOAD and SIGHUP re-read) until
/// `shutdown` resolves.
pub async fn run(
    config: Config,
    path: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AppError> {
    let proxy = Proxy::bind(config).await?;
    if let Some(p) = path {
        proxy.set_config_path(p);
    }
    proxy.serve(shutdown).await;
    Ok(())
}

/// The next delivery of a signal pgpilot listens for (SIGHUP, SIGUSR1, SIGUSR2); never when
/// the handler could not be set.
async fn hangup(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            if s.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    info!("shutdown signal received");
}
