//! The steering program, run by a tiny classic-BPF interpreter, must pick the
//! same socket as `shard_for_datagram` for every kind of datagram.

use super::*;

/// Runs `program` over `packet` the way the kernel's cBPF interpreter does
/// for the opcodes the steering program uses (a load past the end returns 0).
fn run(program: &[libc::sock_filter], packet: &[u8]) -> u32 {
    use libc::{
        BPF_A, BPF_ABS, BPF_ALU, BPF_B, BPF_JA, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_MOD,
        BPF_RET, BPF_W,
    };
    let mut a: u32 = 0;
    let mut pc = 0usize;
    loop {
        let i = &program[pc];
        let code = u32::from(i.code);
        pc += 1;
        match code {
            c if c == BPF_LD | BPF_W | BPF_ABS => {
                let at = i.k as usize;
                match packet.get(at..at + 4) {
                    Some(w) => a = u32::from_be_bytes([w[0], w[1], w[2], w[3]]),
                    None => return 0,
                }
            }
            c if c == BPF_LD | BPF_B | BPF_ABS => match packet.get(i.k as usize) {
                Some(b) => a = u32::from(*b),
                None => return 0,
            },
            c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                pc += usize::from(if a == i.k { i.jt } else { i.jf });
            }
            c if c == BPF_JMP | BPF_JSET | BPF_K => {
                pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf });
            }
            c if c == BPF_JMP | BPF_JA => pc += i.k as usize,
            c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
            c if c == BPF_RET | BPF_A => return a,
            other => panic!("opcode {other:#x} not modelled"),
        }
    }
}

/// A deterministic xorshift stream, so the test needs no RNG crate.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn program_agrees_with_shard_for_datagram() {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for shards in [2u32, 3, 4, 7, 8, 64] {
        let program = program(shards);
        for n in 0..4000u32 {
            let len = (xorshift(&mut seed) % 40) as usize;
            let mut packet: Vec<u8> = (0..len).map(|_| xorshift(&mut seed) as u8).collect();
            // A third of them STUN-looking, a third with the cookie but a
            // high first byte (an MPP conn id whose affinity is the cookie).
            if len >= 8 && n % 3 != 0 {
                packet[4..8].copy_from_slice(&crate::packet::STUN_MAGIC_COOKIE);
                packet[0] = if n % 3 == 1 {
                    packet[0] & 0x3F
                } else {
                    packet[0] | 0x40
                };
            }
            assert_eq!(
                run(&program, &packet),
                shard_for_datagram(&packet, shards),
                "shards {shards}, packet {packet:02x?}"
            );
        }
    }
}

#[test]
fn rule_examples() {
    let mpp = [0x80, 1, 2, 3, 0, 0, 0, 10, 9, 9, 9, 9];
    assert_eq!(steering_key(&mpp), Some(10));
    assert_eq!(shard_for_datagram(&mpp, 4), 2);
    let stun = [0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 7];
    assert_eq!(steering_key(&stun), Some(7));
    assert_eq!(shard_for_datagram(&stun, 4), 3);
    let cookie_not_stun = [0x40, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 7];
    assert_eq!(steering_key(&cookie_not_stun), Some(0x2112_A442));
    assert_eq!(steering_key(&[0; 7]), None);
    assert_eq!(shard_for_datagram(&[0; 7], 4), 0);
    // STUN too short for the transaction id word: the load fails → socket 0.
    assert_eq!(shard_for_datagram(&stun[..10], 4), 0);
}

#[test]
fn shard_of_is_mod() {
    assert_eq!(shard_of(10, 4), 2);
    assert_eq!(shard_of(u32::MAX, 7), u32::MAX % 7);
    assert_eq!(shard_of(5, 0), 0);
}
