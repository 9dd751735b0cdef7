//! The hostile mix (`--hostile RATE`, docs/BENCHMARKS.md "Flood"): while the
//! devices of a scenario keep their load, one more thread sends the node
//! garbage from the devices' own address, as a noisy neighbour behind the
//! same NAT would. Six kinds, in turn, each from a socket of its own so that
//! what the node answers is counted per kind:
//!
//! - `random`: random bytes of random length;
//! - `bad_tag`: a real device's conn id and a heartbeat-sized body that does
//!   not authenticate;
//! - `truncated`: a real device's sealed heartbeat, cut short;
//! - `oversized`: a real device's conn id in a datagram larger than any MPP
//!   packet (4,000 bytes);
//! - `stun`: a STUN Binding request (the only kind the node should answer);
//! - `replay`: a real device's authentic heartbeat with a Serial the node has
//!   seen long ago (what a captured and replayed packet is to the node).
//!
//! It must not touch the devices' state: it builds its packets from the
//! run's [`Identity`] only.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use mpp::net::mmsg::MmsgBatch;
use mpp::packet::MAX_PACKET;
use mpp::proto::{seal_request_with, Request, RequestHeader};
use rand::{Rng, RngCore, SeedableRng};
use socket2::Socket;

use crate::ident::Identity;
use crate::io::{connected_socket, send_all};

/// The kinds, in the order they are sent and reported.
pub(crate) const KINDS: [&str; 6] = [
    "random",
    "bad_tag",
    "truncated",
    "oversized",
    "stun",
    "replay",
];

/// Bytes of an `oversized` datagram.
const OVERSIZED: usize = 4000;

/// Packets of each kind built ahead (sent round-robin).
const POOL: usize = 1024;

/// What one kind sent and what came back for it.
#[derive(Default)]
pub(crate) struct KindCounts {
    pub(crate) sent: AtomicU64,
    pub(crate) answers: AtomicU64,
    pub(crate) answer_bytes: AtomicU64,
}

/// The counts of every kind, shared with the report.
pub(crate) struct HostileCounts {
    pub(crate) kinds: [KindCounts; 6],
}

impl HostileCounts {
    /// The counts as a JSON object: per kind, sent / answers / answer bytes,
    /// and the totals.
    pub(crate) fn to_json(&self, seconds: f64) -> serde_json::Value {
        let mut per = serde_json::Map::new();
        let (mut sent, mut answered_bytes_non_stun) = (0, 0);
        for (name, k) in KINDS.iter().zip(&self.kinds) {
            let s = k.sent.load(Relaxed);
            let bytes = k.answer_bytes.load(Relaxed);
            sent += s;
            if *name != "stun" {
                answered_bytes_non_stun += bytes;
            }
            per.insert(
                (*name).into(),
                serde_json::json!({
                    "sent": s,
                    "answers": k.answers.load(Relaxed),
                    "answer_bytes": bytes,
                }),
            );
        }
        serde_json::json!({
            "sent": sent,
            "rate_per_s": (sent as f64 / seconds.max(1e-9)).round(),
            "answer_bytes_except_stun": answered_bytes_non_stun,
            "kinds": per,
        })
    }
}

/// The sender: one connected socket per kind and a pool of packets each.
pub(crate) struct Hostile {
    socks: Vec<Socket>,
    pools: Vec<Vec<Vec<u8>>>,
    rate: f64,
    pub(crate) counts: Arc<HostileCounts>,
}

impl Hostile {
    /// Builds the pools from `devices` of `ident` and connects the sockets
    /// to `target`.
    pub(crate) fn new(
        ident: &Identity,
        devices: u64,
        target: SocketAddr,
        rate: f64,
    ) -> Result<Hostile> {
        let mut rng = rand::rngs::StdRng::from_entropy();
        let socks = KINDS
            .iter()
            .map(|_| connected_socket(target))
            .collect::<Result<Vec<_>>>()?;
        let mut pools: Vec<Vec<Vec<u8>>> = vec![Vec::with_capacity(POOL); KINDS.len()];
        for i in 0..POOL {
            let g = rng.gen_range(0..devices.max(1));
            let mut random = vec![0u8; rng.gen_range(1..=1200)];
            rng.fill_bytes(&mut random);
            pools[0].push(random);
            let heartbeat = stale_heartbeat(ident, g, &mut rng);
            if let (Some(conn_id), Some(hb)) = (ident.conn_id(g), heartbeat) {
                let mut bad = hb.clone();
                rng.fill_bytes(&mut bad[conn_id.0.len()..]);
                pools[1].push(bad);
                let cut = rng.gen_range(1..hb.len());
                pools[2].push(hb[..cut].to_vec());
                let mut big = vec![0u8; OVERSIZED];
                rng.fill_bytes(&mut big);
                big[..conn_id.0.len()].copy_from_slice(&conn_id.0);
                pools[3].push(big);
                pools[5].push(hb);
            }
            pools[4].push(stun_request(i as u64, &mut rng));
        }
        if pools.iter().any(|p| p.is_empty()) {
            anyhow::bail!("--hostile: no device of this run has a usable conn id");
        }
        Ok(Hostile {
            socks,
            pools,
            rate,
            counts: Arc::new(HostileCounts {
                kinds: Default::default(),
            }),
        })
    }

    /// Sends the mix at the rate until `stop`, reading what comes back.
    pub(crate) fn run(self, batch: usize, stop: &AtomicBool) -> Result<()> {
        let started = Instant::now();
        let fds: Vec<i32> = self.socks.iter().map(|s| s.as_raw_fd()).collect();
        let mut out: Vec<MmsgBatch> = fds.iter().map(|_| MmsgBatch::new(batch)).collect();
        let mut inb = MmsgBatch::new(batch);
        let mut next = vec![0usize; KINDS.len()];
        let mut sent_total: u64 = 0;
        let mut kind = 0;
        while !stop.load(Relaxed) {
            let due = (started.elapsed().as_secs_f64() * self.rate) as u64;
            let mut n = due
                .saturating_sub(sent_total)
                .min(batch as u64 * KINDS.len() as u64);
            if n == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
            while n > 0 {
                let pool = &self.pools[kind];
                let p = &pool[next[kind] % pool.len()];
                next[kind] += 1;
                if p.len() > mpp::net::MAX_DATAGRAM {
                    // Larger than a batch slot: one send of its own.
                    if self.socks[kind].send(p).is_ok() {
                        self.counts.kinds[kind].sent.fetch_add(1, Relaxed);
                    }
                } else if let Some(slot) = out[kind].send_slot() {
                    slot[..p.len()].copy_from_slice(p);
                    out[kind].commit(p.len());
                }
                if out[kind].is_full() {
                    let s = send_all(&mut out[kind], fds[kind]);
                    self.counts.kinds[kind].sent.fetch_add(s as u64, Relaxed);
                }
                sent_total += 1;
                n -= 1;
                kind = (kind + 1) % KINDS.len();
            }
            for (k, b) in out.iter_mut().enumerate() {
                if b.queued() > 0 {
                    let s = send_all(b, fds[k]);
                    self.counts.kinds[k].sent.fetch_add(s as u64, Relaxed);
                }
            }
            for (k, &fd) in fds.iter().enumerate() {
                loop {
                    let got = inb.recv(fd).unwrap_or(0);
                    let bytes: usize = (0..got)
                        .filter_map(|i| inb.payload(i))
                        .map(<[u8]>::len)
                        .sum();
                    let counts = &self.counts.kinds[k];
                    counts.answers.fetch_add(got as u64, Relaxed);
                    counts.answer_bytes.fetch_add(bytes as u64, Relaxed);
                    if got < inb.capacity() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Device `g`'s authentic heartbeat with Serial 2: far below the Serials a
/// connected device uses (at least the Unix time), so the node has "seen" it.
fn stale_heartbeat(ident: &Identity, g: u64, rng: &mut impl RngCore) -> Option<Vec<u8>> {
    let conn_id = ident.conn_id(g)?;
    let keys = ident.keys(g)?;
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    let mut buf = vec![0u8; MAX_PACKET];
    let header = RequestHeader {
        serial: 2,
        acknowledge: None,
        echo: None,
    };
    let n = seal_request_with(
        &keys.c2s,
        conn_id,
        nonce,
        &header,
        &Request::Heartbeat,
        &mut buf,
    )
    .ok()?;
    buf.truncate(n);
    Some(buf)
}

/// A STUN Binding request with a random transaction id.
fn stun_request(i: u64, rng: &mut impl RngCore) -> Vec<u8> {
    let mut b = vec![0u8; 20];
    b[0..2].copy_from_slice(&0x0001u16.to_be_bytes());
    b[4..8].copy_from_slice(&mpp::proto::stun::MAGIC_COOKIE.to_be_bytes());
    b[8..12].copy_from_slice(&(rng.next_u32()).to_be_bytes());
    b[12..20].copy_from_slice(&i.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind is what it says: only `stun` looks like STUN, the packets
    /// built from a device carry its conn id, and none is a valid packet
    /// the node would answer except the stale heartbeat (authentic, with a
    /// Serial far below any connected device's).
    #[test]
    fn the_mix_is_what_it_says() {
        let ident = Identity::new(
            mpp::packet::MasterKey::new([7; 32]),
            crate::ident::Space::new(4, 4),
        )
        .unwrap();
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let h = Hostile::new(&ident, 4, sink.local_addr().unwrap(), 1.0).unwrap();
        for (k, pool) in h.pools.iter().enumerate() {
            assert_eq!(pool.len(), POOL, "{}", KINDS[k]);
            for p in pool {
                assert_eq!(
                    mpp::proto::stun::is_stun(p),
                    KINDS[k] == "stun",
                    "{}",
                    KINDS[k]
                );
            }
        }
        let conn_ids: Vec<_> = (0..4).filter_map(|g| ident.conn_id(g)).collect();
        for k in [1, 3, 5] {
            for p in &h.pools[k] {
                assert!(conn_ids.iter().any(|c| p.starts_with(&c.0)), "{}", KINDS[k]);
            }
        }
        assert!(h.pools[3].iter().all(|p| p.len() == OVERSIZED));
        assert!(h.pools[2]
            .iter()
            .zip(&h.pools[5])
            .all(|(t, r)| t.len() < r.len()));
    }
}
