//! Fuzzes the tagged-message decoder and the typed views built on it: any byte stream must
//! decode into frames or a clean error, never a panic, and never consume bytes it did not frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgpilot::protocol::backend::{ErrorFields, ReadyForQuery, parse_backend_key, parse_parameter_status};
use pgpilot::protocol::frontend::{parse_password, parse_query, parse_sasl_initial};
use pgpilot::protocol::FrameCodec;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(64 * 1024);
    let mut buf = BytesMut::new();
    // Feed in two pieces to exercise partial frames.
    let split = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    for piece in [&data[..split], &data[split..]] {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert_eq!(before - buf.len(), frame.raw().len());
                    let _ = ReadyForQuery::parse(&frame);
                    let _ = parse_backend_key(&frame);
                    let _ = parse_parameter_status(&frame);
                    let _ = ErrorFields::parse(&frame);
                    let _ = parse_query(&frame);
                    let _ = parse_sasl_initial(&frame);
                    let _ = parse_password(&frame);
                }
                Ok(None) => {
                    assert_eq!(before, buf.len());
                    break;
                }
                Err(_) => return,
            }
        }
    }
});
