//! Classifier cost per statement, short and long: `cargo bench --bench classify`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use pgpilot::router::classify::{FunctionRules, analyze};

fn bench(c: &mut Criterion) {
    let rules = FunctionRules::default();
    let long = format!(
        "/* report */ WITH recent AS (SELECT o.id, o.customer_id, o.total FROM orders o \
         WHERE o.created_at > now() - interval '7 days' AND o.status <> 'cancelled'), \
         ranked AS (SELECT r.*, rank() OVER (PARTITION BY customer_id ORDER BY total DESC) AS rk \
         FROM recent r) SELECT c.name, 'it''s -- not a comment', $tag$ UPDATE nothing $tag$, {} \
         FROM ranked JOIN customers c ON c.id = ranked.customer_id WHERE rk <= 3 ORDER BY c.name",
        (1..=40)
            .map(|i| format!("coalesce(col{i}, 0)"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    let cases = [
        (
            "short_select",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1".to_string(),
        ),
        (
            "short_update",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2".to_string(),
        ),
        (
            "for_update",
            "SELECT * FROM jobs WHERE state = 'ready' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
                .to_string(),
        ),
        ("long_report", long),
    ];
    let mut group = c.benchmark_group("classify");
    for (name, sql) in &cases {
        group.bench_function(*name, |b| {
            b.iter(|| analyze(black_box(sql), &rules).read_only)
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
