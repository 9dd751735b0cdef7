//! The MQTT publisher: one connection that publishes messages (QoS 0, or
//! QoS 1 with the broker's PUBACKs counted) carrying their send time and
//! sequence number, at `--rate` or within `--max-in-flight` publishes not
//! yet seen by every subscriber.
//!
//! It exists apart from the subscribers because it paces and settles the
//! window; it must not count deliveries (the subscribers' sink does).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::epoll::{connection_events, epoll_ctl, TOKEN_PUBLISHER};
use super::wire::{
    check_connack, connect_frame, kind_name, puback_id, put_publish, FrameStream, CONNACK,
    KEEPALIVE_S, PINGRESP, PUBACK,
};
use super::{write_available, Config, Shared, MEASURE, MEASURED, WARMUP};

/// Publishes built per write at most.
const PUBLISH_BATCH: u64 = 256;
/// QoS 1 publishes the broker has not PUBACKed yet, at most: their packet
/// identifiers (1..=65535, from the sequence number) must stay unique.
const MAX_UNACKED: u64 = 60_000;

/// The packet identifier of QoS 1 publish `seq` (from 1): 1..=65535 in turn.
fn packet_id(seq: u64) -> u16 {
    ((seq - 1) % 65_535 + 1) as u16
}

/// The one publisher connection, driven by worker 0.
pub(super) struct Publisher {
    pub(super) sock: TcpStream,
    broker: SocketAddr,
    /// Bytes not yet written.
    pub(super) out: Vec<u8>,
    out_pos: usize,
    /// EPOLLOUT is registered.
    want_out: bool,
    stream: FrameStream,
    topic: Vec<u8>,
    payload: Vec<u8>,
    /// Next sequence number (from 1).
    next_seq: u64,
    /// Every sequence number up to this one has settled.
    settled: u64,
    /// Send time (ns) per ring slot.
    sent_ns: Vec<u64>,
    /// Rate mode: when publishing started, and publishes since.
    rate_start: Option<Instant>,
    rate_sent: u64,
    /// QoS 1: PUBACKs received (a broker acknowledges in the order it
    /// received, MQTT 3.1.1 §4.6).
    acked: u64,
    qos: u8,
}

impl Publisher {
    /// Connects and waits for CONNACK (blocking, with a timeout).
    pub(super) fn connect(cfg: &Config, ring_len: usize) -> Result<Publisher> {
        let broker = cfg.broker;
        let sock =
            TcpStream::connect_timeout(&broker, Duration::from_secs(5)).with_context(|| {
                format!("publisher: cannot connect to the MQTT broker at {broker} (is it running?)")
            })?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let frame = connect_frame(&format!("lg{}p", cfg.pid), KEEPALIVE_S)?;
        (&sock)
            .write_all(&frame)
            .context("publisher: sending CONNECT")?;
        let mut stream = FrameStream::default();
        let mut buf = [0u8; 512];
        let mut got = false;
        while !got {
            let n = match (&sock).read(&mut buf) {
                Ok(0) => bail!("publisher: broker {broker} closed the connection before CONNACK"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    bail!("publisher: no CONNACK from broker {broker} within 5 s")
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("publisher: reading CONNACK from broker {broker}")
                    })
                }
            };
            stream.feed(&buf[..n], |f| {
                if f.kind() != CONNACK {
                    bail!(
                        "publisher: broker sent {} instead of CONNACK",
                        kind_name(f.kind())
                    );
                }
                check_connack(&f, "the publisher", broker)?;
                got = true;
                Ok(())
            })?;
        }
        sock.set_read_timeout(None)?;
        sock.set_nonblocking(true)?;
        let mut payload = vec![0u8; cfg.payload_bytes];
        for (i, b) in payload.iter_mut().enumerate().skip(16) {
            *b = super::filler(i);
        }
        Ok(Publisher {
            sock,
            broker,
            out: Vec::with_capacity(64 << 10),
            out_pos: 0,
            want_out: false,
            stream,
            topic: cfg.topic.as_bytes().to_vec(),
            payload,
            next_seq: 1,
            settled: 0,
            sent_ns: vec![0; ring_len],
            rate_start: None,
            rate_sent: 0,
            acked: 0,
            qos: cfg.qos,
        })
    }

    /// Publishes what the window or the rate allows; returns the epoll
    /// timeout (ms) to use until the next call.
    pub(super) fn pump(
        &mut self,
        shared: &Shared,
        cfg: &Config,
        ep: &OwnedFd,
    ) -> Result<libc::c_int> {
        if !self.flush(ep)? {
            return Ok(100);
        }
        let phase = shared.phase.load(Ordering::Acquire);
        if phase != WARMUP && phase != MEASURE {
            return Ok(100);
        }
        let now_ns = shared.now_ns();
        let (count, timeout) = if cfg.rate > 0.0 {
            let start = *self.rate_start.get_or_insert_with(Instant::now);
            let elapsed = start.elapsed().as_secs_f64();
            let due = (elapsed * cfg.rate) as u64 + 1;
            let count = due.saturating_sub(self.rate_sent).min(PUBLISH_BATCH);
            self.rate_sent += count;
            let next = (self.rate_sent as f64 / cfg.rate - elapsed) * 1e3;
            (count, (next.ceil() as libc::c_int).clamp(0, 100))
        } else {
            if cfg.workers > 1 {
                // Other workers wake us when a publish settles; announce it
                // before looking so that no wake-up is missed.
                shared.publisher_waiting.store(true, Ordering::SeqCst);
            }
            self.settle(shared, cfg, now_ns);
            let in_flight = self.next_seq - 1 - self.settled;
            let room = cfg.max_in_flight.saturating_sub(in_flight);
            let count = room.min(PUBLISH_BATCH);
            (count, if room > count { 0 } else { 10 })
        };
        let count = if self.qos > 0 {
            let unacked = self.next_seq - 1 - self.acked;
            count.min(MAX_UNACKED.saturating_sub(unacked))
        } else {
            count
        };
        if count == 0 {
            return Ok(timeout);
        }
        let flag = if phase == MEASURE { MEASURED } else { 0 };
        for _ in 0..count {
            let seq = self.next_seq;
            self.next_seq += 1;
            let slot = (seq & shared.ring_mask) as usize;
            shared.ring[slot].store(0, Ordering::Release);
            self.sent_ns[slot] = now_ns;
            self.payload[0..8].copy_from_slice(&now_ns.to_le_bytes());
            self.payload[8..16].copy_from_slice(&(seq | flag).to_le_bytes());
            let id = (self.qos > 0).then(|| packet_id(seq));
            put_publish(&mut self.out, &self.topic, &self.payload, id)?;
        }
        shared.published.fetch_add(count, Ordering::AcqRel);
        if flag != 0 {
            shared.published_measured.fetch_add(count, Ordering::AcqRel);
        }
        self.flush(ep)?;
        Ok(timeout)
    }

    /// Moves `settled` past publishes every live subscriber has seen, or
    /// that waited longer than the timeout.
    fn settle(&mut self, shared: &Shared, cfg: &Config, now_ns: u64) {
        let live = u32::try_from(shared.live()).unwrap_or(u32::MAX);
        while self.settled + 1 < self.next_seq {
            let s = self.settled + 1;
            let slot = (s & shared.ring_mask) as usize;
            if shared.ring[slot].load(Ordering::Acquire) >= live {
                self.settled = s;
            } else if now_ns.saturating_sub(self.sent_ns[slot]) > cfg.settle_timeout_ns {
                self.settled = s;
                shared.settle_timeouts.fetch_add(1, Ordering::AcqRel);
            } else {
                break;
            }
        }
    }

    /// Writes what it can of `out`; true when all of it went.
    pub(super) fn flush(&mut self, ep: &OwnedFd) -> Result<bool> {
        self.out_pos += write_available(&self.sock, &self.out[self.out_pos..])
            .with_context(|| format!("publisher: writing to the broker {}", self.broker))?;
        let flushed = self.out_pos == self.out.len();
        if flushed {
            self.out.clear();
            self.out_pos = 0;
        }
        // Writable events while bytes wait, none once all are out.
        if self.want_out == flushed {
            self.want_out = !flushed;
            self.register(ep)?;
        }
        Ok(flushed)
    }

    fn register(&self, ep: &OwnedFd) -> Result<()> {
        let events = connection_events(self.want_out);
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_MOD,
            self.sock.as_raw_fd(),
            events,
            TOKEN_PUBLISHER,
        )
    }

    pub(super) fn on_event(
        &mut self,
        flags: u32,
        scratch: &mut [u8],
        ep: &OwnedFd,
        shared: &Shared,
    ) -> Result<()> {
        if flags & libc::EPOLLOUT as u32 != 0 {
            self.flush(ep)?;
        }
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 == 0
        {
            return Ok(());
        }
        let broker = self.broker;
        let n = match (&self.sock).read(scratch) {
            Ok(0) => bail!("publisher: the broker {broker} closed the connection"),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return Ok(())
            }
            Err(e) => {
                return Err(e).with_context(|| format!("publisher: connection to broker {broker}"))
            }
        };
        let (qos, published, before) = (self.qos, self.next_seq - 1, self.acked);
        let acked = &mut self.acked;
        let result = self.stream.feed(&scratch[..n], |f| match f.kind() {
            PINGRESP => Ok(()),
            PUBACK if qos > 0 => {
                let expected = packet_id(*acked + 1);
                match puback_id(&f) {
                    Some(id) if *acked < published && id == expected => {
                        *acked += 1;
                        Ok(())
                    }
                    Some(id) => bail!(
                        "publisher: PUBACK for packet {id} from the broker, expected {expected} \
                         ({published} published, {acked} acknowledged)"
                    ),
                    None => bail!("publisher: malformed PUBACK from the broker"),
                }
            }
            k => bail!("publisher: unexpected {} from the broker", kind_name(k)),
        });
        shared
            .publish_acks
            .fetch_add(self.acked - before, Ordering::AcqRel);
        result
    }
}
