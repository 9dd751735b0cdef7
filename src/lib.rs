//! Mesh Presence Protocol (MPP): a UDP publish/subscribe service through which a
//! person's devices learn at once that something in their Mesh account changed.
//!
//! The library is layered (see README.md, "Architecture"):
//!
//! * [`codec`] — JSON-B items and the protocol's messages;
//! * [`packet`] — encrypted packet framing, key derivation, credentials, fragments;
//! * [`table`] — the compact per-shard connection table;
//! * [`proto`] — the sans-IO server shard and client state machines;
//! * [`net`] — sockets, cBPF steering, the io_uring and recvmmsg drivers;
//! * [`control`] — the HTTP control plane (publish, credentials, metrics
//!   format, the DNS upstream), on its own thread;
//! * [`node`] — the shard threads, the router, the data directory, start and
//!   stop: the layer that puts the others together;
//! * [`config`] — every setting, declared once.
//!
//! No layer below the I/O layer touches a socket or reads the clock: time comes
//! in as a [`time::UnixMillis`] argument.

pub mod codec;
pub mod config;
pub mod control;
pub mod net;
pub mod node;
pub mod packet;
pub mod proto;
pub mod table;
pub mod time;
