//! Packet crypto: per-packet key derivation, seal and open of a heartbeat-sized packet.
//! On the AES-GCM path the process runs (printed first; `MPP_CRYPTO=portable`
//! benches the RustCrypto path, `src/packet/mod.rs`).
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use mpp::packet::{open_in_place, seal_in_place, ConnId, Direction, MasterKey, HEADER_LEN};

fn crypto(c: &mut Criterion) {
    eprintln!(
        "AES-GCM implementation: {}",
        mpp::packet::aes_gcm_implementation()
    );
    let master = MasterKey::new([7; 32]);
    let conn_id = ConnId([1, 2, 3, 4, 0xff, 0x8d, 0x98, 0x19]);
    // The heartbeat vector's plaintext (48 bytes).
    let plaintext = hex::decode(
        "7bb41150726573656e63654865617274626561747bb40653657269616ca005b40b41636b6e6f776c65646765a0037d7d",
    )
    .expect("hex");
    let key = master.packet_key(conn_id, Direction::ClientToServer);
    let mut buf = [0u8; 1232];
    buf[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(&plaintext);
    let sealed_len =
        seal_in_place(&key, conn_id, [9; 12], &mut buf, plaintext.len()).expect("seal");
    let sealed = buf[..sealed_len].to_vec();

    c.bench_function("crypto/derive_packet_key", |b| {
        b.iter(|| master.packet_key(black_box(conn_id), Direction::ClientToServer))
    });
    c.bench_function("crypto/derive_both_keys", |b| {
        b.iter(|| {
            let s = master.expanded_secret(black_box(conn_id));
            (
                s.key(Direction::ClientToServer),
                s.key(Direction::ServerToClient),
            )
        })
    });
    c.bench_function("crypto/seal_heartbeat", |b| {
        let mut out = [0u8; 1232];
        b.iter(|| {
            out[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(&plaintext);
            seal_in_place(&key, conn_id, [9; 12], &mut out, black_box(plaintext.len()))
        })
    });
    c.bench_function("crypto/open_heartbeat", |b| {
        let mut scratch = [0u8; 1232];
        b.iter(|| {
            scratch[..sealed.len()].copy_from_slice(&sealed);
            open_in_place(&key, black_box(&mut scratch[..sealed.len()])).map(|p| p.len())
        })
    });
}

criterion_group!(benches, crypto);
criterion_main!(benches);
