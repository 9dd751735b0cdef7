//! A simple heartbeat load generator for `mppd` (a stop-gap until the real
//! `mpp-loadgen`).
//!
//! Mints `--devices` credentials from the node's master key (its data
//! directory), connects them, then keeps `--window` heartbeats in flight for
//! `--duration`, round-robin over the devices, and counts the
//! `PresenceStatus` replies: heartbeat round trips per second through the
//! real node. One thread, `--sockets` connected UDP sockets,
//! recvmmsg/sendmmsg batches.
//!
//! ```sh
//! cargo run --release --example heartbeat_load -- --node 127.0.0.1:PORT \
//!     --data-dir DIR --devices 10000 --duration 10s --window 256 --sockets 4 --cpu 1
//! ```
//!
//! A device has at most one heartbeat in flight (so `--window` is capped at
//! `--devices`); a heartbeat unanswered after `--timeout-ms` is counted lost
//! and its device becomes free for the next one. Every heartbeat carries the
//! device's next Serial, so the node's replay window never drops one.
//! With `--node-pid` the tool also reads the node's CPU time
//! (`/proc/PID/stat`) over the measured window.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use mpp::codec::{ClientHeader, Message, PresenceConnectRequest, PresenceHeartbeat};
use mpp::packet::{
    open_in_place, seal_in_place, Credential, Direction, MasterKey, PacketKey, HEADER_LEN,
    MAX_PACKET, MAX_PLAINTEXT, OVERHEAD,
};
use mpp::time::{UnixMillis, UnixSeconds};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser, Debug)]
#[command(about = "Heartbeat round trips/s through a running mppd")]
struct Args {
    /// The node's UDP address.
    #[arg(long)]
    node: SocketAddr,
    /// The node's data directory (master.key is read from it).
    #[arg(long)]
    data_dir: PathBuf,
    /// Devices (credentials) to connect; one account per device.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Measured window, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_secs)]
    duration: u64,
    /// Load before the measured window (not counted), e.g. 1s; 0 for none.
    #[arg(long, default_value = "1s", value_parser = parse_secs)]
    warmup: u64,
    /// Heartbeats kept in flight (at most one per device).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// UDP sockets (device i uses socket i % sockets).
    #[arg(long, default_value_t = 4)]
    sockets: usize,
    /// Pin the thread to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    /// Datagrams per recvmmsg/sendmmsg call.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// A heartbeat unanswered this long is counted lost.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Connect requests in flight during the connect phase.
    #[arg(long, default_value_t = 256)]
    connect_window: usize,
    /// Attempts per device's connect (500 ms apart).
    #[arg(long, default_value_t = 10)]
    connect_attempts: u8,
    /// The node's pid: report its CPU time over the measured window.
    #[arg(long)]
    node_pid: Option<u32>,
}

fn parse_secs(text: &str) -> Result<u64, String> {
    mpp::time::parse_duration_secs(text)
}

/// The conn ids' first four bytes are random: a multiply is hash enough.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap = HashMap<u64, u32, BuildHasherDefault<IdHasher>>;

/// One device: what the hot loop touches.
struct Device {
    conn_id: [u8; 8],
    c2s: PacketKey,
    s2c: PacketKey,
    /// Last Serial sent.
    serial: u32,
    /// Serial of the request in flight, 0 if none.
    outstanding: u32,
}

/// What the connect phase needs besides [`Device`].
struct Connect {
    account: String,
    expires: UnixSeconds,
    binding: [u8; 32],
}

#[derive(Default, Clone, Copy)]
struct Stats {
    sent: u64,
    replies: u64,
    lost: u64,
    late: u64,
    refused: u64,
    invalid_serial: u64,
    unauthentic: u64,
    unknown_conn: u64,
    other: u64,
    send_errors: u64,
    recv_errors: u64,
}

/// Buffers for one recvmmsg or sendmmsg batch.
struct Batch {
    bufs: Vec<[u8; MAX_PACKET]>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    lens: Vec<usize>,
    /// Device of each packet to send.
    devs: Vec<u32>,
    len: usize,
}

impl Batch {
    fn new(n: usize) -> Batch {
        let mut b = Batch {
            bufs: vec![[0u8; MAX_PACKET]; n],
            // SAFETY: iovec and mmsghdr are plain C structs; all-zero is valid.
            iovs: vec![unsafe { std::mem::zeroed() }; n],
            hdrs: vec![unsafe { std::mem::zeroed() }; n],
            lens: vec![0; n],
            devs: vec![0; n],
            len: 0,
        };
        for i in 0..n {
            b.iovs[i].iov_base = b.bufs[i].as_mut_ptr().cast();
            b.iovs[i].iov_len = MAX_PACKET;
            b.hdrs[i].msg_hdr.msg_iov = &mut b.iovs[i];
            b.hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        b
    }

    fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Receives up to a batch without blocking; returns how many arrived.
    fn recv(&mut self, fd: i32, stats: &mut Stats) -> usize {
        for i in 0..self.capacity() {
            self.iovs[i].iov_len = MAX_PACKET;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: hdrs point at iovs which point at bufs, all alive and sized.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.capacity() as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                stats.recv_errors += 1;
            }
            return 0;
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = self.hdrs[i].msg_len as usize;
        }
        n
    }

    /// Sends the first `len` packets on a connected socket; how many went.
    fn send(&mut self, fd: i32, stats: &mut Stats) -> usize {
        if self.len == 0 {
            return 0;
        }
        for i in 0..self.len {
            self.iovs[i].iov_len = self.lens[i];
        }
        // SAFETY: as in recv; only the first `len` entries are passed.
        let n = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), self.len as u32, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::WouldBlock {
                stats.send_errors += 1;
            }
            return 0;
        }
        n as usize
    }
}

enum Phase {
    Connect,
    Heartbeat,
}

struct Load {
    devices: Vec<Device>,
    connect: Vec<Connect>,
    ids: IdMap,
    socks: Vec<Socket>,
    fds: Vec<i32>,
    out: Vec<Batch>,
    inb: Batch,
    /// (device, serial, sent at) in send order; answered entries are skipped.
    pending: VecDeque<(u32, u32, Instant)>,
    inflight: usize,
    cursor: usize,
    nonce: u64,
    nonce_salt: [u8; 4],
    stats: Stats,
    /// Devices eligible for the current phase.
    active: Vec<bool>,
    connected: Vec<bool>,
    attempts: Vec<u8>,
    refused_reason: Option<String>,
}

impl Load {
    fn next_nonce(&mut self) -> [u8; 12] {
        self.nonce += 1;
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&self.nonce.to_be_bytes());
        n[8..].copy_from_slice(&self.nonce_salt);
        n
    }

    /// Seals the next request of device `d` into `out[s]`'s next slot.
    fn build(&mut self, phase: &Phase, d: usize) -> bool {
        let s = d % self.out.len();
        let nonce = self.next_nonce();
        let dev = &mut self.devices[d];
        dev.serial = dev.serial.wrapping_add(1).max(1);
        let header = ClientHeader {
            serial: Some(i64::from(dev.serial)),
            ..ClientHeader::default()
        };
        let message = match phase {
            Phase::Heartbeat => Message::Heartbeat(PresenceHeartbeat { header }),
            Phase::Connect => {
                let c = &self.connect[d];
                Message::ConnectRequest(PresenceConnectRequest {
                    account: Some(c.account.as_str().into()),
                    device: Some("load".into()),
                    expires: Some(c.expires),
                    binding: Some((&c.binding[..]).into()),
                    header,
                })
            }
        };
        let batch = &mut self.out[s];
        let i = batch.len;
        let buf = &mut batch.bufs[i];
        let Ok(n) = message.encode(&mut buf[HEADER_LEN..HEADER_LEN + MAX_PLAINTEXT]) else {
            return false;
        };
        let Ok(size) = seal_in_place(&dev.c2s, mpp::packet::ConnId(dev.conn_id), nonce, buf, n)
        else {
            return false;
        };
        batch.lens[i] = size;
        batch.devs[i] = d as u32;
        batch.len += 1;
        dev.outstanding = dev.serial;
        self.inflight += 1;
        true
    }

    /// Sends what is queued on socket `s`; unsent packets are given up
    /// (their devices become free again, their Serials are skipped).
    fn flush(&mut self, s: usize, now: Instant) -> usize {
        let batch = &mut self.out[s];
        let sent = batch.send(self.fds[s], &mut self.stats);
        for i in 0..batch.len {
            let d = batch.devs[i] as usize;
            let dev = &mut self.devices[d];
            if i < sent {
                self.pending.push_back((d as u32, dev.outstanding, now));
            } else {
                dev.outstanding = 0;
                self.inflight -= 1;
            }
        }
        if sent < batch.len {
            self.stats.send_errors += (batch.len - sent) as u64;
        }
        self.stats.sent += sent as u64;
        batch.len = 0;
        sent
    }

    /// Tops the window up to `window` requests in flight; how many were sent.
    fn fill(&mut self, phase: &Phase, window: usize, now: Instant) -> usize {
        let n = self.devices.len();
        let mut sent = 0;
        let mut scanned = 0;
        while self.inflight < window && scanned < n {
            let d = self.cursor;
            self.cursor = if d + 1 == n { 0 } else { d + 1 };
            scanned += 1;
            if !self.active[d] || self.devices[d].outstanding != 0 {
                continue;
            }
            if let Phase::Connect = phase {
                if self.attempts[d] == 0 {
                    self.active[d] = false; // out of attempts
                    continue;
                }
                self.attempts[d] -= 1;
            }
            scanned = 0;
            let s = d % self.out.len();
            if self.out[s].len == self.out[s].capacity() {
                sent += self.flush(s, now);
            }
            if !self.build(phase, d) {
                self.stats.other += 1;
            }
        }
        for s in 0..self.out.len() {
            sent += self.flush(s, now);
        }
        sent
    }

    /// Counts requests unanswered for `timeout` as lost; frees their devices.
    fn expire(&mut self, now: Instant, timeout: Duration) {
        while let Some(&(d, serial, at)) = self.pending.front() {
            let dev = &mut self.devices[d as usize];
            if dev.outstanding != serial {
                self.pending.pop_front();
                continue;
            }
            if now.duration_since(at) < timeout {
                break;
            }
            self.pending.pop_front();
            dev.outstanding = 0;
            self.inflight -= 1;
            self.stats.lost += 1;
        }
    }

    /// Receives and handles everything waiting; how many datagrams arrived.
    fn receive(&mut self) -> usize {
        let mut total = 0;
        for s in 0..self.fds.len() {
            loop {
                let n = self.inb.recv(self.fds[s], &mut self.stats);
                for i in 0..n {
                    let len = self.inb.lens[i];
                    self.handle(i, len);
                }
                total += n;
                if n < self.inb.capacity() {
                    break;
                }
            }
        }
        total
    }

    fn handle(&mut self, i: usize, len: usize) {
        let packet = &mut self.inb.bufs[i][..len];
        if len < OVERHEAD {
            self.stats.other += 1;
            return;
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&packet[..8]);
        let Some(&d) = self.ids.get(&u64::from_ne_bytes(id)) else {
            self.stats.unknown_conn += 1;
            return;
        };
        let dev = &mut self.devices[d as usize];
        let Ok(plain) = open_in_place(&dev.s2c, packet) else {
            self.stats.unauthentic += 1;
            return;
        };
        let Ok(message) = Message::decode(plain) else {
            self.stats.other += 1;
            return;
        };
        let answered = |ack: Option<i64>, dev: &Device| {
            dev.outstanding != 0 && ack == Some(i64::from(dev.outstanding))
        };
        match message {
            Message::Status(m) if answered(m.header.acknowledge, dev) => {
                dev.outstanding = 0;
                self.inflight -= 1;
                self.stats.replies += 1;
            }
            Message::ConnectResponse(m) if answered(m.header.acknowledge, dev) => {
                dev.outstanding = 0;
                self.inflight -= 1;
                self.stats.replies += 1;
                self.connected[d as usize] = true;
                self.active[d as usize] = false;
            }
            Message::Status(_) | Message::ConnectResponse(_) => self.stats.late += 1,
            Message::ErrorRefused(m) => {
                self.stats.refused += 1;
                if self.refused_reason.is_none() {
                    self.refused_reason = Some(format!(
                        "{} {}",
                        m.header.status.unwrap_or(0),
                        m.header.status_description.as_deref().unwrap_or("")
                    ));
                }
            }
            Message::ErrorInvalidSerial(m) => {
                self.stats.invalid_serial += 1;
                // Resume above the node's highest Serial.
                if let Some(h) = m.serial.and_then(|s| u32::try_from(s).ok()) {
                    dev.serial = dev.serial.max(h);
                }
            }
            _ => self.stats.other += 1,
        }
    }

    /// Blocks up to `ms` for any socket to become readable.
    fn wait(&self, ms: i32) {
        let mut pfds: Vec<libc::pollfd> = self
            .fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfd of the given length.
        unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    }

    /// Runs one phase until `until` (or, for connects, until none is left).
    fn run(&mut self, phase: &Phase, window: usize, timeout: Duration, until: Option<Instant>) {
        loop {
            let now = Instant::now();
            if until.is_some_and(|t| now >= t) {
                return;
            }
            let got = self.receive();
            self.expire(now, timeout);
            let sent = self.fill(phase, window, now);
            if let Phase::Connect = phase {
                if self.inflight == 0 && sent == 0 {
                    return;
                }
            }
            if got == 0 && sent == 0 {
                self.wait(2);
            }
        }
    }
}

fn pin(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is a plain bit set; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity({cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// CPU seconds, user and system.
#[derive(Clone, Copy)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }

    fn report(self, who: &str, wall: f64) -> String {
        let total = self.user + self.sys;
        format!(
            "{who}_s={total:.2} {who}_pct={:.0} {who}_user_s={:.2} {who}_sys_s={:.2}",
            total / wall * 100.0,
            self.user,
            self.sys
        )
    }
}

/// This process's CPU time (getrusage).
fn cpu_time() -> Cpu {
    // SAFETY: getrusage fills the zeroed struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Cpu {
        user: tv(ru.ru_utime),
        sys: tv(ru.ru_stime),
    }
}

/// A process's utime and stime, from /proc/PID/stat.
fn proc_cpu_time(pid: u32) -> Option<Cpu> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Cpu {
        user: f.get(11)?.parse::<u64>().ok()? as f64 / hz,
        sys: f.get(12)?.parse::<u64>().ok()? as f64 / hz,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.devices == 0 || args.sockets == 0 || args.window == 0 || args.batch == 0 {
        bail!("--devices, --sockets, --window and --batch must be positive");
    }
    if let Some(cpu) = args.cpu {
        pin(cpu)?;
    }
    let window = args.window.min(args.devices);
    if window < args.window {
        eprintln!("heartbeat_load: window capped at {window} (one heartbeat in flight per device)");
    }

    let data = mpp::server::open_data_dir(&args.data_dir).map_err(anyhow::Error::msg)?;
    let master = MasterKey::new(data.master);
    let now = UnixMillis::from_system_clock().seconds();
    let expires = UnixSeconds(now.0 + 86_400);
    let first_serial = now.0 as u32; // PROTOCOL: start at the Unix time
    let mut rng = rand::rngs::OsRng;
    let mut devices = Vec::with_capacity(args.devices);
    let mut connect = Vec::with_capacity(args.devices);
    let mut ids = IdMap::default();
    let t0 = Instant::now();
    for i in 0..args.devices {
        let account = format!("load-{i}@example.com");
        let cred = Credential::issue(&master, &account, "load", expires, Vec::new(), &mut rng)?;
        let x = cred.secret.expand(cred.conn_id);
        if ids
            .insert(u64::from_ne_bytes(cred.conn_id.0), i as u32)
            .is_some()
        {
            bail!("duplicate conn id drawn; run again");
        }
        devices.push(Device {
            conn_id: cred.conn_id.0,
            c2s: x.key(Direction::ClientToServer),
            s2c: x.key(Direction::ServerToClient),
            serial: first_serial,
            outstanding: 0,
        });
        connect.push(Connect {
            account,
            expires,
            binding: cred.binding,
        });
    }
    let mint = t0.elapsed();

    let mut socks = Vec::new();
    for _ in 0..args.sockets {
        let domain = if args.node.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        };
        let sock = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
        let _ = sock.set_recv_buffer_size(8 << 20);
        let _ = sock.set_send_buffer_size(8 << 20);
        sock.connect(&args.node.into())
            .with_context(|| format!("connect {}", args.node))?;
        sock.set_nonblocking(true)?;
        socks.push(sock);
    }
    let fds = socks.iter().map(|s| s.as_raw_fd()).collect();
    let mut salt = [0u8; 4];
    rand::RngCore::fill_bytes(&mut rng, &mut salt);
    let n = args.devices;
    let mut load = Load {
        devices,
        connect,
        ids,
        socks,
        fds,
        out: (0..args.sockets).map(|_| Batch::new(args.batch)).collect(),
        inb: Batch::new(args.batch),
        pending: VecDeque::new(),
        inflight: 0,
        cursor: 0,
        nonce: 0,
        nonce_salt: salt,
        stats: Stats::default(),
        active: vec![true; n],
        connected: vec![false; n],
        attempts: vec![args.connect_attempts; n],
        refused_reason: None,
    };

    // Connect phase.
    let t1 = Instant::now();
    load.run(
        &Phase::Connect,
        args.connect_window,
        Duration::from_millis(500),
        None,
    );
    let connect_time = t1.elapsed();
    let connected = load.connected.iter().filter(|&&c| c).count();
    let cs = load.stats;
    println!(
        "connect: devices={n} connected={connected} sent={} lost={} refused={} invalid_serial={} mint_ms={} connect_ms={}",
        cs.sent,
        cs.lost,
        cs.refused,
        cs.invalid_serial,
        mint.as_millis(),
        connect_time.as_millis()
    );
    if let Some(r) = &load.refused_reason {
        println!("connect: first refusal: {r}");
    }
    if connected == 0 {
        bail!("no device connected to {}", args.node);
    }
    load.active = load.connected.clone();
    load.stats = Stats::default();
    load.cursor = 0;

    // Heartbeats: warm-up, then the measured window.
    let timeout = Duration::from_millis(args.timeout_ms);
    if args.warmup > 0 {
        let until = Instant::now() + Duration::from_secs(args.warmup);
        load.run(&Phase::Heartbeat, window, timeout, Some(until));
    }
    load.stats = Stats::default();
    let node_cpu0 = args.node_pid.and_then(proc_cpu_time);
    let cpu0 = cpu_time();
    let start = Instant::now();
    load.run(
        &Phase::Heartbeat,
        window,
        timeout,
        Some(start + Duration::from_secs(args.duration)),
    );
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_time().since(cpu0);
    let node_cpu = args
        .node_pid
        .and_then(|p| Some(proc_cpu_time(p)?.since(node_cpu0?)));
    let s = load.stats;

    println!(
        "heartbeat: devices={connected} window={window} sockets={} batch={} duration_s={wall:.2}",
        args.sockets, args.batch
    );
    println!(
        "heartbeat: replies_per_s={:.0} sent_per_s={:.0} mean_rtt_us={:.0}",
        s.replies as f64 / wall,
        s.sent as f64 / wall,
        window as f64 / (s.replies as f64 / wall).max(1.0) * 1e6
    );
    println!(
        "heartbeat: replies={} sent={} lost={} late={} refused={} invalid_serial={} unauthentic={} unknown_conn={} other={} send_errors={} recv_errors={} in_flight_at_end={}",
        s.replies,
        s.sent,
        s.lost,
        s.late,
        s.refused,
        s.invalid_serial,
        s.unauthentic,
        s.unknown_conn,
        s.other,
        s.send_errors,
        s.recv_errors,
        load.inflight
    );
    if let Some(r) = &load.refused_reason {
        println!("heartbeat: first refusal: {r}");
    }
    match node_cpu {
        Some(c) => println!(
            "cpu: {} {}",
            cpu.report("loadgen", wall),
            c.report("node", wall)
        ),
        None => println!("cpu: {}", cpu.report("loadgen", wall)),
    }
    drop(load.socks);
    Ok(())
}
