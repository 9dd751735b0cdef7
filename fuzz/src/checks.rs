//! What each fuzz target does with its input, and the property it checks.
//!
//! One function per target (`fuzz/fuzz_targets/<target>.rs` calls the
//! function of the same name). Each takes the raw fuzzer input, must never
//! panic on its own, and panics (an `assert!`) only when the code under test
//! breaks the target's property. `tests/fuzz_regressions.rs` runs every file
//! of `tests/fuzz_regressions/<target>/` through the same function, and
//! `tests/fuzz_properties.rs` feeds some of them proptest input; both include
//! this file by path, so it uses nothing but `mpp`, `serde_json` and `std`.
//! The AES-GCM differential target is in `gcm_checks.rs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::OnceLock;

use mpp::codec::Message;
use mpp::control::{
    NodeApi, DEFAULT_CREDENTIAL_TTL_SECS, MAX_CREDENTIAL_TTL_SECS, MAX_NOTIFY_BATCH,
    MIN_CREDENTIAL_TTL_SECS,
};
use mpp::node::snapshot::{self, DecodedState, LoadError};
use mpp::packet::{
    open, open_in_place, peek_conn_id, seal, seal_in_place, ConnId, MasterKey, PacketError,
    PacketKey, Reassembler, FRAGMENT_MARKER, FRAGMENT_TIMEOUT_MS, HEADER_LEN, KEY_LEN,
    MAX_ACCOUNT_LEN, MAX_FRAGMENTS, MAX_FRAGMENT_DATA, MAX_MESSAGES_IN_PROGRESS, MAX_PACKET,
    MAX_PLAINTEXT, OVERHEAD,
};
use mpp::proto::stun::{binding_response, is_stun, StunError, MAGIC_COOKIE, MAX_RESPONSE_LEN};
use mpp::proto::{SavedConnection, MAX_BITMASK};
use mpp::table::{Account, AccountKey};
use mpp::time::UnixMillis;

// ---------------------------------------------------------------------------
// Reading a fuzzer input
// ---------------------------------------------------------------------------

/// Takes values off the front of a fuzzer input; past its end every value
/// is zero and every slice empty, so any input is a valid program.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte was taken.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Exactly `N` bytes, zero-padded at the end.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn byte(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A big-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    /// A big-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }

    /// A big-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

// ---------------------------------------------------------------------------
// 1. jsonb_decode
// ---------------------------------------------------------------------------

/// `jsonb_decode`: the input is a JSON-B datagram. Neither decoder panics;
/// what the strict one accepts the liberal one accepts as the same message;
/// whatever either accepts encodes to bytes that both decode back to the
/// same message, that encode again to the same bytes, and whose JSON text
/// form reads back to the same message.
pub fn jsonb_decode(data: &[u8]) {
    let strict = Message::decode(data);
    let liberal = Message::decode_liberal(data);
    if let Ok(m) = &strict {
        assert_eq!(
            liberal.as_ref(),
            Ok(m),
            "the liberal decoder must accept what the strict one accepts, as the same message"
        );
        round_trip(m);
    }
    if let Ok(m) = &liberal {
        round_trip(m);
    }
}

/// decode → encode → decode is the identity, and so is the JSON text form.
pub fn round_trip(m: &Message<'_>) {
    let bytes = m.to_vec();
    let mut exact = vec![0u8; bytes.len()];
    assert_eq!(
        m.encode(&mut exact),
        Ok(bytes.len()),
        "encode into an exact buffer"
    );
    assert_eq!(exact, bytes, "encode and to_vec differ");
    match Message::decode(&bytes) {
        Ok(again) => {
            assert_eq!(
                &again, m,
                "decode(encode(m)) != m (strict); encoding {bytes:02x?}"
            );
            assert_eq!(again.to_vec(), bytes, "encode is not stable");
        }
        Err(e) => panic!("our own encoding {bytes:02x?} of {m:?} is refused: {e:?}"),
    }
    match Message::decode_liberal(&bytes) {
        Ok(again) => assert_eq!(&again, m, "decode_liberal(encode(m)) != m"),
        Err(e) => panic!("our own encoding {bytes:02x?} is refused by the liberal decoder: {e:?}"),
    }
    let text = m.to_json_string();
    match Message::from_json_str(&text) {
        Ok(again) => assert_eq!(&again, m, "from_json(to_json(m)) != m; text {text}"),
        Err(e) => panic!("our own JSON text {text} of {m:?} is refused: {e:?}"),
    }
}

// ---------------------------------------------------------------------------
// 2. packet_open
// ---------------------------------------------------------------------------

/// The fixed key every packet target opens with.
pub fn fuzz_packet_key() -> &'static PacketKey {
    static KEY: OnceLock<PacketKey> = OnceLock::new();
    KEY.get_or_init(|| PacketKey::new(&[0x4B; KEY_LEN]))
}

/// `packet_open`: first byte even: the rest is a datagram, opened with a
/// fixed key by `open` and `open_in_place` (same verdict, the buffer left
/// as it was on refusal, the error the length calls for) and peeked at by
/// `peek_conn_id`. First byte odd: the rest is conn id (8), nonce (12), a
/// position (2) and a mask (1) and a plaintext: sealed by `seal` and
/// `seal_in_place` (the same bytes), opened back, then with the mask XORed
/// in at the position: refused.
pub fn packet_open(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        open_datagram(rest);
    } else {
        seal_open_tamper(rest);
    }
}

/// Opens an arbitrary datagram.
pub fn open_datagram(packet: &[u8]) {
    let key = fuzz_packet_key();
    let expected_id = (packet.len() >= OVERHEAD && packet[..8] != [0u8; 8]).then(|| &packet[..8]);
    let peeked = peek_conn_id(packet);
    assert_eq!(
        peeked.as_ref().map(|id| &id.0[..]),
        expected_id,
        "peek_conn_id"
    );

    let opened = open(key, packet);
    let mut buf = packet.to_vec();
    let in_place = open_in_place(key, &mut buf).map(<[u8]>::to_vec);
    assert_eq!(opened, in_place, "open and open_in_place disagree");
    match &opened {
        Ok(plaintext) => {
            assert_eq!(plaintext.len(), packet.len() - OVERHEAD);
            let id = ConnId(packet[..8].try_into().expect("8 bytes"));
            let nonce = packet[8..HEADER_LEN].try_into().expect("12 bytes");
            if let Ok(again) = seal(key, id, nonce, plaintext) {
                assert_eq!(again, packet, "sealing what opened gives other bytes");
            }
        }
        Err(e) => {
            assert_eq!(buf, packet, "a refused packet was changed in place");
            let expected = if packet.len() < OVERHEAD {
                PacketError::TooShort
            } else if packet.len() > MAX_PACKET {
                PacketError::TooLong
            } else {
                PacketError::Unauthentic
            };
            assert_eq!(
                *e,
                expected,
                "wrong error for a {}-byte packet",
                packet.len()
            );
        }
    }
}

/// Seals, opens, tampers.
pub fn seal_open_tamper(data: &[u8]) {
    let key = fuzz_packet_key();
    let mut input = Input::new(data);
    let id = ConnId(input.array());
    let nonce: [u8; 12] = input.array();
    let position = usize::from(input.u16());
    let mask = input.byte();
    let plaintext = input.rest();
    let sealed = match seal(key, id, nonce, plaintext) {
        Ok(p) => p,
        Err(e) => {
            // Either reason when both apply.
            let fair = match e {
                PacketError::ReservedConnId => id.is_reserved(),
                PacketError::TooLong => plaintext.len() > MAX_PLAINTEXT,
                _ => false,
            };
            assert!(
                fair,
                "seal refused a {}-byte plaintext: {e:?}",
                plaintext.len()
            );
            return;
        }
    };
    assert!(plaintext.len() <= MAX_PLAINTEXT);
    assert_eq!(sealed.len(), plaintext.len() + OVERHEAD);
    assert_eq!(&sealed[..8], &id.0);
    assert_eq!(&sealed[8..HEADER_LEN], &nonce);
    assert_eq!(peek_conn_id(&sealed), Some(id));

    let mut buf = vec![0u8; plaintext.len() + OVERHEAD + 3];
    buf[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(plaintext);
    let n = seal_in_place(key, id, nonce, &mut buf, plaintext.len()).expect("seal_in_place");
    assert_eq!(&buf[..n], &sealed[..], "seal and seal_in_place differ");

    assert_eq!(
        open(key, &sealed).as_deref(),
        Ok(plaintext),
        "open(seal(p)) != p"
    );
    let mut in_place = sealed.clone();
    assert_eq!(open_in_place(key, &mut in_place), Ok(plaintext));

    if mask != 0 {
        let mut tampered = sealed.clone();
        let i = position % tampered.len();
        tampered[i] ^= mask;
        assert_eq!(
            open(key, &tampered),
            Err(PacketError::Unauthentic),
            "a packet with byte {i} changed was accepted"
        );
    }
    let other = PacketKey::new(&[0x4C; KEY_LEN]);
    assert_eq!(
        open(&other, &sealed),
        Err(PacketError::Unauthentic),
        "wrong key accepted"
    );
}

// ---------------------------------------------------------------------------
// 3. reassembler
// ---------------------------------------------------------------------------

/// The most heap a [`Reassembler`] may hold: 4 messages of 16 chunks of at
/// most `MAX_FRAGMENT_DATA` bytes each (a chunk's vector rounds its first
/// allocation up to 8 bytes), plus bookkeeping.
pub const REASSEMBLER_HEAP_BOUND: usize = MAX_MESSAGES_IN_PROGRESS
    * (MAX_FRAGMENTS * (MAX_FRAGMENT_DATA + 8 + std::mem::size_of::<Vec<u8>>()) + 128)
    + 1024;

/// `reassembler` without a heap probe (the tests' entry point).
pub fn reassembler(data: &[u8]) {
    reassembler_probed(data, &|| None);
}

/// `reassembler`: the input is a program of pushes, expiries, polls and
/// clears at arbitrary times (forward by small or large steps, or jumps to
/// any time, backwards included) on one [`Reassembler`]. Checked after every
/// step: at most 4 messages in progress and, where `heap` reports the bytes
/// the process holds, no more than [`REASSEMBLER_HEAP_BOUND`] held by the
/// reassembler; each push gets the error its header calls for; a delivered
/// message is no longer than its chunks allow and made of its chunks in
/// order (chunk `i` carries bytes equal to `i`); a chunk of a message just
/// delivered is ignored; after `expire(now)`, `poll_timeout` is after `now`.
pub fn reassembler_probed(data: &[u8], heap: &dyn Fn() -> Option<usize>) {
    let mut input = Input::new(data);
    let mut now = UnixMillis(input.u64() >> 16);
    let baseline = heap();
    let mut r = Reassembler::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 4096 {
        steps += 1;
        let op = input.byte();
        now = match (op >> 5) & 3 {
            0 => now,
            1 => now.plus_millis(u64::from(input.byte()) * 16),
            2 => now.plus_millis(u64::from(input.u16())),
            _ => UnixMillis(input.u64()),
        };
        match op & 7 {
            0..=4 => reassembler_push(&mut r, now, op, &mut input),
            5 => {
                let before = r.in_progress();
                let expired = r.expire(now);
                assert_eq!(before - expired, r.in_progress());
                check_poll_timeout(&r, now);
            }
            6 => {
                r.clear();
                assert_eq!(r.in_progress(), 0);
                assert_eq!(r.poll_timeout(), None);
            }
            _ => assert_eq!(
                r.poll_timeout().is_some(),
                r.in_progress() > 0,
                "poll_timeout and in_progress disagree"
            ),
        }
        assert!(
            r.in_progress() <= MAX_MESSAGES_IN_PROGRESS,
            "{} messages in progress",
            r.in_progress()
        );
        if let (Some(base), Some(held)) = (baseline, heap()) {
            let held = held.saturating_sub(base);
            assert!(
                held <= REASSEMBLER_HEAP_BOUND,
                "the reassembler holds {held} bytes, more than {REASSEMBLER_HEAP_BOUND}"
            );
        }
    }
}

/// After `expire(now)` nothing due is left: the next expiry is after `now`
/// (or the clock saturated at its end).
fn check_poll_timeout(r: &Reassembler, now: UnixMillis) {
    if let Some(t) = r.poll_timeout() {
        assert!(
            t > now || t == UnixMillis(u64::MAX),
            "poll_timeout {t:?} not after now {now:?} right after expire"
        );
        // A set expires 2 s after its first chunk: never later than that
        // after any time it can still be held at.
        assert!(t.0 <= now.0.saturating_add(FRAGMENT_TIMEOUT_MS) || t.0 > now.0);
    } else {
        assert_eq!(r.in_progress(), 0, "sets in progress but no poll_timeout");
    }
}

/// One push, its header mostly well-formed (ids from a small set so that
/// chunks of one message meet), sometimes raw.
fn reassembler_push(r: &mut Reassembler, now: UnixMillis, op: u8, input: &mut Input<'_>) {
    let raw = op & 0x10 != 0;
    let id: u16 = if op & 0x08 != 0 {
        input.u16()
    } else {
        u16::from(input.byte() & 7)
    };
    let (marker, index, count) = if raw {
        (input.byte(), input.byte(), input.byte())
    } else {
        let count = input.byte() % (MAX_FRAGMENTS as u8 + 1);
        let index = input.byte() % count.max(1);
        (FRAGMENT_MARKER, index, count)
    };
    let len = usize::from(input.byte()) * 5; // 0..=1275, past MAX_FRAGMENT_DATA
    let mut plaintext = Vec::with_capacity(5 + len);
    plaintext.push(marker);
    plaintext.extend_from_slice(&id.to_be_bytes());
    plaintext.push(index);
    plaintext.push(count);
    plaintext.resize(5 + len, index);

    let result = r.push(now, &plaintext);
    let valid = marker == FRAGMENT_MARKER
        && count != 0
        && usize::from(count) <= MAX_FRAGMENTS
        && index < count
        && len <= MAX_FRAGMENT_DATA;
    match result {
        Err(e) => {
            use mpp::packet::FragmentError as F;
            let expected = if marker != FRAGMENT_MARKER {
                Some(F::NotAFragment)
            } else if count == 0 || usize::from(count) > MAX_FRAGMENTS {
                Some(F::BadCount)
            } else if index >= count {
                Some(F::BadIndex)
            } else if len > MAX_FRAGMENT_DATA {
                Some(F::ChunkTooLong)
            } else {
                None // only InconsistentCount may refuse a well-formed chunk
            };
            match expected {
                Some(expected) => assert_eq!(e, expected),
                None => assert_eq!(e, F::InconsistentCount),
            }
        }
        Ok(delivered) => {
            assert!(valid, "accepted a malformed chunk {:02x?}", &plaintext[..5]);
            if let Some(message) = delivered {
                assert!(message.len() <= usize::from(count) * MAX_FRAGMENT_DATA);
                assert!(
                    message.windows(2).all(|w| w[0] <= w[1]) && message.iter().all(|&b| b < count),
                    "message {id} delivered with its chunks out of order or mixed with another's"
                );
                if count == 1 {
                    assert_eq!(message, &plaintext[5..], "a single chunk delivered changed");
                }
                // A late duplicate of a message just delivered is ignored.
                assert_eq!(
                    r.push(now, &plaintext),
                    Ok(None),
                    "duplicate delivered twice"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 4. stun
// ---------------------------------------------------------------------------

/// `stun`: first byte: bit 0 picks the source's family, the other bits the
/// size of a second output buffer; then port and address, then the
/// datagram. `is_stun` is exactly the header rule; `binding_response`
/// answers only STUN, never more than 64 bytes even into a large buffer,
/// echoes the transaction id, writes a well-formed header, answers the same
/// into a 64-byte buffer, and into a small buffer fails or fits.
pub fn stun(data: &[u8]) {
    let mut input = Input::new(data);
    let selector = input.byte();
    let port = input.u16();
    let ip = if selector & 1 == 0 {
        IpAddr::V4(Ipv4Addr::from(input.u32()))
    } else {
        IpAddr::V6(Ipv6Addr::from(u128::from_be_bytes(input.array())))
    };
    let from = SocketAddr::new(ip, port);
    let datagram = input.rest();

    let header_ok = datagram.len() >= 20
        && datagram[0] & 0xC0 == 0
        && datagram[4..8] == MAGIC_COOKIE.to_be_bytes();
    assert_eq!(is_stun(datagram), header_ok, "is_stun");

    let mut out = [0u8; 1500];
    match binding_response(datagram, from, &mut out) {
        Ok(n) => {
            assert!(header_ok, "answered a datagram that is not STUN");
            assert!(n <= MAX_RESPONSE_LEN, "answer of {n} bytes");
            let answer = &out[..n];
            assert!(n >= 20 && n.is_multiple_of(4), "answer of {n} bytes");
            assert!(is_stun(answer), "the answer is not STUN");
            let kind = u16::from_be_bytes([answer[0], answer[1]]);
            assert!(kind == 0x0101 || kind == 0x0111, "answer type {kind:04x}");
            let length = usize::from(u16::from_be_bytes([answer[2], answer[3]]));
            assert_eq!(length + 20, n, "the length field");
            assert_eq!(
                &answer[8..20],
                &datagram[8..20],
                "transaction id not echoed"
            );
            assert!(out[n..].iter().all(|&b| b == 0), "wrote past its answer");

            let mut exact = [0u8; MAX_RESPONSE_LEN];
            assert_eq!(binding_response(datagram, from, &mut exact), Ok(n));
            assert_eq!(&exact[..n], answer, "not the same answer twice");
        }
        Err(e) => {
            if !header_ok {
                assert_eq!(e, StunError::NotStun);
            }
            assert_ne!(e, StunError::BufferTooSmall, "1500 bytes are too small");
        }
    }
    let mut small = vec![0u8; usize::from(selector >> 1)];
    if let Ok(n) = binding_response(datagram, from, &mut small) {
        assert!(n <= small.len().min(MAX_RESPONSE_LEN));
    }
}

// ---------------------------------------------------------------------------
// 5. http_bodies
// ---------------------------------------------------------------------------

/// `http_bodies`: first byte even: the rest is a `POST /v1/notify` body,
/// odd: a `POST /v1/credentials` body. Neither parser panics; what they
/// accept is within the limits (1..=10 000 entries, accounts of 1 to
/// `MAX_ACCOUNT_LEN` bytes, bitmasks of 1 to 32 bytes not all zero, a
/// lifetime within bounds) and is what a plain JSON reading of the body
/// holds; a refusal has a reason.
pub fn http_bodies(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        notify_body(body);
    } else {
        credentials_body(body);
    }
}

/// Lowercase or uppercase hex, as the API takes a bitmask.
fn unhex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Checks one notify body.
pub fn notify_body(body: &[u8]) {
    let parsed = <dyn NodeApi>::parse_notify_body(body);
    let batch = match parsed {
        Ok(batch) => batch,
        Err(reason) => {
            assert!(!reason.is_empty(), "a refusal without a reason");
            return;
        }
    };
    assert!(
        !batch.is_empty() && batch.len() <= MAX_NOTIFY_BATCH,
        "{} entries",
        batch.len()
    );
    for (account, bitmask) in &batch {
        assert!(
            !account.is_empty() && account.len() <= MAX_ACCOUNT_LEN,
            "account {account:?}"
        );
        assert!(
            (1..=MAX_BITMASK).contains(&bitmask.len()),
            "bitmask {bitmask:02x?}"
        );
        assert!(
            bitmask.iter().any(|&b| b != 0),
            "an all-zero bitmask accepted"
        );
    }
    let value: serde_json::Value = serde_json::from_slice(body).expect("an accepted body is JSON");
    let object = value.as_object().expect("an accepted body is an object");
    for key in object.keys() {
        assert!(
            ["account", "bitmask", "notifications"].contains(&key.as_str()),
            "key {key}"
        );
    }
    let entry = |v: &serde_json::Value| -> (String, Vec<u8>) {
        let account = v["account"]
            .as_str()
            .expect("account is a string")
            .to_owned();
        let bitmask =
            unhex(v["bitmask"].as_str().expect("bitmask is a string")).expect("bitmask is hex");
        (account, bitmask)
    };
    let expected: Vec<(String, Vec<u8>)> = match object.get("notifications") {
        Some(list) if !list.is_null() => {
            let list = list.as_array().expect("notifications is an array");
            list.iter().map(entry).collect()
        }
        _ => vec![entry(&value)],
    };
    assert_eq!(
        batch, expected,
        "the parser's reading differs from the JSON"
    );
}

/// Checks one credentials body.
pub fn credentials_body(body: &[u8]) {
    let (account, device, ttl) = match <dyn NodeApi>::parse_credentials_body(body) {
        Ok(r) => r,
        Err(reason) => {
            assert!(!reason.is_empty(), "a refusal without a reason");
            return;
        }
    };
    assert!(
        (MIN_CREDENTIAL_TTL_SECS..=MAX_CREDENTIAL_TTL_SECS).contains(&ttl),
        "ttl_secs {ttl}"
    );
    let value: serde_json::Value = serde_json::from_slice(body).expect("an accepted body is JSON");
    let object = value.as_object().expect("an accepted body is an object");
    for key in object.keys() {
        assert!(
            ["account", "device", "ttl_secs"].contains(&key.as_str()),
            "key {key}"
        );
    }
    assert_eq!(Some(account.as_str()), value["account"].as_str());
    assert_eq!(Some(device.as_str()), value["device"].as_str());
    let expected_ttl = match object.get("ttl_secs") {
        None | Some(serde_json::Value::Null) => DEFAULT_CREDENTIAL_TTL_SECS,
        Some(v) => v.as_u64().expect("ttl_secs is a u64"),
    };
    assert_eq!(ttl, expected_ttl);
}

// ---------------------------------------------------------------------------
// 6. state_file
// ---------------------------------------------------------------------------

/// The master key every state-file target signs and verifies with.
pub fn fuzz_master() -> &'static MasterKey {
    static KEY: OnceLock<MasterKey> = OnceLock::new();
    KEY.get_or_init(|| MasterKey::new([0x6D; KEY_LEN]))
}

/// `state_file`: first byte mod 3: 0, the rest is a state file, decoded as
/// it is (the MAC check stands in front of the parser); 1, the rest is a
/// file body, signed then decoded (the parser behind the MAC, on bytes the
/// fuzzer mutates freely); 2, the rest describes records, written as a
/// valid file that must decode to exactly them, then mutated as the rest of
/// the input says, re-signed and decoded. Never a panic; what decodes is
/// consistent and encodes back to a file that decodes the same.
pub fn state_file(data: &[u8]) {
    let master = fuzz_master();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let result = snapshot::decode_state(rest, master);
            // Without the key nothing passes the MAC, so nothing gets past it.
            assert!(
                matches!(
                    result,
                    Err(LoadError::Truncated(_)
                        | LoadError::NotState(_)
                        | LoadError::Version { .. }
                        | LoadError::Tampered(_))
                ),
                "an unsigned file gave {result:?}"
            );
        }
        1 => {
            let file = snapshot::sign_state(rest, master);
            check_state(&file, snapshot::decode_state(&file, master));
        }
        _ => {
            let mut input = Input::new(rest);
            let state = arbitrary_state(&mut input);
            let file = encode_state(&state, master);
            match snapshot::decode_state(&file, master) {
                Ok(decoded) => assert_state_eq(&decoded, &state),
                Err(e) => panic!("a valid file was refused: {e}"),
            }
            let mut body = file[..file.len() - 32].to_vec();
            mutate(&mut body, &mut input);
            let file = snapshot::sign_state(&body, master);
            check_state(&file, snapshot::decode_state(&file, master));
        }
    }
}

/// A few overwrites, XORs, insertions, deletions and a cut, as `input` says.
fn mutate(body: &mut Vec<u8>, input: &mut Input<'_>) {
    for _ in 0..input.byte() % 5 {
        let kind = input.byte();
        let at = usize::from(input.u16());
        let value = input.byte();
        if body.is_empty() {
            body.push(value);
            continue;
        }
        let at = at % body.len();
        match kind % 5 {
            0 => body[at] = value,
            1 => body[at] ^= value,
            2 => body.insert(at, value),
            3 => {
                body.remove(at);
            }
            _ => body.truncate(at),
        }
    }
}

/// A state decoded from `file` (signed with the fuzz key) holds only
/// well-formed records, and writing it again gives a file that decodes to
/// the same records.
pub fn check_state(file: &[u8], result: Result<DecodedState, LoadError>) {
    let decoded = match result {
        Ok(d) => d,
        Err(e) => {
            assert!(
                !matches!(e, LoadError::Tampered(_)),
                "a signed file refused as tampered"
            );
            return;
        }
    };
    assert!(file.len() >= 60 + 32 && file.starts_with(b"MPPSTATE"));
    for a in &decoded.accounts {
        assert_ne!(a.serial, 0, "an account with Serial 0 was accepted");
        assert_eq!(a.head, 0);
    }
    for c in &decoded.connections {
        assert!(usize::from(c.pending_len) <= MAX_BITMASK);
        assert!(c.pending[usize::from(c.pending_len)..]
            .iter()
            .all(|&b| b == 0));
        assert!(c.tries <= 7 && c.key_parity <= 1);
        assert!(
            decoded
                .accounts
                .iter()
                .any(|a| a.affinity == c.account.affinity && a.low == c.account.low),
            "a connection of an account not in the file"
        );
    }
    let body_len: usize = 60
        + decoded.accounts.len() * 28
        + decoded
            .connections
            .iter()
            .map(connection_len)
            .sum::<usize>();
    assert_eq!(
        body_len + 32,
        file.len(),
        "decoded records do not account for every byte"
    );
    let again = encode_state(&decoded, fuzz_master());
    match snapshot::decode_state(&again, fuzz_master()) {
        Ok(d) => assert_state_eq(&d, &decoded),
        Err(e) => panic!("re-encoding a decoded state gives a file refused: {e}"),
    }
}

fn connection_len(c: &SavedConnection) -> usize {
    let addr = match c.endpoint {
        None => 0,
        Some(SocketAddr::V4(_)) => 4,
        Some(SocketAddr::V6(_)) => 16,
    };
    36 + addr + usize::from(c.pending_len)
}

fn assert_state_eq(a: &DecodedState, b: &DecodedState) {
    assert_eq!(a.id, b.id);
    assert_eq!(a.index, b.index);
    assert_eq!(a.saved, b.saved);
    assert_eq!(a.epoch, b.epoch);
    assert_eq!(a.accounts, b.accounts);
    assert_eq!(a.connections, b.connections);
}

/// Records as `input` says: up to 8 accounts (Serial never 0) and up to 8
/// connections of them, every field drawn whole.
pub fn arbitrary_state(input: &mut Input<'_>) -> DecodedState {
    let id = snapshot::SaveId {
        generation: input.u64(),
        count: input.u32(),
    };
    let index = input.u32();
    let saved = UnixMillis(input.u64());
    let epoch = UnixMillis(input.u64());
    let n_accounts = usize::from(input.byte() % 9);
    let n_connections = if n_accounts == 0 {
        0
    } else {
        usize::from(input.byte() % 9)
    };
    let accounts: Vec<Account> = (0..n_accounts)
        .map(|_| Account {
            affinity: input.u32(),
            low: input.u32(),
            head: 0,
            serial: input.u32().max(1),
            since: input.u32(),
            catch_up: input.u32(),
            epoch: input.u32(),
            stamp: input.u32(),
        })
        .collect();
    let connections = (0..n_connections)
        .map(|_| {
            let a = accounts[usize::from(input.byte()) % n_accounts];
            let flags = input.byte();
            let port = input.u16();
            let endpoint = match flags % 3 {
                0 => None,
                1 => Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(input.u32())),
                    port,
                )),
                _ => Some(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(u128::from_be_bytes(input.array()))),
                    port,
                )),
            };
            let pending_len = input.byte() % (MAX_BITMASK as u8 + 1);
            let mut pending = [0u8; MAX_BITMASK];
            let p = input.bytes(usize::from(pending_len));
            pending[..p.len()].copy_from_slice(p);
            SavedConnection {
                conn_id: ConnId(input.array()),
                account: AccountKey {
                    affinity: a.affinity,
                    low: a.low,
                },
                highest_serial: input.u32(),
                window: input.u64(),
                last_seen: input.u32(),
                expires: input.u32(),
                endpoint,
                pending,
                pending_len,
                tries: (flags >> 2) & 7,
                catch_up: flags & 0x20 != 0,
                validated: flags & 0x40 != 0,
                key_parity: flags >> 7,
            }
        })
        .collect();
    DecodedState {
        id,
        index,
        saved,
        epoch,
        accounts,
        connections,
    }
}

/// Writes `state` in the state-file format (`src/node/snapshot.rs`,
/// `save_shard`), signed under `master`: an independent writer to check the
/// reader against. A connection refers to the first account with its key.
pub fn encode_state(state: &DecodedState, master: &MasterKey) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"MPPSTATE");
    b.extend_from_slice(&snapshot::VERSION.to_le_bytes());
    b.extend_from_slice(&state.id.generation.to_le_bytes());
    b.extend_from_slice(&state.index.to_le_bytes());
    b.extend_from_slice(&state.id.count.to_le_bytes());
    b.extend_from_slice(&state.saved.0.to_le_bytes());
    b.extend_from_slice(&state.epoch.0.to_le_bytes());
    b.extend_from_slice(&(state.accounts.len() as u64).to_le_bytes());
    b.extend_from_slice(&(state.connections.len() as u64).to_le_bytes());
    for a in &state.accounts {
        for v in [
            a.affinity, a.low, a.serial, a.since, a.catch_up, a.epoch, a.stamp,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    for c in &state.connections {
        let account = state
            .accounts
            .iter()
            .position(|a| a.affinity == c.account.affinity && a.low == c.account.low)
            .unwrap_or(u32::MAX as usize) as u32;
        b.extend_from_slice(&c.conn_id.0);
        b.extend_from_slice(&c.window.to_le_bytes());
        b.extend_from_slice(&c.highest_serial.to_le_bytes());
        b.extend_from_slice(&c.last_seen.to_le_bytes());
        b.extend_from_slice(&c.expires.to_le_bytes());
        b.extend_from_slice(&account.to_le_bytes());
        let mut flags = c.tries.min(7) << 4;
        if c.catch_up {
            flags |= 8;
        }
        if c.validated {
            flags |= 4;
        }
        if c.key_parity & 1 == 1 {
            flags |= 0x80;
        }
        let (port, addr) = match c.endpoint {
            None => (0, Vec::new()),
            Some(SocketAddr::V4(a)) => {
                flags |= 2;
                (a.port(), a.ip().octets().to_vec())
            }
            Some(SocketAddr::V6(a)) => {
                flags |= 2 | 1;
                (a.port(), a.ip().octets().to_vec())
            }
        };
        b.extend_from_slice(&port.to_le_bytes());
        b.push(flags);
        b.push(c.pending_len);
        b.extend_from_slice(&addr);
        b.extend_from_slice(&c.pending[..usize::from(c.pending_len)]);
    }
    snapshot::sign_state(&b, master)
}
