//! JSON-B and the protocol's messages (docs/PROTOCOL.md §1–§2).
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
//! Our writer always picks the shortest width, writes a message's own
//! fields before the inherited ones, and writes a DateTime as JSON text
//! inside JSON-B — `22 "2026-11-21T12:00:00Z" 22`, not the JSON-B string
//! `80 14 …` — which makes it byte-compatible with the reference writer.
//! Our reader accepts any field order, any integer width, and skips unknown
//! fields of any type (a JSON text string `"…"` included); truncation,
//! lengths past the buffer, nesting deeper than 8, duplicate or mistyped
//! known fields, malformed JSON text (unterminated, a bad escape, a raw
//! control character, invalid UTF-8) and trailing bytes are each a
//! [`DecodeError`].
//!
//! # Compatibility with the reference (docs/PROTOCOL.md §1.6, §1.7)
//!
//! We are byte-compatible with the reference JSON-B writer of
//! hallambaker/Mathematical-Mesh **release_1.0.2, commit 9f38fd02**. This
//! was checked by running that writer on our vectors (`tests/vectors/`):
//! every item was byte-identical except DateTime, which it writes as JSON
//! text; we now write it the same way, so the vectors are its output byte
//! for byte. One known difference remains on purpose: for a non-ASCII
//! string the reference writes the length in UTF-16 code units but the bytes
//! in UTF-8 (malformed); we write the length in bytes, as the format intends.
//!
//! Open point (unverified): newer reference revisions may write the
//! inherited fields before a message's own. Our readers accept any order, so
//! this would only change the bytes our writer must produce to stay
//! byte-identical; it has not been checked against a newer writer.
//!
//! # Strict and liberal decoding (docs/PROTOCOL.md §1.5)
//!
//! - [`Message::decode`] (strict, [`Mode::Strict`]) is the node's decoder,
//!   used on every packet: a DateTime must be the quoted JSON text form, a
//!   string field a JSON-B string (`80`+w).
//! - [`Message::decode_liberal`] ([`Mode::Liberal`]) is for whoever reads
//!   what a service sends — the client state machine (`proto::client`) and
//!   the tools (`mpp decode`): it also accepts a DateTime as a JSON-B string
//!   (the form this project wrote before) and a JSON text string (with JSON
//!   escapes) wherever a string value may stand, as the reference reader
//!   does (it parses any non-bracket byte below `0x80` as JSON text).
//!
//! The text form is ordinary JSON of the same shape, binaries as unpadded
//! base64url: `{"PresenceHeartbeat":{"Serial":5,"Acknowledge":3}}`.
//!
//! This layer never allocates on the decode path (strings and binaries are
//! borrowed from the datagram; only a JSON text string holding an escape is
//! copied) and knows nothing about packets or sockets.

pub mod jsonb;
mod message;
mod value;

pub use jsonb::{DecodeError, EncodeError, Mode, Reader, Writer};
pub use message::*;
pub use value::TextError;
