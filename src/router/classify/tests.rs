use super::*;

/// R = read-only (replica), W = primary.
const CASES: &[(&str, char)] = &[
    // Plain reads.
    ("SELECT 1", 'R'),
    ("select * from accounts where id = $1", 'R'),
    ("  SELECT count(*) FROM t", 'R'),
    ("TABLE accounts", 'R'),
    ("VALUES (1), (2)", 'R'),
    ("SHOW search_path", 'R'),
    ("EXPLAIN SELECT * FROM t", 'R'),
    ("EXPLAIN DELETE FROM t", 'R'),
    ("WITH x AS (SELECT 1) SELECT * FROM x", 'R'),
    ("SELECT substring('abc' FROM 1 FOR 2)", 'R'),
    ("SELECT * FROM t ORDER BY id LIMIT 10 OFFSET 5", 'R'),
    ("SELECT a.* FROM a JOIN b USING (id) WHERE b.x > 3", 'R'),
    ("COPY accounts TO STDOUT", 'R'),
    (
        "COPY (SELECT id FROM accounts) TO STDOUT WITH (FORMAT csv)",
        'R',
    ),
    ("SELECT currval('s')", 'R'),
    ("SELECT 1; SELECT 2", 'R'),
    ("", 'R'),
    ("-- only a comment", 'R'),
    (";;", 'R'),
    // Keywords hidden in quotes and comments do not make writes.
    ("SELECT 'insert into t values (1)'", 'R'),
    ("SELECT E'update \\' delete'", 'R'),
    ("SELECT $$ DELETE FROM t $$", 'R'),
    ("SELECT $body$ nextval('x') $body$", 'R'),
    ("SELECT \"update\" FROM t", 'R'),
    ("SELECT 1 -- FOR UPDATE", 'R'),
    ("SELECT 1 /* INSERT /* nested */ INTO x */", 'R'),
    ("SELECT U&'\\0064elete' AS x", 'R'),
    ("SELECT 'it''s; DELETE FROM t'", 'R'),
    // Writes.
    ("INSERT INTO t VALUES (1)", 'W'),
    ("UPDATE t SET a = 1", 'W'),
    ("DELETE FROM t", 'W'),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        'W',
    ),
    ("CREATE TABLE x (id int)", 'W'),
    ("DROP TABLE x", 'W'),
    ("ALTER TABLE x ADD COLUMN y int", 'W'),
    ("TRUNCATE t", 'W'),
    ("VACUUM t", 'W'),
    ("ANALYZE t", 'W'),
    ("CALL p()", 'W'),
    ("DO $$ BEGIN PERFORM 1; END $$", 'W'),
    ("GRANT SELECT ON t TO app", 'W'),
    ("REFRESH MATERIALIZED VIEW mv", 'W'),
    ("COPY t FROM STDIN", 'W'),
    ("COPY t TO '/tmp/file'", 'W'),
    ("LISTEN ch", 'W'),
    ("NOTIFY ch", 'W'),
    ("LOCK TABLE t", 'W'),
    ("SELECT nextval('seq')", 'W'),
    ("SELECT NEXTVAL('seq')", 'W'),
    ("SELECT pg_catalog.setval('seq', 5)", 'W'),
    ("SELECT pg_advisory_lock(1)", 'W'),
    ("SELECT pg_try_advisory_xact_lock(1)", 'W'),
    ("SELECT pg_notify('ch', 'x')", 'W'),
    ("SELECT set_config('a.b', 'c', false)", 'W'),
    ("SELECT txid_current()", 'W'),
    ("SELECT pg_current_xact_id()", 'W'),
    ("SELECT lo_create(0)", 'W'),
    ("SELECT * FROM t FOR UPDATE", 'W'),
    ("SELECT * FROM t FOR NO KEY UPDATE", 'W'),
    ("SELECT * FROM t FOR SHARE", 'W'),
    ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", 'W'),
    ("SELECT * FROM t WHERE id = 1 FOR UPDATE OF t NOWAIT", 'W'),
    ("SELECT * INTO newtable FROM t", 'W'),
    (
        "WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x",
        'W',
    ),
    (
        "WITH d AS (DELETE FROM t RETURNING id) SELECT count(*) FROM d",
        'W',
    ),
    (
        "WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT 1",
        'W',
    ),
    ("EXPLAIN ANALYZE DELETE FROM t", 'W'),
    ("EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 2", 'W'),
    ("EXPLAIN ANALYZE SELECT nextval('s')", 'W'),
    ("SELECT 1; DELETE FROM t", 'W'),
    ("SELECT 1; INSERT INTO t VALUES ('; SELECT')", 'W'),
    ("BEGIN", 'R'),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", 'R'),
    ("BEGIN; INSERT INTO t VALUES (1); COMMIT", 'W'),
    ("PREPARE p AS SELECT 1", 'W'),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", 'W'),
    ("SOMETHING UNKNOWN", 'W'),
    ("SELECT 'unterminated", 'R'),
    ("SELECT $tag$ never closed", 'R'),
];

#[test]
fn table_of_tricky_statements() {
    let rules = FunctionRules::default();
    assert!(CASES.len() >= 60);
    let mut wrong = Vec::new();
    for (sql, want) in CASES {
        let got = if analyze(sql, &rules).read_only {
            'R'
        } else {
            'W'
        };
        if got != *want {
            wrong.push(format!("{sql:?}: want {want}, got {got}"));
        }
    }
    assert!(wrong.is_empty(), "misclassified:\n{}", wrong.join("\n"));
}

#[test]
fn transactions_hints_and_settings() {
    let rules = FunctionRules::default();
    assert_eq!(analyze("BEGIN", &rules).begin, Some(false));
    assert_eq!(analyze("begin read only", &rules).begin, Some(true));
    assert_eq!(
        analyze(
            "START TRANSACTION READ ONLY, ISOLATION LEVEL REPEATABLE READ",
            &rules
        )
        .begin,
        Some(true)
    );
    assert_eq!(analyze("BEGIN READ WRITE", &rules).begin, Some(false));
    assert_eq!(
        analyze("/* pgpilot:primary */ SELECT 1", &rules).hint,
        Some(Route::Primary)
    );
    assert_eq!(
        analyze("/*pgpilot:replica*/ SELECT 1", &rules).hint,
        Some(Route::Replica)
    );
    assert_eq!(analyze("SELECT /* pgpilot:replica */ 1", &rules).hint, None);
    assert_eq!(
        analyze("SET pgpilot.route = 'replica'", &rules).route_setting,
        Some(Route::Replica)
    );
    assert_eq!(
        analyze("set pgpilot.route to primary", &rules).route_setting,
        Some(Route::Primary)
    );
    assert_eq!(
        analyze("SET pgpilot.route = default", &rules).route_setting,
        Some(Route::Auto)
    );
    assert_eq!(
        analyze(
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            &rules
        )
        .session_read_only,
        Some(true)
    );
    let a = analyze(
        "SET search_path = app, public; RESET work_mem; RESET ALL",
        &rules,
    );
    assert_eq!(
        a.changes,
        [
            SessionChange::Set {
                name: "search_path",
                statement: "SET search_path = app, public"
            },
            SessionChange::Reset { name: "work_mem" },
            SessionChange::ResetAll,
        ]
    );
    assert!(
        analyze("SET LOCAL work_mem = '1MB'", &rules)
            .changes
            .is_empty()
    );
    assert_eq!(
        analyze("DEALLOCATE ALL", &rules).changes,
        [SessionChange::DeallocateAll]
    );
    assert_eq!(
        analyze("deallocate prepare s1", &rules).changes,
        [SessionChange::Deallocate {
            name: "s1",
            quoted: false
        }]
    );
    assert_eq!(
        analyze("DISCARD ALL", &rules).changes,
        [SessionChange::DiscardAll]
    );
}

#[test]
fn pinning_statements() {
    let rules = FunctionRules::default();
    for sql in [
        "LISTEN ch",
        "SELECT pg_advisory_lock(42)",
        "SELECT pg_try_advisory_lock_shared(1, 2)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "CREATE TEMP TABLE x (id int)",
        "create temporary table x as select 1",
        "SELECT 1 AS one INTO TEMP t",
        "PREPARE p AS SELECT 1",
        "SET ROLE other",
    ] {
        assert!(analyze(sql, &rules).pins, "{sql} pins");
    }
    for sql in [
        "SELECT pg_advisory_xact_lock(1)",
        "DECLARE c CURSOR FOR SELECT 1",
        "CREATE TABLE t (id int)",
    ] {
        assert!(!analyze(sql, &rules).pins, "{sql} does not pin");
    }
}

#[test]
fn configured_function_lists() {
    let rules = FunctionRules::new(&["audit_log".into()], &["nextval".into()]);
    assert!(!analyze("SELECT audit_log('x')", &rules).read_only);
    assert!(analyze("SELECT nextval('s')", &rules).read_only);
    let long = format!("SELECT {}(1)", "f".repeat(100));
    assert!(analyze(&long, &rules).read_only);
}
