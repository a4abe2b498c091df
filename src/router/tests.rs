use super::*;
use crate::cluster::{Cluster, Report, Sample};
use crate::config::NodeConfig;

fn client(database: Routing) -> ClientRoute {
    ClientRoute {
        database,
        setting: Route::Auto,
        session_read_only: false,
    }
}

#[test]
fn decisions() {
    let auto = client(Routing::Auto);
    let read = Intent {
        read_only: true,
        ..Intent::default()
    };
    let write = Intent::default();
    assert_eq!(decide(&read, &auto), Target::Replica);
    assert_eq!(decide(&write, &auto), Target::Primary);
    assert_eq!(
        decide(
            &Intent {
                begin: Some(true),
                ..write
            },
            &auto
        ),
        Target::Replica
    );
    assert_eq!(
        decide(
            &Intent {
                begin: Some(false),
                ..read
            },
            &auto
        ),
        Target::Primary
    );
    assert_eq!(
        decide(
            &Intent {
                hint: Some(Route::Primary),
                ..read
            },
            &auto
        ),
        Target::Primary
    );
    assert_eq!(
        decide(
            &Intent {
                hint: Some(Route::Replica),
                ..write
            },
            &auto
        ),
        Target::Replica
    );
    assert_eq!(decide(&read, &client(Routing::Primary)), Target::Primary);
    assert_eq!(decide(&write, &client(Routing::Replica)), Target::Replica);
    assert_eq!(
        decide(
            &Intent {
                sticky: true,
                ..read
            },
            &auto
        ),
        Target::Primary
    );
    let pinned = ClientRoute {
        setting: Route::Primary,
        ..auto
    };
    assert_eq!(decide(&read, &pinned), Target::Primary);
    let ro = ClientRoute {
        session_read_only: true,
        ..auto
    };
    assert_eq!(decide(&write, &ro), Target::Replica);
}

fn cluster() -> std::sync::Arc<Cluster> {
    let nodes: Vec<NodeConfig> = (1..=3)
        .map(|i| NodeConfig {
            name: format!("pg{i}"),
            host: "h".into(),
            port: 1,
            priority: 0,
            no_failover: false,
            data_dir: None,
        })
        .collect();
    Cluster::new(&nodes)
}

fn sample(in_recovery: bool, lsn: u64) -> Sample {
    Sample {
        receive_lsn: None,
        timeline: None,
        system_id: None,
        streaming: true,
        ..Sample::for_tests(in_recovery, lsn)
    }
}

fn report(c: &Cluster, i: usize, s: Sample) {
    c.report(
        i,
        Report {
            result: Ok(s),
            healthy: true,
        },
    );
}

#[test]
fn replica_choice_respects_lag_load_and_read_your_writes() {
    let c = cluster();
    let cfg = ClusterConfig {
        max_replica_lag: crate::config::ByteSize(100),
        ..ClusterConfig::default()
    };
    let written = Instant::now();
    report(&c, 0, sample(false, 1000));
    report(&c, 1, sample(true, 1000));
    report(&c, 2, sample(true, 800));
    let load = Load::new(3);
    let v = c.view();
    // pg3 is 200 bytes behind: over the limit.
    for _ in 0..4 {
        assert_eq!(pick_replica(&v, &cfg, &load, None, &[]), Some(1));
    }
    assert_eq!(pick_replica(&v, &cfg, &load, None, &[1]), None);
    // Both within the limit: least outstanding first, then alternate.
    report(&c, 2, sample(true, 950));
    let v = c.view();
    let busy = load.track(1);
    assert_eq!(pick_replica(&v, &cfg, &load, None, &[]), Some(2));
    drop(busy);
    let picks: Vec<_> = (0..4)
        .map(|_| pick_replica(&v, &cfg, &load, None, &[]).unwrap())
        .collect();
    assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
    // After a write sampled before the primary probe: only replicas that replayed it.
    assert_eq!(pick_replica(&v, &cfg, &load, Some(written), &[]), Some(1));
    // A write newer than the last primary sample: no replica qualifies yet.
    assert_eq!(
        pick_replica(&v, &cfg, &load, Some(Instant::now()), &[]),
        None
    );
}
