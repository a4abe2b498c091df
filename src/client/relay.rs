//! The session-mode relay between a client and its server connection: two direction loops in
//! one task, forwarding whole frames in batches (one write per read), watching only the tags the
//! proxy must see (Terminate, ReadyForQuery, ParameterStatus), and ending gracefully on
//! shutdown once the session is idle.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::protocol::backend::{self, ReadyForQuery, TxStatus, parse_parameter_status};
use crate::protocol::frontend::{self, expects_ready, is_session_tag};
use crate::protocol::{MessageReader, ProtocolError};
use crate::server::{MAX_SERVER_MESSAGE, ServerConn};

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Terminate or end of stream from the client.
    ClientGone,
    ClientProtocol(ProtocolError),
    ServerLost(String),
    /// Shutdown reached the session while it was idle.
    Shutdown,
    /// The shutdown grace period ran out with work in flight.
    ShutdownForced,
}

/// Progress shared by the two directions: requests awaiting ReadyForQuery and the last status.
struct Flow {
    outstanding: AtomicUsize,
    in_tx: AtomicBool,
    sending: AtomicBool,
    changed: Notify,
}

impl Flow {
    fn idle(&self) -> bool {
        self.outstanding.load(Ordering::Acquire) == 0
            && !self.in_tx.load(Ordering::Acquire)
            && !self.sending.load(Ordering::Acquire)
    }
}

/// Whether the server connection can be reused after the relay.
pub struct Outcome {
    pub end: End,
    pub server_idle: bool,
}

pub async fn relay<CR, CW>(
    client_rd: &mut MessageReader<CR>,
    client_wr: &mut CW,
    server: &mut ServerConn,
    shutdown: &CancellationToken,
    grace: Duration,
    fenced: &CancellationToken,
) -> Outcome
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
{
    let flow = Flow {
        outstanding: AtomicUsize::new(0),
        in_tx: AtomicBool::new(false),
        sending: AtomicBool::new(false),
        changed: Notify::new(),
    };
    let ServerConn {
        stream,
        buf,
        params,
        ..
    } = server;
    let (srd, mut swr) = tokio::io::split(stream);
    let mut server_rd = MessageReader::new(srd, std::mem::take(buf), MAX_SERVER_MESSAGE);

    let end = {
        let client_to_server = async {
            let mut batch = BytesMut::new();
            loop {
                let frame = match client_rd.next().await {
                    Ok(Some(f)) => f,
                    Ok(None) | Err(ProtocolError::Closed | ProtocolError::Io(_)) => {
                        return End::ClientGone;
                    }
                    Err(e) => return End::ClientProtocol(e),
                };
                match frame.tag {
                    frontend::TERMINATE => return End::ClientGone,
                    tag if !is_session_tag(tag) => {
                        return End::ClientProtocol(ProtocolError::Unexpected {
                            tag,
                            context: "from client",
                        });
                    }
                    tag if expects_ready(tag) => {
                        flow.outstanding.fetch_add(1, Ordering::AcqRel);
                    }
                    _ => {}
                }
                flow.sending.store(true, Ordering::Release);
                batch.unsplit(frame.into_raw());
                if !client_rd.has_buffered_frame() {
                    if let Err(e) = swr.write_all(&batch).await {
                        return End::ServerLost(e.to_string());
                    }
                    batch = BytesMut::new();
                    flow.sending.store(false, Ordering::Release);
                    flow.changed.notify_one();
                }
            }
        };
        let server_to_client = async {
            let mut batch = BytesMut::new();
            let mut ready = 0usize;
            let mut status = TxStatus::Idle;
            loop {
                let frame = match server_rd.next().await {
                    Ok(Some(f)) => f,
                    Ok(None) => return End::ServerLost("server closed the connection".into()),
                    Err(e) => return End::ServerLost(e.to_string()),
                };
                match frame.tag {
                    backend::READY_FOR_QUERY => {
                        ready += 1;
                        status = match ReadyForQuery::parse(&frame) {
                            Ok(s) => s,
                            Err(e) => return End::ServerLost(e.to_string()),
                        };
                    }
                    backend::PARAMETER_STATUS => {
                        if let Ok((k, v)) = parse_parameter_status(&frame) {
                            ServerConn::set_param(params, k, v);
                        }
                    }
                    _ => {}
                }
                batch.unsplit(frame.into_raw());
                if !server_rd.has_buffered_frame() {
                    if client_wr.write_all(&batch).await.is_err() {
                        return End::ClientGone;
                    }
                    batch = BytesMut::new();
                    if ready > 0 {
                        // Only once the client has the whole answer does the session count as
                        // idle, so a shutdown never cuts a result short.
                        flow.in_tx
                            .store(status != TxStatus::Idle, Ordering::Release);
                        let _ = flow.outstanding.fetch_update(
                            Ordering::AcqRel,
                            Ordering::Acquire,
                            |n| Some(n.saturating_sub(ready)),
                        );
                        ready = 0;
                        flow.changed.notify_one();
                    }
                }
            }
        };
        let graceful = async {
            shutdown.cancelled().await;
            while !flow.idle() {
                flow.changed.notified().await;
            }
        };
        let forced = super::grace_ran_out(shutdown, grace);
        tokio::select! {
            e = client_to_server => e,
            e = server_to_client => e,
            _ = graceful => End::Shutdown,
            _ = forced => End::ShutdownForced,
            _ = fenced.cancelled() => End::ServerLost("its node was fenced after a failover".into()),
        }
    };
    *buf = server_rd.into_parts().1;
    let server_idle = flow.idle() && buf.is_empty() && !matches!(end, End::ServerLost(_));
    Outcome { end, server_idle }
}
