//! Memory per held connection: connects N devices (default 1,000,000, or the
//! first argument) to one server shard through real ConnectRequest packets,
//! in A accounts (the second argument; default N: one device per account,
//! the worst case for the account records and their catch-up state), and
//! prints the heap bytes and RSS growth per connection.
//!
//! `cargo bench --bench table_memory [-- N [A] [--snapshot]]`
//!
//! With `--snapshot` it then saves the shard's state as a graceful stop
//! does (docs/PROTOCOL.md §6.8), reads it back and restores it into a new
//! shard, and prints the time of each step: the in-process part of the
//! 10M save-and-restore bar, without sockets or devices.
//!
//! Allocations go to mimalloc, the allocator `mppd` runs on, through a
//! wrapper that counts live bytes: the heap figure is what the table holds,
//! the RSS figure adds what the allocator keeps around it.

use std::alloc::{GlobalAlloc, Layout};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};

use mpp::codec::{ClientHeader, Message, PresenceConnectRequest};
use mpp::packet::{seal, BindingKey, ConnId, Direction, MasterKey};
use mpp::proto::{Service, ServiceConfig};
use mpp::time::{UnixMillis, UnixSeconds};

struct Counting;
static INNER: mimalloc::MiMalloc = mimalloc::MiMalloc;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to mimalloc, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { INNER.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { INNER.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { INNER.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let snapshot = std::env::args().any(|a| a == "--snapshot");
    let numbers: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = numbers.first().copied().unwrap_or(1_000_000);
    let accounts = numbers.get(1).copied().unwrap_or(n).clamp(1, n);
    let now = UnixMillis(1_795_262_400_000);
    let master = MasterKey::new([7; 32]);
    let binder = BindingKey::from_master(&master);
    let expires = UnixSeconds(1_900_000_000);
    let mut server = Service::new(
        ServiceConfig::default(),
        MasterKey::new([7; 32]),
        [3; 32],
        now,
    );
    let mut out = vec![0u8; 1232];
    let mut packet = Vec::with_capacity(512);

    let heap_before = LIVE.load(Ordering::Relaxed);
    let rss_before = rss_bytes();
    let started = std::time::Instant::now();
    for i in 0..n {
        let account = format!("account{}@example.com", i % accounts);
        let mut id = [0u8; 8];
        id[..4].copy_from_slice(&(i as u32 | 0x4000_0000).to_be_bytes());
        id[4..].copy_from_slice(&mpp::packet::account_affinity(&account).to_be_bytes());
        let conn_id = ConnId(id);
        let device = format!("device{i}");
        let binding = binder
            .binding(conn_id, expires, &account, &device)
            .expect("binding");
        let m = Message::ConnectRequest(PresenceConnectRequest {
            account: Some(account.as_str().into()),
            device: Some(device.as_str().into()),
            expires: Some(expires),
            binding: Some((&binding[..]).into()),
            header: ClientHeader {
                serial: Some(now.0 as i64 / 1000),
                ..ClientHeader::default()
            },
        });
        packet.clear();
        packet.extend_from_slice(&m.to_vec());
        let key = master
            .secret(conn_id)
            .key(Direction::ClientToServer, conn_id);
        let sealed = seal(&key, conn_id, [1; 12], &packet).expect("seal");
        let from = SocketAddr::from((
            [127, 0, (i >> 16) as u8, (i >> 8) as u8],
            1024 + (i & 0xff) as u16,
        ));
        server.handle_datagram(now, from, &sealed);
        while server.poll_transmit(now, &mut out).is_some() {}
    }
    let elapsed = started.elapsed();
    let held = server.connections();
    let heap = LIVE.load(Ordering::Relaxed) - heap_before;
    let rss = rss_bytes().saturating_sub(rss_before);
    assert_eq!(held, n, "every connect accepted");
    println!("connections held:           {held}");
    println!(
        "accounts:                   {}",
        server.table().accounts_len()
    );
    println!("heap growth:                {heap} bytes");
    println!(
        "heap bytes per connection:  {:.1}",
        heap as f64 / held as f64
    );
    println!(
        "RSS growth per connection:  {:.1}",
        rss as f64 / held as f64
    );
    println!(
        "connects/s (1 thread):      {:.0}",
        held as f64 / elapsed.as_secs_f64()
    );
    println!(
        "record sizes:               {} bytes per connection, {} per account",
        std::mem::size_of::<mpp::table::Connection>(),
        std::mem::size_of::<mpp::table::Account>()
    );
    if snapshot {
        save_and_restore(&server, now);
    }
}

/// Saves `server` as shard 0 of 1, loads it back and restores it into a
/// new shard, timing each step.
fn save_and_restore(server: &Service, now: UnixMillis) {
    use mpp::node::snapshot;
    let dir = std::env::temp_dir().join(format!("mpp-snapshot-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let master = MasterKey::new([7; 32]);
    let id = snapshot::SaveId {
        generation: 1,
        count: 1,
    };
    let t = std::time::Instant::now();
    let bytes = snapshot::save_shard(&dir, &master, id, 0, server, now).expect("save");
    let save = t.elapsed();
    let keys = mpp::proto::KeySet {
        current: master.clone(),
        parity: 0,
        previous: None,
    };
    let t = std::time::Instant::now();
    let loaded = snapshot::load(&dir, &keys, 1, |_| 0, now, 86_400)
        .expect("load")
        .expect("a saved state");
    let load = t.elapsed();
    let shard = &loaded.shards[0];
    let rss_loaded = rss_bytes();
    let mut fresh = Service::new(ServiceConfig::default(), master, [3; 32], now);
    let t = std::time::Instant::now();
    let done = fresh.restore_indexed(
        loaded.epoch,
        &shard.accounts,
        &shard.connections,
        &shard.account_of,
    );
    let restore = t.elapsed();
    assert_eq!(
        done.connections,
        server.connections(),
        "every connection restored"
    );
    let rss_restored = rss_bytes();
    drop(loaded);
    mpp::node::release_freed_memory();
    let rss_dropped = rss_bytes();
    println!(
        "RSS MiB: loaded {}, restored {}, loaded state dropped {}",
        rss_loaded >> 20,
        rss_restored >> 20,
        rss_dropped >> 20
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!("snapshot bytes:             {bytes}");
    println!("save (encode, sign, fsync): {:.2} s", save.as_secs_f64());
    println!("load (read, verify, parse): {:.2} s", load.as_secs_f64());
    println!("restore into a new shard:   {:.2} s", restore.as_secs_f64());
    println!(
        "total:                      {:.2} s",
        (save + load + restore).as_secs_f64()
    );
}
