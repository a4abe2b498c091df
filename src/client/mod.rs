//! One task per client connection: startup negotiation (SSLRequest, GSSENCRequest,
//! CancelRequest, StartupMessage), authentication, picking a pool, and the session itself.

pub mod cancel;
mod error;
mod relay;
mod startup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info_span, warn};

pub use error::ClientError;

use crate::app::Shared;
use crate::config::{PoolMode, is_admin_database};
use crate::pool::{PoolKey, PoolSettings, PooledConn};
use crate::protocol::MessageReader;
use crate::protocol::backend::{self, TxStatus};
use crate::protocol::startup::StartupParams;
use crate::router::{Target, session_target};
use crate::server::ConnectParams;
use cancel::CancelTarget;
use relay::End;

/// Serves one accepted connection to completion.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let span = info_span!("client", %peer);
    async move {
        let _ = tcp.set_nodelay(true);
        if let Err(e) = run(tcp, &shared).await {
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

async fn run(tcp: TcpStream, shared: &Arc<Shared>) -> Result<(), ClientError> {
    let Some((stream, params, leftover)) = startup::negotiate(tcp, shared).await? else {
        return Ok(());
    };
    let (rd, mut wr) = tokio::io::split(stream);
    let config = shared.config();
    let max_body = config.proxy.max_message_size.0 as usize;
    let mut reader = MessageReader::new(rd, leftover, max_body);
    let result = session(&mut reader, &mut wr, &params, shared).await;
    if let Err(e) = &result {
        send_error(&mut wr, e).await;
    }
    let _ = wr.shutdown().await;
    result
}

/// Everything after the startup packet: admission, authentication, the session.
async fn session<R, W>(
    reader: &mut MessageReader<R>,
    wr: &mut W,
    params: &StartupParams,
    shared: &Arc<Shared>,
) -> Result<(), ClientError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = shared.config();
    if shared.clients.fetch_add(1, Ordering::AcqRel) >= config.proxy.max_client_conn {
        shared.clients.fetch_sub(1, Ordering::AcqRel);
        return Err(ClientError::TooManyClients);
    }
    let _slot = ClientSlot(shared);
    let user = params.user().unwrap_or_default();
    let database = params.database().unwrap_or_default();
    shared.credentials().authenticate(reader, wr, user).await?;
    let mut out = BytesMut::new();
    backend::authentication_ok(&mut out);
    wr.write_all(&out)
        .await
        .map_err(crate::protocol::ProtocolError::Io)?;
    if is_admin_database(database) {
        return Err(ClientError::AdminConsole);
    }
    let db = config
        .database(database)
        .ok_or_else(|| ClientError::UnknownDatabase(database.to_owned()))?;
    if config.proxy.pool_mode != PoolMode::Session {
        debug!("transaction pooling is not available yet; serving the client in session mode");
    }

    let mut pooled = checkout(shared, session_target(db.routing), database, user).await?;
    apply_startup_params(&mut pooled, params).await?;
    let conn = pooled.conn();
    let key = conn.key;
    out.clear();
    for (k, v) in conn.params() {
        backend::parameter_status(&mut out, k, v);
    }
    backend::backend_key_data(&mut out, key);
    backend::ready_for_query(&mut out, TxStatus::Idle);
    wr.write_all(&out)
        .await
        .map_err(crate::protocol::ProtocolError::Io)?;
    shared.cancels.register(
        key,
        CancelTarget {
            host: conn.host.clone(),
            port: conn.port,
            key,
        },
    );

    let outcome = relay::relay(
        reader,
        wr,
        pooled.conn(),
        &shared.shutdown,
        config.proxy.shutdown_timeout.0,
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

/// Picks the node for `target` and borrows a connection from its pool.
async fn checkout(
    shared: &Arc<Shared>,
    target: Target,
    database: &str,
    user: &str,
) -> Result<PooledConn, ClientError> {
    let config = shared.config();
    let wait = config.proxy.query_wait_timeout.0;
    // Without an elected primary (startup, or between a crash and a promotion) clients wait
    // for one rather than fail.
    let primary_wait = config.cluster.failover_wait_timeout.0;
    let node = match target {
        Target::Replica => match shared.replicas.pick(&shared.cluster.view()) {
            Some(n) => n.clone(),
            None => shared
                .cluster
                .wait_for_primary(primary_wait)
                .await
                .ok_or(ClientError::NoNode("replica or primary"))?,
        },
        Target::Primary => shared
            .cluster
            .wait_for_primary(primary_wait)
            .await
            .ok_or(ClientError::NoNode("primary"))?,
    };
    let key = PoolKey {
        node: node.name.as_str().into(),
        database: database.into(),
        user: user.into(),
    };
    let pool = shared.pools.get_or_create(key, || {
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
        let settings = PoolSettings {
            size: config.proxy.pool_size,
            idle_timeout: config.proxy.server_idle_timeout.0,
            lifetime: config.proxy.server_lifetime.0,
        };
        (connect, settings)
    });
    Ok(pool.checkout(wait).await?)
}

/// Startup parameters the proxy handles itself rather than setting on the server.
fn is_connection_param(name: &str) -> bool {
    matches!(name, "user" | "database" | "replication" | "options") || name.starts_with("_pq_.")
}

/// Makes the borrowed server session match what the client asked for at startup.
async fn apply_startup_params(
    pooled: &mut PooledConn,
    params: &StartupParams,
) -> Result<(), ClientError> {
    let conn = pooled.conn();
    let mut sql = String::new();
    let mut set = |name: &str, value: &str| {
        if conn.param(name) != Some(value) {
            sql.push_str(&format!(
                "SET \"{}\" = '{}';",
                name.replace('"', "\"\""),
                value.replace('\'', "''")
            ));
        }
    };
    for (name, value) in &params.params {
        if !is_connection_param(name) {
            set(name, value);
        }
    }
    for (name, value) in parse_options(params.get("options").unwrap_or_default()) {
        set(&name, &value);
    }
    if sql.is_empty() {
        return Ok(());
    }
    match conn.simple_query(&sql).await {
        Ok(TxStatus::Idle) => Ok(()),
        Ok(_) => Err(ClientError::ServerLost(
            "startup parameters left a transaction open".into(),
        )),
        Err(crate::server::ServerError::Rejected(fields)) => Err(ClientError::Pool(
            crate::pool::PoolError::Connect(crate::server::ServerError::Rejected(fields)),
        )),
        Err(e) => Err(ClientError::ServerLost(e.to_string())),
    }
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
