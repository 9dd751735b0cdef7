//! Shard steering in the kernel: the classic-BPF program that picks, for each
//! datagram, which socket of the SO_REUSEPORT group receives it
//! (docs/PROTOCOL.md §8), and the same rule in Rust for code that must agree.
//!
//! It exists so that a connection's packets reach the shard that owns its
//! account whatever address they come from, with no lock and no forwarding in
//! the common case. It must not look further into a packet than the two
//! 32-bit words the rule names, and nothing else may compute a shard any
//! other way: [`shard_of`] and [`shard_for_datagram`] are the only formulas.

use std::io;
use std::mem;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;

/// `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5+): attach a classic-BPF socket
/// selector to the SO_REUSEPORT group of a socket.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// The STUN magic cookie, bytes 4..8 of every STUN message (RFC 8489 §5),
/// read as a big-endian word as the BPF `ld` does (docs/PROTOCOL.md §8).
const STUN_COOKIE: u32 = u32::from_be_bytes(crate::packet::STUN_MAGIC_COOKIE);

/// Offset of the account affinity in an MPP datagram: connection id bytes
/// 4..8 (docs/PROTOCOL.md §4, §8).
const AFFINITY_OFFSET: u32 = 4;

/// Offset of the first word of a STUN transaction id (RFC 8489 §5), which
/// steers STUN (docs/PROTOCOL.md §8).
const STUN_TXID_OFFSET: u32 = 8;

/// The shard that owns `affinity` among `shards`: `affinity mod shards`
/// (docs/PROTOCOL.md §8). 0 when `shards` is 0.
pub fn shard_of(affinity: u32, shards: u32) -> u32 {
    affinity.checked_rem(shards).unwrap_or(0)
}

/// The steering key the kernel program uses for `payload`: the STUN
/// transaction id's first word for a STUN message, otherwise the 32-bit
/// big-endian word at offset 4. `None` when the datagram is too short for
/// the load, in which case the kernel picks socket 0.
pub fn steering_key(payload: &[u8]) -> Option<u32> {
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            payload.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    let affinity = word(AFFINITY_OFFSET as usize)?;
    // docs/PROTOCOL.md §8: first two bits 0 and the cookie at 4..8 → STUN.
    if affinity == STUN_COOKIE && payload[0] & 0xC0 == 0 {
        word(STUN_TXID_OFFSET as usize)
    } else {
        Some(affinity)
    }
}

/// The socket index (= shard) the kernel program selects for `payload` among
/// `shards` sockets; exactly what [`attach_steering`] makes the kernel do.
pub fn shard_for_datagram(payload: &[u8], shards: u32) -> u32 {
    steering_key(payload).map_or(0, |key| shard_of(key, shards))
}

/// Attaches the steering program to the SO_REUSEPORT group of `socket`, so
/// the group's socket number [`shard_for_datagram`] (in bind order) receives
/// each datagram.
///
/// Call it once, on any member, after every socket of the group is bound;
/// the program belongs to the group. With `shards <= 1` nothing is attached.
pub fn attach_steering(socket: &UdpSocket, shards: u32) -> io::Result<()> {
    if shards <= 1 {
        return Ok(());
    }
    let mut program = program(shards);
    let fprog = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `program`, which outlives the call (the kernel
    // copies the instructions during setsockopt); the option length is the
    // size of the sock_fprog passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("attaching the reuseport steering program for {shards} shards: {err}"),
        ));
    }
    Ok(())
}

/// One classic-BPF instruction.
fn insn(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The steering program for `shards` sockets. It sees the UDP payload at
/// offset 0; a load past the end aborts it with return value 0 (socket 0).
pub(crate) fn program(shards: u32) -> Vec<libc::sock_filter> {
    use libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JA, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_MOD,
        BPF_RET, BPF_W,
    };
    vec![
        // 0: A = word at 4 (affinity, or the STUN cookie).
        insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, AFFINITY_OFFSET),
        // 1: not the cookie → 7 (A holds the affinity).
        insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 5, STUN_COOKIE),
        // 2: A = first byte.
        insn(BPF_LD | BPF_B | BPF_ABS, 0, 0, 0),
        // 3: top two bits set → not STUN → 6 (reload the affinity).
        insn(BPF_JMP | BPF_JSET | BPF_K, 2, 0, 0xC0),
        // 4: STUN: A = first word of the transaction id.
        insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, STUN_TXID_OFFSET),
        // 5: → 7.
        insn(BPF_JMP | BPF_JA, 0, 0, 1),
        // 6: A = word at 4 again.
        insn(BPF_LD | BPF_W | BPF_ABS, 0, 0, AFFINITY_OFFSET),
        // 7: A = A mod N (docs/PROTOCOL.md §8), same as `shard_of`.
        insn(BPF_ALU | BPF_MOD | BPF_K, 0, 0, shards),
        // 8: select socket A.
        insn(BPF_RET | BPF_A, 0, 0, 0),
    ]
}

#[cfg(test)]
mod tests;
