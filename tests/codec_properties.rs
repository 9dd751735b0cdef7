//! Properties of the JSON-B codec (docs/PROTOCOL.md §1–§2) over every message type,
//! plus one hand-written case for each rejection and acceptance §1 lists.
//!
//! The generated messages cover all 14 variants with any subset of their fields
//! set: strings of any Unicode, binaries of any bytes, integers over the whole
//! `i64` range (with the width boundaries made likely), DateTimes over years
//! 0000..=9999 and endpoints of both address families. The properties: both
//! encodings round-trip, no input makes either decoder (strict or liberal)
//! panic, and a valid encoding cut short or followed by anything is refused.
//!
//! A DateTime is written as JSON text inside JSON-B (`22 "…" 22`, the
//! reference writer's form). Properties of that form: the liberal decoder
//! reads it and the older JSON-B string form (`80 14 …`) to the same value,
//! the strict one only the former; any string written as JSON text by
//! serde_json is read back by the liberal decoder; malformed JSON text
//! (unterminated, a bad escape, a raw control character, invalid UTF-8) is
//! an error in every position and mode, never a panic.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mpp::codec::{
    ClientHeader, DecodeError, EncodeError, Message, PresenceAcknowledge, PresenceConnectRequest,
    PresenceConnectResponse, PresenceDisconnectRequest, PresenceDisconnectResponse,
    PresenceEndpointRequest, PresenceEndpointResponse, PresenceErrorInvalidSerial,
    PresenceErrorRefused, PresenceHeartbeat, PresenceNotify, PresenceResolveRequest,
    PresenceResolveResponse, PresenceStatus, ServiceHeader,
};
use mpp::time::UnixSeconds;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::json;

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// First second of year 0000 (the smallest wire DateTime).
const MIN_DATETIME: i64 = -62_167_219_200;
/// Last second of year 9999 (the largest wire DateTime).
const MAX_DATETIME: i64 = 253_402_300_799;

/// A string of any Unicode scalar values.
fn text() -> impl Strategy<Value = Cow<'static, str>> {
    any::<String>().prop_map(Cow::Owned)
}

/// A binary of any bytes, up to 64 of them.
fn binary() -> impl Strategy<Value = Cow<'static, [u8]>> {
    prop::collection::vec(any::<u8>(), 0..=64).prop_map(Cow::Owned)
}

/// Any `i64`, with the values around each JSON-B width boundary made likely.
fn int() -> impl Strategy<Value = i64> {
    const EDGES: [i64; 14] = [
        0,
        1,
        -1,
        0xFF,
        0x100,
        0xFFFF,
        0x1_0000,
        0xFFFF_FFFF,
        0x1_0000_0000,
        -0x100,
        -0x101,
        -0x1_0000_0000,
        i64::MAX,
        i64::MIN,
    ];
    prop_oneof![
        3 => any::<i64>(),
        1 => prop::sample::select(&EDGES[..]),
        1 => -70_000i64..70_000,
    ]
}

/// A DateTime in the four-digit-year range the wire form can express.
fn datetime() -> impl Strategy<Value = UnixSeconds> {
    (MIN_DATETIME..=MAX_DATETIME).prop_map(UnixSeconds)
}

/// A UDP endpoint, IPv4 or IPv6 (no flow info or scope id: the wire has neither).
fn endpoint() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(a, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(a, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port)),
    ]
}

/// An optional field: absent about a third of the time.
fn opt<S: Strategy>(s: S) -> impl Strategy<Value = Option<S::Value>> {
    prop::option::weighted(0.67, s)
}

/// The fields a client → service message inherits.
fn client_header() -> impl Strategy<Value = ClientHeader<'static>> {
    (opt(int()), opt(int()), opt(text()), opt(binary())).prop_map(
        |(serial, acknowledge, service, id)| ClientHeader {
            serial,
            acknowledge,
            service,
            id,
        },
    )
}

/// The fields a service → client message inherits.
fn service_header() -> impl Strategy<Value = ServiceHeader<'static>> {
    (
        opt(endpoint()),
        opt(datetime()),
        opt(int()),
        opt(int()),
        opt(int()),
        opt(text()),
        opt(binary()),
    )
        .prop_map(
            |(endpoint, now, acknowledge, status, status_extended, status_description, id)| {
                ServiceHeader {
                    endpoint,
                    now,
                    acknowledge,
                    status,
                    status_extended,
                    status_description,
                    id,
                }
            },
        )
}

/// A message of any of the 14 types, with any subset of its fields set.
fn message() -> impl Strategy<Value = Message<'static>> {
    prop_oneof![
        (
            client_header(),
            opt(text()),
            opt(text()),
            opt(datetime()),
            opt(binary())
        )
            .prop_map(|(header, account, device, expires, binding)| {
                Message::from(PresenceConnectRequest {
                    account,
                    device,
                    expires,
                    binding,
                    header,
                })
            }),
        client_header().prop_map(|header| Message::from(PresenceHeartbeat { header })),
        client_header().prop_map(|header| Message::from(PresenceEndpointRequest { header })),
        client_header().prop_map(|header| Message::from(PresenceAcknowledge { header })),
        (client_header(), opt(binary())).prop_map(|(header, dns_request)| {
            Message::from(PresenceResolveRequest {
                dns_request,
                header,
            })
        }),
        client_header().prop_map(|header| Message::from(PresenceDisconnectRequest { header })),
        (service_header(), opt(int()), opt(int()), opt(binary())).prop_map(
            |(header, connection_timeout, serial, bitmask)| {
                Message::from(PresenceConnectResponse {
                    connection_timeout,
                    serial,
                    bitmask,
                    header,
                })
            }
        ),
        (service_header(), opt(int()), opt(binary())).prop_map(|(header, serial, bitmask)| {
            Message::from(PresenceStatus {
                serial,
                bitmask,
                header,
            })
        }),
        service_header().prop_map(|header| Message::from(PresenceEndpointResponse { header })),
        (service_header(), opt(binary()), opt(int())).prop_map(|(header, bitmask, serial)| {
            Message::from(PresenceNotify {
                bitmask,
                serial,
                header,
            })
        }),
        (service_header(), opt(binary())).prop_map(|(header, dns_response)| {
            Message::from(PresenceResolveResponse {
                dns_response,
                header,
            })
        }),
        (service_header(), opt(int())).prop_map(|(header, serial)| {
            Message::from(PresenceErrorInvalidSerial { serial, header })
        }),
        service_header().prop_map(|header| Message::from(PresenceDisconnectResponse { header })),
        service_header().prop_map(|header| Message::from(PresenceErrorRefused { header })),
    ]
}

/// A byte likely to start or end a JSON-B item, so random inputs get past the first byte.
fn jsonb_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        1 => any::<u8>(),
        3 => prop::sample::select(&b"{}[]\"\\u\x00\x01\x05\x06\x11\x14\x80\x81\x83\x88\x8b\xa0\xa1\xa3\xa8\xab\xb0\xb1\xb2\xb4\xb5\xb7\xff"[..]),
    ]
}

/// One change to a byte string: overwrite, insert or delete at a position
/// (taken modulo the length when applied).
#[derive(Debug, Clone)]
enum Mutation {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), jsonb_byte()).prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<usize>(), jsonb_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<usize>().prop_map(Mutation::Delete),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::Set(i, b) if !bytes.is_empty() => {
            let i = i % bytes.len();
            bytes[i] = b;
        }
        Mutation::Insert(i, b) => {
            let i = i % (bytes.len() + 1);
            bytes.insert(i, b);
        }
        Mutation::Delete(i) if !bytes.is_empty() => {
            let i = i % bytes.len();
            bytes.remove(i);
        }
        _ => {}
    }
}

/// Neither decoder panics; the liberal one accepts whatever the strict one
/// does, as the same message; and whatever either accepts re-encodes into
/// something the strict one decodes to the same message.
fn decode_is_stable(bytes: &[u8]) -> Result<(), TestCaseError> {
    let strict = Message::decode(bytes);
    let liberal = Message::decode_liberal(bytes);
    if let Ok(m) = &strict {
        prop_assert_eq!(liberal.as_ref(), Ok(m));
    }
    if let Ok(m) = liberal {
        let again = m.to_vec();
        prop_assert_eq!(Message::decode(&again), Ok(m));
    }
    Ok(())
}

/// The message's DateTime field and its wire name: `Expires` of a connect
/// request, `Now` of every service → client message; `None` for the others.
fn datetime_slot<'m>(
    m: &'m mut Message<'static>,
) -> Option<(&'static str, &'m mut Option<UnixSeconds>)> {
    let header = match m {
        Message::ConnectRequest(c) => return Some(("Expires", &mut c.expires)),
        Message::ConnectResponse(r) => &mut r.header,
        Message::Status(r) => &mut r.header,
        Message::EndpointResponse(r) => &mut r.header,
        Message::Notify(r) => &mut r.header,
        Message::ResolveResponse(r) => &mut r.header,
        Message::ErrorInvalidSerial(r) => &mut r.header,
        Message::DisconnectResponse(r) => &mut r.header,
        Message::ErrorRefused(r) => &mut r.header,
        _ => return None,
    };
    Some(("Now", &mut header.now))
}

/// A message with a DateTime field set, the field's wire name and value.
fn message_with_datetime() -> impl Strategy<Value = (Message<'static>, &'static str, UnixSeconds)> {
    (message(), datetime()).prop_filter_map("no DateTime field", |(mut m, t)| {
        let (name, slot) = datetime_slot(&mut m)?;
        *slot = Some(t);
        Some((m, name, t))
    })
}

/// The encoding of `m` without its DateTime field, with `name` and `value`
/// (raw item bytes) spliced in as the body's last field instead.
fn with_datetime_as(m: &Message<'static>, name: &str, value: &[u8]) -> Vec<u8> {
    let mut without = m.clone();
    if let Some((_, slot)) = datetime_slot(&mut without) {
        *slot = None;
    }
    let mut bytes = without.to_vec();
    let at = bytes.len() - 2;
    bytes.splice(at..at, [&field(name)[..], value].concat());
    bytes
}

/// `s` as JSON text with every character escaped as `\uXXXX` (a surrogate
/// pair above U+FFFF): the opposite of serde_json's minimal escaping.
fn all_escaped(s: &str) -> Vec<u8> {
    let mut out = String::from("\"");
    for unit in s.encode_utf16() {
        out.push_str(&format!("\\u{unit:04x}"));
    }
    out.push('"');
    out.into_bytes()
}

/// Where a string field may stand, one per header kind and one of a message's own.
const STRING_FIELDS: [(&str, &str); 4] = [
    ("PresenceHeartbeat", "Service"),
    ("PresenceConnectRequest", "Account"),
    ("PresenceConnectRequest", "Device"),
    ("PresenceStatus", "StatusDescription"),
];

/// Escapes JSON does not define (each followed by the closing quote in a test).
const BAD_ESCAPES: &[&[u8]] = &[
    br"\x",
    br"\u12",
    br"\uZZZZ",
    br"\ud800",
    br"\udc00",
    br"\ud800\u0041",
    br"\U0041",
    b"\\\x01",
];

/// Bytes that are not UTF-8 (each followed by the closing quote in a test).
const NOT_UTF8: &[&[u8]] = &[b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80"];

/// One way JSON text can be malformed, and the error it must give.
fn malformed_text() -> impl Strategy<Value = (Vec<u8>, DecodeError)> {
    let bad_escape = prop::sample::select(BAD_ESCAPES);
    let utf8 = prop::sample::select(NOT_UTF8);
    (any::<String>(), any::<String>()).prop_flat_map(move |(before, after)| {
        let open = serde_json::to_vec(&before).expect("a string serializes");
        // `"before`, without its closing quote.
        let head = open[..open.len() - 1].to_vec();
        let tail = serde_json::to_vec(&after).expect("a string serializes")[1..].to_vec();
        let (h1, h2, h3) = (head.clone(), head.clone(), head.clone());
        prop_oneof![
            Just((head, DecodeError::Truncated)),
            // Closed right after the escape: `\u12` followed by `ab"` would be valid.
            bad_escape
                .clone()
                .prop_map(move |e| { ([&h1[..], e, b"\""].concat(), DecodeError::InvalidEscape) }),
            (0u8..0x20).prop_map(move |c| {
                (
                    [&h2[..], &[c], &tail].concat(),
                    DecodeError::ControlCharacter,
                )
            }),
            utf8.clone()
                .prop_map(move |b| { ([&h3[..], b, b"\""].concat(), DecodeError::InvalidUtf8) }),
        ]
    })
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

proptest! {
    /// (a) JSON-B: decode(encode(m)) == m, and `encode` reports the exact size it needs.
    #[test]
    fn jsonb_round_trip(m in message()) {
        let bytes = m.to_vec();
        let decoded = Message::decode(&bytes);
        prop_assert_eq!(decoded.as_ref(), Ok(&m));

        let mut exact = vec![0u8; bytes.len()];
        prop_assert_eq!(m.encode(&mut exact), Ok(bytes.len()));
        prop_assert_eq!(&exact, &bytes);
        let mut short = vec![0u8; bytes.len() - 1];
        prop_assert_eq!(m.encode(&mut short), Err(EncodeError { needed: bytes.len() }));
    }

    /// (b) JSON text: from_json(to_json(m)) == m, through a `Value` and through text.
    #[test]
    fn json_text_round_trip(m in message()) {
        prop_assert_eq!(Message::from_json(&m.to_json()), Ok(m.clone()));
        prop_assert_eq!(Message::from_json_str(&m.to_json_string()), Ok(m.clone()));
        prop_assert_eq!(Message::from_json_str(&m.to_json_pretty()), Ok(m));
    }

    /// (c) Arbitrary bytes never make the decoder panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        decode_is_stable(&bytes)?;
    }

    /// (c) Bytes drawn mostly from JSON-B's tags and brackets never make it panic either.
    #[test]
    fn tag_soup_never_panics(head in jsonb_byte(), rest in prop::collection::vec(jsonb_byte(), 0..200)) {
        let mut bytes = vec![b'{', head];
        bytes.extend(rest);
        decode_is_stable(&bytes)?;
    }

    /// (c) Valid encodings with a few random overwrites, insertions and deletions
    /// never make it panic, and what it still accepts is stable.
    #[test]
    fn mutated_encodings_never_panic(
        m in message(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let mut bytes = m.to_vec();
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        decode_is_stable(&bytes)?;
    }

    /// (d) Every strict prefix of a valid encoding is refused as cut short.
    #[test]
    fn every_truncation_is_refused(m in message()) {
        let bytes = m.to_vec();
        for n in 0..bytes.len() {
            let result = Message::decode(&bytes[..n]);
            prop_assert!(
                matches!(result, Err(DecodeError::Truncated | DecodeError::LengthPastEnd)),
                "prefix of {} of {} bytes gave {:?}", n, bytes.len(), result
            );
        }
    }

    /// (e) A valid encoding followed by any byte is refused.
    #[test]
    fn any_trailing_byte_is_refused(m in message(), extra in any::<u8>()) {
        let mut bytes = m.to_vec();
        bytes.push(extra);
        prop_assert_eq!(Message::decode(&bytes), Err(DecodeError::TrailingBytes));
    }

    /// (f) A DateTime is written as JSON text, `22`, the 20 characters, `22`;
    /// the liberal decoder reads that, the older JSON-B string `80 14 …` and a
    /// fully escaped JSON text to the same value; the strict one reads the
    /// JSON text forms and refuses the JSON-B string.
    #[test]
    fn both_datetime_forms_decode_to_the_same_value(
        (m, name, t) in message_with_datetime(),
    ) {
        let wire = t.to_wire();
        let text = std::str::from_utf8(&wire).expect("ASCII");
        let encoded = m.to_vec();
        let quoted_field = [&field(name)[..], b"\"", &wire, b"\""].concat();
        prop_assert!(
            encoded.windows(quoted_field.len()).any(|w| w == quoted_field),
            "{} not written as JSON text", name
        );

        let quoted = with_datetime_as(&m, name, &[&b"\""[..], &wire, b"\""].concat());
        let escaped = with_datetime_as(&m, name, &all_escaped(text));
        let string = with_datetime_as(&m, name, &string(text));
        prop_assert_eq!(quoted.len(), string.len());
        for bytes in [&encoded, &quoted, &escaped] {
            prop_assert_eq!(Message::decode(bytes), Ok(m.clone()));
            prop_assert_eq!(Message::decode_liberal(bytes), Ok(m.clone()));
        }
        prop_assert_eq!(Message::decode_liberal(&string), Ok(m.clone()));
        prop_assert_eq!(Message::decode(&string), Err(DecodeError::WrongType));
    }

    /// (g) Any string written as JSON text by serde_json (minimal escapes) or
    /// with every character escaped is read back by the liberal decoder in
    /// any string field, borrowed when it holds no escape; the strict decoder
    /// refuses a string field in JSON text.
    #[test]
    fn json_text_strings_round_trip_liberally(
        s in any::<String>(),
        which in 0..STRING_FIELDS.len(),
        escape_all in any::<bool>(),
    ) {
        let (message, name) = STRING_FIELDS[which];
        let text = if escape_all { all_escaped(&s) } else { serde_json::to_vec(&s).expect("serializes") };
        let bytes = tagged(message, &[&field(name)[..], &text].concat());
        let expected = Message::from_json(&json!({ message: { name: s } }))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let decoded = Message::decode_liberal(&bytes);
        prop_assert_eq!(decoded.as_ref(), Ok(&expected));
        let value = match &decoded {
            Ok(Message::Heartbeat(h)) => h.header.service.clone(),
            Ok(Message::ConnectRequest(c)) if name == "Account" => c.account.clone(),
            Ok(Message::ConnectRequest(c)) => c.device.clone(),
            Ok(Message::Status(r)) => r.header.status_description.clone(),
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(
            matches!(value, Some(Cow::Borrowed(_))),
            !text.contains(&b'\\'),
            "borrowed unless escaped: {:?}", value
        );
        prop_assert_eq!(Message::decode(&bytes), Err(DecodeError::WrongType));
    }

    /// (h) Malformed JSON text — unterminated, a bad escape, a raw control
    /// character, invalid UTF-8 — is its error in both modes, whether it
    /// stands as an unknown field's value, a string field's or a DateTime's.
    #[test]
    fn malformed_json_text_is_an_error((text, error) in malformed_text()) {
        for bytes in [
            tagged("PresenceHeartbeat", &[&field("Serial")[..], &[0xA0, 5], &field("Unknown"), &text].concat()),
            tagged("PresenceHeartbeat", &[&field("Serial")[..], &[0xA0, 5], &field("Service"), &text].concat()),
            tagged("PresenceStatus", &[&field("Serial")[..], &[0xA0, 5], &field("Now"), &text].concat()),
            tagged("PresenceConnectRequest", &[&field("Expires")[..], &text].concat()),
        ] {
            prop_assert_eq!(Message::decode(&bytes), Err(error), "{:02x?}", bytes);
            prop_assert_eq!(Message::decode_liberal(&bytes), Err(error), "{:02x?}", bytes);
        }
    }

    /// (i) Every strict prefix of an encoding with a JSON text DateTime is
    /// refused as cut short by both decoders, and so is every prefix of the
    /// older `80 14 …` form by the liberal one.
    #[test]
    fn every_truncation_of_a_quoted_datetime_is_refused((m, name, t) in message_with_datetime()) {
        let text = String::from_utf8_lossy(&t.to_wire()).into_owned();
        let encoded = m.to_vec();
        let string = with_datetime_as(&m, name, &string(&text));
        for n in 0..encoded.len() {
            for result in [Message::decode(&encoded[..n]), Message::decode_liberal(&encoded[..n])] {
                prop_assert!(
                    matches!(result, Err(DecodeError::Truncated | DecodeError::LengthPastEnd)),
                    "prefix of {} of {} bytes gave {:?}", n, encoded.len(), result
                );
            }
        }
        for n in 0..string.len() {
            let result = Message::decode_liberal(&string[..n]);
            prop_assert!(
                matches!(result, Err(DecodeError::Truncated | DecodeError::LengthPastEnd)),
                "prefix of {} of {} bytes gave {:?}", n, string.len(), result
            );
        }
    }

    /// (j) The liberal forms (a DateTime as `80 14 …`, JSON text strings with
    /// and without escapes) with random overwrites, insertions and deletions
    /// never make either decoder panic, and what they accept is stable.
    #[test]
    fn mutated_liberal_forms_never_panic(
        (m, name, t) in message_with_datetime(),
        s in any::<String>(),
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let text = String::from_utf8_lossy(&t.to_wire()).into_owned();
        let mut bytes = with_datetime_as(&m, name, &string(&text));
        let at = bytes.len() - 2;
        let extra = [
            &field("Unknown")[..],
            &serde_json::to_vec(&s).expect("serializes"),
            &field("Escaped"),
            &all_escaped(&s),
        ]
        .concat();
        bytes.splice(at..at, extra);
        decode_is_stable(&bytes)?;
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        decode_is_stable(&bytes)?;
    }
}

/// The strategy really produces all 14 message types.
#[test]
fn strategy_covers_every_message_type() {
    let strategy = message();
    let mut runner = TestRunner::deterministic();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2000 {
        let tree = strategy
            .new_tree(&mut runner)
            .expect("strategy never rejects");
        seen.insert(tree.current().name());
    }
    assert_eq!(seen.len(), 14, "only generated {seen:?}");
}

// ---------------------------------------------------------------------------
// Hand-written inputs: each rejection and acceptance of docs/PROTOCOL.md §1
// ---------------------------------------------------------------------------

/// `{ B4 len name { body } }`: a tagged message around raw field bytes.
fn tagged(name: &str, body: &[u8]) -> Vec<u8> {
    let mut out = vec![b'{', 0xB4, name.len() as u8];
    out.extend_from_slice(name.as_bytes());
    out.push(b'{');
    out.extend_from_slice(body);
    out.extend_from_slice(b"}}");
    out
}

/// A field name item, `B4 len name`.
fn field(name: &str) -> Vec<u8> {
    let mut out = vec![0xB4, name.len() as u8];
    out.extend_from_slice(name.as_bytes());
    out
}

/// A short string item, `80 len text`.
fn string(s: &str) -> Vec<u8> {
    let mut out = vec![0x80, s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// A JSON text string item as the reference writes a DateTime, `"text"`
/// (nothing escaped: the caller's text needs none, or is meant raw).
fn quoted(s: &str) -> Vec<u8> {
    [&b"\""[..], s.as_bytes(), b"\""].concat()
}

/// A heartbeat body with extra raw bytes spliced in before `Serial 5 Acknowledge 3`.
fn heartbeat_with(before: &[u8]) -> Vec<u8> {
    let body = [
        before,
        &field("Serial"),
        &[0xA0, 5],
        &field("Acknowledge"),
        &[0xA0, 3],
    ]
    .concat();
    tagged("PresenceHeartbeat", &body)
}

/// The heartbeat of `vectors/heartbeat.hex`: Serial 5, Acknowledge 3.
fn heartbeat() -> Message<'static> {
    Message::from(PresenceHeartbeat {
        header: ClientHeader {
            serial: Some(5),
            acknowledge: Some(3),
            ..ClientHeader::default()
        },
    })
}

/// The notify of `vectors/notify.hex`.
fn notify() -> Message<'static> {
    Message::from(PresenceNotify {
        bitmask: Some(Cow::Borrowed(&[5])),
        serial: Some(42),
        header: ServiceHeader {
            endpoint: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
            now: UnixSeconds::parse(b"2026-11-21T12:00:00Z").ok(),
            acknowledge: Some(7),
            ..ServiceHeader::default()
        },
    })
}

/// The bytes of a test vector.
fn vector(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/vectors/{name}.hex", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    hex::decode(text.trim()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn hand_built_messages_match_the_vectors() {
    assert_eq!(heartbeat_with(&[]), vector("heartbeat"));
    assert_eq!(heartbeat().to_vec(), vector("heartbeat"));
    assert_eq!(notify().to_vec(), vector("notify"));
}

#[test]
fn rejects_a_truncated_item() {
    // Serial's 2-byte integer with only one byte left.
    let body = [&field("Serial")[..], &[0xA1, 0xEA]].concat();
    let mut bytes = tagged("PresenceHeartbeat", &body);
    bytes.truncate(bytes.len() - 2);
    assert_eq!(Message::decode(&bytes), Err(DecodeError::Truncated));
    // A field name whose 2-byte length is cut.
    assert_eq!(
        Message::decode(b"{\xb4\x11PresenceHeartbeat{\xb5\x00"),
        Err(DecodeError::Truncated)
    );
    // Ends where the next item should start.
    assert_eq!(
        Message::decode(b"{\xb4\x11PresenceHeartbeat{"),
        Err(DecodeError::Truncated)
    );
    assert_eq!(Message::decode(b""), Err(DecodeError::Truncated));
}

#[test]
fn rejects_a_length_past_the_buffer() {
    // A 16-byte string with 2 bytes (and the closing brackets) left.
    let body = [&field("Service")[..], &[0x80, 0x10], b"ab"].concat();
    assert_eq!(
        Message::decode(&tagged("PresenceHeartbeat", &body)),
        Err(DecodeError::LengthPastEnd)
    );
    // A binary claiming 2^64 - 1 bytes.
    let body = [
        &field("ID")[..],
        &[0x8B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
    ]
    .concat();
    assert_eq!(
        Message::decode(&tagged("PresenceHeartbeat", &body)),
        Err(DecodeError::LengthPastEnd)
    );
    // A field name, and an unknown field's value, running past the end.
    let body = [0xB4, 0x40, b'S'];
    assert_eq!(
        Message::decode(&tagged("PresenceHeartbeat", &body)),
        Err(DecodeError::LengthPastEnd)
    );
    let body = [&field("Unknown")[..], &[0x89, 0x01, 0x00, 1, 2, 3]].concat();
    assert_eq!(
        Message::decode(&tagged("PresenceHeartbeat", &body)),
        Err(DecodeError::LengthPastEnd)
    );
}

/// An unknown field holding `levels` nested arrays (or objects) inside a heartbeat.
fn nested(levels: usize, objects: bool) -> Vec<u8> {
    let mut value = Vec::new();
    for i in 0..levels {
        if objects {
            value.push(b'{');
            if i + 1 < levels {
                value.extend(field("k"));
            }
        } else {
            value.push(b'[');
        }
    }
    value.extend(std::iter::repeat_n(
        if objects { b'}' } else { b']' },
        levels,
    ));
    heartbeat_with(&[&field("Deep")[..], &value].concat())
}

#[test]
fn rejects_nesting_deeper_than_eight() {
    for objects in [false, true] {
        // The message and its body are two levels: 6 more make 8, the most allowed.
        assert_eq!(
            Message::decode(&nested(6, objects)),
            Ok(heartbeat()),
            "{objects}"
        );
        assert_eq!(
            Message::decode(&nested(7, objects)),
            Err(DecodeError::TooDeep),
            "{objects}"
        );
        assert_eq!(
            Message::decode(&nested(9, objects)),
            Err(DecodeError::TooDeep),
            "{objects}"
        );
    }
    // Arrays and objects mixed, 9 deep.
    let mixed = b"[{\xb4\x01k[{\xb4\x01k[{\xb4\x01k[{\xb4\x01k[]}]}]}]}]";
    assert_eq!(
        Message::decode(&heartbeat_with(&[&field("Deep")[..], mixed].concat())),
        Err(DecodeError::TooDeep)
    );
    // A thousand open brackets are refused without recursing a thousand times.
    let deep = heartbeat_with(&[&field("Deep")[..], &[b'['; 1000]].concat());
    assert_eq!(Message::decode(&deep), Err(DecodeError::TooDeep));
}

#[test]
fn rejects_a_duplicate_known_field() {
    let body = [&field("Serial")[..], &[0xA0, 9]].concat();
    assert_eq!(
        Message::decode(&heartbeat_with(&body)),
        Err(DecodeError::DuplicateField)
    );
    // An inherited field, in a service message.
    let mut bytes = vector("notify");
    let at = bytes.len() - 2;
    bytes.splice(at..at, [&field("Acknowledge")[..], &[0xA0, 7]].concat());
    assert_eq!(Message::decode(&bytes), Err(DecodeError::DuplicateField));
    // Inside an EndPoint.
    let endpoint = [
        &b"{"[..],
        &field("IpAddress"),
        &[0x88, 4, 1, 2, 3, 4],
        &field("IpAddress"),
        &[0x88, 4, 1, 2, 3, 4],
        &field("Port"),
        &[0xA0, 1],
        b"}",
    ]
    .concat();
    let body = [&field("EndPoint")[..], &endpoint].concat();
    assert_eq!(
        Message::decode(&tagged("PresenceStatus", &body)),
        Err(DecodeError::DuplicateField)
    );
}

#[test]
fn rejects_a_known_field_of_the_wrong_type() {
    // Wrong in both modes.
    let cases: [(&str, &str, Vec<u8>); 13] = [
        ("PresenceHeartbeat", "Serial", string("5")),
        ("PresenceHeartbeat", "Serial", vec![0xB0]),
        ("PresenceHeartbeat", "Serial", b"{}".to_vec()),
        ("PresenceHeartbeat", "Service", vec![0x88, 1, b'x']),
        ("PresenceConnectRequest", "Account", vec![0xA0, 1]),
        ("PresenceConnectRequest", "Expires", vec![0xA0, 1]),
        ("PresenceNotify", "Bitmask", string("BQ")),
        ("PresenceNotify", "EndPoint", string("127.0.0.1:1")),
        ("PresenceNotify", "EndPoint", b"[]".to_vec()),
        ("PresenceHeartbeat", "Serial", quoted("5")),
        ("PresenceNotify", "Bitmask", quoted("BQ")),
        ("PresenceNotify", "Now", vec![0x88, 1, b'x']),
        ("PresenceNotify", "EndPoint", quoted("127.0.0.1:1")),
    ];
    for (message, name, value) in cases {
        let bytes = tagged(message, &[&field(name)[..], &value].concat());
        assert_eq!(
            Message::decode(&bytes),
            Err(DecodeError::WrongType),
            "{message}.{name} = {value:02x?}"
        );
        assert_eq!(
            Message::decode_liberal(&bytes),
            Err(DecodeError::WrongType),
            "liberal {message}.{name} = {value:02x?}"
        );
    }
    // Wrong only for the strict decoder: a string field as JSON text, a
    // DateTime as a JSON-B string.
    let cases: [(&str, &str, Vec<u8>); 4] = [
        ("PresenceHeartbeat", "Service", quoted("x")),
        ("PresenceConnectRequest", "Account", br#""\u0061""#.to_vec()),
        (
            "PresenceConnectRequest",
            "Expires",
            string("2027-01-01T00:00:00Z"),
        ),
        ("PresenceNotify", "Now", string("2026-11-21T12:00:00Z")),
    ];
    for (message, name, value) in cases {
        let bytes = tagged(message, &[&field(name)[..], &value].concat());
        assert_eq!(
            Message::decode(&bytes),
            Err(DecodeError::WrongType),
            "{message}.{name} = {value:02x?}"
        );
        assert!(
            Message::decode_liberal(&bytes).is_ok(),
            "liberal {message}.{name} = {value:02x?}"
        );
    }
}

#[test]
fn rejects_out_of_range_values_of_known_fields() {
    for date in [
        "2026-02-30T00:00:00Z",
        "2026-11-21T12:00:00",
        "2026-11-21 12:00:00Z",
        "",
    ] {
        let now = [&field("Now")[..], &quoted(date)].concat();
        let bytes = tagged("PresenceStatus", &now);
        assert_eq!(
            Message::decode(&bytes),
            Err(DecodeError::InvalidDateTime),
            "{date}"
        );
        assert_eq!(
            Message::decode_liberal(&bytes),
            Err(DecodeError::InvalidDateTime),
            "{date}"
        );
        // The older JSON-B string form: the liberal decoder parses it too.
        let now = [&field("Now")[..], &string(date)].concat();
        assert_eq!(
            Message::decode_liberal(&tagged("PresenceStatus", &now)),
            Err(DecodeError::InvalidDateTime),
            "{date}"
        );
    }
    for endpoint in [
        [
            &b"{"[..],
            &field("IpAddress"),
            &[0x88, 3, 1, 2, 3],
            &field("Port"),
            &[0xA0, 1],
            b"}",
        ]
        .concat(),
        [
            &b"{"[..],
            &field("IpAddress"),
            &[0x88, 4, 1, 2, 3, 4],
            &field("Port"),
            &[0xA2, 0, 1, 0, 0],
            b"}",
        ]
        .concat(),
        [
            &b"{"[..],
            &field("IpAddress"),
            &[0x88, 4, 1, 2, 3, 4],
            &field("Port"),
            &[0xA8, 1],
            b"}",
        ]
        .concat(),
        [&b"{"[..], &field("Port"), &[0xA0, 1], b"}"].concat(),
    ] {
        let body = [&field("EndPoint")[..], &endpoint].concat();
        assert_eq!(
            Message::decode(&tagged("PresenceStatus", &body)),
            Err(DecodeError::InvalidEndpoint),
            "{endpoint:02x?}"
        );
    }
    let serial = [&field("Serial")[..], &[0xA3, 0x80, 0, 0, 0, 0, 0, 0, 0]].concat();
    assert_eq!(
        Message::decode(&heartbeat_with(&serial)),
        Err(DecodeError::IntegerOverflow)
    );
    let service = [&field("Service")[..], &[0x80, 2, 0xC3, 0x28]].concat();
    assert_eq!(
        Message::decode(&heartbeat_with(&service)),
        Err(DecodeError::InvalidUtf8)
    );
}

#[test]
fn rejects_trailing_bytes() {
    for extra in [&[0u8][..], b" ", b"}", b"{}", &vector("heartbeat")] {
        let bytes = [&vector("heartbeat")[..], extra].concat();
        assert_eq!(
            Message::decode(&bytes),
            Err(DecodeError::TrailingBytes),
            "{extra:02x?}"
        );
    }
}

#[test]
fn rejects_what_is_not_one_tagged_message() {
    assert_eq!(
        Message::decode(&tagged("PresenceUnknown", &[])),
        Err(DecodeError::UnknownMessage)
    );
    assert_eq!(Message::decode(b"{}"), Err(DecodeError::NotAMessage));
    // An empty envelope with bytes after it: the trailing bytes are reported.
    assert_eq!(
        Message::decode(b"{}\xa0\x01"),
        Err(DecodeError::TrailingBytes)
    );
    assert_eq!(Message::decode(b"[]"), Err(DecodeError::NotAMessage));
    assert_eq!(
        Message::decode(b"{\xb4\x11PresenceHeartbeat\xa0\x01}"),
        Err(DecodeError::NotAMessage)
    );
    // Two message names in one envelope.
    let mut two = tagged("PresenceHeartbeat", &[]);
    two.pop();
    two.extend(&tagged("PresenceHeartbeat", &[])[1..]);
    assert_eq!(Message::decode(&two), Err(DecodeError::NotAMessage));
    assert_eq!(
        Message::decode(&heartbeat_with(&[0x42])),
        Err(DecodeError::UnknownTag(0x42))
    );
}

#[test]
fn accepts_fields_in_reverse_order() {
    let body = [
        &field("Acknowledge")[..],
        &[0xA0, 3],
        &field("Serial"),
        &[0xA0, 5],
    ]
    .concat();
    assert_eq!(
        Message::decode(&tagged("PresenceHeartbeat", &body)),
        Ok(heartbeat())
    );

    // The notify vector's fields reversed, and its EndPoint's too.
    let body = [
        &field("Acknowledge")[..],
        &[0xA0, 7],
        &field("Now"),
        &quoted("2026-11-21T12:00:00Z"),
        &field("EndPoint"),
        b"{",
        &field("Port"),
        &[0xA1, 0x9C, 0x40],
        &field("IpAddress"),
        &[0x88, 4, 127, 0, 0, 1],
        b"}",
        &field("Serial"),
        &[0xA0, 42],
        &field("Bitmask"),
        &[0x88, 1, 5],
    ]
    .concat();
    assert_eq!(
        Message::decode(&tagged("PresenceNotify", &body)),
        Ok(notify())
    );
}

#[test]
fn reads_the_datetime_forms_by_mode() {
    let mut old = vector("notify");
    let quoted_now = [&field("Now")[..], &quoted("2026-11-21T12:00:00Z")].concat();
    let string_now = [&field("Now")[..], &string("2026-11-21T12:00:00Z")].concat();
    let at = old
        .windows(quoted_now.len())
        .position(|w| w == quoted_now)
        .expect("the notify vector's Now is JSON text");
    old.splice(at..at + quoted_now.len(), string_now);
    assert_eq!(Message::decode_liberal(&old), Ok(notify()));
    assert_eq!(Message::decode(&old), Err(DecodeError::WrongType));
    assert_eq!(Message::decode(&vector("notify")), Ok(notify()));
    assert_eq!(Message::decode_liberal(&vector("notify")), Ok(notify()));
}

#[test]
fn reads_a_json_text_string_field_liberally() {
    let body = [&field("Service")[..], br#""a\u00e9\n""#].concat();
    let bytes = heartbeat_with(&body);
    let Ok(Message::Heartbeat(h)) = Message::decode_liberal(&bytes) else {
        panic!("a JSON text Service refused");
    };
    assert!(
        matches!(&h.header.service, Some(Cow::Owned(s)) if s == "a\u{e9}\n"),
        "{:?}",
        h.header.service
    );
    let body = [&field("Service")[..], &quoted("plain")].concat();
    let bytes = heartbeat_with(&body);
    let Ok(Message::Heartbeat(h)) = Message::decode_liberal(&bytes) else {
        panic!("a JSON text Service refused");
    };
    assert_eq!(h.header.service, Some(Cow::Borrowed("plain")));
    assert!(matches!(h.header.service, Some(Cow::Borrowed(_))));
    assert_eq!(Message::decode(&bytes), Err(DecodeError::WrongType));
}

#[test]
fn rejects_malformed_json_text() {
    let cases: [(&[u8], DecodeError); 9] = [
        (b"\"abc", DecodeError::Truncated),
        (b"\"abc\\", DecodeError::Truncated),
        (b"\"abc\\\"", DecodeError::Truncated),
        (b"\"a\\x\"", DecodeError::InvalidEscape),
        (b"\"a\\u00\"", DecodeError::InvalidEscape),
        (b"\"\\ud800\"", DecodeError::InvalidEscape),
        (b"\"a\nb\"", DecodeError::ControlCharacter),
        (b"\"\x00\"", DecodeError::ControlCharacter),
        (b"\"\xc3\x28\"", DecodeError::InvalidUtf8),
    ];
    for (text, error) in cases {
        // At the end of the body, so that nothing after it holds a quote.
        for bytes in [
            tagged("PresenceHeartbeat", &[&field("Unknown")[..], text].concat()),
            tagged("PresenceHeartbeat", &[&field("Service")[..], text].concat()),
            tagged("PresenceStatus", &[&field("Now")[..], text].concat()),
        ] {
            assert_eq!(Message::decode(&bytes), Err(error), "{text:02x?}");
            assert_eq!(Message::decode_liberal(&bytes), Err(error), "{text:02x?}");
        }
    }
}

#[test]
fn accepts_integers_and_lengths_wider_than_needed() {
    for serial in [
        &[0xA1, 0, 5][..],
        &[0xA2, 0, 0, 0, 5],
        &[0xA3, 0, 0, 0, 0, 0, 0, 0, 5],
    ] {
        let body = [
            &field("Serial")[..],
            serial,
            &field("Acknowledge"),
            &[0xA0, 3],
        ]
        .concat();
        assert_eq!(
            Message::decode(&tagged("PresenceHeartbeat", &body)),
            Ok(heartbeat()),
            "{serial:02x?}"
        );
    }
    // A negative integer, a string, a binary and a field name, each 8 bytes wide.
    let body = [
        &[0xB7, 0, 0, 0, 0, 0, 0, 0, 6][..],
        b"Serial",
        &[0xAB, 0, 0, 0, 0, 0, 0, 0, 1],
        &field("Service"),
        &[0x83, 0, 0, 0, 0, 0, 0, 0, 2],
        b"ab",
        &field("ID"),
        &[0x8B, 0, 0, 0, 0, 0, 0, 0, 1, 9],
    ]
    .concat();
    let expected = Message::from(PresenceHeartbeat {
        header: ClientHeader {
            serial: Some(-1),
            service: Some(Cow::Borrowed("ab")),
            id: Some(Cow::Borrowed(&[9])),
            ..ClientHeader::default()
        },
    });
    assert_eq!(
        Message::decode(&tagged("PresenceHeartbeat", &body)),
        Ok(expected)
    );
}

#[test]
fn skips_unknown_fields_of_every_type() {
    let unknown: [(&str, Vec<u8>); 16] = [
        ("string", string("hello")),
        ("empty string", vec![0x80, 0]),
        ("JSON text", quoted("2026-11-21T12:00:00Z")),
        ("empty JSON text", quoted("")),
        (
            "JSON text with escapes",
            br#""a\u00e9\n\"\\ \ud83d\ude00""#.to_vec(),
        ),
        ("JSON text with UTF-8 and brackets", quoted("é}]{[ \u{b4}")),
        ("binary", vec![0x88, 3, 0, 0xFF, 0x7D]),
        ("int", vec![0xA1, 0xEA, 0x60]),
        ("negative int", vec![0xAB, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        ("true", vec![0xB0]),
        ("false", vec![0xB1]),
        ("null", vec![0xB2]),
        ("empty object", b"{}".to_vec()),
        (
            "nested object",
            [
                &b"{"[..],
                &field("a"),
                b"{",
                &field("Serial"),
                &string("x"),
                b"}",
                b"}",
            ]
            .concat(),
        ),
        ("empty array", b"[]".to_vec()),
        (
            "array",
            [
                &b"["[..],
                &[0xA0, 1, 0xB0, 0xB2],
                &string("s"),
                &quoted("t"),
                b"{}[[]]",
                b"]",
            ]
            .concat(),
        ),
    ];
    for (what, value) in &unknown {
        let bytes = heartbeat_with(&[&field("Unknown")[..], value].concat());
        assert_eq!(Message::decode(&bytes), Ok(heartbeat()), "{what}");
        assert_eq!(Message::decode_liberal(&bytes), Ok(heartbeat()), "{what}");
    }
    // All of them at once, in a service message and inside its EndPoint.
    let all: Vec<u8> = unknown
        .iter()
        .enumerate()
        .flat_map(|(i, (_, v))| [field(&format!("X{i}")), v.clone()].concat())
        .collect();
    let mut bytes = vector("notify");
    let at = bytes.len() - 2;
    bytes.splice(at..at, all.iter().copied());
    assert_eq!(Message::decode(&bytes), Ok(notify()));
    assert_eq!(Message::decode_liberal(&bytes), Ok(notify()));
    let endpoint = [
        &field("EndPoint")[..],
        b"{",
        &all,
        &field("IpAddress"),
        &[0x88, 4, 127, 0, 0, 1],
        &field("Port"),
        &[0xA1, 0x9C, 0x40],
        b"}",
    ]
    .concat();
    let bytes = tagged("PresenceStatus", &endpoint);
    let Ok(Message::Status(status)) = Message::decode(&bytes) else {
        panic!("status with unknown EndPoint fields refused");
    };
    assert_eq!(
        status.header.endpoint,
        Some(SocketAddr::from(([127, 0, 0, 1], 40000)))
    );
}

#[test]
fn null_known_field_is_absent() {
    let body = [
        &field("Serial")[..],
        &[0xB2],
        &field("Acknowledge"),
        &[0xA0, 3],
    ]
    .concat();
    let expected = Message::from(PresenceHeartbeat {
        header: ClientHeader {
            acknowledge: Some(3),
            ..ClientHeader::default()
        },
    });
    assert_eq!(
        Message::decode(&tagged("PresenceHeartbeat", &body)),
        Ok(expected)
    );
    // Every field of a notify null: an empty notify.
    let body: Vec<u8> = [
        "Bitmask",
        "Serial",
        "EndPoint",
        "Now",
        "Acknowledge",
        "Status",
        "StatusExtended",
        "StatusDescription",
        "ID",
    ]
    .iter()
    .flat_map(|name| [field(name), vec![0xB2]].concat())
    .collect();
    assert_eq!(
        Message::decode(&tagged("PresenceNotify", &body)),
        Ok(Message::from(PresenceNotify::default()))
    );
}
