use super::*;

fn frame(tag: u8, f: impl FnOnce(&mut BytesMut)) -> Frame {
    let mut b = BytesMut::new();
    write_message(&mut b, tag, f);
    Frame::from_raw(b).unwrap()
}

fn parse(name: &str, sql: &str) -> Frame {
    frame(b'P', |b| {
        put_cstr(b, name);
        put_cstr(b, sql);
        b.put_i16(0);
    })
}

fn bind(statement: &str) -> Frame {
    frame(b'B', |b| {
        put_cstr(b, "");
        put_cstr(b, statement);
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    })
}

fn tags(mut out: BytesMut) -> Vec<(u8, String)> {
    use tokio_util::codec::Decoder;
    let mut codec = crate::protocol::FrameCodec::new(1 << 20);
    let mut v = Vec::new();
    while let Some(f) = codec.decode(&mut out).unwrap() {
        let name = match f.tag {
            b'P' => parse_view(&f).unwrap().name.to_owned(),
            b'B' => bind_view(&f).unwrap().1.to_owned(),
            b'C' | b'D' => target_view(&f).unwrap().1.to_owned(),
            _ => String::new(),
        };
        v.push((f.tag, name));
    }
    v
}

struct Conn {
    server: ServerStatements,
    expect: VecDeque<Expect>,
}

fn send(
    client: &mut ClientStatements,
    conn: &mut Conn,
    frames: Vec<Frame>,
    max: usize,
) -> Vec<(u8, String)> {
    let rules = FunctionRules::default();
    let mut out = BytesMut::new();
    let mut rw = Rewriter {
        client,
        server: &mut conn.server,
        expect: &mut conn.expect,
        rules: &rules,
        max_prepared: max,
        parsed: [].iter(),
        refuse_unverified: false,
        unverified: false,
    };
    for f in frames {
        rw.push(&f, &mut out).unwrap();
    }
    tags(out)
}

fn conn() -> Conn {
    Conn {
        server: ServerStatements::default(),
        expect: VecDeque::new(),
    }
}

#[test]
fn named_statements_are_renamed_and_reparsed_on_another_connection() {
    let mut client = ClientStatements::new(7);
    let (mut a, mut b) = (conn(), conn());
    let sent = send(
        &mut client,
        &mut a,
        vec![parse("s1", "SELECT 1"), frame(b'S', |_| {})],
        10,
    );
    let sn = sent[0].1.clone();
    assert!(sn.starts_with("pgp7_"), "{sn}");
    // The Parse is followed by a Describe of the proxy's own, to learn the result shape.
    assert_eq!(
        sent,
        [
            (b'P', sn.clone()),
            (b'D', sn.clone()),
            (b'S', String::new())
        ]
    );
    // ParseComplete and ReadyForQuery are forwarded; the Describe's answer is swallowed and
    // recorded as the statement's shape.
    assert_eq!(
        on_response(b'1', &[], &mut a.expect, &mut a.server),
        Disposition::Forward
    );
    assert_eq!(
        on_response(b't', &[0, 0], &mut a.expect, &mut a.server),
        Disposition::Swallow
    );
    assert_eq!(
        on_response(b'T', b"shape", &mut a.expect, &mut a.server),
        Disposition::Swallow
    );
    assert_eq!(
        client
            .get("s1")
            .and_then(|s| s.shape.get())
            .map(Vec::as_slice),
        Some(&b"shape"[..])
    );
    assert_eq!(
        on_response(b'Z', &[], &mut a.expect, &mut a.server),
        Disposition::Forward
    );

    // Same connection: no re-parse.
    let sent = send(
        &mut client,
        &mut a,
        vec![bind("s1"), frame(b'S', |_| {})],
        10,
    );
    assert_eq!(sent, [(b'B', sn.clone()), (b'S', String::new())]);

    // Another connection: the Parse is injected and its ParseComplete swallowed.
    let sent = send(
        &mut client,
        &mut b,
        vec![bind("s1"), frame(b'S', |_| {})],
        10,
    );
    assert_eq!(
        sent,
        [
            (b'P', sn.clone()),
            (b'B', sn.clone()),
            (b'S', String::new())
        ]
    );
    assert_eq!(
        on_response(b'1', &[], &mut b.expect, &mut b.server),
        Disposition::Swallow
    );
    assert_eq!(
        on_response(b'2', &[], &mut b.expect, &mut b.server),
        Disposition::Forward
    );
}

#[test]
fn describe_and_close_follow_the_statement() {
    let mut client = ClientStatements::new(1);
    let (mut a, mut b) = (conn(), conn());
    let sn = send(&mut client, &mut a, vec![parse("q", "SELECT 2")], 10)[0]
        .1
        .clone();
    let describe = frame(b'D', |b| {
        b.put_u8(b'S');
        put_cstr(b, "q");
    });
    let sent = send(&mut client, &mut b, vec![describe], 10);
    assert_eq!(sent, [(b'P', sn.clone()), (b'D', sn.clone())]);
    let close = frame(b'C', |b| {
        b.put_u8(b'S');
        put_cstr(b, "q");
    });
    let sent = send(&mut client, &mut b, vec![close], 10);
    assert_eq!(sent, [(b'C', sn)]);
    assert!(client.get("q").is_none());
}

#[test]
fn lru_evicts_with_close_and_swallows_it() {
    let mut client = ClientStatements::new(1);
    let mut a = conn();
    send(
        &mut client,
        &mut a,
        vec![parse("a", "SELECT 1"), parse("b", "SELECT 2")],
        2,
    );
    let sent = send(&mut client, &mut a, vec![parse("c", "SELECT 3")], 2);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(sent[0].0, b'C', "the oldest statement is closed first");
    assert_eq!(a.server.len(), 2);
    a.expect.clear();
    a.expect.push_back(Expect::Close {
        injected: true,
        name: None,
    });
    assert_eq!(
        on_response(b'3', &[], &mut a.expect, &mut a.server),
        Disposition::Swallow
    );
}

#[test]
fn unnamed_statement_is_reparsed_when_it_ran_elsewhere() {
    let mut client = ClientStatements::new(3);
    let (mut a, mut b) = (conn(), conn());
    let sent = send(
        &mut client,
        &mut a,
        vec![parse("", "SELECT 1"), frame(b'S', |_| {})],
        10,
    );
    assert_eq!(sent[0], (b'P', String::new()));
    let sent = send(&mut client, &mut b, vec![bind(""), frame(b'S', |_| {})], 10);
    assert_eq!(sent[..2], [(b'P', String::new()), (b'B', String::new())]);
    // A simple query on `a` destroyed its unnamed statement.
    let q = frame(b'Q', |b| put_cstr(b, "SELECT 1"));
    send(&mut client, &mut a, vec![q], 10);
    let sent = send(&mut client, &mut a, vec![bind("")], 10);
    assert_eq!(sent[0], (b'P', String::new()));
}

#[test]
fn an_error_undoes_skipped_parses() {
    let mut client = ClientStatements::new(1);
    let mut a = conn();
    send(
        &mut client,
        &mut a,
        vec![parse("bad", "SELEC 1"), frame(b'S', |_| {})],
        10,
    );
    assert_eq!(a.server.len(), 1);
    on_response(b'E', &[], &mut a.expect, &mut a.server);
    assert_eq!(
        a.server.len(),
        0,
        "the failed statement is not on the server"
    );
    on_response(b'Z', &[], &mut a.expect, &mut a.server);
    assert!(a.expect.is_empty());
}

#[test]
fn classes() {
    let rules = FunctionRules::default();
    assert!(StatementClass::of("SELECT 1", &rules).read_only);
    assert_eq!(
        StatementClass::of("rollback", &rules).ends_tx,
        Some(TxEnd::Rollback)
    );
    assert_eq!(
        StatementClass::of("END", &rules).ends_tx,
        Some(TxEnd::Commit)
    );
    assert_eq!(
        StatementClass::of("ROLLBACK; SELECT 1", &rules).ends_tx,
        None
    );
    // These leave a transaction open, or act on a prepared one.
    for sql in [
        "ROLLBACK TO SAVEPOINT a",
        "rollback to a",
        "ROLLBACK WORK TO a",
        "COMMIT AND CHAIN",
        "rollback transaction and chain",
    ] {
        assert_eq!(StatementClass::of(sql, &rules).ends_tx, None, "{sql}");
    }
    assert_eq!(
        StatementClass::of("COMMIT AND NO CHAIN", &rules).ends_tx,
        Some(TxEnd::Commit)
    );
    let prepared = StatementClass::of("COMMIT PREPARED 'x'", &rules);
    assert_eq!(prepared.ends_tx, None);
    assert!(!prepared.read_only, "a two-phase commit writes");
    assert_eq!(
        StatementClass::of("BEGIN READ ONLY", &rules).begin,
        Some(true)
    );
}

#[test]
fn a_failed_parse_forgets_the_statement_and_a_reused_name_fails_on_the_server() {
    let mut client = ClientStatements::new(3);
    let mut a = conn();
    send(&mut client, &mut a, vec![parse("s", "SELECT 1")], 10);
    // The server rejects the Parse (an aborted transaction, a syntax error...).
    let failed = failed_parses(&a.expect);
    assert_eq!(failed.len(), 1);
    client.parse_failed(&failed[0].0, failed[0].1.as_deref());
    assert!(client.get("s").is_none(), "it never existed for PostgreSQL");

    // A name in use is sent under the statement's own server name: the server says 42P05.
    let mut b = conn();
    let sent = send(&mut client, &mut b, vec![parse("t", "SELECT 1")], 10);
    let sn = sent[0].1.clone();
    b.expect.clear();
    let sent = send(&mut client, &mut b, vec![parse("t", "SELECT 2")], 10);
    assert_eq!(sent, [(b'P', sn.clone())]);
    assert!(
        failed_parses(&b.expect).is_empty(),
        "the old statement stays"
    );
    assert_eq!(
        client
            .unrename(format!("prepared statement \"{sn}\" already exists").as_bytes())
            .as_deref(),
        Some(&b"prepared statement \"t\" already exists"[..])
    );
}

#[test]
fn a_changed_shape_is_found_before_the_statement_runs_again() {
    let mut client = ClientStatements::new(4);
    let (mut a, mut b) = (conn(), conn());
    send(&mut client, &mut a, vec![parse("s", "SELECT * FROM t")], 10);
    on_response(b'1', &[], &mut a.expect, &mut a.server);
    on_response(b'T', b"one column", &mut a.expect, &mut a.server);
    let run = vec![bind("s"), frame(b'S', |_| {})];
    let stmts = unchecked_statements(&run, &client, &b.server).unwrap();
    assert_eq!(stmts.len(), 1, "the other connection must check it first");
    let (out, _) = check_request(&stmts, &mut b.server, 10);
    assert_eq!(
        tags(out).iter().map(|t| t.0).collect::<Vec<_>>(),
        [b'P', b'D', b'S']
    );
    let mut next = 0;
    for (tag, body) in [
        (b'1', &b""[..]),
        (b't', &[0, 0][..]),
        (b'T', &b"two columns"[..]),
    ] {
        on_check_answer(tag, body, &stmts, &mut next, &mut b.server);
    }
    assert!(stmts[0].broken.load(Ordering::Relaxed));
    assert!(unchecked_statements(&run, &client, &b.server).is_err());
    // On the original connection nothing needs checking (the server itself raises 0A000),
    // but a known change is reported everywhere.
    assert!(unchecked_statements(&run, &client, &a.server).is_err());
}

#[test]
fn a_refused_rewrite_leaves_the_connection_set_as_it_was() {
    let mut client = ClientStatements::new(5);
    let (mut a, mut lane) = (conn(), conn());
    send(&mut client, &mut a, vec![parse("s", "SELECT 1")], 10);
    on_response(b'1', &[], &mut a.expect, &mut a.server);
    on_response(b'T', b"shape", &mut a.expect, &mut a.server);
    let rules = FunctionRules::default();
    let mut out = BytesMut::new();
    let mut rw = Rewriter {
        client: &mut client,
        server: &mut lane.server,
        expect: &mut lane.expect,
        rules: &rules,
        max_prepared: 10,
        parsed: [].iter(),
        refuse_unverified: true,
        unverified: false,
    };
    rw.push(&bind("s"), &mut out).unwrap();
    assert!(rw.unverified, "a known shape must be checked first");
    assert!(lane.server.is_empty(), "nothing was prepared there");
}

#[test]
fn a_parse_lost_with_its_server_can_be_sent_again() {
    let mut client = ClientStatements::new(6);
    let mut a = conn();
    send(
        &mut client,
        &mut a,
        vec![parse("s", "SELECT 1"), frame(b'S', |_| {})],
        10,
    );
    // The server dies before answering: the Parse never completed.
    for (c, s) in unanswered_parses(&a.expect) {
        client.parse_failed(&c, s.as_deref());
    }
    assert!(client.get("s").is_none());
    // Retried elsewhere, it is a new Parse, not a reuse of the name (no 42P05).
    let mut b = conn();
    let sent = send(&mut client, &mut b, vec![parse("s", "SELECT 1")], 10);
    assert_eq!(sent.iter().filter(|t| t.0 == b'P').count(), 1);
    assert!(client.get("s").is_some());
}
