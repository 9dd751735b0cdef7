//! The byte-exact vectors of PROTOCOL.md §1: each `.hex` and `.json` pair must
//! convert into each other in both directions.

use mpp::codec::Message;

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
