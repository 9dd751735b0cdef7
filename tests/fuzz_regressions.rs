//! Every input a fuzz target (`fuzz/`, see `fuzz/README.md`) found a crash
//! with, kept: each file of `tests/fuzz_regressions/<target>/` runs through
//! the target's own check (`fuzz/src/checks.rs` and `gcm_checks.rs`,
//! included here by path), so it asserts no panic and the target's
//! property, exactly as the fuzzer did.
//! docs/TESTING.md, "Fuzzing", says what each one found.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[allow(unreachable_pub, dead_code)]
#[path = "../fuzz/src/checks.rs"]
mod checks;

#[allow(unreachable_pub)]
#[path = "../fuzz/src/gcm_checks.rs"]
mod gcm_checks;

/// Runs every input kept for `target` through `check`; names each that fails.
fn run(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(target);
    let mut inputs: Vec<_> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .map(|e| e.expect("directory entry").path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    inputs.sort();
    let mut failed = Vec::new();
    for path in &inputs {
        let bytes = fs::read(path).expect("readable input");
        if catch_unwind(AssertUnwindSafe(|| check(&bytes))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(failed.is_empty(), "{target}: failing inputs: {failed:?}");
}

#[test]
fn jsonb_decode() {
    run("jsonb_decode", checks::jsonb_decode);
}

#[test]
fn packet_open() {
    run("packet_open", checks::packet_open);
}

#[test]
fn reassembler() {
    run("reassembler", checks::reassembler);
}

#[test]
fn stun() {
    run("stun", checks::stun);
}

#[test]
fn http_bodies() {
    run("http_bodies", checks::http_bodies);
}

#[test]
fn state_file() {
    run("state_file", checks::state_file);
}

#[test]
fn aes_gcm_diff() {
    run("aes_gcm_diff", gcm_checks::aes_gcm_diff);
}

/// The fuzzers' seed and corpus inputs are not kept, but these few made by
/// hand make sure each check runs its main paths here too.
#[test]
fn hand_made_inputs_pass() {
    // A JSON-B heartbeat: {"PresenceHeartbeat":{"Serial":1}}.
    let mut heartbeat = vec![b'{', 0xB4, 17];
    heartbeat.extend_from_slice(b"PresenceHeartbeat");
    heartbeat.extend_from_slice(&[b'{', 0xB4, 6]);
    heartbeat.extend_from_slice(b"Serial");
    heartbeat.extend_from_slice(&[0xA0, 1, b'}', b'}']);
    checks::jsonb_decode(&heartbeat);
    // Seal, open, tamper.
    let mut packet = vec![1u8];
    packet.extend_from_slice(&[7; 8 + 12]);
    packet.extend_from_slice(&[0, 3, 0x20]);
    packet.extend_from_slice(b"hello");
    checks::packet_open(&packet);
    checks::packet_open(&[0; 60]);
    // Two chunks of one message, then an expiry.
    let program = [
        0u8, 0, 0, 0, 0, 0, 0, 0, // start time
        0x00, 1, 2, 0, 10, // push id 1, 2 chunks, chunk 0, 50 bytes
        0x00, 1, 2, 1, 3, // chunk 1, 15 bytes: delivered
        0x45, 200, // 3.2 s later: expire
    ];
    checks::reassembler(&program);
    // An RFC 5769-style Binding request from 192.0.2.1:3478.
    let mut stun = vec![0u8, 0x0D, 0x96, 192, 0, 2, 1];
    stun.extend_from_slice(&[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42]);
    stun.extend_from_slice(&[0xB7; 12]);
    checks::stun(&stun);
    checks::http_bodies(b"\x00{\"account\":\"a@example.com\",\"bitmask\":\"0100\"}");
    checks::http_bodies(b"\x01{\"account\":\"a\",\"device\":\"d\",\"ttl_secs\":3600}");
    // A structured state file of a few records, then mutated.
    let state: Vec<u8> = (0..400u32).map(|i| (i * 37 % 251) as u8).collect();
    checks::state_file(&[&[2u8][..], &state].concat());
    checks::state_file(&[&[1u8][..], b"MPPSTATE"].concat());
    // Key, nonce, conn id, position, mask, no AAD, a 40-byte text.
    let mut gcm: Vec<u8> = (0..32 + 12 + 8 + 2 + 1 + 1 + 40).map(|i| i as u8).collect();
    gcm[55] = 0;
    gcm_checks::aes_gcm_diff(&gcm);
}
