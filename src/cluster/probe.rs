//! One health probe per node over its own tokio-postgres connection, bounded as a whole by
//! `probe_timeout` (tokio-postgres' connect_timeout does not bound a server that accepts and
//! then hangs).

use std::sync::Arc;

use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use super::{Cluster, Role};
use crate::config::ClusterConfig;

pub(super) struct Prober {
    cluster: Arc<Cluster>,
    index: usize,
    config: ClusterConfig,
    client: Option<Client>,
}

impl Prober {
    pub(super) fn new(cluster: Arc<Cluster>, index: usize, config: ClusterConfig) -> Self {
        Prober {
            cluster,
            index,
            config,
            client: None,
        }
    }

    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.probe_interval.0);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let outcome =
                tokio::time::timeout(self.config.probe_timeout.0, self.probe_once()).await;
            match outcome {
                Ok(Ok(role)) => self.cluster.report(self.index, role, None),
                Ok(Err(e)) => {
                    self.client = None;
                    self.cluster.report(self.index, Role::Down, Some(e));
                }
                Err(_) => {
                    self.client = None;
                    self.cluster
                        .report(self.index, Role::Down, Some("probe timed out".into()));
                }
            }
        }
    }

    async fn probe_once(&mut self) -> Result<Role, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let node = self.cluster.view().nodes[self.index].clone();
            let mut cfg = tokio_postgres::Config::new();
            cfg.host(&node.host)
                .port(node.port)
                .user(&self.config.monitor_user)
                .dbname(&self.config.monitor_database)
                .application_name("pgpilot-probe")
                .connect_timeout(self.config.probe_timeout.0);
            if let Some(pw) = &self.config.monitor_password {
                cfg.password(pw);
            }
            let (client, connection) = cfg.connect(NoTls).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            self.client = Some(client);
        }
        let client = self.client.as_ref().ok_or("no probe connection")?;
        let rows = client
            .simple_query("SELECT pg_is_in_recovery()")
            .await
            .map_err(|e| e.to_string())?;
        let in_recovery = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(|v| v == "t"),
            _ => None,
        });
        match in_recovery {
            Some(true) => Ok(Role::Replica),
            Some(false) => Ok(Role::Primary),
            None => Err("probe returned no row".into()),
        }
    }
}
