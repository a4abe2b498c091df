//! Seeded client conversations for the differential tester: simple and extended queries,
//! named and unnamed statements, Describe/Close, DEALLOCATE/DISCARD, SET/RESET/SET LOCAL,
//! transactions and savepoints, errors inside and outside them, COPY both ways, cursors,
//! temporary tables, advisory locks, LISTEN/NOTIFY, DDL under prepared statements, pipelines
//! without Sync and text that is not UTF-8.
#![allow(dead_code)]

use super::diff::{Rng, Step, msg};

/// Statement texts a conversation prepares (`{t}` is its table).
const PREPARED: [&str; 5] = [
    "SELECT v FROM {t} WHERE id = $1",
    "SELECT * FROM {t} WHERE id = $1",
    "INSERT INTO {t} (id, v) VALUES ($1, 'p')",
    "UPDATE {t} SET v = v || 'u' WHERE id = $1",
    "SET work_mem = '3MB'",
];

struct Gen {
    rng: Rng,
    table: String,
    channel: String,
    lock: u64,
    in_tx: bool,
    prepared: Vec<String>,
    cursors: Vec<String>,
    next_key: u64,
    next_name: u64,
    temp: bool,
    steps: Vec<Step>,
}

/// The conversation for `seed`, about `len` requests long. `flush` adds pipelines without
/// Sync; `session_state` adds what pins a session (temp tables, session advisory locks,
/// LISTEN).
pub fn conversation(seed: u64, len: usize, flush: bool, session_state: bool) -> Vec<Step> {
    let mut g = Gen {
        rng: Rng::new(seed),
        table: format!("dt{seed}"),
        channel: format!("ch{seed}"),
        lock: 1_000_000 + seed,
        in_tx: false,
        prepared: Vec::new(),
        cursors: Vec::new(),
        next_key: 1,
        next_name: 0,
        temp: false,
        steps: Vec::new(),
    };
    g.q(&format!(
        "CREATE TABLE {} (id int PRIMARY KEY, v text)",
        g.table
    ));
    while g.steps.len() < len {
        g.step(flush, session_state);
    }
    if g.in_tx {
        g.q("ROLLBACK");
    }
    g.q(&format!("DROP TABLE {}", g.table));
    g.steps
}

impl Gen {
    fn q(&mut self, sql: &str) {
        self.steps.push(Step::query(sql));
    }

    fn t(&self, sql: &str) -> String {
        sql.replace("{t}", &self.table)
    }

    fn key(&mut self) -> String {
        self.next_key += 1;
        self.next_key.to_string()
    }

    /// An existing key most of the time, sometimes one that is not there.
    fn some_key(&mut self) -> String {
        (1 + self.rng.below(self.next_key + 1)).to_string()
    }

    fn name(&mut self) -> String {
        self.next_name += 1;
        format!("s{}", self.next_name)
    }

    /// A prepared name most of the time, sometimes an unknown one.
    fn some_statement(&mut self) -> String {
        if self.prepared.is_empty() || self.rng.chance(10) {
            return "nosuch".into();
        }
        let i = self.rng.below(self.prepared.len() as u64) as usize;
        self.prepared[i].clone()
    }

    fn step(&mut self, flush: bool, session_state: bool) {
        let t = self.table.clone();
        match self.rng.below(40) {
            0..=3 => {
                let k = self.key();
                self.q(&format!("INSERT INTO {t} VALUES ({k}, 'v{k}')"));
            }
            4 => {
                let k = self.some_key();
                self.q(&format!("INSERT INTO {t} VALUES ({k}, 'dup')"));
            }
            5..=6 => self.q(&format!("SELECT id, v FROM {t} ORDER BY id")),
            7..=8 if !self.in_tx => {
                self.in_tx = true;
                let begin = [
                    "BEGIN",
                    "START TRANSACTION",
                    "BEGIN ISOLATION LEVEL REPEATABLE READ",
                ];
                let i = self.rng.below(3) as usize;
                self.q(begin[i]);
            }
            7..=9 if self.in_tx => {
                self.in_tx = false;
                self.cursors.clear();
                let end = ["COMMIT", "ROLLBACK", "END", "COMMIT"];
                let i = self.rng.below(4) as usize;
                self.q(end[i]);
            }
            10 if self.in_tx => {
                let sp = [
                    "SAVEPOINT a",
                    "ROLLBACK TO SAVEPOINT a",
                    "RELEASE SAVEPOINT a",
                ];
                let i = self.rng.below(3) as usize;
                self.q(sp[i]);
            }
            11 => self.q("SELECT 1/0"),
            12 => {
                let mb = 1 + self.rng.below(8);
                let local = if self.rng.chance(40) { "LOCAL " } else { "" };
                self.q(&format!("SET {local}work_mem = '{mb}MB'"));
            }
            13 => self.q("SHOW work_mem"),
            14 => {
                let reset = ["RESET work_mem", "RESET ALL", "SET work_mem TO DEFAULT"];
                let i = self.rng.below(3) as usize;
                self.q(reset[i]);
            }
            15..=16 => {
                let name = self.name();
                let i = self.rng.below(PREPARED.len() as u64) as usize;
                let sql = self.t(PREPARED[i]);
                self.prepared.push(name.clone());
                self.steps
                    .push(Step::extended(&format!("Parse {name} {sql:?}"), |b| {
                        msg::parse(b, &name, sql.as_bytes())
                    }));
            }
            17..=19 => {
                let name = self.some_statement();
                let k = self.some_key();
                let describe = self.rng.chance(50);
                self.steps.push(Step::extended(
                    &format!("Bind {name} ({k}) / Describe P: {describe} / Execute"),
                    |b| {
                        msg::bind(b, "", &name, &[&k]);
                        if describe {
                            msg::describe(b, b'P', "");
                        }
                        msg::execute(b, "", 0);
                    },
                ));
            }
            20 => {
                let name = self.some_statement();
                self.steps
                    .push(Step::extended(&format!("Describe S {name}"), |b| {
                        msg::describe(b, b'S', &name)
                    }));
            }
            21 => {
                let name = self.some_statement();
                self.prepared.retain(|n| *n != name);
                self.steps
                    .push(Step::extended(&format!("Close S {name}"), |b| {
                        msg::close(b, b'S', &name)
                    }));
            }
            22 => {
                let name = self.some_statement();
                self.prepared.retain(|n| *n != name);
                let sql = if self.rng.chance(50) {
                    format!("DEALLOCATE {name}")
                } else {
                    format!("DEALLOCATE PREPARE \"{name}\"")
                };
                self.q(&sql);
            }
            23 if self.rng.chance(30) => {
                self.prepared.clear();
                self.q("DEALLOCATE ALL");
            }
            24 => {
                let k = self.key();
                let sql = format!("INSERT INTO {t} VALUES ($1, 'unnamed') RETURNING id");
                self.steps
                    .push(Step::extended(&format!("unnamed {sql:?} ({k})"), |b| {
                        msg::parse(b, "", sql.as_bytes());
                        msg::bind(b, "", "", &[&k]);
                        msg::execute(b, "", 0);
                    }));
            }
            25 => {
                let (k1, k2) = (self.key(), self.some_key());
                let ins = format!("INSERT INTO {t} VALUES ($1, 'two')");
                let sel = format!("SELECT count(*) FROM {t} WHERE id <= $1");
                self.steps.push(Step::extended(
                    &format!("two statements in one Sync ({k1}, {k2})"),
                    |b| {
                        msg::parse(b, "", ins.as_bytes());
                        msg::bind(b, "", "", &[&k1]);
                        msg::execute(b, "", 0);
                        msg::parse(b, "", sel.as_bytes());
                        msg::bind(b, "", "", &[&k2]);
                        msg::describe(b, b'P', "");
                        msg::execute(b, "", 0);
                    },
                ));
            }
            26 => {
                let (a, b) = (self.key(), self.key());
                let rows = format!("{a}\tcopied\n{b}\tcopied\n");
                self.steps.push(Step::copy_in(
                    &format!("COPY {t} (id, v) FROM STDIN"),
                    &rows,
                ));
            }
            27 => self.q(&format!(
                "COPY (SELECT id, v FROM {t} ORDER BY id) TO STDOUT"
            )),
            28 if self.in_tx => {
                let c = format!("c{}", self.next_name);
                self.next_name += 1;
                self.cursors.push(c.clone());
                self.q(&format!(
                    "DECLARE {c} CURSOR FOR SELECT id FROM {t} ORDER BY id"
                ));
            }
            29 if !self.cursors.is_empty() => {
                let c = self.cursors[0].clone();
                self.q(&format!("FETCH 2 FROM {c}"));
            }
            30 => {
                let (k, v) = (self.key(), self.some_key());
                self.q(&format!(
                    "INSERT INTO {t} VALUES ({k}, 'multi'); SELECT count(*) FROM {t} WHERE id < {v}"
                ));
            }
            31 => {
                let col = format!("c{}", self.next_name);
                self.next_name += 1;
                self.q(&format!("ALTER TABLE {t} ADD COLUMN {col} int"));
            }
            32 => {
                // Text in a single-byte encoding: an identifier PostgreSQL quotes back in its
                // error message, and a value.
                self.q("SET client_encoding = 'LATIN9'");
                self.steps
                    .push(Step::query_bytes(b"SELECT 1 FROM \"foo\xa4bar\""));
                self.steps.push(Step::query_bytes(b"SELECT 'caf\xe9 \xa4'"));
                self.q("RESET client_encoding");
            }
            33 if !self.in_tx => self.q("DISCARD ALL"),
            34 => self.q(""),
            35 if session_state => {
                if !self.temp {
                    self.temp = true;
                    self.q("CREATE TEMP TABLE tmp (x int)");
                } else {
                    self.q("INSERT INTO tmp VALUES (1)");
                }
            }
            36 if session_state => {
                let lock = self.lock;
                let f = [
                    "pg_advisory_lock",
                    "pg_advisory_unlock",
                    "pg_try_advisory_lock",
                ];
                let i = self.rng.below(3) as usize;
                self.q(&format!("SELECT {}({lock})", f[i]));
            }
            37 if session_state => {
                let ch = self.channel.clone();
                let sql = match self.rng.below(3) {
                    0 => format!("LISTEN {ch}"),
                    1 => format!("NOTIFY {ch}, 'n{}'", self.next_key),
                    _ => "UNLISTEN *".into(),
                };
                self.q(&sql);
            }
            38 if flush => {
                // A pipeline without Sync: the answer must come as the server executes.
                let k = self.key();
                let sql = format!("INSERT INTO {t} VALUES ($1, 'flushed')");
                self.steps.push(Step::flushed(
                    &format!("unnamed {sql:?} ({k})"),
                    b'C',
                    |b| {
                        msg::parse(b, "", sql.as_bytes());
                        msg::bind(b, "", "", &[&k]);
                        msg::execute(b, "", 0);
                    },
                ));
                self.steps.push(Step::extended("", |_| {}));
            }
            39 => {
                let k = self.some_key();
                self.q(&format!("UPDATE {t} SET v = v || '+' WHERE id = {k}"));
            }
            _ => {}
        }
    }
}
