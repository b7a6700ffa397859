//! The TLS ClientHello parser fed as reads arrive: the first two bytes of the input choose where
//! the rest is cut into reads. The incremental parse must give what a one-shot parse of the same
//! bytes gives, and look at each byte a bounded number of times whatever the cuts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::l4::sni::{HelloParser, Parse, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    let [a, b, hello @ ..] = data else {
        return;
    };
    // xorshift from the two bytes: read sizes of 1..=64 bytes, or 1..=4 for a slow drip.
    let mut state = u32::from(*a) << 8 | u32::from(*b) | 1 << 16;
    let max_read = if a & 1 == 1 { 4 } else { 64 };
    let mut parser = HelloParser::default();
    let mut end = 0;
    let mut calls = 0usize;
    let incremental = loop {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        end = (end + 1 + state as usize % max_read).min(hello.len());
        calls += 1;
        match parser.advance(&hello[..end]) {
            Parse::NeedMore if end < hello.len() => continue,
            other => break other,
        }
    };
    let one_shot = parse_client_hello(hello);
    // Done and Invalid are decided by the bytes seen so far, so more input cannot change them.
    assert_eq!(incremental, one_shot, "cut into {calls} reads");
    assert!(
        parser.examined <= 2 * hello.len() + 5 * calls,
        "examined {} bytes of {} in {calls} reads",
        parser.examined,
        hello.len()
    );
});
