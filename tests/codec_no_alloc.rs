//! The codec's promise that decoding and encoding the hot messages allocate
//! nothing (see `mpp::codec`): a counting global allocator checks it.
//!
//! Only allocations made by the test's own thread while it measures are
//! counted, so the harness's threads and output do not disturb the count. The
//! counter is one process-wide static, which is why this file holds a single
//! test: two measuring threads would add into the same count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use mpp::codec::{Message, PresenceStatus, ServiceHeader};
use mpp::time::UnixSeconds;

/// The system allocator, counting the allocations of a measuring thread.
struct CountingAllocator;

/// Allocations (and reallocations) made while a thread was measuring.
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread is inside [`allocations_during`].
    static MEASURING: Cell<bool> = const { Cell::new(false) };
}

impl CountingAllocator {
    fn count(&self) {
        // `try_with`: during thread teardown the flag may be gone; count nothing then.
        if MEASURING.try_with(Cell::get).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is forwarded unchanged to `System`; counting touches no memory it hands out.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count();
        // SAFETY: `ptr` and `layout` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` came from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Runs `f` and returns its result with the number of allocations it made on this thread.
fn allocations_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    MEASURING.with(|m| m.set(true));
    let result = f();
    MEASURING.with(|m| m.set(false));
    (result, ALLOCATIONS.load(Ordering::SeqCst))
}

/// `vectors/heartbeat.hex`: `{"PresenceHeartbeat":{"Serial":5,"Acknowledge":3}}`.
const HEARTBEAT: &str = "7bb41150726573656e63654865617274626561747bb40653657269616ca005b40b41636b6e6f776c65646765a0037d7d";

/// `vectors/notify.hex`: Bitmask, Serial, EndPoint, Now (a quoted DateTime) and Acknowledge.
const NOTIFY: &str = "7bb40e50726573656e63654e6f746966797bb4074269746d61736b880105b40653657269616ca02ab408456e64506f696e747bb40949704164647265737388047f000001b404506f7274a19c407db4034e6f7722323032362d31312d32315431323a30303a30305a22b40b41636b6e6f776c65646765a0077d7d";

/// `vectors/notify.hex` as this project wrote it before: Now as a JSON-B
/// string (`80 14 …`), which only the liberal decoder reads.
const NOTIFY_STRING_DATETIME: &str = "7bb40e50726573656e63654e6f746966797bb4074269746d61736b880105b40653657269616ca02ab408456e64506f696e747bb40949704164647265737388047f000001b404506f7274a19c407db4034e6f778014323032362d31312d32315431323a30303a30305ab40b41636b6e6f776c65646765a0077d7d";

/// A status whose StatusDescription is JSON text without escapes,
/// `"all good"`, which the liberal decoder borrows.
fn status_with_text_description() -> Vec<u8> {
    let mut bytes = status().to_vec();
    let at = bytes.len() - 2;
    let field = [&[0xB4, 17][..], b"StatusDescription", b"\"all good\""].concat();
    bytes.splice(at..at, field);
    bytes
}

/// A heartbeat's answer with every field a status usually carries, IPv6 endpoint included.
fn status() -> Message<'static> {
    Message::from(PresenceStatus {
        serial: Some(1_000_000),
        bitmask: Some(Cow::Owned(vec![0xFF; 32])),
        header: ServiceHeader {
            endpoint: "[2001:db8::1]:15099".parse::<SocketAddr>().ok(),
            now: UnixSeconds::parse(b"2026-11-21T12:00:00Z").ok(),
            acknowledge: Some(77),
            status: Some(200),
            ..ServiceHeader::default()
        },
    })
}

#[test]
fn decode_and_encode_do_not_allocate() {
    // The counter works: an allocation made while measuring is seen.
    let (v, n) = allocations_during(|| black_box(vec![1u8; 10]));
    assert!(n >= 1, "the counting allocator saw no allocation");
    drop(v);

    let heartbeat = hex::decode(HEARTBEAT).expect("heartbeat hex");
    let notify = hex::decode(NOTIFY).expect("notify hex");
    let status = status().to_vec();

    for (name, bytes) in [
        ("heartbeat", &heartbeat),
        ("notify", &notify),
        ("status", &status),
    ] {
        let (decoded, n) = allocations_during(|| Message::decode(black_box(bytes)));
        assert_eq!(n, 0, "decoding the {name} allocated {n} times");
        let message = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));

        let (liberal, n) = allocations_during(|| Message::decode_liberal(black_box(bytes)));
        assert_eq!(n, 0, "decoding the {name} liberally allocated {n} times");
        assert_eq!(liberal.as_ref(), Ok(&message), "{name}");

        let mut buf = [0u8; 1232];
        let (written, n) = allocations_during(|| black_box(&message).encode(&mut buf));
        assert_eq!(n, 0, "encoding the {name} allocated {n} times");
        assert_eq!(written.map(|len| &buf[..len]), Ok(&bytes[..]), "{name}");
    }

    // The liberal decoder's other forms: a DateTime as a JSON-B string, and
    // a string field as JSON text without escapes (borrowed).
    let old_notify = hex::decode(NOTIFY_STRING_DATETIME).expect("old notify hex");
    let (decoded, n) = allocations_during(|| Message::decode_liberal(black_box(&old_notify)));
    assert_eq!(
        n, 0,
        "decoding the old notify liberally allocated {n} times"
    );
    assert_eq!(decoded, Message::decode(&notify));

    let text_status = status_with_text_description();
    let (decoded, n) = allocations_during(|| Message::decode_liberal(black_box(&text_status)));
    assert_eq!(
        n, 0,
        "decoding a text StatusDescription allocated {n} times"
    );
    let Ok(Message::Status(decoded)) = decoded else {
        panic!("status with a text StatusDescription: {decoded:?}");
    };
    assert!(
        matches!(
            decoded.header.status_description,
            Some(Cow::Borrowed("all good"))
        ),
        "{:?}",
        decoded.header.status_description
    );
}
