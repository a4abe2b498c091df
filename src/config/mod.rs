//! The typed configuration: the TOML surface, defaults, environment overrides and validation.
//! Loading never panics; every problem comes back as a `ConfigError` that names the key.

mod env;
mod units;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use units::{ByteSize, Dur, format_duration, parse_duration};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Env(String),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub databases: Vec<DatabaseConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    Transaction,
    Session,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthType {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    Disable,
    Allow,
    Require,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    Prefer,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
    /// Period of the averages in SHOW STATS / STATS_AVERAGES.
    pub stats_period: Dur,
    pub max_client_conn: usize,
    pub pool_mode: PoolMode,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub query_wait_timeout: Dur,
    /// A client must finish its startup and authentication within this (PgBouncer's
    /// `client_login_timeout`); until then it holds no `max_client_conn` slot.
    pub client_login_timeout: Dur,
    pub server_idle_timeout: Dur,
    pub server_lifetime: Dur,
    pub server_connect_timeout: Dur,
    /// Largest message body a client may send; bigger ones close that client with `08P01`.
    pub max_message_size: ByteSize,
    /// How clients prove who they are.
    pub auth_type: AuthType,
    /// Prepared statements kept per server connection (LRU, closed on eviction).
    pub max_prepared_statements: usize,
    /// Autocommit read-only requests (simple, unnamed extended, executions of named
    /// statements) may share a server connection with other clients' (pipelined, answered in
    /// order), up to this many at once per connection; 0 turns it off.
    pub pipeline_depth: usize,
    /// Runtime worker threads; 0 means one per CPU core.
    pub worker_threads: usize,
    /// How long a graceful shutdown lets open transactions finish before `57P01`.
    pub shutdown_timeout: Dur,
    pub client_tls_mode: ClientTlsMode,
    pub client_tls_cert: Option<PathBuf>,
    pub client_tls_key: Option<PathBuf>,
    pub server_tls_mode: ServerTlsMode,
    pub server_tls_ca: Option<PathBuf>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 6432)),
            admin_users: vec!["admin".into()],
            stats_users: Vec::new(),
            stats_period: Dur::secs(60),
            max_client_conn: 10_000,
            pool_mode: PoolMode::Transaction,
            pool_size: 20,
            min_pool_size: 0,
            query_wait_timeout: Dur::secs(30),
            client_login_timeout: Dur::secs(60),
            server_idle_timeout: Dur::secs(600),
            server_lifetime: Dur::secs(3600),
            server_connect_timeout: Dur::secs(5),
            max_message_size: ByteSize(64 << 20),
            auth_type: AuthType::ScramSha256,
            max_prepared_statements: 200,
            pipeline_depth: 8,
            worker_threads: 0,
            shutdown_timeout: Dur::secs(30),
            client_tls_mode: ClientTlsMode::Disable,
            client_tls_cert: None,
            client_tls_key: None,
            server_tls_mode: ServerTlsMode::Disable,
            server_tls_ca: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    Auto,
    Manual,
    Off,
}

/// Who decides failover when several pgpilot instances front one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Coordinator {
    /// This instance alone.
    None,
    /// The holder of a lease in etcd; every instance routes by the record there.
    Etcd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaFallback {
    Primary,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadYourWrites {
    Lsn,
    Off,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub probe_interval: Dur,
    /// Bound on one probe (connect + query); a hung server counts as a failed probe.
    pub probe_timeout: Dur,
    /// Consecutive probe results needed to flip a node between healthy and unhealthy.
    pub probe_failures: u32,
    pub failover: FailoverMode,
    pub failover_timeout: Dur,
    pub failover_wait_timeout: Dur,
    pub max_failover_lag: ByteSize,
    /// Replicas further behind the primary than this get no reads.
    pub max_replica_lag: ByteSize,
    /// Replicas whose last replayed transaction is older than this (while behind) get no reads.
    pub max_replica_lag_time: Dur,
    /// What a read does when no replica is eligible: go to the primary, or fail.
    pub replica_fallback: ReplicaFallback,
    /// `lsn`: a client's reads after its own write only go to replicas that replayed it.
    pub read_your_writes: ReadYourWrites,
    /// Functions that make a statement a write, beyond the built-in list.
    pub write_functions: Vec<String>,
    /// Functions removed from the write list.
    pub read_only_functions: Vec<String>,
    pub monitor_user: String,
    pub monitor_password: Option<String>,
    /// The database probes connect to.
    pub monitor_database: String,
    /// Keep `synchronous_standby_names = 'ANY 1 (<live replicas>)'` on the primary, so an
    /// acknowledged commit is on a replica before the client hears of it.
    pub synchronous: bool,
    /// With `synchronous`: never empty the list when no replica is live; writes wait for a
    /// standby instead of committing on the primary alone (Patroni's
    /// `synchronous_mode_strict`).
    pub synchronous_strict: bool,
    /// Run on a fenced node seen running as a primary, to turn it into a replica of the
    /// elected primary. Variables: {node} {host} {port} {data_dir} {primary_node}
    /// {primary_host} {primary_port}.
    pub rejoin_command: Option<String>,
    /// Run on the old primary during a switchover, after writes drained; same variables.
    /// Without it, the old primary is fenced (and `rejoin_command` runs).
    pub demote_command: Option<String>,
    /// Bound on `pg_promote(wait => true)`.
    pub promote_timeout: Dur,
    /// Bound on a switchover's wait for in-flight writes and for the candidate to catch up.
    pub switchover_timeout: Dur,
    /// Lower replicas' `wal_receiver_timeout` (ALTER SYSTEM) to two thirds of
    /// `failover_timeout` when it is longer, so a live primary is heard from in time.
    pub tune_wal_receiver_timeout: bool,
    pub coordinator: Coordinator,
    /// etcd client URLs (`coordinator = "etcd"`).
    pub etcd_endpoints: Vec<String>,
    /// Key prefix of this cluster's records in etcd.
    pub etcd_prefix: String,
    /// TTL of the leader lease: a leader that stops renewing it loses the role after this.
    pub etcd_lease_ttl: Dur,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            probe_interval: Dur::ms(500),
            probe_timeout: Dur::secs(1),
            probe_failures: 2,
            failover: FailoverMode::Auto,
            failover_timeout: Dur::secs(3),
            failover_wait_timeout: Dur::secs(30),
            max_failover_lag: ByteSize(16 << 20),
            max_replica_lag: ByteSize(1 << 20),
            max_replica_lag_time: Dur::secs(30),
            replica_fallback: ReplicaFallback::Primary,
            read_your_writes: ReadYourWrites::Lsn,
            write_functions: Vec::new(),
            read_only_functions: Vec::new(),
            monitor_user: "postgres".into(),
            monitor_password: None,
            monitor_database: "postgres".into(),
            synchronous: false,
            synchronous_strict: false,
            rejoin_command: None,
            demote_command: None,
            promote_timeout: Dur::secs(60),
            switchover_timeout: Dur::secs(30),
            tune_wal_receiver_timeout: true,
            coordinator: Coordinator::None,
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            etcd_prefix: "/pgpilot/default".into(),
            etcd_lease_ttl: Dur::secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub no_failover: bool,
    /// The node's data directory as seen by `rejoin_command` / `demote_command` ({data_dir}).
    #[serde(default)]
    pub data_dir: Option<String>,
}

fn default_pg_port() -> u16 {
    5432
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// A plaintext password or a `SCRAM-SHA-256$...` verifier (then `server_password` is needed).
    #[serde(default)]
    pub password: Option<String>,
    /// The password pgpilot uses towards PostgreSQL; defaults to `password` when plaintext.
    #[serde(default)]
    pub server_password: Option<String>,
}

impl UserConfig {
    pub fn password_is_verifier(&self) -> bool {
        self.password
            .as_deref()
            .is_some_and(|p| p.starts_with("SCRAM-SHA-256$"))
    }

    /// The password pgpilot presents to PostgreSQL for this user.
    pub fn backend_password(&self) -> Option<&str> {
        self.server_password.as_deref().or_else(|| {
            self.password
                .as_deref()
                .filter(|_| !self.password_is_verifier())
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    Auto,
    Primary,
    Replica,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub name: String,
    #[serde(default = "default_routing")]
    pub routing: Routing,
}

fn default_routing() -> Routing {
    Routing::Auto
}

impl Config {
    /// Reads `path`, applies `PGPILOT_*` overrides from the process environment and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml_with_env(&text, path, std::env::vars())
    }

    /// Parses TOML text, applies the given environment and validates.
    pub fn from_toml_with_env(
        text: &str,
        path: &Path,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: path.into(),
            message,
        };
        let file: toml::Table = text.parse().map_err(|e| parse_err(format!("{e}")))?;
        let mut table = file.clone();
        let applied =
            env::apply_overrides(&mut table, &Self::schema(), vars).map_err(ConfigError::Env)?;
        for name in &applied.ignored {
            tracing::info!(variable = %name, "ignored: not a PGPILOT_SECTION__KEY setting");
        }
        let config = match Config::deserialize(table) {
            Ok(c) => c,
            // Blamed on the first variable after which the configuration no longer reads,
            // else on the file.
            Err(e) => {
                let file_fails = Config::deserialize(file).is_err();
                let culprit = (!file_fails)
                    .then(|| {
                        applied
                            .steps
                            .into_iter()
                            .find_map(|(name, t)| Config::deserialize(t).err().map(|e| (name, e)))
                    })
                    .flatten();
                return Err(match culprit {
                    Some((name, e)) => {
                        ConfigError::Env(format!("environment variable {name}: {e}"))
                    }
                    None => parse_err(e.to_string()),
                });
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Every setting pgpilot knows, each with a value of its type (its default; one example
    /// element for arrays of tables): what an environment override's text is read as.
    pub fn schema() -> toml::Table {
        let example = Config {
            nodes: vec![NodeConfig {
                name: String::new(),
                host: String::new(),
                port: default_pg_port(),
                priority: 0,
                no_failover: false,
                data_dir: None,
            }],
            users: vec![UserConfig {
                name: String::new(),
                password: None,
                server_password: None,
            }],
            databases: vec![DatabaseConfig {
                name: String::new(),
                routing: default_routing(),
            }],
            ..Config::default()
        };
        toml::Table::try_from(&example).unwrap_or_default()
    }

    /// Parses TOML text without the environment (tests and embedded configs).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, Path::new("<inline>"), std::iter::empty())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.nodes.is_empty() {
            return bad("at least one [[nodes]] entry is required".into());
        }
        unique("nodes", self.nodes.iter().map(|n| n.name.as_str()))?;
        unique("users", self.users.iter().map(|u| u.name.as_str()))?;
        unique("databases", self.databases.iter().map(|d| d.name.as_str()))?;
        if self.databases.is_empty() {
            return bad("at least one [[databases]] entry is required".into());
        }
        for db in &self.databases {
            if is_admin_database(&db.name) {
                return bad(format!(
                    "database name \"{}\" is reserved for the admin console",
                    db.name
                ));
            }
        }
        let c = &self.cluster;
        if c.probe_timeout.0 >= c.failover_timeout.0 {
            return bad(
                "cluster.probe_timeout must be shorter than cluster.failover_timeout".into(),
            );
        }
        if c.coordinator == Coordinator::Etcd {
            if !cfg!(feature = "etcd") {
                return bad(
                    "cluster.coordinator = \"etcd\" needs pgpilot built with the `etcd` feature"
                        .into(),
                );
            }
            if c.etcd_endpoints.is_empty() {
                return bad("cluster.etcd_endpoints is empty".into());
            }
            if c.etcd_lease_ttl.0 < Duration::from_secs(2) {
                return bad("cluster.etcd_lease_ttl must be at least 2s".into());
            }
        }
        if c.probe_interval.0.is_zero() {
            return bad("cluster.probe_interval must be positive".into());
        }
        let p = &self.proxy;
        if p.stats_period.0 < Duration::from_secs(1) {
            return bad("proxy.stats_period must be at least 1s".into());
        }
        if p.pool_size == 0 {
            return bad("proxy.pool_size must be at least 1".into());
        }
        if p.min_pool_size > p.pool_size {
            return bad("proxy.min_pool_size cannot exceed proxy.pool_size".into());
        }
        if p.max_client_conn == 0 {
            return bad("proxy.max_client_conn must be at least 1".into());
        }
        if p.max_message_size.0 < 1024 {
            return bad("proxy.max_message_size must be at least 1kB".into());
        }
        if p.client_tls_mode != ClientTlsMode::Disable
            && (p.client_tls_cert.is_none() || p.client_tls_key.is_none())
        {
            return bad("proxy.client_tls_mode needs client_tls_cert and client_tls_key".into());
        }
        if p.server_tls_mode == ServerTlsMode::VerifyFull && p.server_tls_ca.is_none() {
            return bad("proxy.server_tls_mode = \"verify-full\" needs server_tls_ca".into());
        }
        for u in &self.users {
            if u.password_is_verifier() {
                if u.server_password.is_none() {
                    return bad(format!(
                        "user \"{}\": a SCRAM verifier as password needs server_password",
                        u.name
                    ));
                }
                if p.auth_type == AuthType::Md5 {
                    return bad(format!(
                        "user \"{}\": md5 authentication needs a plaintext password",
                        u.name
                    ));
                }
            }
            if u.password.is_none() && p.auth_type != AuthType::Trust {
                return bad(format!("user \"{}\" has no password", u.name));
            }
        }
        if self.cluster.probe_interval.0 < Duration::from_millis(10) {
            return bad("cluster.probe_interval must be at least 10ms".into());
        }
        Ok(())
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn database(&self, name: &str) -> Option<&DatabaseConfig> {
        self.databases.iter().find(|d| d.name == name)
    }

    /// The effective configuration as TOML, with secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        let mask = |p: &mut Option<String>| {
            if p.is_some() {
                *p = Some("********".into());
            }
        };
        mask(&mut masked.cluster.monitor_password);
        for u in &mut masked.users {
            mask(&mut u.password);
            mask(&mut u.server_password);
        }
        toml::to_string(&masked).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// The database names that open the admin console instead of a pool.
pub fn is_admin_database(name: &str) -> bool {
    name == "pgpilot" || name == "pgbouncer"
}

fn unique<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for n in names {
        if n.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "an entry in [[{what}]] has an empty name"
            )));
        }
        if !seen.insert(n) {
            return Err(ConfigError::Invalid(format!(
                "duplicate name \"{n}\" in [[{what}]]"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
