//! Who is connected, for `SHOW CLIENTS` / `SHOW SERVERS` and `KILL`: entries registered by an
//! RAII guard that removes them when the client session or server connection ends. State
//! changes are relaxed atomic stores on the entry; nothing on the request path takes a lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

type Map<T> = Arc<Mutex<HashMap<u64, Arc<T>>>>;

pub struct Registry<T> {
    next: AtomicU64,
    map: Map<T>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            next: AtomicU64::new(1),
            map: Arc::default(),
        }
    }
}

/// Keeps an entry registered for as long as it lives.
pub struct Registered<T> {
    map: Map<T>,
    id: u64,
    pub entry: Arc<T>,
}

impl<T> Drop for Registered<T> {
    fn drop(&mut self) {
        self.map.lock().remove(&self.id);
    }
}

impl<T> Registry<T> {
    pub fn register(&self, make: impl FnOnce(u64) -> T) -> Registered<T> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(make(id));
        self.map.lock().insert(id, entry.clone());
        Registered {
            map: self.map.clone(),
            id,
            entry,
        }
    }

    /// Every entry, oldest first.
    pub fn list(&self) -> Vec<(u64, Arc<T>)> {
        let mut all: Vec<(u64, Arc<T>)> = self
            .map
            .lock()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        all.sort_by_key(|(k, _)| *k);
        all
    }

    pub fn get(&self, id: u64) -> Option<Arc<T>> {
        self.map.lock().get(&id).cloned()
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

pub const IDLE: u8 = 0;
pub const ACTIVE: u8 = 1;
pub const WAITING: u8 = 2;

pub struct ClientEntry {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub peer: SocketAddr,
    pub local: Option<SocketAddr>,
    pub tls: bool,
    pub connect_ms: u64,
    pub request_ms: AtomicU64,
    /// `IDLE`, `ACTIVE` (holding a server connection) or `WAITING` (for one).
    pub state: AtomicU8,
    /// When the current wait began (unix ms), while `WAITING`.
    pub wait_since_ms: AtomicU64,
    /// Cancelled by `KILL_CLIENT` / `KILL db`: the session ends with `57P01`.
    pub kill: CancellationToken,
}

impl ClientEntry {
    /// Called around every checkout: the clock is read once per request, when it starts
    /// waiting for a server connection (every request does, if only for an instant).
    pub fn set_state(&self, state: u8) {
        if state == WAITING {
            let now = now_ms();
            self.wait_since_ms.store(now, Ordering::Relaxed);
            self.request_ms.store(now, Ordering::Relaxed);
        }
        self.state.store(state, Ordering::Relaxed);
    }
}

pub struct ServerEntry {
    pub node: String,
    pub user: String,
    pub database: String,
    pub addr: String,
    pub port: u16,
    pub local: Option<SocketAddr>,
    pub remote_pid: i32,
    pub tls: bool,
    pub connect_ms: u64,
    pub request_ms: AtomicU64,
    /// Lent to a client.
    pub active: AtomicBool,
}

impl ServerEntry {
    pub fn set_active(&self, active: bool) {
        if active {
            self.request_ms.store(now_ms(), Ordering::Relaxed);
        }
        self.active.store(active, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_with_their_guard() {
        let r: Registry<String> = Registry::default();
        let a = r.register(|id| format!("a{id}"));
        let b = r.register(|id| format!("b{id}"));
        assert_eq!(r.list().len(), 2);
        assert_eq!(r.get(1).as_deref().map(String::as_str), Some("a1"));
        drop(a);
        let left: Vec<String> = r.list().into_iter().map(|(_, e)| (*e).clone()).collect();
        assert_eq!(left, ["b2"]);
        drop(b);
        assert!(r.list().is_empty());
    }
}
