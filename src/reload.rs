//! `RELOAD` and SIGHUP: re-read the config file, validate it, and apply what can change while
//! clients stay connected — users, databases, functions lists, timeouts, pool sizes (existing
//! pools resize), cluster settings, and nodes (new ones are probed and routed to once healthy,
//! removed ones are fenced for good). What needs a restart is reported and left as it was. A
//! file that does not load changes nothing.

use std::sync::Arc;

use crate::app::Shared;
use crate::config::Config;
use crate::pool::PoolSettings;

/// Reloads from the file the proxy was started with; returns what it noticed (changes that
/// need a restart, nodes added or removed).
pub async fn reload(shared: &Arc<Shared>) -> Result<Vec<String>, String> {
    let path = shared
        .config_path()
        .ok_or("no config file to reload (started without --config)")?;
    let path2 = path.clone();
    let next = tokio::task::spawn_blocking(move || Config::load(&path2))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            format!(
                "{}: {e}; the running configuration is unchanged",
                path.display()
            )
        })?;
    Ok(apply(shared, next))
}

/// Applies a validated configuration.
pub fn apply(shared: &Arc<Shared>, next: Config) -> Vec<String> {
    let old = shared.config();
    let mut notes = Vec::new();
    let mut restart =
        |what: &str| notes.push(format!("{what} changed: takes effect after a restart"));
    if next.proxy.listen != old.proxy.listen {
        restart("proxy.listen");
    }
    if next.metrics.listen != old.metrics.listen {
        restart("metrics.listen");
    }
    if next.proxy.worker_threads != old.proxy.worker_threads {
        restart("proxy.worker_threads");
    }
    let tls = |c: &Config| {
        (
            c.proxy.client_tls_mode,
            c.proxy.client_tls_cert.clone(),
            c.proxy.client_tls_key.clone(),
            c.proxy.server_tls_mode,
            c.proxy.server_tls_ca.clone(),
        )
    };
    if tls(&next) != tls(&old) {
        restart("TLS settings");
    }
    if next.proxy.pool_mode != old.proxy.pool_mode {
        notes.push("proxy.pool_mode changed: applies to new client connections".into());
    }

    // Nodes: by name. Host or port changes need a restart (pools are addressed by them).
    let cluster = &shared.cluster;
    let view = cluster.view();
    for n in &next.nodes {
        match view.index_of(&n.name) {
            Some(i) if view.nodes[i].fenced == Some(crate::cluster::Fence::Removed) => {
                cluster.add_node(n);
                notes.push(format!("node {} added back", n.name));
            }
            Some(i) => {
                let cur = &view.nodes[i];
                if cur.host != n.host || cur.port != n.port {
                    notes.push(format!(
                        "node {}: host/port changed: takes effect after a restart",
                        n.name
                    ));
                }
                cluster.update_node(i, n);
            }
            None => match cluster.add_node(n) {
                Some(_) => notes.push(format!("node {} added", n.name)),
                None => notes.push(format!(
                    "node {} not added: at most {} nodes",
                    n.name,
                    crate::cluster::MAX_NODES
                )),
            },
        }
    }
    for (i, n) in view.nodes.iter().enumerate() {
        let gone = !next.nodes.iter().any(|c| c.name == n.name);
        if gone && n.fenced != Some(crate::cluster::Fence::Removed) {
            if view.elected == Some(i) {
                notes.push(format!(
                    "node {} is the elected primary: not removed",
                    n.name
                ));
                continue;
            }
            cluster.remove_node(i);
            shared.pools.abort_node(&n.name);
            notes.push(format!("node {} removed", n.name));
        }
    }

    let settings = PoolSettings::from_config(&next.proxy);
    for pool in shared.pools.all() {
        pool.resize(settings);
    }
    shared.install_config(next);
    tracing::info!(notes = ?notes, "configuration reloaded");
    notes
}
