//! STUN Binding load (RFC 8489): `--window` requests in flight per worker,
//! answered by the node, coturn, or (as the raw echo baseline) a reflector.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hdrhistogram::Histogram;
use socket2::Socket;

use crate::engine::{histogram, Shared};
use mpp::net::mmsg::MmsgBatch;

use crate::io::{send_all, wait_readable};

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
const HEADER_LEN: usize = 20;

/// One STUN worker's settings.
pub(crate) struct StunWorker {
    pub(crate) sockets: Vec<Socket>,
    pub(crate) window: usize,
    pub(crate) batch: usize,
    pub(crate) timeout_ms: u64,
    pub(crate) cpu: Option<usize>,
    /// Count an echoed request as an answer (the reflector baseline).
    pub(crate) accept_echo: bool,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    /// Generation of the request in flight; 0 when the slot is free.
    gen: u64,
    sent_us: u64,
}

/// Writes a Binding request for `slot`/`gen` into `buf`; returns its length.
fn request(buf: &mut [u8], slot: u32, gen: u64) -> usize {
    buf[0..2].copy_from_slice(&BINDING_REQUEST.to_be_bytes());
    buf[2..4].copy_from_slice(&0u16.to_be_bytes());
    buf[4..8].copy_from_slice(&MAGIC_COOKIE);
    buf[8..12].copy_from_slice(&slot.to_be_bytes());
    buf[12..20].copy_from_slice(&gen.to_be_bytes());
    HEADER_LEN
}

/// The slot and generation a response answers, if it is a Binding
/// success (or, with `accept_echo`, our own request coming back).
fn answer(packet: &[u8], accept_echo: bool) -> Option<(u32, u64)> {
    if packet.len() < HEADER_LEN || packet[4..8] != MAGIC_COOKIE {
        return None;
    }
    let kind = u16::from_be_bytes([packet[0], packet[1]]);
    let len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    if HEADER_LEN + len > packet.len() {
        return None;
    }
    if kind != BINDING_SUCCESS && !(accept_echo && kind == BINDING_REQUEST) {
        return None;
    }
    let slot = u32::from_be_bytes(packet[8..12].try_into().ok()?);
    let gen = u64::from_be_bytes(packet[12..20].try_into().ok()?);
    Some((slot, gen))
}

/// Runs until `shared.stop`; returns the round trips recorded while measuring.
pub(crate) fn run_worker(cfg: StunWorker, shared: Arc<Shared>) -> anyhow::Result<Histogram<u64>> {
    if let Some(cpu) = cfg.cpu {
        crate::sys::pin(cpu)?;
    }
    let fds: Vec<i32> = cfg.sockets.iter().map(|s| s.as_raw_fd()).collect();
    let socks = fds.len().max(1);
    let window = cfg.window.max(1);
    let mut slots = vec![Slot::default(); window];
    let mut out: Vec<MmsgBatch> = (0..socks).map(|_| MmsgBatch::new(cfg.batch)).collect();
    let mut inb = MmsgBatch::new(cfg.batch);
    let mut rtt = histogram();
    let mut gen = 0u64;
    let mut free: Vec<u32> = (0..window as u32).rev().collect();
    let c = &shared.counters;
    let timeout_us = cfg.timeout_ms * 1000;
    let mut last_scan = 0u64;
    shared.connect_done.fetch_add(1, Relaxed);
    while !shared.stop.load(Relaxed) {
        let now = shared.now_us();
        let mut got_total = 0;
        let mut replies = 0;
        for &fd in &fds {
            for _ in 0..8 {
                let n = match inb.recv(fd) {
                    Ok(n) => n,
                    Err(_) => {
                        c.recv_errors.fetch_add(1, Relaxed);
                        0
                    }
                };
                for i in 0..n {
                    match inb.payload(i).and_then(|p| answer(p, cfg.accept_echo)) {
                        Some((slot, g))
                            if (slot as usize) < window && slots[slot as usize].gen == g =>
                        {
                            let s = &mut slots[slot as usize];
                            if shared.measuring.load(Relaxed) {
                                let _ = rtt.record((now - s.sent_us).max(1));
                            }
                            s.gen = 0;
                            free.push(slot);
                            replies += 1;
                        }
                        Some(_) => {
                            c.duplicates.fetch_add(1, Relaxed);
                        }
                        None => {
                            c.other.fetch_add(1, Relaxed);
                        }
                    }
                }
                got_total += n;
                if n < inb.capacity() {
                    break;
                }
            }
        }
        c.received.fetch_add(got_total as u64, Relaxed);
        c.replies.fetch_add(replies, Relaxed);
        // Timeouts: scan every 10 ms.
        if now - last_scan > 10_000 {
            last_scan = now;
            let mut lost = 0;
            for (i, s) in slots.iter_mut().enumerate() {
                if s.gen != 0 && now - s.sent_us > timeout_us {
                    s.gen = 0;
                    free.push(i as u32);
                    lost += 1;
                }
            }
            c.lost.fetch_add(lost, Relaxed);
        }
        // Fill the window (not while another side of an interleaved run
        // has its turn: answers and timeouts go on).
        let mut sent_total = 0;
        let mut queued = 0;
        while shared.active.load(Relaxed) {
            let Some(slot) = free.pop() else {
                break;
            };
            gen += 1;
            let s = slot as usize % socks;
            let b = &mut out[s];
            if b.is_full() {
                let q = b.queued();
                let sent = send_all(b, fds[s]);
                sent_total += sent;
                if sent < q {
                    c.send_errors.fetch_add((q - sent) as u64, Relaxed);
                }
            }
            if let Some(buf) = b.send_slot() {
                let len = request(buf, slot, gen);
                b.commit(len);
            }
            slots[slot as usize] = Slot { gen, sent_us: now };
            queued += 1;
        }
        for (s, b) in out.iter_mut().enumerate() {
            let q = b.queued();
            let sent = send_all(b, fds[s]);
            sent_total += sent;
            if sent < q {
                c.send_errors.fetch_add((q - sent) as u64, Relaxed);
            }
        }
        c.sent.fetch_add(sent_total as u64, Relaxed);
        if got_total == 0 && queued == 0 {
            wait_readable(&fds, 1);
        }
    }
    Ok(rtt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_worker_sends_nothing_until_it_is_resumed() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let shared = Shared::new(0);
        shared.active.store(false, Relaxed);
        let cfg = StunWorker {
            sockets: vec![crate::io::connected_socket(server.local_addr().unwrap()).unwrap()],
            window: 4,
            batch: 4,
            timeout_ms: 1000,
            cpu: None,
            accept_echo: true,
        };
        let sh = shared.clone();
        let worker = std::thread::spawn(move || run_worker(cfg, sh));
        // Paused (another side's turn): no request in 300 ms.
        server
            .set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(
            server.recv_from(&mut buf).is_err(),
            "a paused worker sent a request"
        );
        // Resumed: its window of requests arrives.
        shared.active.store(true, Relaxed);
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let (n, _) = server.recv_from(&mut buf).expect("a request once resumed");
        assert!(mpp::proto::stun::is_stun(&buf[..n]));
        shared.stop.store(true, Relaxed);
        worker.join().expect("worker").expect("worker result");
    }

    #[test]
    fn requests_are_stun_and_answers_match() {
        let mut buf = [0u8; 64];
        let n = request(&mut buf, 7, 99);
        assert!(mpp::proto::stun::is_stun(&buf[..n]));
        // The node's own responder accepts it and its answer matches the slot.
        let mut resp = [0u8; 128];
        let from = "127.0.0.1:4000".parse().unwrap();
        let m = mpp::proto::stun::binding_response(&buf[..n], from, &mut resp).unwrap();
        assert_eq!(answer(&resp[..m], false), Some((7, 99)));
        assert_eq!(answer(&buf[..n], false), None, "a request is no answer");
        assert_eq!(answer(&buf[..n], true), Some((7, 99)), "unless echoed");
        assert_eq!(answer(&resp[..10], false), None, "short");
    }
}
