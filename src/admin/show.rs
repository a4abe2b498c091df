//! The SHOW tables: PgBouncer's, with its column names and order (1.2x), and pgpilot's own
//! (`NODES`, `FAILOVERS`, `EVENTS`).

use std::collections::BTreeMap;
use std::time::SystemTime;

use super::table::{Table, Type, opt, s};
use crate::app::Shared;
use crate::config::{Config, PoolMode};

use Type::{Float8, Int4, Int8, Numeric, Text};

pub const HELP: &str = "\
SHOW HELP|VERSION|CONFIG|LISTS|DATABASES|USERS|POOLS|STATS|STATS_TOTALS|STATS_AVERAGES
SHOW CLIENTS|SERVERS|NODES|FAILOVERS|EVENTS
PAUSE [db], RESUME [db], RECONNECT [db], DISABLE db, ENABLE db, KILL [db], KILL_CLIENT id, RELOAD
SWITCHOVER [node]   planned switchover to node (or the best replica)
PROMOTE node        promote node now (forced: no health verdict, no lag limit)
FENCE node          never route to node; UNFENCE node lifts an operator's fence
SHUTDOWN [WAIT_FOR_CLIENTS]  graceful shutdown of pgpilot";

/// The table for `SHOW what`, or `None` for an unknown one.
pub fn show(shared: &Shared, what: &str) -> Option<Table> {
    let config = shared.config();
    Some(match what {
        "VERSION" => {
            let mut t = Table::new(&[("version", Text)]);
            t.row(vec![s(format!("pgpilot {}", env!("CARGO_PKG_VERSION")))]);
            t
        }
        "NODES" => nodes(shared),
        "FAILOVERS" => failovers(shared),
        "EVENTS" => events(shared),
        "POOLS" => pools(shared, &config),
        "DATABASES" => databases(shared, &config),
        "USERS" => {
            let mut t = Table::new(&[("name", Text), ("pool_mode", Text)]);
            for u in &config.users {
                t.row(vec![s(&u.name), None]);
            }
            t
        }
        "CONFIG" => settings(&config),
        "STATS" => stats(shared),
        "CLIENTS" => clients(shared),
        "SERVERS" => servers(shared),
        "STATS_TOTALS" => stats_table(shared, false),
        "STATS_AVERAGES" => stats_table(shared, true),
        "LISTS" => lists(shared, &config),
        _ => return None,
    })
}

fn nodes(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int4),
        ("role", Text),
        ("health", Text),
        ("priority", Int4),
        ("elected", Text),
        ("fenced", Text),
        ("lag_bytes", Int8),
        ("lag_seconds", Float8),
        ("replay_lsn", Text),
        ("timeline", Int4),
        ("last_probe_ms", Float8),
        ("error", Text),
        ("wal_receiver_timeout_ms", Int8),
        ("hears_primary", Text),
        ("epoch", Int8),
    ]);
    let view = shared.cluster.view();
    for (i, n) in view.nodes.iter().enumerate() {
        let sample = n.sample.as_ref();
        t.row(vec![
            s(&n.name),
            s(&n.host),
            s(n.port),
            s(n.role),
            s(if n.healthy { "up" } else { "down" }),
            s(n.priority),
            s(if view.elected == Some(i) { "yes" } else { "no" }),
            s(match n.fenced {
                None => "no",
                Some(crate::cluster::Fence::Claim) => "claim",
                Some(crate::cluster::Fence::Operator) => "operator",
                Some(crate::cluster::Fence::Removed) => "removed",
            }),
            opt(n.lag_bytes),
            opt(n.lag_seconds.map(|l| format!("{l:.3}"))),
            opt(n.replay_lsn()),
            opt(sample.and_then(|s| s.timeline)),
            opt(sample.map(|s| format!("{:.1}", s.duration.as_secs_f64() * 1000.0))),
            n.last_error.clone(),
            opt(sample.and_then(|s| s.wal_receiver_timeout_ms)),
            opt(sample
                .filter(|s| s.in_recovery)
                .map(|s| if s.hears_primary() { "yes" } else { "no" })),
            s(view.epoch),
        ]);
    }
    t
}

fn failovers(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("epoch", Int8),
        ("kind", Text),
        ("cause", Text),
        ("old_primary", Text),
        ("new_primary", Text),
        ("finished_at", Text),
        ("total_ms", Float8),
        ("phases", Text),
    ]);
    for r in shared.failover.history() {
        let phases: Vec<String> = r
            .phases
            .iter()
            .map(|(p, d)| format!("{p}={:.1}ms", d.as_secs_f64() * 1000.0))
            .collect();
        t.row(vec![
            s(r.epoch),
            s(r.kind),
            s(&r.cause),
            r.old.clone(),
            s(&r.new),
            s(utc(r.at)),
            s(format!("{:.1}", r.total.as_secs_f64() * 1000.0)),
            s(phases.join(" ")),
        ]);
    }
    t
}

fn events(shared: &Shared) -> Table {
    let mut t = Table::new(&[("at", Text), ("node", Text), ("event", Text)]);
    for e in shared.failover.events() {
        t.row(vec![s(utc(e.at)), s(&e.node), s(&e.what)]);
    }
    t
}

fn totals_row(db: &str, t: crate::stats::Totals) -> Vec<Option<String>> {
    let numbers = [
        t.xact_count,
        t.query_count,
        t.received,
        t.sent,
        t.xact_time,
        t.query_time,
        t.wait_time,
    ];
    std::iter::once(s(db))
        .chain(numbers.into_iter().map(s))
        .collect()
}

/// Totals and averages side by side, as PgBouncer's SHOW STATS.
fn stats(shared: &Shared) -> Table {
    let mut t = Table::new(&[
        ("database", Text),
        ("total_xact_count", Numeric),
        ("total_query_count", Numeric),
        ("total_received", Numeric),
        ("total_sent", Numeric),
        ("total_xact_time", Numeric),
        ("total_query_time", Numeric),
        ("total_wait_time", Numeric),
        ("avg_xact_count", Numeric),
        ("avg_query_count", Numeric),
        ("avg_recv", Numeric),
        ("avg_sent", Numeric),
        ("avg_xact_time", Numeric),
        ("avg_query_time", Numeric),
        ("avg_wait_time", Numeric),
    ]);
    for (db, st) in shared.stats.all() {
        let mut row = totals_row(&db, st.totals());
        row.extend(
            totals_row(&db, shared.stats.averages_of(&db))
                .into_iter()
                .skip(1),
        );
        t.row(row);
    }
    t
}

fn stats_table(shared: &Shared, averages: bool) -> Table {
    let mut t = Table::new(&[
        ("database", Text),
        ("xact_count", Numeric),
        ("query_count", Numeric),
        ("bytes_received", Numeric),
        ("bytes_sent", Numeric),
        ("xact_time", Numeric),
        ("query_time", Numeric),
        ("wait_time", Numeric),
    ]);
    for (db, st) in shared.stats.all() {
        let numbers = if averages {
            shared.stats.averages_of(&db)
        } else {
            st.totals()
        };
        t.row(totals_row(&db, numbers));
    }
    t
}

const CONNECTION_COLUMNS: [(&str, Type); 18] = [
    ("type", Text),
    ("user", Text),
    ("database", Text),
    ("state", Text),
    ("addr", Text),
    ("port", Int4),
    ("local_addr", Text),
    ("local_port", Int4),
    ("connect_time", Text),
    ("request_time", Text),
    ("wait", Int4),
    ("wait_us", Int4),
    ("close_needed", Int4),
    ("ptr", Text),
    ("link", Text),
    ("remote_pid", Int4),
    ("tls", Text),
    ("application_name", Text),
];

fn ms_time(ms: u64) -> Option<String> {
    (ms > 0).then(|| utc(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms)))
}

/// One row per client session; `ptr` is the id `KILL_CLIENT` takes.
fn clients(shared: &Shared) -> Table {
    use std::sync::atomic::Ordering::Relaxed;
    let mut t = Table::new(&CONNECTION_COLUMNS);
    let now = crate::registry::now_ms();
    for (id, c) in shared.sessions.list() {
        let state = c.state.load(Relaxed);
        let waited_us = if state == crate::registry::WAITING {
            now.saturating_sub(c.wait_since_ms.load(Relaxed)) * 1000
        } else {
            0
        };
        t.row(vec![
            s("C"),
            s(&c.user),
            s(&c.database),
            s(if state == crate::registry::WAITING {
                "waiting"
            } else {
                "active"
            }),
            s(c.peer.ip()),
            s(c.peer.port()),
            opt(c.local.map(|a| a.ip())),
            opt(c.local.map(|a| a.port())),
            ms_time(c.connect_ms),
            ms_time(c.request_ms.load(Relaxed)).or_else(|| ms_time(c.connect_ms)),
            s(waited_us / 1_000_000),
            s(waited_us % 1_000_000),
            s(0),
            s(id),
            None,
            s(0),
            s(if c.tls { "TLS" } else { "" }),
            s(&c.application_name),
        ]);
    }
    t
}

/// PgBouncer's columns plus `node`.
fn servers(shared: &Shared) -> Table {
    use std::sync::atomic::Ordering::Relaxed;
    let mut columns = CONNECTION_COLUMNS.to_vec();
    columns.push(("node", Text));
    let mut t = Table::new(&columns);
    for (id, c) in shared.pools.servers.list() {
        t.row(vec![
            s("S"),
            s(&c.user),
            s(&c.database),
            s(if c.active.load(Relaxed) {
                "active"
            } else {
                "idle"
            }),
            s(&c.addr),
            s(c.port),
            opt(c.local.map(|a| a.ip())),
            opt(c.local.map(|a| a.port())),
            ms_time(c.connect_ms),
            ms_time(c.request_ms.load(Relaxed)).or_else(|| ms_time(c.connect_ms)),
            s(0),
            s(0),
            s(0),
            s(format!("s{id}")),
            None,
            s(c.remote_pid),
            s(if c.tls { "TLS" } else { "" }),
            s(""),
            s(&c.node),
        ]);
    }
    t
}

fn mode(m: PoolMode) -> &'static str {
    match m {
        PoolMode::Session => "session",
        PoolMode::Transaction => "transaction",
    }
}

/// Per (database, user), summed over nodes: PgBouncer has one pool per pair.
fn pools(shared: &Shared, config: &Config) -> Table {
    let mut t = Table::new(&[
        ("database", Text),
        ("user", Text),
        ("cl_active", Int4),
        ("cl_waiting", Int4),
        ("cl_active_cancel_req", Int4),
        ("cl_waiting_cancel_req", Int4),
        ("sv_active", Int4),
        ("sv_active_cancel", Int4),
        ("sv_being_canceled", Int4),
        ("sv_idle", Int4),
        ("sv_used", Int4),
        ("sv_tested", Int4),
        ("sv_login", Int4),
        ("maxwait", Int4),
        ("maxwait_us", Int4),
        ("pool_mode", Text),
    ]);
    let mut sums: BTreeMap<(String, String), (usize, usize, usize)> = BTreeMap::new();
    for p in shared.pools.all() {
        let e = sums
            .entry((p.key.database.to_string(), p.key.user.to_string()))
            .or_default();
        e.0 += p.active_count();
        e.1 += p.waiting_count();
        e.2 += p.idle_count();
    }
    for ((db, user), (active, waiting, idle)) in sums {
        t.row(vec![
            s(db),
            s(user),
            s(active),
            s(waiting),
            s(0),
            s(0),
            s(active),
            s(0),
            s(0),
            s(idle),
            s(0),
            s(0),
            s(0),
            s(0),
            s(0),
            s(mode(config.proxy.pool_mode)),
        ]);
    }
    t
}

fn databases(shared: &Shared, config: &Config) -> Table {
    let mut t = Table::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int4),
        ("database", Text),
        ("force_user", Text),
        ("pool_size", Int4),
        ("min_pool_size", Int4),
        ("reserve_pool", Int4),
        ("pool_mode", Text),
        ("max_connections", Int4),
        ("current_connections", Int4),
        ("paused", Int4),
        ("disabled", Int4),
    ]);
    let view = shared.cluster.view();
    let primary = view.primary();
    let pools = shared.pools.all();
    for db in &config.databases {
        let open: usize = pools
            .iter()
            .filter(|p| &*p.key.database == db.name.as_str())
            .map(|p| p.open())
            .sum();
        t.row(vec![
            s(&db.name),
            opt(primary.map(|p| &p.host)),
            opt(primary.map(|p| p.port)),
            s(&db.name),
            None,
            s(config.proxy.pool_size),
            s(config.proxy.min_pool_size),
            s(0),
            s(mode(config.proxy.pool_mode)),
            s(0),
            s(open),
            s(i32::from(view.paused || shared.gate.is_paused(&db.name))),
            s(i32::from(shared.gate.is_disabled(&db.name))),
        ]);
    }
    t
}

/// Every `[proxy]` and `[cluster]` key, flattened, with its default.
fn settings(config: &Config) -> Table {
    let mut t = Table::new(&[
        ("key", Text),
        ("value", Text),
        ("default", Text),
        ("changeable", Text),
    ]);
    let flat = |c: &Config| -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Ok(toml::Value::Table(root)) = toml::from_str::<toml::Value>(&c.to_masked_toml()) {
            for section in ["proxy", "cluster", "metrics"] {
                if let Some(toml::Value::Table(keys)) = root.get(section) {
                    for (k, v) in keys {
                        let text = match v {
                            toml::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        out.insert(format!("{section}.{k}"), text);
                    }
                }
            }
        }
        out
    };
    let defaults = flat(&Config::default());
    for (k, v) in flat(config) {
        let d = defaults.get(&k).cloned();
        t.row(vec![s(&k), s(v), d, s("no")]);
    }
    t
}

fn lists(shared: &Shared, config: &Config) -> Table {
    let mut t = Table::new(&[("list", Text), ("items", Int4)]);
    let pools = shared.pools.all();
    let idle: usize = pools.iter().map(|p| p.idle_count()).sum();
    let active: usize = pools.iter().map(|p| p.active_count()).sum();
    let clients = shared.clients.load(std::sync::atomic::Ordering::Relaxed);
    for (name, n) in [
        ("databases", config.databases.len()),
        ("users", config.users.len()),
        ("pools", pools.len()),
        ("free_clients", 0),
        ("used_clients", clients),
        ("login_clients", 0),
        ("free_servers", idle),
        ("used_servers", active),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        t.row(vec![s(name), s(n)]);
    }
    t
}

/// `YYYY-MM-DD HH:MM:SS.mmm UTC`.
pub fn utc(at: SystemTime) -> String {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn utc_formats_civil_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_439_015_923);
        assert_eq!(utc(t), "2026-11-23 13:03:35.923 UTC");
        assert_eq!(utc(SystemTime::UNIX_EPOCH), "1970-01-01 00:00:00.000 UTC");
    }
}
