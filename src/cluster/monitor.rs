//! Connections as `monitor_user` to one node, used by the probes and by the failover
//! controller (promotion, repointing, synchronous standby names). Always bounded in time.

use std::time::Duration;

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::config::ClusterConfig;

/// Opens a monitor connection to `host:port`; the connection task runs in the background
/// until the client is dropped.
pub async fn connect(
    config: &ClusterConfig,
    host: &str,
    port: u16,
    application_name: &str,
    timeout: Duration,
) -> Result<Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(host)
        .port(port)
        .user(&config.monitor_user)
        .dbname(&config.monitor_database)
        .application_name(application_name)
        .connect_timeout(timeout);
    if let Some(pw) = &config.monitor_password {
        cfg.password(pw);
    }
    let (client, connection) = cfg.connect(NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The first column of the first row of a simple query, `None` for no row or NULL.
pub async fn query_value(client: &Client, sql: &str) -> Result<Option<String>, String> {
    let messages = client.simple_query(sql).await.map_err(|e| e.to_string())?;
    Ok(messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    }))
}

/// Quotes a string as an SQL literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
