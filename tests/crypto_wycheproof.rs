//! Both AES-256-GCM implementations (ours on AES-NI and PCLMULQDQ, and the
//! portable RustCrypto one; `src/packet/mod.rs`) against Google's Wycheproof
//! vectors, a known-answer packet and `aes_gcm` itself, each selected
//! explicitly whatever the process chose. Also: the process's choice follows
//! the CPU and `MPP_CRYPTO`, and (run by CI, needs `qemu-x86_64`) this very
//! binary passes on the portable path on emulated CPUs that each lack one of
//! the fast path's instruction sets.
//!
//! On a CPU without AES-NI the fast implementation cannot run: these tests
//! then say so on stderr and check the portable one.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use mpp::packet::testing::{available, TestGcm};
use mpp::packet::{
    aes_gcm_implementation, open, seal, AesGcmImplementation, ConnId, Direction, MasterKey,
    CRYPTO_ENV,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use wycheproof::aead::{TestName, TestSet};
use wycheproof::TestResult;

/// The implementations to test here, saying on stderr if ours is missing.
fn implementations() -> Vec<AesGcmImplementation> {
    let all = available();
    if !all.contains(&AesGcmImplementation::AesNi) {
        eprintln!("this CPU lacks AES-NI/PCLMULQDQ/SSSE3/SSE4.1: testing the portable path only");
    }
    all
}

fn key32(bytes: &[u8]) -> [u8; 32] {
    bytes.try_into().expect("a 32-byte key")
}

fn nonce12(bytes: &[u8]) -> [u8; 12] {
    bytes.try_into().expect("a 12-byte nonce")
}

/// Per implementation: how many valid vectors sealed and opened, how many
/// invalid ones were refused.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    valid: usize,
    invalid: usize,
}

/// Runs every Wycheproof AES-GCM vector with a 256-bit key, a 96-bit nonce
/// and a 128-bit tag (what every packet uses, docs/PROTOCOL.md §3.3)
/// through `implementation`: a valid vector must seal to its ciphertext and
/// tag and open to its plaintext (the tag bytes left as they were); an
/// invalid one must be refused with the buffer unchanged.
fn run_wycheproof(implementation: AesGcmImplementation) -> Counts {
    let set = TestSet::load(TestName::AesGcm).expect("the AES-GCM vectors load");
    let mut counts = Counts::default();
    for group in set
        .test_groups
        .iter()
        .filter(|g| g.key_size == 256 && g.nonce_size == 96 && g.tag_size == 128)
    {
        for t in &group.tests {
            let id = format!("{implementation} tcId {} ({})", t.tc_id, t.comment);
            let key = TestGcm::new(implementation, &key32(&t.key)).expect("available");
            let nonce = nonce12(&t.nonce);
            let sealed: Vec<u8> = [&t.ct[..], &t.tag[..]].concat();
            match t.result {
                TestResult::Valid => {
                    let mut buf = t.pt.to_vec();
                    buf.extend([0u8; 16]);
                    key.seal_in_place(&nonce, &t.aad, &mut buf);
                    assert_eq!(hex::encode(&buf), hex::encode(&sealed), "seal {id}");
                    let mut buf = sealed.clone();
                    assert!(key.open_in_place(&nonce, &t.aad, &mut buf), "open {id}");
                    assert_eq!(buf[..t.pt.len()], t.pt[..], "plaintext {id}");
                    assert_eq!(buf[t.pt.len()..], t.tag[..], "tag bytes {id}");
                    counts.valid += 1;
                }
                TestResult::Invalid => {
                    let mut buf = sealed.clone();
                    assert!(!key.open_in_place(&nonce, &t.aad, &mut buf), "opened {id}");
                    assert_eq!(buf, sealed, "refusal changed the buffer: {id}");
                    counts.invalid += 1;
                }
                // None in this set for these sizes; either outcome is allowed.
                TestResult::Acceptable => {}
            }
        }
    }
    counts
}

/// The Wycheproof set (wycheproof 0.7) has 66 such vectors: 39 valid, 27
/// invalid (modified tags, ciphertexts and the like). Every one runs
/// through every implementation this CPU has.
#[test]
fn wycheproof_aes_256_gcm_both_implementations() {
    for implementation in implementations() {
        let counts = run_wycheproof(implementation);
        eprintln!("Wycheproof AES-256-GCM, {implementation}: {counts:?}");
        assert_eq!(
            counts,
            Counts {
                valid: 39,
                invalid: 27
            },
            "{implementation}"
        );
    }
}

/// Known answer, opening: the sealed client packet of
/// `tests/vectors/crypto.json` (key `k_c2s`, AAD = its conn id) opens to its
/// plaintext under each implementation, and not with one bit of the tag
/// changed.
#[test]
fn known_answer_open_both_implementations() {
    let key = key32(
        &hex::decode("f9b795d9c6b75624b5dbd59ce9655e8a82f6c86ad02ae7d053e30856e429f687")
            .expect("hex"),
    );
    let packet = hex::decode(
        "0102030405060708000102030405060708090a0bcafc39631fa58e8ed2222f01d45aa8d4f25eea8cf41ea2dcf1a65c158e6a0ee4df3a84eee8b8d66fb80cdd6a16831dad50d660dad4da1620f7c437565d5dbf0f",
    )
    .expect("hex");
    let plaintext = hex::decode(
        "7bb41150726573656e63654865617274626561747bb40653657269616ca005b40b41636b6e6f776c65646765a0037d7d",
    )
    .expect("hex");
    let (conn_id, rest) = packet.split_at(8);
    let (nonce, body) = rest.split_at(12);
    for implementation in implementations() {
        let gcm = TestGcm::new(implementation, &key).expect("available");
        let mut buf = body.to_vec();
        assert!(
            gcm.open_in_place(&nonce12(nonce), conn_id, &mut buf),
            "{implementation}"
        );
        assert_eq!(buf[..plaintext.len()], plaintext[..], "{implementation}");
        let mut bad = body.to_vec();
        *bad.last_mut().expect("a tag") ^= 0x80;
        assert!(
            !gcm.open_in_place(&nonce12(nonce), conn_id, &mut bad),
            "{implementation}"
        );
    }
}

/// Differential: for every AAD length 0..=24 and text length 0..=160 with
/// random keys, nonces and bytes, every implementation seals exactly as
/// `aes_gcm::Aes256Gcm` does and opens what it sealed; one flipped bit is
/// refused. (`src/packet/gcm.rs` has the longer sweep for ours.)
#[test]
fn implementations_agree_with_aes_gcm() {
    let mut rng = StdRng::seed_from_u64(0x7779_6368);
    let implementations = implementations();
    for aad_len in 0..=24usize {
        for len in 0..=160usize {
            let key: [u8; 32] = rng.gen();
            let nonce: [u8; 12] = rng.gen();
            let mut aad = vec![0u8; aad_len];
            let mut plain = vec![0u8; len];
            rng.fill_bytes(&mut aad);
            rng.fill_bytes(&mut plain);
            let mut expected = plain.clone();
            let tag = Aes256Gcm::new(&key.into())
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad, &mut expected)
                .expect("seal");
            expected.extend_from_slice(&tag);
            for &implementation in &implementations {
                let gcm = TestGcm::new(implementation, &key).expect("available");
                let mut buf = plain.clone();
                buf.extend(rng.gen::<[u8; 16]>());
                gcm.seal_in_place(&nonce, &aad, &mut buf);
                assert_eq!(buf, expected, "{implementation} aad {aad_len} len {len}");
                assert!(gcm.open_in_place(&nonce, &aad, &mut buf));
                assert_eq!(buf[..len], plain[..]);
                let mut bad = expected.clone();
                let bit = rng.gen_range(0..bad.len() * 8);
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(!gcm.open_in_place(&nonce, &aad, &mut bad));
            }
        }
    }
}

/// The process runs the portable path if `MPP_CRYPTO=portable` or the CPU
/// lacks the instructions, ours otherwise; CI's second run (`.ci/run`)
/// relies on this to know it tested the portable path.
#[test]
fn the_choice_follows_the_cpu_and_the_environment() {
    let forced = std::env::var(CRYPTO_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("portable"));
    let expected = if !forced && available().contains(&AesGcmImplementation::AesNi) {
        AesGcmImplementation::AesNi
    } else {
        AesGcmImplementation::Portable
    };
    eprintln!(
        "{CRYPTO_ENV}={:?}: running {}",
        std::env::var(CRYPTO_ENV).ok(),
        aes_gcm_implementation()
    );
    assert_eq!(aes_gcm_implementation(), expected);
}

/// Set by [`qemu_without_aes_ni`] for the child it runs under qemu.
const IN_QEMU: &str = "MPP_TEST_IN_QEMU";

/// Run inside qemu by [`qemu_without_aes_ni`] (ignored otherwise): on a CPU
/// without AES-NI the process picks the portable path by itself, and a
/// packet round trip through the public API, the known answer and every
/// Wycheproof vector pass on it.
#[test]
#[ignore = "run by qemu_without_aes_ni, inside qemu"]
fn emulated_cpu_child() {
    if std::env::var_os(IN_QEMU).is_none() {
        // Run natively by `--ignored`: nothing to check here; the parent
        // test requires the line this prints at the end.
        eprintln!("emulated_cpu_child: only meaningful under qemu_without_aes_ni");
        return;
    }
    assert_eq!(available(), vec![AesGcmImplementation::Portable]);
    assert_eq!(aes_gcm_implementation(), AesGcmImplementation::Portable);
    let master = MasterKey::new([7; 32]);
    let id = ConnId([1, 2, 3, 4, 5, 6, 7, 8]);
    let p = seal(
        &master.packet_key(id, Direction::ClientToServer),
        id,
        [3; 12],
        b"hello",
    )
    .expect("seals");
    let key = master.expanded_secret(id).key(Direction::ClientToServer);
    assert_eq!(open(&key, &p), Ok(b"hello".to_vec()));
    known_answer_open_both_implementations();
    let counts = run_wycheproof(AesGcmImplementation::Portable);
    assert_eq!(
        counts,
        Counts {
            valid: 39,
            invalid: 27
        }
    );
    println!("emulated CPU: portable path, Wycheproof {counts:?}");
}

/// Emulated CPUs that each lack at least one of the four instruction sets
/// the fast path needs (AES-NI, PCLMULQDQ, SSSE3, SSE4.1): none at all;
/// SSSE3 and SSE4.1 but neither AES-NI nor PCLMULQDQ (`Nehalem`);
/// PCLMULQDQ without AES-NI; AES-NI without PCLMULQDQ. A process that took
/// any of them for one with all four would run an AES-NI or PCLMULQDQ
/// instruction the emulator refuses (illegal instruction).
const CPUS_WITHOUT_THE_FAST_PATH: [&str; 4] = [
    "qemu64,-aes,-pclmulqdq",
    "Nehalem",
    "Nehalem,+pclmulqdq",
    "Westmere,-pclmulqdq",
];

/// This test binary, run by `qemu-x86_64 -cpu MODEL` for each model of
/// [`CPUS_WITHOUT_THE_FAST_PATH`], passes [`emulated_cpu_child`] on the
/// portable path: no illegal instruction. Needs `qemu-x86_64` (Debian:
/// `qemu-user`) and fails without it; CI installs it and runs this with
/// `--ignored`.
#[test]
#[ignore = "needs qemu-x86_64 (Debian qemu-user); CI runs it"]
fn qemu_without_aes_ni() {
    let exe = std::env::current_exe().expect("this test binary");
    for cpu in CPUS_WITHOUT_THE_FAST_PATH {
        let out = std::process::Command::new("qemu-x86_64")
            .args(["-cpu", cpu])
            .arg(&exe)
            .args(["--ignored", "--exact", "emulated_cpu_child", "--nocapture"])
            .env_remove(CRYPTO_ENV)
            .env(IN_QEMU, "1")
            .output()
            .expect("qemu-x86_64 runs (install Debian's qemu-user)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("-cpu {cpu}:\n{stdout}{stderr}");
        assert!(
            out.status.success(),
            "under qemu -cpu {cpu}: {:?}",
            out.status
        );
        assert!(
            stdout.contains("emulated CPU: portable path"),
            "the child test ran under -cpu {cpu}"
        );
        assert!(
            stdout.contains("1 passed"),
            "the child test passed under -cpu {cpu}"
        );
    }
}
