//! Arbitrary text as a bootstrap file, through what reading one does after the file is read:
//! the size, depth and alias limits, parsing, then validation. Bad input must be an error (with
//! a message), never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::config::{
    bootstrap,
    limits::{self, Limits},
    validate,
};

fuzz_target!(|data: &[u8]| {
    // The loader refuses a file that is not UTF-8 before looking at it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits::DEFAULT;
    if text.len() as u64 > limits.max_bytes {
        return;
    }
    if let Err(e) = limits::check_text(text, &limits) {
        assert!(!e.to_string().is_empty());
        return;
    }
    let parsed = match bootstrap::parse(text) {
        Ok(p) => p,
        Err(message) => {
            assert!(!message.is_empty());
            return;
        }
    };
    match validate::validate(parsed) {
        Ok(_) => {}
        Err(errors) => assert!(!errors.0.is_empty(), "an empty error list"),
    }
});
