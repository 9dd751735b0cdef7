//! The byte-exact vectors of docs/PROTOCOL.md §1: each `.hex` and `.json` pair must
//! convert into each other in both directions. The vectors with a DateTime
//! (`connect-response`, `notify`) hold it as the reference writer writes it,
//! JSON text `22 "…" 22`; the form this project wrote before, `80 14 …`, is
//! read by the liberal decoder only.

use mpp::codec::{DecodeError, Message};

fn vector(name: &str, ext: &str) -> String {
    let path = format!("{}/tests/vectors/{name}.{ext}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const NAMES: [&str; 4] = ["heartbeat", "connect", "connect-response", "notify"];

#[test]
fn hex_decodes_to_the_json_text() {
    for name in NAMES {
        let bytes = hex::decode(vector(name, "hex").trim()).expect("hex");
        let message = Message::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            message.to_json_pretty(),
            vector(name, "json").trim_end(),
            "{name}: JSON text differs"
        );
    }
}

#[test]
fn json_encodes_to_the_hex_bytes() {
    for name in NAMES {
        let message =
            Message::from_json_str(&vector(name, "json")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            hex::encode(message.to_vec()),
            vector(name, "hex").trim(),
            "{name}: JSON-B differs"
        );
    }
}

#[test]
fn one_line_text_form() {
    let bytes = hex::decode(vector("heartbeat", "hex").trim()).expect("hex");
    assert_eq!(
        Message::decode(&bytes).expect("decodes").to_json_string(),
        r#"{"PresenceHeartbeat":{"Serial":5,"Acknowledge":3}}"#
    );
}

/// The vectors that hold a DateTime (`Now`).
const WITH_DATETIME: [&str; 2] = ["connect-response", "notify"];

/// `B4 03 "Now"`: the field name in front of each vector's DateTime.
const NOW: &[u8] = b"\xb4\x03Now";

/// The vector's bytes with `Now` rewritten as this project wrote it before
/// the reference check: the JSON-B string `80 14 …` instead of `22 … 22`.
fn with_string_datetime(bytes: &[u8]) -> Vec<u8> {
    let at = bytes
        .windows(NOW.len())
        .position(|w| w == NOW)
        .expect("a Now field")
        + NOW.len();
    let quoted = &bytes[at..at + 22];
    assert_eq!((quoted[0], quoted[21]), (b'"', b'"'), "{quoted:02x?}");
    let mut out = bytes.to_vec();
    out.splice(at..at + 22, [&[0x80, 20][..], &quoted[1..21]].concat());
    out
}

#[test]
fn datetime_is_json_text_as_the_reference_writes_it() {
    for name in WITH_DATETIME {
        let hex = vector(name, "hex");
        let quoted = format!(
            "{}22{}22",
            hex::encode(NOW),
            hex::encode("2026-11-21T12:00:00Z")
        );
        assert!(hex.contains(&quoted), "{name}: no quoted Now");
        assert!(!hex.contains("8014"), "{name}: a JSON-B string of 20 bytes");
    }
}

#[test]
fn the_liberal_decoder_reads_every_vector_as_the_strict_one_does() {
    for name in NAMES {
        let bytes = hex::decode(vector(name, "hex").trim()).expect("hex");
        assert_eq!(
            Message::decode_liberal(&bytes),
            Message::decode(&bytes),
            "{name}"
        );
    }
}

#[test]
fn string_datetime_is_read_liberally_and_refused_strictly() {
    for name in WITH_DATETIME {
        let bytes = hex::decode(vector(name, "hex").trim()).expect("hex");
        let old = with_string_datetime(&bytes);
        assert_eq!(old.len(), bytes.len(), "{name}: both forms are 22 bytes");
        let message = Message::decode_liberal(&old).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            message.to_json_pretty(),
            vector(name, "json").trim_end(),
            "{name}: JSON text differs"
        );
        assert_eq!(
            message.to_vec(),
            bytes,
            "{name}: re-encoded in the new form"
        );
        assert_eq!(Message::decode(&old), Err(DecodeError::WrongType), "{name}");
    }
}
