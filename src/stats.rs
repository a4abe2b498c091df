//! Traffic statistics per database: PgBouncer's counters and averages (`SHOW STATS`,
//! `STATS_TOTALS`, `STATS_AVERAGES`) and the histograms the Prometheus endpoint exports.
//! Updated with relaxed atomics on the request path; averages are recomputed every
//! `stats_period` the way PgBouncer does (counts and bytes per second, times per query or
//! transaction, wait time per second).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

/// Histogram bucket upper bounds, in seconds.
pub const BUCKETS: [f64; 15] = [
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
pub struct Histogram {
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is +Inf, i.e. the total) and the sum in seconds.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut acc = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                acc += c.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (cumulative, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// PgBouncer's per-database numbers (times in microseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub xact_count: u64,
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    pub xact_time: u64,
    pub query_time: u64,
    pub wait_time: u64,
}

#[derive(Default)]
pub struct DbStats {
    xact_count: AtomicU64,
    query_count: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_time_us: AtomicU64,
    query_time_us: AtomicU64,
    wait_time_us: AtomicU64,
    /// Requests sent on a shared, pipelined server connection.
    pipelined: AtomicU64,
    pub query_duration: Histogram,
    pub xact_duration: Histogram,
    pub wait_duration: Histogram,
}

impl DbStats {
    pub fn query(&self, took: Duration) {
        self.query_count.fetch_add(1, Ordering::Relaxed);
        self.query_time_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.query_duration.observe(took);
    }

    pub fn transaction(&self, took: Duration) {
        self.xact_count.fetch_add(1, Ordering::Relaxed);
        self.xact_time_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.xact_duration.observe(took);
    }

    pub fn wait(&self, took: Duration) {
        self.wait_time_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.wait_duration.observe(took);
    }

    pub fn pipelined(&self) {
        self.pipelined.fetch_add(1, Ordering::Relaxed);
    }

    pub fn pipelined_count(&self) -> u64 {
        self.pipelined.load(Ordering::Relaxed)
    }

    pub fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn sent(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn totals(&self) -> Totals {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            xact_count: l(&self.xact_count),
            query_count: l(&self.query_count),
            received: l(&self.received),
            sent: l(&self.sent),
            xact_time: l(&self.xact_time_us),
            query_time: l(&self.query_time_us),
            wait_time: l(&self.wait_time_us),
        }
    }
}

/// Averages over one period, as PgBouncer computes them.
pub fn averages(now: Totals, before: Totals, period: Duration) -> Totals {
    let us = period.as_micros().max(1) as u64;
    let per_sec = |a: u64, b: u64| a.saturating_sub(b).saturating_mul(1_000_000) / us;
    let per = |a: u64, b: u64, n: u64| a.saturating_sub(b).checked_div(n).unwrap_or(0);
    let xacts = now.xact_count.saturating_sub(before.xact_count);
    let queries = now.query_count.saturating_sub(before.query_count);
    Totals {
        xact_count: per_sec(now.xact_count, before.xact_count),
        query_count: per_sec(now.query_count, before.query_count),
        received: per_sec(now.received, before.received),
        sent: per_sec(now.sent, before.sent),
        xact_time: per(now.xact_time, before.xact_time, xacts),
        query_time: per(now.query_time, before.query_time, queries),
        wait_time: per_sec(now.wait_time, before.wait_time),
    }
}

#[derive(Default)]
pub struct Stats {
    dbs: RwLock<BTreeMap<String, Arc<DbStats>>>,
    /// (when, totals) at the start of the current period, and the last period's averages.
    period: Mutex<Option<(Instant, BTreeMap<String, Totals>)>>,
    averages: Mutex<BTreeMap<String, Totals>>,
    /// Errors servers returned to clients, by SQLSTATE class.
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    /// The counters of database `name`, created on first use.
    pub fn db(&self, name: &str) -> Arc<DbStats> {
        if let Some(s) = self.dbs.read().get(name) {
            return s.clone();
        }
        self.dbs.write().entry(name.to_owned()).or_default().clone()
    }

    pub fn all(&self) -> Vec<(String, Arc<DbStats>)> {
        self.dbs
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn error(&self, sqlstate: &str) {
        let class = sqlstate.get(..2).unwrap_or("??").to_owned();
        *self.errors.lock().entry(class).or_default() += 1;
    }

    pub fn errors(&self) -> Vec<(String, u64)> {
        self.errors
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// Closes the current period: averages since the previous call become visible.
    pub fn roll(&self) {
        let now = Instant::now();
        let totals: BTreeMap<String, Totals> = self
            .all()
            .into_iter()
            .map(|(k, v)| (k, v.totals()))
            .collect();
        let mut period = self.period.lock();
        if let Some((since, before)) = period.as_ref() {
            let elapsed = now.duration_since(*since);
            let avgs = totals
                .iter()
                .map(|(k, t)| {
                    let b = before.get(k).copied().unwrap_or_default();
                    (k.clone(), averages(*t, b, elapsed))
                })
                .collect();
            *self.averages.lock() = avgs;
        }
        *period = Some((now, totals));
    }

    pub fn averages_of(&self, db: &str) -> Totals {
        self.averages.lock().get(db).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let (c, sum) = h.snapshot();
        assert_eq!(
            (c[0], c[4], c[BUCKETS.len() - 1], c[BUCKETS.len()]),
            (1, 2, 2, 3)
        );
        assert!((sum - 20.00305).abs() < 1e-6);
    }

    #[test]
    fn averages_follow_pgbouncer() {
        let before = Totals::default();
        let now = Totals {
            xact_count: 120,
            query_count: 240,
            received: 6000,
            sent: 12000,
            xact_time: 120 * 500,
            query_time: 240 * 100,
            wait_time: 60_000,
        };
        let a = averages(now, before, Duration::from_secs(60));
        assert_eq!(
            a,
            Totals {
                xact_count: 2,
                query_count: 4,
                received: 100,
                sent: 200,
                xact_time: 500,
                query_time: 100,
                wait_time: 1000,
            }
        );
    }
}
