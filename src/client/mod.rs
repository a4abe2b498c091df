//! One task per client connection: startup negotiation (SSLRequest, GSSENCRequest,
//! CancelRequest, StartupMessage), authentication, picking a pool, and the session itself.

mod busy;
pub mod cancel;
mod error;
mod pipelined;
pub mod prepared;
mod relay;
pub mod settings;
mod startup;
mod txn;
mod unit;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};

pub use error::ClientError;

use crate::app::Shared;
use crate::cluster::{NodeStatus, Role};
use crate::config::{Config, DatabaseConfig, PoolMode, Routing, is_admin_database};
use crate::pool::{PoolKey, PoolSettings, PooledConn, login};
use crate::protocol::MessageReader;
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::startup::{BackendKey, StartupParams};
use crate::registry::{ClientEntry, now_ms};
use crate::router::Target;
use crate::server::ConnectParams;
use cancel::CancelTarget;
use relay::End;
use settings::Settings;

/// Serves one accepted connection to completion.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let span = info_span!("client", %peer);
    async move {
        let _ = tcp.set_nodelay(true);
        if let Err(e) = run(tcp, peer, &shared).await {
            debug!(error = %e, "client session ended with an error");
        }
    }
    .instrument(span)
    .await
}

/// Counts a client against `max_client_conn` for as long as it lives.
struct ClientSlot<'a>(&'a Shared);

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Largest message accepted before authentication completes (PostgreSQL's limit for
/// authentication tokens): a login cannot make the proxy buffer more.
const MAX_LOGIN_MESSAGE: usize = 65_535;

/// Counts a connection that is still logging in.
struct LoginSlot<'a>(&'a Shared);

impl Drop for LoginSlot<'_> {
    fn drop(&mut self) {
        self.0.logins.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn run(tcp: TcpStream, peer: SocketAddr, shared: &Arc<Shared>) -> Result<(), ClientError> {
    let local = tcp.local_addr().ok();
    let config = shared.config();
    let deadline = tokio::time::Instant::now() + config.proxy.client_login_timeout.0;
    if shared.logins.fetch_add(1, Ordering::AcqRel) >= config.proxy.max_client_conn {
        shared.logins.fetch_sub(1, Ordering::AcqRel);
        let (mut tcp, e) = (tcp, ClientError::TooManyClients);
        send_error(&mut tcp, &e).await;
        return Err(e);
    }
    let login = LoginSlot(shared);
    // The one-time phases (TLS handshake, authentication, opening server connections) are
    // boxed: their futures are large, and inline they would set the size of every client's
    // task for its whole life, idle or not.
    let Some((stream, params, leftover)) =
        Box::pin(startup::negotiate(tcp, shared, deadline)).await?
    else {
        return Ok(());
    };
    let conn = Conn {
        peer,
        local,
        tls: stream.is_tls(),
    };
    let (rd, mut wr) = tokio::io::split(stream);
    let max_body = config.proxy.max_message_size.0 as usize;
    let mut reader = MessageReader::new(rd, leftover, MAX_LOGIN_MESSAGE.min(max_body));
    let result = session(
        &mut reader,
        &mut wr,
        &params,
        shared,
        &conn,
        (deadline, login),
    )
    .await;
    if let Err(e) = &result {
        send_error(&mut wr, e).await;
    }
    let _ = wr.shutdown().await;
    result
}

/// The client's connection as `SHOW CLIENTS` lists it.
struct Conn {
    peer: SocketAddr,
    local: Option<SocketAddr>,
    tls: bool,
}

/// Everything after the startup packet: admission, authentication, the session.
async fn session<R, W>(
    reader: &mut MessageReader<R>,
    wr: &mut W,
    params: &StartupParams,
    shared: &Arc<Shared>,
    conn: &Conn,
    (deadline, login): (tokio::time::Instant, LoginSlot<'_>),
) -> Result<(), ClientError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = shared.config();
    let user = params.user().unwrap_or_default();
    let database = params.database().unwrap_or_default();
    let credentials = shared.credentials();
    let auth = Box::pin(credentials.authenticate(reader, wr, user));
    tokio::time::timeout_at(deadline, auth)
        .await
        .map_err(|_| ClientError::LoginTimeout)??;
    // Authenticated: from here on the client counts against max_client_conn.
    drop(login);
    if shared.clients.fetch_add(1, Ordering::AcqRel) >= config.proxy.max_client_conn {
        shared.clients.fetch_sub(1, Ordering::AcqRel);
        return Err(ClientError::TooManyClients);
    }
    let _slot = ClientSlot(shared);
    reader.set_max_body(config.proxy.max_message_size.0 as usize);
    let mut out = BytesMut::new();
    backend::authentication_ok(&mut out);
    wr.write_all(&out)
        .await
        .map_err(crate::protocol::ProtocolError::Io)?;
    let registered = shared.sessions.register(|_| ClientEntry {
        user: user.to_owned(),
        database: database.to_owned(),
        application_name: params
            .get("application_name")
            .unwrap_or_default()
            .to_owned(),
        peer: conn.peer,
        local: conn.local,
        tls: conn.tls,
        connect_ms: now_ms(),
        request_ms: Default::default(),
        state: Default::default(),
        wait_since_ms: Default::default(),
        kill: Default::default(),
    });
    let client = registered.entry.clone();
    if is_admin_database(database) {
        // Boxed: the console's future (switchover, reload, monitor connections) is large, and
        // unboxed it would set the size of every client's task.
        return Box::pin(crate::admin::serve(reader, wr, shared, user)).await;
    }
    let db = config
        .database(database)
        .ok_or_else(|| ClientError::UnknownDatabase(database.to_owned()))?;
    if shared.gate.is_disabled(database) {
        return Err(ClientError::Disabled(database.to_owned()));
    }
    let startup = Settings::from_pairs(
        params
            .params
            .iter()
            .filter(|(k, _)| !is_connection_param(k))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(
                parse_options(params.get("options").unwrap_or_default())
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .collect::<Vec<_>>(),
    );
    let kill = client.kill.clone();
    match config.proxy.pool_mode {
        PoolMode::Session => tokio::select! {
            r = Box::pin(session_mode(reader, wr, shared, &config, db, user, &startup)) => r,
            _ = kill.cancelled() => Err(ClientError::Shutdown),
        },
        PoolMode::Transaction => {
            transaction_mode(reader, wr, shared, &config, db, startup, client).await
        }
    }
}

/// Session pooling: one server connection for the whole session, relayed as is. The client
/// sees that server's own BackendKeyData and ParameterStatus.
async fn session_mode<R, W>(
    reader: &mut MessageReader<R>,
    wr: &mut W,
    shared: &Arc<Shared>,
    config: &Arc<Config>,
    db: &DatabaseConfig,
    user: &str,
    startup: &Settings,
) -> Result<(), ClientError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let target = session_target(db);
    let mut pooled = checkout(shared, config, target, &db.name, user).await?;
    apply_settings(&mut pooled, startup).await?;
    let conn = pooled.conn();
    let key = conn.key;
    let mut out = BytesMut::new();
    for (k, v) in conn.params() {
        backend::parameter_status(&mut out, k, v);
    }
    backend::backend_key_data(&mut out, key);
    backend::ready_for_query(&mut out, TxStatus::Idle);
    wr.write_all(&out)
        .await
        .map_err(crate::protocol::ProtocolError::Io)?;
    let slot = shared.cancels.register(key);
    *slot.lock() = Some(CancelTarget::Server {
        host: conn.host.clone(),
        port: conn.port,
        key,
    });

    let fenced = pooled.fence();
    let outcome = relay::relay(
        reader,
        wr,
        pooled.conn(),
        &shared.shutdown,
        config.proxy.shutdown_timeout.0,
        &fenced,
    )
    .await;
    shared.cancels.unregister(key);
    let reusable = outcome.server_idle && !shared.shutdown.is_cancelled();
    if reusable {
        pooled.release().await;
    } else {
        pooled.discard().await;
    }
    match outcome.end {
        End::ClientGone => Ok(()),
        End::ClientProtocol(e) => Err(e.into()),
        End::ServerLost(why) => Err(ClientError::ServerLost(why)),
        End::Shutdown | End::ShutdownForced => Err(ClientError::Shutdown),
    }
}

/// Transaction pooling: the client holds a server connection only while it needs one. Its
/// ParameterStatus values come from a connection set up with its startup parameters; its
/// BackendKeyData is the proxy's own, mapped to whichever server serves it at the moment.
async fn transaction_mode<R, W>(
    reader: &mut MessageReader<R>,
    wr: &mut W,
    shared: &Arc<Shared>,
    config: &Arc<Config>,
    db: &DatabaseConfig,
    startup: Settings,
    client: Arc<ClientEntry>,
) -> Result<(), ClientError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let entry = client.clone();
    let user = entry.user.as_str();
    let target = session_target(db);
    // Any healthy node can describe the session: when the preferred kind is down, take the
    // other.
    let params = match Box::pin(describe(shared, config, target, &db.name, user, &startup)).await {
        Ok(p) => p,
        Err(e) if e.is_unreachable() || matches!(e, ClientError::NoNode(_)) => {
            let replica = describe(shared, config, Target::Replica, &db.name, user, &startup);
            Box::pin(replica).await?
        }
        Err(e) => return Err(e),
    };
    let mut out = BytesMut::new();
    for (k, v) in &params {
        backend::parameter_status(&mut out, k, v);
    }
    let key = BackendKey {
        pid: rand::random::<i32>() & i32::MAX,
        secret: rand::random(),
    };
    backend::backend_key_data(&mut out, key);
    backend::ready_for_query(&mut out, TxStatus::Idle);
    wr.write_all(&out)
        .await
        .map_err(crate::protocol::ProtocolError::Io)?;
    let cancel = shared.cancels.register(key);
    let client_id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let mut txn = txn::Txn {
        shared,
        config: config.clone(),
        rules: shared.rules(),
        reader,
        writer: wr,
        database: &db.name,
        user,
        routing: db.routing,
        statements: prepared::ClientStatements::new(client_id),
        settings: startup.clone(),
        startup_settings: startup,
        route_setting: crate::router::classify::Route::Auto,
        session_read_only: false,
        last_write: None,
        lost_tx: None,
        discard_until_sync: false,
        status: TxStatus::Idle,
        pinned: false,
        cancel,
        queue: Default::default(),
        incoming: Default::default(),
        pools: vec![None; config.nodes.len()],
        stats: shared.stats.db(&db.name),
        client,
    };
    let result = txn.run().await;
    shared.cancels.unregister(key);
    result
}

/// Where a session (or the startup handshake) goes: a replica only for `routing = "replica"`.
fn session_target(db: &DatabaseConfig) -> Target {
    if db.routing == Routing::Replica {
        Target::Replica
    } else {
        Target::Primary
    }
}

/// The pool for (node, database, user), created on first use.
pub(crate) fn pool_for(
    shared: &Shared,
    config: &Config,
    node: &NodeStatus,
    database: &str,
    user: &str,
) -> Arc<crate::pool::Pool> {
    let key = PoolKey {
        node: node.name.as_str().into(),
        database: database.into(),
        user: user.into(),
    };
    shared.pools.get_or_create(key, || {
        let password = config
            .user(user)
            .and_then(|u| u.backend_password())
            .map(str::to_owned);
        let tls_required = !matches!(
            config.proxy.server_tls_mode,
            crate::config::ServerTlsMode::Disable | crate::config::ServerTlsMode::Prefer
        );
        let connect = ConnectParams {
            host: node.host.clone(),
            port: node.port,
            user: user.to_owned(),
            password,
            database: database.to_owned(),
            tls: shared.tls_connector.clone(),
            tls_required,
            connect_timeout: config.proxy.server_connect_timeout.0,
        };
        let settings = PoolSettings::from_config(&config.proxy);
        (connect, settings)
    })
}

/// Picks the node for a whole session (or the startup handshake) and borrows a connection.
async fn checkout(
    shared: &Arc<Shared>,
    config: &Config,
    target: Target,
    database: &str,
    user: &str,
) -> Result<PooledConn, ClientError> {
    let (pool, _) = login_pool(shared, config, target, database, user).await?;
    Ok(pool.checkout(config.proxy.query_wait_timeout.0).await?)
}

/// The ParameterStatus values a transaction-mode login reports: a server's, with the client's
/// startup settings applied. A login that finds every connection of the pool busy takes what
/// the last such login was told (and waits only when there is none): logins never queue
/// behind clients' transactions.
async fn describe(
    shared: &Arc<Shared>,
    config: &Config,
    target: Target,
    database: &str,
    user: &str,
    startup: &Settings,
) -> Result<login::Params, ClientError> {
    let (pool, primary) = login_pool(shared, config, target, database, user).await?;
    let mut pooled = match pool.checkout_now().await {
        Some(got) => got?,
        None => match pool.login.get(startup, primary) {
            Some(params) => return Ok(params),
            None => pool.checkout(config.proxy.query_wait_timeout.0).await?,
        },
    };
    Box::pin(apply_settings(&mut pooled, startup)).await?;
    let params = pooled.conn().params().to_vec();
    pooled.give_back();
    pool.login.remember(startup, primary, &params);
    Ok(params)
}

/// The pool a session or login for `target` goes to, and whether its node is the primary.
async fn login_pool(
    shared: &Arc<Shared>,
    config: &Config,
    target: Target,
    database: &str,
    user: &str,
) -> Result<(Arc<crate::pool::Pool>, bool), ClientError> {
    // Without an elected primary (startup, or between a crash and a promotion) clients wait
    // for one rather than fail.
    let primary_wait = config.cluster.failover_wait_timeout.0;
    let view = shared.cluster.view();
    let replica = (target == Target::Replica)
        .then(|| crate::router::pick_replica(&view, &config.cluster, &shared.load, None, &[]))
        .flatten()
        .map(|i| view.nodes[i].clone());
    let node = match replica {
        Some(n) => n,
        None => shared
            .cluster
            .wait_for_primary(primary_wait)
            .await
            .ok_or(ClientError::NoNode("primary"))?,
    };
    let pool = pool_for(shared, config, &node, database, user);
    Ok((pool, node.role == Role::Primary))
}

/// Makes a borrowed connection's session match the client's startup parameters.
async fn apply_settings(pooled: &mut PooledConn, settings: &Settings) -> Result<(), ClientError> {
    match pooled.conn().apply_settings(settings).await {
        Ok(()) => Ok(()),
        Err(crate::server::ServerError::Rejected(fields)) => Err(ClientError::Pool(
            crate::pool::PoolError::Connect(crate::server::ServerError::Rejected(fields)),
        )),
        Err(e) => Err(ClientError::ServerLost(e.to_string())),
    }
}

/// Startup parameters the proxy handles itself rather than setting on the server.
fn is_connection_param(name: &str) -> bool {
    matches!(name, "user" | "database" | "replication" | "options") || name.starts_with("_pq_.")
}

/// `options` startup parameter: `-c name=value` and `--name=value` settings.
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut words = options.split_whitespace();
    while let Some(word) = words.next() {
        let setting = match word {
            "-c" => words.next(),
            w => w.strip_prefix("--").or_else(|| w.strip_prefix("-c")),
        };
        if let Some((k, v)) = setting.and_then(|s| s.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_owned()));
        }
    }
    out
}

/// Completes once a shutdown has begun and its grace period has run out.
async fn grace_ran_out(shutdown: &tokio_util::sync::CancellationToken, grace: std::time::Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}

async fn send_error<W: AsyncWrite + Unpin>(wr: &mut W, e: &ClientError) {
    if let Some((severity, code, message)) = e.response() {
        let mut out = BytesMut::new();
        backend::error_response(&mut out, severity, code, &message);
        if let Err(io) = wr.write_all(&out).await {
            warn!(error = %io, "could not send error to client");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_options;

    #[test]
    fn options_parameter() {
        let got = parse_options("-c search_path=app,public --statement-timeout=5s -cwork_mem=4MB");
        let want = [
            ("search_path", "app,public"),
            ("statement_timeout", "5s"),
            ("work_mem", "4MB"),
        ];
        assert_eq!(got.len(), 3);
        for ((k, v), (wk, wv)) in got.iter().zip(want) {
            assert_eq!((k.as_str(), v.as_str()), (wk, wv));
        }
    }
}
