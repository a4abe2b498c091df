//! A local PostgreSQL cluster for the demo, the integration tests and the benches: one primary
//! and streaming replicas (physical slots, `wal_log_hints = on`, SCRAM auth) on loopback ports
//! in a temporary directory, built with the installed `initdb` / `pg_basebackup`. Started as
//! root, it runs PostgreSQL as the `postgres` OS user. A watchdog process removes everything if
//! the owning process dies without cleaning up.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::config::NodeConfig;

/// The superuser's password in every devcluster (loopback only).
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "pgpilot-dev";

/// `scripts/rejoin.sh`: turns a fenced old primary into a replica of the new one.
pub const REJOIN_SCRIPT: &str = include_str!("../scripts/rejoin.sh");

#[derive(Debug, thiserror::Error)]
pub enum DevClusterError {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) not found: install them \
         (apt-get install -y postgresql) or set PGPILOT_PG_BIN to their directory"
    )]
    BinariesNotFound,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("I/O error in the cluster directory: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out waiting for {0}")]
    Timeout(String),
}

#[derive(Debug, Clone)]
pub struct DevClusterOptions {
    pub replicas: usize,
    /// Extra `postgresql.conf` lines for every node.
    pub extra_conf: Vec<String>,
    /// Server certificate and key (PEM): when set, every node has `ssl = on` with them.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for DevClusterOptions {
    fn default() -> Self {
        Self {
            replicas: 2,
            extra_conf: Vec::new(),
            tls: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DevNode {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
}

#[derive(Debug)]
pub struct DevCluster {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    nodes: Vec<DevNode>,
    watchdog: Option<Child>,
}

impl DevCluster {
    /// Creates and starts the cluster; returns once every replica is streaming. Blocking.
    pub fn start(opts: DevClusterOptions) -> Result<Self, DevClusterError> {
        let bin = find_bin_dir().ok_or(DevClusterError::BinariesNotFound)?;
        let as_postgres = running_as_root();
        let dir = make_temp_dir()?;
        let mut cluster = DevCluster {
            dir: dir.clone(),
            bin,
            as_postgres,
            nodes: Vec::new(),
            watchdog: None,
        };
        if as_postgres {
            cluster.run(
                "chown",
                Command::new("chown").arg("-R").arg("postgres:").arg(&dir),
            )?;
        }
        cluster.watchdog = spawn_watchdog(&cluster).ok();
        fs::write(dir.join("rejoin.sh"), REJOIN_SCRIPT)?;
        let pwfile = dir.join("pwfile");
        fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        cluster.give_to_postgres(&pwfile)?;

        let primary = cluster.new_node("pg1")?;
        let mut initdb = cluster.pg("initdb");
        initdb
            .arg("-D")
            .arg(&primary.data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .args(["--locale=C", "--no-instructions"])
            .arg(format!("--pwfile={}", pwfile.display()));
        cluster.run("initdb", &mut initdb)?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", dir.display()),
            "wal_level = replica".into(),
            "wal_log_hints = on".into(),
            "max_wal_senders = 10".into(),
            "max_replication_slots = 10".into(),
            "hot_standby = on".into(),
            "fsync = off".into(),
            "max_connections = 300".into(),
            "shared_buffers = 32MB".into(),
            "log_min_messages = warning".into(),
            "hot_standby_feedback = on".into(),
            // pg_rewind (the rejoin script) reads the old primary's WAL back to the last
            // common checkpoint: keep enough of it.
            "wal_keep_size = '256MB'".into(),
        ];
        if let Some((cert, key)) = &opts.tls {
            let (dest_cert, dest_key) = (dir.join("server.crt"), dir.join("server.key"));
            fs::copy(cert, &dest_cert)?;
            fs::copy(key, &dest_key)?;
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dest_key, fs::Permissions::from_mode(0o600))?;
            cluster.give_to_postgres(&dest_cert)?;
            cluster.give_to_postgres(&dest_key)?;
            conf.push("ssl = on".into());
            conf.push(format!("ssl_cert_file = '{}'", dest_cert.display()));
            conf.push(format!("ssl_key_file = '{}'", dest_key.display()));
        }
        conf.extend(opts.extra_conf.iter().cloned());
        let mut text = conf.join("\n");
        text.push('\n');
        append(&primary.data_dir.join("postgresql.conf"), &text)?;
        fs::write(
            primary.data_dir.join("pg_hba.conf"),
            "local all all scram-sha-256\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host replication all 127.0.0.1/32 scram-sha-256\n",
        )?;
        cluster.set_port(&primary)?;
        cluster.nodes.push(primary);
        cluster.start_node(0)?;

        for i in 0..opts.replicas {
            let node = cluster.new_node(&format!("pg{}", i + 2))?;
            let mut backup = cluster.pg("pg_basebackup");
            backup
                .args(["-h", "127.0.0.1", "-p", &cluster.nodes[0].port.to_string()])
                .args([
                    "-U",
                    SUPERUSER,
                    "-X",
                    "stream",
                    "-R",
                    "-C",
                    "--no-sync",
                    "-S",
                ])
                .arg(&node.name)
                .arg("-D")
                .arg(&node.data_dir)
                .env("PGPASSWORD", SUPERUSER_PASSWORD);
            cluster.run("pg_basebackup", &mut backup)?;
            cluster.set_port(&node)?;
            cluster.nodes.push(node);
            cluster.start_node(i + 1)?;
        }
        cluster.wait_streaming(opts.replicas, Duration::from_secs(60))?;
        Ok(cluster)
    }

    pub fn nodes(&self) -> &[DevNode] {
        &self.nodes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// `[[nodes]]` entries for a pgpilot config, priorities descending from pg1.
    pub fn node_configs(&self) -> Vec<NodeConfig> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeConfig {
                name: n.name.clone(),
                host: "127.0.0.1".into(),
                port: n.port,
                priority: 100 - 10 * i as i32,
                no_failover: false,
                data_dir: Some(n.data_dir.display().to_string()),
            })
            .collect()
    }

    pub fn start_node(&self, i: usize) -> Result<(), DevClusterError> {
        let node = &self.nodes[i];
        let mut cmd = self.pg("pg_ctl");
        cmd.arg("-D")
            .arg(&node.data_dir)
            .arg("-l")
            .arg(&node.log_file);
        cmd.args(["-w", "-t", "60", "start"]);
        self.run(&format!("pg_ctl start {}", node.name), &mut cmd)
            .map(|_| ())
    }

    /// Stops a node; `mode` is `fast` or `immediate` (a crash).
    pub fn stop_node(&self, i: usize, mode: &str) -> Result<(), DevClusterError> {
        let node = &self.nodes[i];
        let mut cmd = self.pg("pg_ctl");
        cmd.arg("-D")
            .arg(&node.data_dir)
            .args(["-w", "-m", mode, "stop"]);
        self.run(&format!("pg_ctl stop {}", node.name), &mut cmd)
            .map(|_| ())
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to every process of node `i`: the postmaster and
    /// its children. `STOP` freezes the node without closing any connection (a hang).
    pub fn signal_node(&self, i: usize, signal: &str) -> Result<(), DevClusterError> {
        let pid_file = fs::read_to_string(self.nodes[i].data_dir.join("postmaster.pid"))?;
        let pid = pid_file
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        // The postmaster first, so that it forks no child the second kill misses; a child
        // may exit meanwhile (a backend whose client left), which is no failure.
        let script = format!(
            "kill -{signal} {pid} || exit 1; for c in $(pgrep -P {pid}); do kill -{signal} $c 2>/dev/null; done; exit 0"
        );
        self.run(
            &format!("kill -{signal} {}", self.nodes[i].name),
            Command::new("sh").arg("-c").arg(script),
        )
        .map(|_| ())
    }

    /// A `rejoin_command` for this cluster: the rejoin script (written into the cluster
    /// directory) with the superuser's password and the binaries in use.
    pub fn rejoin_command(&self) -> String {
        format!(
            "PGPASSWORD={SUPERUSER_PASSWORD} PGBIN={} sh {} {{node}} {{host}} {{port}} {{data_dir}} {{primary_host}} {{primary_port}}",
            self.bin.display(),
            self.dir.join("rejoin.sh").display()
        )
    }

    /// The directory of the PostgreSQL server binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Runs SQL on node `i` with psql as the superuser; returns unaligned, tuples-only output.
    pub fn psql(&self, i: usize, database: &str, sql: &str) -> Result<String, DevClusterError> {
        let mut cmd = Command::new("psql");
        cmd.arg(format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={database}",
            self.nodes[i].port
        ))
        .args(["-AtqX", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGPASSWORD", SUPERUSER_PASSWORD);
        let out = self.run(&format!("psql on {}", self.nodes[i].name), &mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Creates a login role and a database it owns (on the primary, replicated to the rest),
    /// and waits until every replica has replayed it.
    pub fn create_app(
        &self,
        user: &str,
        password: &str,
        database: &str,
    ) -> Result<(), DevClusterError> {
        self.psql(
            0,
            "postgres",
            &format!("CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'"),
        )?;
        self.psql(
            0,
            "postgres",
            &format!("CREATE DATABASE \"{database}\" OWNER \"{user}\""),
        )?;
        self.wait_replayed(Duration::from_secs(30))
    }

    /// Waits until every replica has replayed the primary's current WAL position.
    pub fn wait_replayed(&self, timeout: Duration) -> Result<(), DevClusterError> {
        let lsn = self.psql(0, "postgres", "SELECT pg_current_wal_lsn()")?;
        for i in 1..self.nodes.len() {
            let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
            poll(
                timeout,
                &format!("{} to replay {lsn}", self.nodes[i].name),
                || Ok(self.psql(i, "postgres", &sql)? == "t"),
            )?;
        }
        Ok(())
    }

    fn wait_streaming(&self, replicas: usize, timeout: Duration) -> Result<(), DevClusterError> {
        let sql = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'";
        poll(timeout, "replicas to stream", || {
            Ok(self.psql(0, "postgres", sql)?.parse::<usize>().unwrap_or(0) >= replicas)
        })
    }

    fn new_node(&self, name: &str) -> Result<DevNode, DevClusterError> {
        Ok(DevNode {
            name: name.to_owned(),
            port: free_port()?,
            data_dir: self.dir.join(name),
            log_file: self.dir.join(format!("{name}.log")),
        })
    }

    /// The node's own settings, appended last: its port, and its name as `cluster_name`
    /// (which its WAL receiver reports as `application_name`, the name
    /// `synchronous_standby_names` uses).
    fn set_port(&self, node: &DevNode) -> Result<(), DevClusterError> {
        append(
            &node.data_dir.join("postgresql.conf"),
            &format!("port = {}\ncluster_name = '{}'\n", node.port, node.name),
        )
    }

    fn give_to_postgres(&self, path: &Path) -> Result<(), DevClusterError> {
        if self.as_postgres {
            self.run("chown", Command::new("chown").arg("postgres:").arg(path))?;
        }
        Ok(())
    }

    /// A command for a PostgreSQL server binary, run as `postgres` when we are root.
    fn pg(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<Output, DevClusterError> {
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .map_err(|e| DevClusterError::Command {
                what: what.to_owned(),
                detail: e.to_string(),
            })?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(DevClusterError::Command {
                what: what.to_owned(),
                detail: format!(
                    "{}: {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&out.stdout)
                ),
            })
        }
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // A node a test froze (SIGSTOP) would otherwise make `pg_ctl stop` wait a minute.
            let _ = self.signal_node(i, "CONT");
            let _ = self.stop_node(i, "immediate");
        }
        let _ = fs::remove_dir_all(&self.dir);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn poll(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool, DevClusterError>,
) -> Result<(), DevClusterError> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) | Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(false) => return Err(DevClusterError::Timeout(what.to_owned())),
            Err(e) => return Err(e),
        }
    }
}

fn append(path: &Path, text: &str) -> Result<(), DevClusterError> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16, DevClusterError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|rest| rest.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn make_temp_dir() -> Result<PathBuf, DevClusterError> {
    let suffix: u64 = rand::random();
    let dir = std::env::temp_dir().join(format!("pgpilot-dev-{}-{suffix:x}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn has_initdb(dir: &Path) -> bool {
    dir.join("initdb").is_file()
        && dir.join("pg_ctl").is_file()
        && dir.join("pg_basebackup").is_file()
}

/// Finds the PostgreSQL server binaries: `PGPILOT_PG_BIN`, `pg_config --bindir`, the newest
/// `/usr/lib/postgresql/*/bin`, then `PATH`.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PGPILOT_PG_BIN").map(PathBuf::from) {
        return has_initdb(&dir).then_some(dir);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|d| has_initdb(d)) {
        return Some(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_initdb(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| has_initdb(d))
}

/// A shell loop that outlives us only long enough to clean up after an abnormal exit.
fn spawn_watchdog(c: &DevCluster) -> std::io::Result<Child> {
    let pg_ctl = c.bin.join("pg_ctl");
    let run_as = if c.as_postgres {
        "runuser -u postgres -- "
    } else {
        ""
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         for d in '{dir}'/pg*/; do [ -f \"$d/postmaster.pid\" ] && {run_as}'{pg_ctl}' -D \"$d\" -m immediate stop >/dev/null 2>&1; done; \
         rm -rf '{dir}'",
        pid = std::process::id(),
        dir = c.dir.display(),
        pg_ctl = pg_ctl.display(),
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}
