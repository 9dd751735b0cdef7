//! The AES-GCM differential target's check (see `checks.rs`). Apart from
//! `checks.rs` because it calls each implementation explicitly through
//! `mpp::packet::testing`, which the packet layer added with run-time
//! selection of the implementation.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes256Gcm;
use mpp::packet::{open, seal, testing, ConnId, PacketError, PacketKey, MAX_PLAINTEXT};

use crate::checks::Input;

// ---------------------------------------------------------------------------
// 7. aes_gcm_diff
// ---------------------------------------------------------------------------

/// `aes_gcm_diff`: key (32), nonce (12), conn id (8), a position (2), a
/// mask (1), an AAD length (1), the AAD, then a text. For every AES-GCM
/// implementation this CPU runs (`mpp::packet::testing`: ours on AES-NI and
/// the portable one), against the `aes-gcm` crate: sealing the text gives
/// the same ciphertext and tag; opening the text as ciphertext ‖ tag gives
/// the same verdict (and leaves it unchanged when refused); the sealed text
/// opens back, and with the mask XORed in at the position both refuse it.
/// Then the same through whatever `mpp::packet::seal`/`open` select, with
/// the conn id as AAD, as a packet.
pub fn aes_gcm_diff(data: &[u8]) {
    let mut input = Input::new(data);
    let key: [u8; 32] = input.array();
    let nonce: [u8; 12] = input.array();
    let conn_id: [u8; 8] = input.array();
    let position = usize::from(input.u16());
    let mask = input.byte();
    let aad_len = usize::from(input.byte());
    let aad = input.bytes(aad_len);
    let text = input.rest();

    let reference = Aes256Gcm::new(&key.into());
    let mut expected = text.to_vec();
    let tag = reference
        .encrypt_in_place_detached(&nonce.into(), aad, &mut expected)
        .expect("aes-gcm seals any length we give it");
    expected.extend_from_slice(&tag);
    let reference_opens = |buf: &[u8]| -> Option<Vec<u8>> {
        if buf.len() < 16 {
            return None;
        }
        let (ct, tag) = buf.split_at(buf.len() - 16);
        let mut pt = ct.to_vec();
        reference
            .decrypt_in_place_detached(&nonce.into(), aad, &mut pt, tag.into())
            .ok()
            .map(|()| pt)
    };
    let mut tampered = expected.clone();
    let at = position % tampered.len();
    tampered[at] ^= mask;

    for implementation in testing::available() {
        let ours = testing::TestGcm::new(implementation, &key).expect("available");
        let mut sealed = text.to_vec();
        sealed.extend_from_slice(&[0u8; 16]);
        ours.seal_in_place(&nonce, aad, &mut sealed);
        assert_eq!(
            sealed, expected,
            "{implementation}: seal differs from aes-gcm"
        );

        let mut opened = sealed.clone();
        assert!(
            ours.open_in_place(&nonce, aad, &mut opened),
            "{implementation}: open(seal)"
        );
        assert_eq!(
            &opened[..text.len()],
            text,
            "{implementation}: open(seal(p)) != p"
        );

        for candidate in [text, &tampered[..]] {
            let mut buf = candidate.to_vec();
            let ok = ours.open_in_place(&nonce, aad, &mut buf);
            let theirs = reference_opens(candidate);
            assert_eq!(
                ok,
                theirs.is_some(),
                "{implementation}: open verdicts differ"
            );
            match theirs {
                Some(pt) => assert_eq!(&buf[..pt.len()], &pt[..], "{implementation}: plaintexts"),
                None => assert_eq!(buf, candidate, "{implementation}: refused but changed"),
            }
        }
    }

    // The packet layer, through whichever implementation it selected.
    let id = ConnId(conn_id);
    let packet_key = PacketKey::new(&key);
    let Ok(packet) = seal(&packet_key, id, nonce, text) else {
        assert!(id.is_reserved() || text.len() > MAX_PLAINTEXT);
        return;
    };
    let mut ct = text.to_vec();
    let tag = reference
        .encrypt_in_place_detached(&nonce.into(), &conn_id, &mut ct)
        .expect("aes-gcm seals");
    let expected_packet = [&conn_id[..], &nonce, &ct, &tag].concat();
    assert_eq!(
        packet, expected_packet,
        "mpp::packet::seal differs from aes-gcm"
    );
    assert_eq!(open(&packet_key, &packet).as_deref(), Ok(text));
    let mut bad = packet.clone();
    let at = position % bad.len();
    bad[at] ^= mask;
    let verdict = open(&packet_key, &bad);
    if mask == 0 {
        assert_eq!(verdict.as_deref(), Ok(text));
    } else {
        assert_eq!(
            verdict,
            Err(PacketError::Unauthentic),
            "tampered packet accepted"
        );
    }
}
