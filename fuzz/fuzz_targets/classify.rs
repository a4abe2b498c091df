//! Fuzzes the SQL lexer and classifier: any text must classify without panicking, and the
//! lexer must always make progress.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgpilot::router::classify::{FunctionRules, analyze};
use pgpilot::router::lexer::Lexer;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    let rules = FunctionRules::default();
    let a = analyze(sql, &rules);
    assert!(a.statements <= sql.len());
    assert!(Lexer::new(sql).count() <= sql.len());
});
