//! Proptest versions of the fuzz targets' properties (`fuzz/`, docs/TESTING.md
//! "Fuzzing") that CI did not already have: the saved state file's decoder,
//! the control API's JSON bodies, packet open, and fragment reassembly under
//! arbitrary chunk sequences and times. The JSON-B decoder and the STUN
//! responder have theirs in `tests/codec_properties.rs` and
//! `src/proto/stun/tests.rs`; our AES-GCM is checked against `aes_gcm` on
//! random inputs in `src/packet/gcm.rs`.
//!
//! Each property runs the fuzz target's own check (`fuzz/src/checks.rs`,
//! included by path) on generated input, so both assert the same thing.

use mpp::control::{MAX_CREDENTIAL_TTL_SECS, MIN_CREDENTIAL_TTL_SECS};
use mpp::node::snapshot;
use mpp::packet::{Fragments, FRAGMENT_TIMEOUT_MS, MAX_FRAGMENT_DATA};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

#[allow(unreachable_pub, dead_code)]
#[path = "../fuzz/src/checks.rs"]
mod checks;

use checks::Input;

/// Bytes of any value, lengths up to `max`.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

/// A JSON value of the kinds a body's fields may hold, well-formed or not.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[a-z@.]{0,12}".prop_map(Value::from),
        4 => "[0-9a-fA-F]{0,70}".prop_map(Value::from),
        1 => any::<String>().prop_map(Value::from),
        1 => "(00)*".prop_map(Value::from),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        2 => prop_oneof![
            any::<u64>(),
            0..2 * MAX_CREDENTIAL_TTL_SECS,
            Just(MIN_CREDENTIAL_TTL_SECS - 1),
            Just(MAX_CREDENTIAL_TTL_SECS + 1),
        ]
        .prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(|f| json!(f)),
    ]
}

/// An object with some of `keys` (and sometimes one more), each of a value
/// from `value`.
fn object(
    keys: &'static [&'static str],
    value: impl Strategy<Value = Value>,
) -> impl Strategy<Value = Value> {
    let entries = prop::collection::vec((prop::sample::select(keys), value), 0..4);
    (entries, prop::option::weighted(0.1, "[a-z_]{1,10}")).prop_map(|(entries, extra)| {
        let mut map = Map::new();
        for (k, v) in entries {
            map.insert(k.to_owned(), v);
        }
        if let Some(extra) = extra {
            map.insert(extra, Value::Null);
        }
        Value::Object(map)
    })
}

/// A notify body: one notification, or a batch of entries, right or wrong.
fn notify_body() -> impl Strategy<Value = Value> {
    let entry = object(&["account", "bitmask"], field_value());
    let list = prop::collection::vec(entry, 0..5).prop_map(Value::from);
    let value = prop_oneof![3 => field_value(), 2 => list];
    object(&["account", "bitmask", "notifications"], value)
}

/// The body as sent: compact or pretty JSON, rarely with a byte changed.
fn as_sent(v: Value, pretty: bool, flip: Option<(usize, u8)>) -> Vec<u8> {
    let mut b = if pretty {
        serde_json::to_vec_pretty(&v).expect("json")
    } else {
        serde_json::to_vec(&v).expect("json")
    };
    if let Some((at, x)) = flip {
        if !b.is_empty() {
            let at = at % b.len();
            b[at] ^= x;
        }
    }
    b
}

/// A message's fragments (`Fragments::new`) as reassembler program steps:
/// one push each, in the given order, each `gap` ms after the last.
fn push_steps(message: &[u8], id: u16, order: &[usize], gap: u8) -> Vec<u8> {
    let chunks: Vec<Vec<u8>> = Fragments::new(message, id)
        .expect("fits")
        .map(|c| c.to_vec())
        .collect();
    let mut program = Vec::new();
    for &i in order {
        let chunk = &chunks[i % chunks.len()];
        // op: small time step (1 << 5), raw header (0x10), full id (0x08), push (0).
        program.extend_from_slice(&[0x20 | 0x18, gap]);
        program.extend_from_slice(&chunk[1..3]); // id
        program.extend_from_slice(&[chunk[0], chunk[3], chunk[4]]); // marker, index, count
                                                                    // The check writes `len * 5` bytes of value `index`: it checks order
                                                                    // and bounds, not the fragmenter's own bytes.
        program.push(((chunk.len() - 5) / 5).min(255) as u8);
    }
    program
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// State file: arbitrary bytes, unsigned (refused before the parser) or
    /// signed (the parser behind the MAC), never panic; what decodes is
    /// consistent and re-encodes to the same records.
    #[test]
    fn state_file_arbitrary_bytes(mode in 0u8..2, body in bytes(600)) {
        checks::state_file(&[&[mode][..], &body].concat());
    }

    /// State file: a body that starts as a valid header, then anything.
    #[test]
    fn state_file_valid_header_then_anything(
        counts in (0u64..4, 0u64..4),
        rest in bytes(400),
    ) {
        let mut body = b"MPPSTATE".to_vec();
        body.extend_from_slice(&snapshot::VERSION.to_le_bytes());
        body.extend_from_slice(&[0u8; 8 + 4 + 4 + 8 + 8]);
        body.extend_from_slice(&counts.0.to_le_bytes());
        body.extend_from_slice(&counts.1.to_le_bytes());
        body.extend_from_slice(&rest);
        checks::state_file(&[&[1u8][..], &body].concat());
    }

    /// State file: records written as a valid file decode to exactly
    /// themselves; the same file mutated and re-signed never panics.
    #[test]
    fn state_file_valid_then_mutated(description in bytes(1200)) {
        checks::state_file(&[&[2u8][..], &description].concat());
        let state = checks::arbitrary_state(&mut Input::new(&description));
        let file = checks::encode_state(&state, checks::fuzz_master());
        let decoded = snapshot::decode_state(&file, checks::fuzz_master());
        prop_assert!(decoded.is_ok(), "{:?}", decoded.err());
    }

    /// `POST /v1/notify` bodies, near-valid JSON of every shape.
    #[test]
    fn notify_bodies(
        v in notify_body(),
        pretty in any::<bool>(),
        flip in prop::option::weighted(0.1, (any::<usize>(), 1u8..)),
    ) {
        checks::notify_body(&as_sent(v, pretty, flip));
    }

    /// `POST /v1/notify`: a batch of valid entries is read as sent.
    #[test]
    fn notify_batches_are_read_in_order(
        entries in prop::collection::vec(("[a-z]{1,20}", "[0-9a-f]{2}(00)?"), 1..20),
    ) {
        let list: Vec<Value> = entries
            .iter()
            .map(|(a, b)| json!({ "account": a, "bitmask": format!("{b}01") }))
            .collect();
        let body = serde_json::to_vec(&json!({ "notifications": list })).expect("json");
        let batch = <dyn mpp::control::NodeApi>::parse_notify_body(&body);
        prop_assert!(batch.is_ok(), "{:?}", batch);
        prop_assert_eq!(batch.map(|b| b.len()), Ok(entries.len()));
        checks::notify_body(&body);
    }

    /// `POST /v1/credentials` bodies, near-valid JSON of every shape.
    #[test]
    fn credentials_bodies(
        v in object(&["account", "device", "ttl_secs"], field_value()),
        pretty in any::<bool>(),
        flip in prop::option::weighted(0.1, (any::<usize>(), 1u8..)),
    ) {
        checks::credentials_body(&as_sent(v, pretty, flip));
    }

    /// Both bodies: arbitrary bytes.
    #[test]
    fn http_bodies_arbitrary_bytes(data in bytes(300)) {
        checks::http_bodies(&data);
    }

    /// Packet open: arbitrary datagrams, and seal → open → tamper.
    #[test]
    fn packet_open_and_tamper(mode in 0u8..2, rest in bytes(1300)) {
        checks::packet_open(&[&[mode][..], &rest].concat());
    }

    /// Reassembly: any program of pushes, expiries, polls and clears at any
    /// times keeps at most 4 messages and answers every chunk as its
    /// header calls for.
    #[test]
    fn reassembler_programs(program in bytes(2000)) {
        checks::reassembler(&program);
    }

    /// Reassembly: two real messages' chunks, interleaved in any order with
    /// duplicates, at gaps that may pass the 2 s timeout, under the same
    /// checks.
    #[test]
    fn reassembler_interleaved_messages(
        a in 1usize..4 * MAX_FRAGMENT_DATA,
        b in 1usize..4 * MAX_FRAGMENT_DATA,
        order_a in prop::collection::vec(0usize..16, 1..12),
        order_b in prop::collection::vec(0usize..16, 1..12),
        gap in prop_oneof![Just(0u8), 1u8..=255],
    ) {
        prop_assume!(u64::from(gap) * 16 < 4 * FRAGMENT_TIMEOUT_MS);
        let mut program = vec![0u8; 8];
        let steps_a = push_steps(&vec![1; a], 7, &order_a, gap);
        let steps_b = push_steps(&vec![2; b], 8, &order_b, gap);
        let step = 8; // bytes per push step
        for i in 0..steps_a.len().max(steps_b.len()) / step {
            for steps in [&steps_a, &steps_b] {
                if let Some(s) = steps.get(i * step..(i + 1) * step) {
                    program.extend_from_slice(s);
                }
            }
        }
        checks::reassembler(&program);
    }
}
