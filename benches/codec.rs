//! JSON-B encode and decode of the two hottest messages, the heartbeat and the
//! notify, built from their test vectors (docs/PROTOCOL.md §1).
//!
//! Benchmarks are named `codec/<vector>/<decode|encode>`; throughput is the
//! message's wire size. Run with `cargo bench --bench codec`.

use std::hint::black_box;

use criterion::{criterion_main, Criterion, Throughput};
use mpp::codec::Message;

/// Largest client packet (docs/PROTOCOL.md §3): the encode buffer lives on the stack.
const MAX_PACKET: usize = 1232;

/// The vectors benchmarked: client → service and service → client.
const VECTORS: [&str; 2] = ["heartbeat", "notify"];

/// The wire bytes of `tests/vectors/<name>.hex`.
fn vector(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/vectors/{name}.hex", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    hex::decode(text.trim()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `codec/<vector>/decode` and `codec/<vector>/encode` for each vector.
fn codec(c: &mut Criterion) {
    for name in VECTORS {
        let bytes = vector(name);
        let message = Message::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));

        let mut group = c.benchmark_group(format!("codec/{name}"));
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function("decode", |b| b.iter(|| Message::decode(black_box(&bytes))));
        group.bench_function("encode", |b| {
            let mut buf = [0u8; MAX_PACKET];
            b.iter(|| black_box(&message).encode(black_box(&mut buf)))
        });
        group.finish();
    }
}

/// Every benchmark of this file, configured from the command line. Written out
/// instead of `criterion_group!`, whose generated `pub fn` cannot carry a doc comment.
fn benches() {
    let mut criterion = Criterion::default().configure_from_args();
    codec(&mut criterion);
}

criterion_main!(benches);
