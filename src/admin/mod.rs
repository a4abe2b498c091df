//! The admin console: database `pgpilot` (alias `pgbouncer`) on the proxy's own port, simple
//! query protocol only. `admin_users` may run everything, `stats_users` only SHOW; anyone else
//! is refused at connection time (`28000`).

mod command;
mod show;
mod table;

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

pub use command::{Command, parse};
pub use show::show;
pub use table::{Table, Type};

use crate::app::Shared;
use crate::client::ClientError;
use crate::cluster::Fence;
use crate::protocol::backend::{self, Severity, TxStatus};
use crate::protocol::startup::BackendKey;
use crate::protocol::{MessageReader, ProtocolError, frontend, sqlstate};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Admin,
    Stats,
}

/// Serves an authenticated admin console session until the client leaves.
pub async fn serve<R, W>(
    reader: &mut MessageReader<R>,
    wr: &mut W,
    shared: &Arc<Shared>,
    user: &str,
) -> Result<(), ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = shared.config();
    let access = if config.proxy.admin_users.iter().any(|u| u == user) {
        Access::Admin
    } else if config.proxy.stats_users.iter().any(|u| u == user) {
        Access::Stats
    } else {
        return Err(ClientError::AdminDenied(user.to_owned()));
    };
    let mut out = BytesMut::new();
    for (k, v) in [
        ("server_version", "15.0 (pgpilot)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        backend::parameter_status(&mut out, k, v);
    }
    backend::backend_key_data(&mut out, BackendKey { pid: 0, secret: 0 });
    backend::ready_for_query(&mut out, TxStatus::Idle);
    write(wr, &out).await?;
    loop {
        let next = tokio::select! {
            r = reader.next() => r,
            _ = shared.shutdown.cancelled() => return Err(ClientError::Shutdown),
        };
        let frame = match next {
            Ok(Some(f)) => f,
            Ok(None) | Err(ProtocolError::Closed | ProtocolError::Io(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        match frame.tag {
            frontend::TERMINATE => return Ok(()),
            frontend::QUERY => {
                let sql = frontend::parse_query(&frame)?.to_owned();
                let mut out = BytesMut::new();
                run(shared, access, &sql, &mut out).await;
                backend::ready_for_query(&mut out, TxStatus::Idle);
                write(wr, &out).await?;
            }
            _ => return Err(ClientError::AdminProtocol),
        }
    }
}

async fn write<W: AsyncWrite + Unpin>(wr: &mut W, out: &[u8]) -> Result<(), ClientError> {
    wr.write_all(out)
        .await
        .map_err(|e| ClientError::Protocol(ProtocolError::Io(e)))
}

fn error(out: &mut BytesMut, code: &str, message: &str) {
    backend::error_response(out, Severity::Error, code, message);
}

/// Runs one command, appending its answer (without ReadyForQuery) to `out`.
async fn run(shared: &Arc<Shared>, access: Access, sql: &str, out: &mut BytesMut) {
    let cmd = match parse(sql) {
        Ok(c) => c,
        Err(e) => return error(out, sqlstate::SYNTAX_ERROR, &e.0),
    };
    if access == Access::Stats && !cmd.read_only() {
        return error(
            out,
            sqlstate::INSUFFICIENT_PRIVILEGE,
            "admin access needed (stats_users may only run SHOW)",
        );
    }
    match cmd {
        Command::Empty => backend::empty_query(out),
        Command::Show(what) if what == "HELP" => {
            backend::notice(out, "Console usage", Some(show::HELP));
            backend::command_complete(out, "SHOW");
        }
        Command::Show(what) => match show(shared, &what) {
            Some(table) => table.encode(out, "SHOW"),
            None => error(
                out,
                sqlstate::SYNTAX_ERROR,
                &format!("unknown SHOW \"{what}\"; see SHOW HELP"),
            ),
        },
        Command::Switchover(target) => {
            match crate::failover::switchover(shared, target.as_deref()).await {
                Ok(r) => {
                    let msg = format!("switchover to {} done in {:?}", r.new, r.total);
                    backend::notice(out, &msg, None);
                    backend::command_complete(out, "SWITCHOVER");
                }
                Err(e) => error(
                    out,
                    sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                    &e.to_string(),
                ),
            }
        }
        Command::Promote(node) => match crate::failover::promote(shared, &node).await {
            Ok(r) => {
                let msg = format!("{} promoted in {:?}", r.new, r.total);
                backend::notice(out, &msg, None);
                backend::command_complete(out, "PROMOTE");
            }
            Err(e) => error(
                out,
                sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
                &e.to_string(),
            ),
        },
        Command::Fence(node) => set_fence(shared, out, &node, true),
        Command::Unfence(node) => set_fence(shared, out, &node, false),
        Command::Pause(db) => {
            shared.gate.pause(db.as_deref());
            // As PgBouncer: answer once the servers in use have been released.
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
            let busy = || {
                shared
                    .pools
                    .of_database(db.as_deref())
                    .iter()
                    .map(|p| p.active_count())
                    .sum::<usize>()
            };
            while busy() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            let left = busy();
            if left > 0 {
                let msg = format!("{left} server connections still in use after 30s");
                backend::notice(out, &msg, None);
            }
            backend::command_complete(out, "PAUSE");
        }
        Command::Resume(db) => {
            shared.gate.resume(db.as_deref());
            backend::command_complete(out, "RESUME");
        }
        Command::Reconnect(db) => {
            for p in shared.pools.of_database(db.as_deref()) {
                p.reconnect();
            }
            backend::command_complete(out, "RECONNECT");
        }
        Command::Disable(db) | Command::Enable(db) if shared.config().database(&db).is_none() => {
            error(
                out,
                sqlstate::UNDEFINED_OBJECT,
                &format!("no database named \"{db}\""),
            )
        }
        Command::Disable(db) => {
            shared.gate.set_disabled(&db, true);
            backend::command_complete(out, "DISABLE");
        }
        Command::Enable(db) => {
            shared.gate.set_disabled(&db, false);
            backend::command_complete(out, "ENABLE");
        }
        Command::Kill(db) => {
            // Every client of the database (admin sessions excepted) and its server
            // connections.
            for (_, c) in shared.sessions.list() {
                let admin = crate::config::is_admin_database(&c.database);
                if !admin && db.as_deref().is_none_or(|d| d == c.database) {
                    c.kill.cancel();
                }
            }
            for p in shared.pools.of_database(db.as_deref()) {
                p.abort_all();
            }
            backend::command_complete(out, "KILL");
        }
        Command::KillClient(id) => match shared.sessions.get(id) {
            Some(c) => {
                c.kill.cancel();
                backend::command_complete(out, "KILL_CLIENT");
            }
            None => error(
                out,
                sqlstate::UNDEFINED_OBJECT,
                &format!("no client with id {id} (see SHOW CLIENTS, column ptr)"),
            ),
        },
        Command::Reload => match crate::reload::reload(shared).await {
            Ok(notes) => {
                for n in &notes {
                    backend::notice(out, n, None);
                }
                backend::command_complete(out, "RELOAD");
            }
            Err(e) => error(out, sqlstate::CONFIG_FILE_ERROR, &e),
        },
        Command::Shutdown(wait_for_clients) => {
            if wait_for_clients {
                shared
                    .wait_for_clients
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            shared.stop.cancel();
            backend::command_complete(out, "SHUTDOWN");
        }
        Command::Unsupported(verb) => error(
            out,
            sqlstate::FEATURE_NOT_SUPPORTED,
            &format!("{verb} is not supported by pgpilot yet"),
        ),
    }
}

/// FENCE / UNFENCE: an operator's fence is lifted only by UNFENCE.
fn set_fence(shared: &Shared, out: &mut BytesMut, node: &str, fence: bool) {
    let Some(i) = shared.cluster.view().index_of(node) else {
        return error(
            out,
            sqlstate::UNDEFINED_OBJECT,
            &format!("no node named \"{node}\""),
        );
    };
    shared
        .cluster
        .set_fence(i, fence.then_some(Fence::Operator));
    backend::command_complete(out, if fence { "FENCE" } else { "UNFENCE" });
}
