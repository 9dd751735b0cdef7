//! docs/PROTOCOL.md §3, §4: every byte of `tests/vectors/crypto.json` must be
//! reproduced — derived keys, binding, affinity and one sealed client packet —
//! and the sealed packet must not open after any tampering or truncation.
//!
//! Through the public API, so on the AES-GCM path the process runs (ours on
//! AES-NI where the CPU has it, `src/packet/mod.rs`); CI runs this file a
//! second time with `MPP_CRYPTO=portable` for the RustCrypto path.

use mpp::packet::{
    account_affinity, binding, open, open_in_place, seal_in_place, BindingKey, ConnId, Direction,
    MasterKey, PacketError, PacketKey, HEADER_LEN, MAX_PACKET,
};
use mpp::time::UnixSeconds;
use serde_json::Value;

struct Vectors(Value);

impl Vectors {
    fn load() -> Self {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/crypto.json");
        let text = std::fs::read_to_string(path).expect("crypto.json is readable");
        Vectors(serde_json::from_str(&text).expect("crypto.json is JSON"))
    }

    fn str(&self, key: &str) -> &str {
        self.0[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key} is a string"))
    }

    fn bytes(&self, key: &str) -> Vec<u8> {
        hex::decode(self.str(key)).unwrap_or_else(|e| panic!("{key} is hex: {e}"))
    }

    fn key(&self, key: &str) -> [u8; 32] {
        self.bytes(key)
            .try_into()
            .unwrap_or_else(|_| panic!("{key} is 32 bytes"))
    }

    fn conn_id(&self) -> ConnId {
        ConnId::from_slice(&self.bytes("conn_id")).expect("conn_id is 8 bytes")
    }

    fn k_c2s(&self) -> PacketKey {
        PacketKey::new(&self.key("k_c2s"))
    }
}

#[test]
fn derived_keys() {
    let v = Vectors::load();
    let master = MasterKey::from_hex(v.str("master_key")).expect("master key");
    assert_eq!(master.to_hex(), v.str("master_key"));
    let id = v.conn_id();
    let secret = master.secret(id);
    assert_eq!(secret.as_bytes(), &v.key("secret"));
    assert_eq!(
        secret.key_bytes(Direction::ClientToServer, id),
        v.key("k_c2s")
    );
    assert_eq!(
        secret.key_bytes(Direction::ServerToClient, id),
        v.key("k_s2c")
    );
    assert_eq!(master.bind_key(), v.key("bind_key"));
    let expanded = master.expanded_secret(id);
    assert_eq!(
        expanded.key_bytes(Direction::ClientToServer),
        v.key("k_c2s")
    );
    assert_eq!(
        expanded.key_bytes(Direction::ServerToClient),
        v.key("k_s2c")
    );
}

#[test]
fn binding_vector() {
    let v = Vectors::load();
    let expires_unix = v.0["expires_unix"]
        .as_i64()
        .expect("expires_unix is an integer");
    let expires = UnixSeconds::parse(v.str("expires").as_bytes()).expect("expires is a date");
    assert_eq!(expires, UnixSeconds(expires_unix));
    let (account, device) = (v.str("account"), v.str("device"));
    let b =
        binding(&v.key("bind_key"), v.conn_id(), expires, account, device).expect("short fields");
    assert_eq!(b, v.key("binding"));
    let master = MasterKey::from_hex(v.str("master_key")).expect("master key");
    let b2 = BindingKey::from_master(&master)
        .binding(v.conn_id(), expires, account, device)
        .expect("short fields");
    assert_eq!(b2, b);
}

#[test]
fn affinity_vector() {
    let v = Vectors::load();
    let expected = u32::from_str_radix(v.str("affinity_hex"), 16).expect("affinity is hex");
    assert_eq!(account_affinity(v.str("affinity_account")), expected);
}

#[test]
fn packet_seals_and_opens_byte_for_byte() {
    let v = Vectors::load();
    let key = v.k_c2s();
    let plaintext = v.bytes("packet_plaintext");
    let nonce: [u8; 12] = v
        .bytes("packet_nonce")
        .try_into()
        .expect("nonce is 12 bytes");
    let expected = v.bytes("packet_c2s");

    let mut buf = [0u8; MAX_PACKET];
    buf[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(&plaintext);
    let n = seal_in_place(&key, v.conn_id(), nonce, &mut buf, plaintext.len()).expect("seals");
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&expected));

    let mut packet = expected.clone();
    let opened = open_in_place(&key, &mut packet).expect("opens");
    assert_eq!(opened, &plaintext[..]);

    // The packet key derived from the master key opens it too.
    let master = MasterKey::from_hex(v.str("master_key")).expect("master key");
    let derived = master.packet_key(v.conn_id(), Direction::ClientToServer);
    assert_eq!(open(&derived, &expected), Ok(plaintext.clone()));
    let wrong_way = master.packet_key(v.conn_id(), Direction::ServerToClient);
    assert_eq!(open(&wrong_way, &expected), Err(PacketError::Unauthentic));
}

#[test]
fn every_single_byte_flip_fails() {
    let v = Vectors::load();
    let key = v.k_c2s();
    let packet = v.bytes("packet_c2s");
    for i in 0..packet.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut tampered = packet.clone();
            tampered[i] ^= mask;
            let before = tampered.clone();
            assert!(
                open_in_place(&key, &mut tampered).is_err(),
                "flip {mask:#04x} at byte {i} opened"
            );
            assert_eq!(tampered, before, "failed open changed the buffer");
        }
    }
}

#[test]
fn every_truncation_fails() {
    let v = Vectors::load();
    let key = v.k_c2s();
    let packet = v.bytes("packet_c2s");
    for len in 0..packet.len() {
        assert!(
            open(&key, &packet[..len]).is_err(),
            "prefix of {len} bytes opened"
        );
        assert!(
            open(&key, &packet[packet.len() - len..]).is_err(),
            "suffix of {len} bytes opened"
        );
    }
    let mut longer = packet.clone();
    longer.push(0);
    assert!(open(&key, &longer).is_err());
}
