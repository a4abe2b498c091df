//! Pipelined lanes: one server connection shared by several clients at once, for requests that
//! cannot change session state (an autocommit read-only query: simple, unnamed extended, or
//! through a client's named prepared statement). Statements are per client on the server, so
//! a lane holds the connection's statement set while it runs and rewrites each request against
//! it at admission, in the order the requests are written. Requests are written
//! back to back, one write for all that are waiting; PostgreSQL answers them in order, and each
//! answer is streamed to the client that asked. The server then reads many requests per wakeup
//! instead of one. The price is that a slow statement delays the ones queued behind it on its
//! lane: a lane takes at most `pipeline_depth` requests, and none while its oldest request has
//! run longer than [`STALL`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;

use super::{Pool, PooledConn};
use crate::client::prepared::{Disposition, Expect, ServerStatements, on_response};
use crate::client::settings::Settings;
use crate::protocol::backend::{self, ErrorFields, ReadyForQuery, TxStatus};
use crate::protocol::startup::BackendKey;
use crate::protocol::{Frame, MessageReader};
use crate::server::{MAX_SERVER_MESSAGE, ServerConn};

/// A lane whose oldest request has been running this long takes no new requests.
pub const STALL: Duration = Duration::from_millis(5);
/// A lane with nothing to do for this long gives its connection back to the pool.
const IDLE: Duration = Duration::from_millis(250);
/// A client that leaves its answer unread this long is cut loose, so the lane moves on.
const CLIENT_STALL: Duration = Duration::from_secs(5);
/// Answers are handed to the client task in batches; this many may wait unread.
pub const REPLY_BATCHES: usize = 4;

/// Part of an answer for the client that asked.
pub enum Reply {
    /// Server messages, in order; `ready` is the status of the ReadyForQuery that ends the
    /// answer, when they do.
    Data {
        bytes: BytesMut,
        ready: Option<TxStatus>,
    },
    /// The lane's connection failed; nothing more will come.
    Lost(String),
}

struct Request {
    id: u64,
    query: BytesMut,
    /// Responses to account for (injected Parse/Close are swallowed); empty: forward all.
    expect: VecDeque<Expect>,
    reply: mpsc::Sender<Reply>,
}

/// What a request becomes on a lane: the bytes to send and the responses to expect.
pub type Rewritten = (BytesMut, VecDeque<Expect>);

/// A lane as the pool and the clients see it.
pub struct Lane {
    settings: Settings,
    requests: mpsc::UnboundedSender<Request>,
    /// Admitted and not yet answered.
    in_flight: AtomicUsize,
    /// When the oldest unanswered request became the one the server works on (µs since `born`).
    head_since: AtomicU64,
    head_id: AtomicU64,
    next_id: AtomicU64,
    /// Cancel requests waiting for their request (by id) to reach the server.
    cancels: Mutex<Vec<u64>>,
    /// `cancels.len()`, read without the lock as each request starts.
    pending_cancels: AtomicUsize,
    /// Takes no new requests; the task ends once the admitted ones are answered.
    closed: AtomicBool,
    /// The connection's prepared statements, held here while the lane runs (`None` until the
    /// lane has its connection: requests that need them wait for another lane until then).
    statements: Mutex<Option<ServerStatements>>,
    born: Instant,
    /// Where cancel requests go, once the lane has its connection.
    server: OnceLock<(String, u16, BackendKey)>,
}

/// A request admitted to a lane: what a cancel request needs to reach it.
#[derive(Clone)]
pub struct Ticket {
    pub lane: Arc<Lane>,
    pub id: u64,
}

impl Ticket {
    /// Cancels the request now if it is running, else when it starts (a session that ends
    /// while waiting, so the requests behind it go on).
    pub fn cancel(&self) {
        if let Some(server) = self.lane.cancel(self.id) {
            spawn_cancel(server);
        }
    }
}

fn spawn_cancel((host, port, key): (String, u16, BackendKey)) {
    tokio::spawn(async move {
        let _ = crate::server::send_cancel(&host, port, key).await;
    });
}

impl Lane {
    fn new(settings: Settings, requests: mpsc::UnboundedSender<Request>) -> Self {
        Lane {
            settings,
            requests,
            in_flight: AtomicUsize::new(0),
            head_since: AtomicU64::new(0),
            head_id: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            cancels: Mutex::new(Vec::new()),
            pending_cancels: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            statements: Mutex::new(None),
            born: Instant::now(),
            server: OnceLock::new(),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn admits(&self, depth: usize) -> bool {
        let n = self.in_flight.load(Ordering::Acquire);
        if n == 0 {
            return true;
        }
        let age = self
            .now_us()
            .saturating_sub(self.head_since.load(Ordering::Acquire));
        n < depth && Duration::from_micros(age) < STALL
    }

    /// The server to send a cancel request to, once request `id` is the one running.
    pub fn cancel(&self, id: u64) -> Option<(String, u16, BackendKey)> {
        let head = self.head_id.load(Ordering::SeqCst);
        if head > id {
            return None; // answered already
        }
        {
            let mut cancels = self.cancels.lock();
            cancels.push(id);
            self.pending_cancels.store(cancels.len(), Ordering::SeqCst);
        }
        // Whoever takes the id off the list sends: this caller if the request is running now,
        // or the lane when it reaches the request.
        if self.head_id.load(Ordering::SeqCst) == id && self.take_cancel(id) {
            return self.server.get().cloned();
        }
        None
    }

    /// Takes `id` off the waiting cancels (true if it was there), and drops those of requests
    /// answered before it.
    fn take_cancel(&self, id: u64) -> bool {
        let mut cancels = self.cancels.lock();
        let found = cancels.contains(&id);
        cancels.retain(|&waiting| waiting > id);
        self.pending_cancels.store(cancels.len(), Ordering::SeqCst);
        found
    }

    /// Request `id` is the one the server works on now; sends a cancel that waited for it.
    fn set_head(&self, id: u64) {
        if self.reach(id)
            && let Some(server) = self.server.get().cloned()
        {
            spawn_cancel(server);
        }
    }

    /// Records that request `id` runs now; true when a cancel request was waiting for it.
    fn reach(&self, id: u64) -> bool {
        self.head_since.store(self.now_us(), Ordering::Release);
        self.head_id.store(id, Ordering::SeqCst);
        self.pending_cancels.load(Ordering::SeqCst) > 0 && self.take_cancel(id)
    }
}

impl Pool {
    /// Admits a request to a lane with the client's `settings`, opening a lane when every one
    /// is full and the pool has a free connection. `rewrite` turns the request into what the
    /// chosen lane sends; it gets the lane's statement set when `statements` says the request
    /// needs one (such requests only go to lanes that have their connection). `None` when no
    /// lane takes the request: serve it on a connection of its own.
    pub fn pipeline(
        self: &Arc<Self>,
        settings: &Settings,
        depth: usize,
        statements: bool,
        rewrite: impl FnOnce(Option<&mut ServerStatements>) -> Option<Rewritten>,
        reply: mpsc::Sender<Reply>,
    ) -> Option<Ticket> {
        let mut lanes = self.lanes.lock();
        lanes.retain(|l| !l.closed.load(Ordering::Acquire));
        let best = lanes
            .iter()
            .filter(|l| l.settings == *settings && l.admits(depth))
            .filter(|l| !statements || l.statements.lock().is_some())
            .min_by_key(|l| l.in_flight.load(Ordering::Acquire))
            .cloned();
        let lane = match best {
            Some(l) => l,
            None => {
                let permit = self.permits.clone().try_acquire_owned().ok()?;
                let (tx, rx) = mpsc::unbounded_channel();
                let lane = Arc::new(Lane::new(settings.clone(), tx));
                // An idle connection starts the lane with its statement set known now; one
                // still to be opened takes requests that need none until it is there.
                let start = match self.take_idle(permit) {
                    Ok(mut conn) => {
                        lane.adopt(conn.conn());
                        Start::Conn(Box::new(conn))
                    }
                    Err(permit) => Start::Permit(permit),
                };
                tokio::spawn(run(self.clone(), lane.clone(), start, rx));
                lanes.push(lane.clone());
                if statements && lane.statements.lock().is_none() {
                    return None;
                }
                lane
            }
        };
        // Rewritten under the lanes lock, so requests reach the server in the order their
        // rewrites assumed.
        let rewritten = if statements {
            let mut held = lane.statements.lock();
            rewrite(held.as_mut())
        } else {
            rewrite(None)
        };
        let (query, expect) = rewritten?;
        let id = lane.next_id.fetch_add(1, Ordering::AcqRel);
        lane.in_flight.fetch_add(1, Ordering::AcqRel);
        let request = Request {
            id,
            query,
            expect,
            reply,
        };
        if lane.requests.send(request).is_err() {
            lane.in_flight.fetch_sub(1, Ordering::AcqRel);
            lane.closed.store(true, Ordering::Release);
            return None;
        }
        Some(Ticket { lane, id })
    }

    /// Stops a lane from taking requests (under the lanes lock, so no admission races it).
    fn close_lane(&self, lane: &Lane) {
        let _lanes = self.lanes.lock();
        lane.closed.store(true, Ordering::Release);
    }
}

/// One admitted request waiting for (the rest of) its answer.
struct Waiting {
    id: u64,
    reply: Option<mpsc::Sender<Reply>>,
    expect: VecDeque<Expect>,
    out: BytesMut,
}

/// How a lane gets its connection.
enum Start {
    /// An idle one, taken (and adopted) at admission.
    Conn(Box<PooledConn>),
    /// One to take or open once the task runs.
    Permit(OwnedSemaphorePermit),
}

impl Lane {
    /// Takes over the connection's identity (for cancels) and its statement set.
    fn adopt(&self, c: &mut ServerConn) {
        let _ = self.server.set((c.host.clone(), c.port, c.key));
        // Requests on the lane replace the unnamed statement: nobody's is there any more.
        c.statements.forget_unnamed();
        *self.statements.lock() = Some(std::mem::take(&mut c.statements));
    }
}

async fn run(
    pool: Arc<Pool>,
    lane: Arc<Lane>,
    start: Start,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    let mut conn = match start {
        Start::Conn(conn) => *conn,
        Start::Permit(permit) => match pool.take(permit).await {
            Ok(mut c) => {
                lane.adopt(c.conn());
                c
            }
            Err(e) => {
                return fail_all(&pool, &lane, &mut rx, VecDeque::new(), &e.to_string()).await;
            }
        },
    };
    if let Err(e) = conn.conn().apply_settings(&lane.settings).await {
        conn.discard().await;
        return fail_all(&pool, &lane, &mut rx, VecDeque::new(), &e.to_string()).await;
    }
    let (end, queue) = serve(&pool, &lane, &mut conn, &mut rx).await;
    // Admissions that use the statement set are over (closed, or failed below).
    if let Some(statements) = lane.statements.lock().take() {
        conn.conn().statements = statements;
    }
    match end {
        Ok(reusable) => {
            if reusable {
                conn.give_back();
            } else {
                conn.discard().await;
            }
        }
        Err(why) => {
            conn.discard().await;
            fail_all(&pool, &lane, &mut rx, queue, &why).await;
        }
    }
}

/// Serves requests until the lane closes (`Ok(reusable)`) or its connection fails (`Err`, with
/// the requests still owed an answer).
async fn serve(
    pool: &Pool,
    lane: &Lane,
    conn: &mut PooledConn,
    rx: &mut mpsc::UnboundedReceiver<Request>,
) -> (Result<bool, String>, VecDeque<Waiting>) {
    let abort = conn.fence();
    let lifetime = pool.settings().lifetime;
    let server: &mut ServerConn = conn.conn();
    let created = server.created;
    let ServerConn {
        stream,
        buf,
        params,
        ..
    } = server;
    let (srd, mut swr) = tokio::io::split(stream);
    let mut reader = MessageReader::new(srd, std::mem::take(buf), MAX_SERVER_MESSAGE);
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    let mut clean = true;
    let result = loop {
        if lane.closed.load(Ordering::Acquire) && lane.in_flight.load(Ordering::Acquire) == 0 {
            break Ok(clean);
        }
        if queue.is_empty() && (created.elapsed() >= lifetime || pool.is_stale(created)) {
            pool.close_lane(lane);
            continue;
        }
        tokio::select! {
            biased;
            _ = abort.cancelled() => break Err("its node was fenced after a failover".to_owned()),
            r = reader.next(), if !queue.is_empty() => {
                let frame = match r {
                    Ok(Some(f)) => f,
                    Ok(None) => break Err("server closed the connection".to_owned()),
                    Err(e) => break Err(e.to_string()),
                };
                match answer(lane, &mut reader, &mut queue, params, frame).await {
                    Ok(idle) => clean &= idle,
                    Err(why) => break Err(why),
                }
                if !clean {
                    pool.close_lane(lane);
                }
            }
            req = rx.recv() => {
                let Some(first) = req else { break Ok(clean) };
                let mut out = BytesMut::new();
                let mut next = Some(first);
                while let Some(r) = next {
                    if queue.is_empty() {
                        lane.set_head(r.id);
                    }
                    out.unsplit(r.query);
                    queue.push_back(Waiting {
                        id: r.id,
                        reply: Some(r.reply),
                        expect: r.expect,
                        out: BytesMut::new(),
                    });
                    next = rx.try_recv().ok();
                }
                if let Err(e) = swr.write_all(&out).await {
                    break Err(e.to_string());
                }
            }
            _ = tokio::time::sleep(IDLE), if queue.is_empty() => pool.close_lane(lane),
            _ = pool.wanted.notified(), if queue.is_empty() => pool.close_lane(lane),
        }
    };
    *buf = reader.into_parts().1;
    if !buf.is_empty() {
        return (Ok(false), queue);
    }
    (result, queue)
}

/// Hands `first` and every further buffered message to the clients they answer. Returns
/// whether the connection is still idle between requests (a ReadyForQuery other than idle
/// means a request left a transaction open: the connection must not be shared any more).
async fn answer<R: tokio::io::AsyncRead + Unpin>(
    lane: &Lane,
    reader: &mut MessageReader<R>,
    queue: &mut VecDeque<Waiting>,
    params: &mut Vec<(String, String)>,
    first: Frame,
) -> Result<bool, String> {
    let mut idle = true;
    let mut frame = first;
    loop {
        match frame.tag {
            backend::ERROR_RESPONSE | backend::NOTICE_RESPONSE => {
                let fields = ErrorFields::parse(&frame).map_err(|e| e.to_string())?;
                if fields.is_goodbye(frame.tag) {
                    return Err(fields.message);
                }
            }
            backend::PARAMETER_STATUS => {
                if let Ok((k, v)) = backend::parse_parameter_status(&frame) {
                    ServerConn::set_param(params, k, v);
                }
            }
            // COPY FROM STDIN or replication never ride a lane: the connection is out of step.
            b'G' | b'W' => return Err("unexpected COPY on a pipelined connection".to_owned()),
            _ => {}
        }
        let ready = if frame.tag == backend::READY_FOR_QUERY {
            let status = ReadyForQuery::parse(&frame).map_err(|e| e.to_string())?;
            idle &= status == TxStatus::Idle;
            Some(status)
        } else {
            None
        };
        let Some(head) = queue.front_mut() else {
            return Err("an answer nobody asked for".to_owned());
        };
        let forward = head.expect.is_empty() || {
            let mut held = lane.statements.lock();
            match held.as_mut() {
                Some(statements) => {
                    on_response(frame.tag, frame.body(), &mut head.expect, statements)
                        == Disposition::Forward
                }
                None => true,
            }
        };
        if forward {
            head.out.unsplit(frame.into_raw());
        }
        if ready.is_some() {
            if let Some(done) = queue.pop_front() {
                deliver(done.reply, done.out, ready).await;
            }
            lane.in_flight.fetch_sub(1, Ordering::AcqRel);
            if let Some(next) = queue.front() {
                lane.set_head(next.id);
            }
        }
        if !reader.has_buffered_frame() {
            break;
        }
        frame = match reader.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return Err("server closed the connection".to_owned()),
            Err(e) => return Err(e.to_string()),
        };
    }
    if let Some(head) = queue.front_mut()
        && !head.out.is_empty()
    {
        let out = std::mem::take(&mut head.out);
        let alive = deliver(head.reply.take(), out, None).await;
        head.reply = alive;
    }
    Ok(idle)
}

/// Sends part of an answer; returns the sender while the client still takes it. A client gone
/// or not reading for [`CLIENT_STALL`] is dropped, which its task sees as a lost connection.
async fn deliver(
    reply: Option<mpsc::Sender<Reply>>,
    bytes: BytesMut,
    ready: Option<TxStatus>,
) -> Option<mpsc::Sender<Reply>> {
    let reply = reply?;
    // Without a timer when there is room, which is nearly always.
    let msg = match reply.try_send(Reply::Data { bytes, ready }) {
        Ok(()) => return Some(reply),
        Err(mpsc::error::TrySendError::Closed(_)) => return None,
        Err(mpsc::error::TrySendError::Full(msg)) => msg,
    };
    match reply.send_timeout(msg, CLIENT_STALL).await {
        Ok(()) => Some(reply),
        Err(_) => None,
    }
}

/// The connection failed or could not be had: every request admitted gets `Lost`.
async fn fail_all(
    pool: &Pool,
    lane: &Lane,
    rx: &mut mpsc::UnboundedReceiver<Request>,
    queue: VecDeque<Waiting>,
    why: &str,
) {
    pool.close_lane(lane);
    let mut owed: Vec<mpsc::Sender<Reply>> = queue.into_iter().filter_map(|w| w.reply).collect();
    rx.close();
    while let Some(r) = rx.recv().await {
        owed.push(r.reply);
    }
    for reply in owed {
        let _ = reply.try_send(Reply::Lost(why.to_owned()));
    }
    lane.in_flight.store(0, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane() -> Lane {
        let (tx, _rx) = mpsc::unbounded_channel();
        let l = Lane::new(Settings::default(), tx);
        let _ = l
            .server
            .set(("127.0.0.1".into(), 5432, BackendKey { pid: 7, secret: 9 }));
        l
    }

    #[test]
    fn a_cancel_reaches_the_server_only_while_its_request_runs() {
        let l = lane();
        assert!(!l.reach(1));
        // Request 1 runs: its cancel goes out at once.
        assert_eq!(l.cancel(1).map(|s| s.2.pid), Some(7));
        // Request 3 is queued behind 2: the cancel waits for it, and 2 is not cancelled.
        assert_eq!(l.cancel(3), None);
        assert!(!l.reach(2));
        assert!(
            l.reach(3),
            "the lane sends the waiting cancel when 3 starts"
        );
        assert!(!l.reach(4));
        // Answered requests are not cancelled any more.
        assert_eq!(l.cancel(3), None);
        assert!(l.cancels.lock().is_empty());
    }

    #[test]
    fn every_queued_cancel_waits_for_its_own_request() {
        let l = lane();
        assert!(!l.reach(1));
        // Two clients cancel two queued requests at once: both are kept.
        assert_eq!(l.cancel(2), None);
        assert_eq!(l.cancel(4), None);
        assert!(l.reach(2));
        assert!(!l.reach(3));
        assert!(l.reach(4));
        assert_eq!(l.pending_cancels.load(Ordering::SeqCst), 0);
        // A cancel that raced its request's answer is dropped once a later request starts.
        l.cancels.lock().push(5);
        l.pending_cancels.store(1, Ordering::SeqCst);
        assert!(!l.reach(6));
        assert!(l.cancels.lock().is_empty());
    }

    #[test]
    fn a_lane_is_full_at_its_depth_and_when_its_head_stalls() {
        let l = lane();
        assert!(l.admits(2));
        l.in_flight.store(1, Ordering::SeqCst);
        l.reach(1);
        assert!(l.admits(2));
        l.in_flight.store(2, Ordering::SeqCst);
        assert!(!l.admits(2));
        l.in_flight.store(1, Ordering::SeqCst);
        l.head_since.store(0, Ordering::SeqCst);
        std::thread::sleep(STALL + Duration::from_millis(1));
        assert!(
            !l.admits(8),
            "a head running longer than STALL takes nobody behind it"
        );
    }
}
