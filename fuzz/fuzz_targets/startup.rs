//! Fuzzes the startup-packet decoder (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest) and the SCRAM server's message parsing.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgpilot::auth::scram::{ScramExchange, ScramVerifier};
use pgpilot::protocol::startup::decode_startup;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = decode_startup(&mut buf) {}
    if let Ok(exchange) = ScramExchange::start(ScramVerifier::mock("fuzz"), data) {
        let _ = exchange.finish(data);
    }
});
