//! The FINGERPRINT value of a STUN message (RFC 8489 §14.7): the CRC-32 of
//! the message up to the attribute, XOR `0x5354554E`.
//!
//! It exists because both the request check (a FINGERPRINT that does not
//! verify means the datagram is discarded) and every response to a request
//! that carried one need the same CRC. It only computes: it must not look at
//! where the attribute sits or what the message means, and it must not
//! allocate (the table is built at compile time).

/// XORed into the CRC-32 to make FINGERPRINT (RFC 8489 §14.7: "STUN" in ASCII).
const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// FINGERPRINT value of `message`, the bytes before the attribute, whose
/// length field must already count the attribute (RFC 8489 §14.7).
pub(super) fn fingerprint(message: &[u8]) -> u32 {
    crc32(message) ^ FINGERPRINT_XOR
}

/// Lookup table of the reflected CRC-32 polynomial 0xEDB88320.
const CRC32_TABLE: [u32; 256] = crc32_table();

/// Builds [`CRC32_TABLE`] at compile time.
const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

/// CRC-32/ISO-HDLC, the V.42 / zlib CRC that FINGERPRINT uses (RFC 8489 §14.7).
pub(super) fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC32_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}
