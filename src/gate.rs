//! Per-database switches the admin console flips: `PAUSE` (new requests wait until `RESUME`)
//! and `DISABLE` (new client connections are refused until `ENABLE`). The request path reads
//! one atomic flag while nothing is paused.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use tokio::sync::watch;

#[derive(Default)]
pub struct Gate {
    any_paused: AtomicBool,
    /// `None` in the set means every database.
    paused: Mutex<HashSet<Option<String>>>,
    disabled: Mutex<HashSet<String>>,
    changed: watch::Sender<u64>,
}

impl Gate {
    pub fn pause(&self, db: Option<&str>) {
        self.paused.lock().insert(db.map(str::to_owned));
        self.any_paused.store(true, Ordering::Release);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Lifts `PAUSE db`, or every pause for `None`.
    pub fn resume(&self, db: Option<&str>) {
        let mut paused = self.paused.lock();
        match db {
            Some(d) => {
                paused.remove(&Some(d.to_owned()));
            }
            None => paused.clear(),
        }
        self.any_paused.store(!paused.is_empty(), Ordering::Release);
        drop(paused);
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn is_paused(&self, db: &str) -> bool {
        if !self.any_paused.load(Ordering::Acquire) {
            return false;
        }
        let paused = self.paused.lock();
        paused.contains(&None) || paused.contains(&Some(db.to_owned()))
    }

    /// Returns once `db` is not paused.
    pub async fn wait_resumed(&self, db: &str) {
        let mut rx = self.changed.subscribe();
        while self.is_paused(db) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn set_disabled(&self, db: &str, disabled: bool) {
        let mut set = self.disabled.lock();
        if disabled {
            set.insert(db.to_owned());
        } else {
            set.remove(db);
        }
    }

    pub fn is_disabled(&self, db: &str) -> bool {
        self.disabled.lock().contains(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pause_holds_until_resume() {
        let g = std::sync::Arc::new(Gate::default());
        assert!(!g.is_paused("app"));
        g.pause(Some("app"));
        assert!(g.is_paused("app") && !g.is_paused("other"));
        let waiter = {
            let g = g.clone();
            tokio::spawn(async move { g.wait_resumed("app").await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        g.resume(None);
        waiter.await.unwrap();
        g.pause(None);
        assert!(g.is_paused("other"));
        g.resume(None);
        g.set_disabled("app", true);
        assert!(g.is_disabled("app"));
        g.set_disabled("app", false);
        assert!(!g.is_disabled("app"));
    }
}
