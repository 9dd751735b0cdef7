//! JSON-B and the protocol's messages (PROTOCOL.md §1–§2).
//!
//! # Wire encoding, in brief
//!
//! JSON-B keeps JSON's `{` `}` `[` `]` and drops `,` and `:`. Every other
//! item is a tag byte, then a big-endian length or value whose width (1, 2, 4
//! or 8 bytes) is the tag's low two bits: field names `B4`+w, strings `80`+w,
//! binaries `88`+w, integers `A0`+w (negative: `A8`+w and the magnitude),
//! `B0`/`B1`/`B2` for true/false/null. A message is tagged:
//! `{ B4 11 "PresenceHeartbeat" { B4 06 "Serial" A0 05 … } }`.
//!
//! Our writer always picks the shortest width and writes a message's own
//! fields before the inherited ones, which makes it byte-compatible with the
//! reference implementation. Our reader is liberal where that is safe (any
//! field order, any integer width, unknown fields of any type are skipped)
//! and strict where it matters: truncation, lengths past the buffer, nesting
//! deeper than 8, duplicate or mistyped known fields and trailing bytes are
//! each a [`DecodeError`].
//!
//! The text form is ordinary JSON of the same shape, binaries as unpadded
//! base64url: `{"PresenceHeartbeat":{"Serial":5,"Acknowledge":3}}`.
//!
//! This layer never allocates on the decode path (strings and binaries are
//! borrowed from the datagram) and knows nothing about packets or sockets.

pub mod jsonb;
mod message;
mod value;

pub use jsonb::{DecodeError, EncodeError, Reader, Writer};
pub use message::*;
pub use value::TextError;
