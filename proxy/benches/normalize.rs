//! Micro-benchmark: path normalisation, which every request pays before routing. A typical path
//! is already normal (one scan, no copy); a dirty one takes the decoding and dot-segment path.
//! `request_target` includes rebuilding the request URI when the path changed.
//!
//!   cargo bench -p trellis-proxy --bench normalize

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Uri;
use trellis_proxy::http::normalize::{EscapedSlashes, Normalized, normalize, request_target};

fn bench(c: &mut Criterion) {
    let cases = [
        ("typical", "/api/v1/users/12345/orders/67890"),
        (
            "dirty",
            "/api/v1/%75sers/./12345//orders/../%6Frders/%c3%a9/67890",
        ),
    ];
    let mut g = c.benchmark_group("normalize");
    for (name, path) in cases {
        assert!(matches!(
            normalize(path, EscapedSlashes::Reject),
            Normalized::Path(_)
        ));
        g.bench_function(name, |b| {
            b.iter(|| black_box(normalize(black_box(path), EscapedSlashes::Reject)))
        });
    }
    for (name, path) in cases {
        let uri: Uri = format!("{path}?q=1").parse().unwrap();
        g.bench_function(format!("{name}_request_target"), |b| {
            b.iter_batched(
                || uri.clone(),
                |mut uri| {
                    let _ = black_box(request_target(&mut uri, EscapedSlashes::Reject));
                    uri
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
