//! Arbitrary bytes as a captured connection's first bytes, fed to protocol detection as reads
//! would deliver them: never a panic, a decision that never changes once made, and no prefix
//! longer than the detection buffer left undecided.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_proxy::capture::detect::{Detection, MAX_PREFIX, detect};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_PREFIX)];
    let mut decided = None;
    for n in 0..=data.len() {
        match (detect(&data[..n]), decided) {
            (Detection::NeedMore, None) => {}
            (Detection::NeedMore, Some(d)) => panic!("undecided again after {d:?} at {n}"),
            (d, None) => decided = Some(d),
            (d, Some(before)) => assert_eq!(d, before, "changed at {n}"),
        }
    }
    if data.len() == MAX_PREFIX {
        assert!(decided.is_some(), "a full buffer left undecided");
    }
});
