//! Arbitrary bytes as discovery responses from the control plane: up to four protobuf messages,
//! each prefixed by its length as two little-endian bytes (the last one takes what is left),
//! decoded as `DeltaDiscoveryResponse` and applied in order with the checks the discovery client
//! runs on each resource. Never a panic; every refusal names its resource and says why.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use trellis_proto::discovery::v1::DeltaDiscoveryResponse;
use trellis_proxy::fuzzing::apply_discovery;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut responses = Vec::new();
    while !rest.is_empty() && responses.len() < 4 {
        let frame = match rest {
            [lo, hi, tail @ ..] if responses.len() < 3 => {
                let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
                rest = &tail[len..];
                &tail[..len]
            }
            _ => std::mem::take(&mut rest),
        };
        // A message that does not decode is a stream error for the client, not an update.
        let Ok(resp) = DeltaDiscoveryResponse::decode(frame) else {
            return;
        };
        responses.push(resp);
    }
    for refused in apply_discovery(&responses) {
        assert!(!refused.resource.is_empty() && !refused.reason.is_empty());
        assert!(refused.to_string().contains(&refused.resource));
    }
});
