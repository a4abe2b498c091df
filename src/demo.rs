//! `pgpilot demo`: a three-node devcluster with a sample dataset and the proxy in front, until
//! Ctrl-C; then everything is stopped and removed.

use crate::config::Config;
use crate::devcluster::{DevCluster, DevClusterError, DevClusterOptions};

pub const DEMO_USER: &str = "app";
pub const DEMO_PASSWORD: &str = "app-secret";
pub const DEMO_DATABASE: &str = "app";
/// The demo's admin console user (`admin_users`).
pub const DEMO_ADMIN: &str = "admin";
pub const DEMO_ADMIN_PASSWORD: &str = "admin-secret";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] DevClusterError),
    #[error(transparent)]
    App(#[from] crate::app::AppError),
    #[error("invalid demo configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("the cluster setup task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The proxy configuration for a devcluster (also used by tests).
pub fn config_for(
    cluster: &DevCluster,
    listen_port: u16,
) -> Result<Config, crate::config::ConfigError> {
    let mut text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{listen_port}\"\n\
         [cluster]\nmonitor_user = \"postgres\"\nmonitor_password = \"{}\"\n\
         rejoin_command = {}\n\
         [[users]]\nname = \"{DEMO_USER}\"\npassword = \"{DEMO_PASSWORD}\"\n\
         [[users]]\nname = \"{DEMO_ADMIN}\"\npassword = \"{DEMO_ADMIN_PASSWORD}\"\n\
         [[databases]]\nname = \"{DEMO_DATABASE}\"\n",
        crate::devcluster::SUPERUSER_PASSWORD,
        toml_string(&cluster.rejoin_command()),
    );
    for n in cluster.node_configs() {
        text.push_str(&format!(
            "[[nodes]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\npriority = {}\ndata_dir = {}\n",
            n.name,
            n.host,
            n.port,
            n.priority,
            toml_string(n.data_dir.as_deref().unwrap_or_default()),
        ));
    }
    Config::from_toml(&text)
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Loads the sample dataset into the demo database.
pub fn load_sample_data(cluster: &DevCluster) -> Result<(), DevClusterError> {
    cluster.create_app(DEMO_USER, DEMO_PASSWORD, DEMO_DATABASE)?;
    cluster.psql(
        0,
        DEMO_DATABASE,
        &format!(
            "SET ROLE {DEMO_USER};\
             CREATE TABLE accounts (id serial PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL DEFAULT 0);\
             INSERT INTO accounts (owner, balance) SELECT 'user' || g, g * 10 FROM generate_series(1, 1000) g;"
        ),
    )?;
    cluster.wait_replayed(std::time::Duration::from_secs(30))
}

pub async fn run(port: u16) -> Result<(), DemoError> {
    println!("Starting a local PostgreSQL cluster (1 primary, 2 replicas)...");
    let cluster = tokio::task::spawn_blocking(|| {
        let c = DevCluster::start(DevClusterOptions::default())?;
        load_sample_data(&c)?;
        Ok::<_, DevClusterError>(c)
    })
    .await??;
    let config = config_for(&cluster, port)?;
    let proxy = crate::app::Proxy::bind(config).await?;
    let addr = proxy.local_addr();
    let nodes = cluster.nodes();
    println!("\npgpilot is listening on {addr}. Connect with:\n");
    println!(
        "  PGPASSWORD={DEMO_PASSWORD} psql -h 127.0.0.1 -p {} -U {DEMO_USER} {DEMO_DATABASE}\n",
        addr.port()
    );
    println!("  app=> SELECT count(*) FROM accounts;\n");
    println!("The admin console (PgBouncer's SHOW commands and pgpilot's own):\n");
    println!(
        "  PGPASSWORD={DEMO_ADMIN_PASSWORD} psql -h 127.0.0.1 -p {} -U {DEMO_ADMIN} pgpilot -c 'SHOW NODES'\n",
        addr.port()
    );
    println!("Nodes (data in {}):", cluster.dir().display());
    for (i, n) in nodes.iter().enumerate() {
        let role = if i == 0 { "primary" } else { "replica" };
        println!(
            "  {:4} {role:8} 127.0.0.1:{}  {}",
            n.name,
            n.port,
            n.data_dir.display()
        );
    }
    let pg_ctl = crate::devcluster::find_bin_dir()
        .unwrap_or_default()
        .join("pg_ctl");
    let as_pg = if crate::devcluster::running_as_root() {
        "runuser -u postgres -- "
    } else {
        ""
    };
    println!("\nKill the primary (a crash) and watch pgpilot promote pg2 and repoint pg3:\n");
    println!(
        "  {as_pg}{} -D {} stop -m immediate\n",
        pg_ctl.display(),
        nodes[0].data_dir.display()
    );
    println!("Sessions stay connected; writes wait for the new primary and then run there.");
    println!("Start the old primary again and pgpilot fences it, then rejoins it as a replica");
    println!("(pg_rewind) with the devcluster's rejoin script:\n");
    println!(
        "  {as_pg}{} -D {} -l {} start\n",
        pg_ctl.display(),
        nodes[0].data_dir.display(),
        nodes[0].log_file.display()
    );
    println!("Press Ctrl-C to stop everything and remove the cluster.");
    proxy.serve(crate::app::shutdown_signal()).await;
    println!("Stopping the cluster...");
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    Ok(())
}
