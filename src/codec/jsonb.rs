//! JSON-B items: the tag bytes, a writer into a caller's buffer and a borrowing reader.
//!
//! JSON-B (docs/PROTOCOL.md §1) keeps JSON's brackets and replaces every other item
//! by a tag byte whose low two bits give the width (1, 2, 4 or 8 bytes,
//! big-endian) of the length or value that follows. The writer always picks
//! the shortest width, which makes our output byte-identical to the reference
//! writer; the reader accepts any width.
//!
//! # JSON text strings inside JSON-B (docs/PROTOCOL.md §1.4)
//!
//! JSON-B is a superset of JSON, and the reference writer (Mathematical-Mesh
//! release_1.0.2, commit 9f38fd02) uses that for DateTime: it writes a
//! DateTime not as a JSON-B string item (`80 14 "2026-11-21T12:00:00Z"`) but
//! as JSON text, a quote byte, the 20 characters, a quote byte
//! (`22 "2026-11-21T12:00:00Z" 22`); both are 22 bytes. We checked this by
//! running that writer on our vectors; every other item was already
//! byte-identical. `Writer::text_fixed` writes that form, and a string of
//! JSON text, `"…"` with JSON's escapes, is therefore an item the reader knows
//! ([`TAG_QUOTE`], [`Reader::text_string`]). Its escapes are undone by
//! serde_json, not by a parser of our own: the reader only scans for the
//! closing unescaped quote, checks for raw control characters and UTF-8 (so
//! that those errors are classified and allocation-free), and hands the
//! quoted slice to `serde_json::from_slice`. A text string without escapes is
//! borrowed from the input; only one with escapes is copied.
//!
//! # Strict and liberal reading (docs/PROTOCOL.md §1.5, D13)
//!
//! A [`Reader`] is [`Mode::Strict`] or [`Mode::Liberal`]; the mode decides
//! only which forms a *string-typed* or *DateTime* field's value may take:
//!
//! | field value | strict | liberal |
//! | --- | --- | --- |
//! | string field as `80`+w | yes | yes |
//! | string field as JSON text `"…"` | no ([`DecodeError::WrongType`]) | yes |
//! | DateTime as JSON text `"…"` (the reference's form, and ours) | yes | yes |
//! | DateTime as `80`+w (what this project wrote before) | no ([`DecodeError::WrongType`]) | yes |
//! | unknown field's value as JSON text `"…"` | skipped | skipped |
//!
//! The node reads every packet strictly (`Message::decode`); the client state
//! machine, `mpp decode` and other tools that read what a service sends use
//! the liberal reader (`Message::decode_liberal`), which also reads what
//! this project's earlier nodes wrote and, like the reference reader (which
//! parses any non-bracket byte below `0x80` as JSON text), a JSON text string
//! wherever a string value may stand.
//!
//! Neither side allocates: the writer fills a `&mut [u8]`, the reader hands
//! out slices of its input (only a JSON text string holding an escape is
//! copied). Everything the reader returns has been bounds-checked; malformed
//! input is a [`DecodeError`], never a panic.

use std::borrow::Cow;

/// Tag of a field name (`0xB4` + width).
pub const TAG_NAME: u8 = 0xB4;
/// Tag of a UTF-8 string (`0x80` + width).
pub const TAG_STRING: u8 = 0x80;
/// Tag of a binary value (`0x88` + width).
pub const TAG_BINARY: u8 = 0x88;
/// Tag of a non-negative integer (`0xA0` + width).
pub const TAG_POSITIVE: u8 = 0xA0;
/// Tag of a negative integer (`0xA8` + width), followed by its magnitude.
pub const TAG_NEGATIVE: u8 = 0xA8;
/// `true`.
pub const TAG_TRUE: u8 = 0xB0;
/// `false`.
pub const TAG_FALSE: u8 = 0xB1;
/// `null`.
pub const TAG_NULL: u8 = 0xB2;
/// The quote that opens (and closes) a JSON text string, `"…"`: how the
/// reference writer writes a DateTime (see the module documentation).
pub const TAG_QUOTE: u8 = b'"';

/// Deepest nesting of objects and arrays a reader accepts (docs/PROTOCOL.md §1).
pub const MAX_DEPTH: u8 = 8;

/// Why a JSON-B input was refused. Each variant is fieldless or `Copy` so the
/// hot path never allocates to report an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside an item.
    #[error("truncated: the input ends inside an item")]
    Truncated,
    /// A length prefix points past the end of the input.
    #[error("a length runs past the end of the input")]
    LengthPastEnd,
    /// Objects or arrays are nested deeper than [`MAX_DEPTH`].
    #[error("nesting deeper than {MAX_DEPTH}")]
    TooDeep,
    /// A known field appears twice in one object.
    #[error("duplicate field")]
    DuplicateField,
    /// A known field holds a value of the wrong type (or out of its range).
    #[error("a known field has the wrong type or an out-of-range value")]
    WrongType,
    /// Bytes follow the end of the message.
    #[error("trailing bytes after the message")]
    TrailingBytes,
    /// A byte that starts no JSON-B item this protocol uses.
    #[error("unknown tag byte 0x{0:02x}")]
    UnknownTag(u8),
    /// A string value is not valid UTF-8 (field names are compared as bytes).
    #[error("a string is not valid UTF-8")]
    InvalidUtf8,
    /// An integer does not fit in a signed 64-bit value.
    #[error("an integer does not fit in 64 bits")]
    IntegerOverflow,
    /// The message name is not one of docs/PROTOCOL.md §2.
    #[error("unknown message type")]
    UnknownMessage,
    /// The input is not shaped as `{ name { fields } }`.
    #[error("not a tagged message: expected {{ name {{ fields }} }}")]
    NotAMessage,
    /// A DateTime field is not `yyyy-MM-ddTHH:mm:ssZ`.
    #[error("a DateTime is not of the form yyyy-MM-ddTHH:mm:ssZ")]
    InvalidDateTime,
    /// An endpoint's address is not 4 or 16 bytes, its port is out of range,
    /// or one of them is missing.
    #[error("an EndPoint needs a 4- or 16-byte IpAddress and a Port 0..=65535")]
    InvalidEndpoint,
    /// A JSON text string (`"…"`) holds a raw control character (below
    /// `0x20`), which JSON allows only escaped. (A text string without its
    /// closing quote is [`DecodeError::Truncated`].)
    #[error("a JSON text string holds a raw control character")]
    ControlCharacter,
    /// A JSON text string (`"…"`) holds an escape JSON does not define
    /// (`\x`, a `\u` without four hex digits, an unpaired surrogate).
    #[error("a JSON text string holds an invalid escape")]
    InvalidEscape,
}

/// The output buffer was too small for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("output buffer too small: {needed} bytes needed")]
pub struct EncodeError {
    /// Bytes the whole message needs.
    pub needed: usize,
}

/// Width code (low two bits of a tag) of the shortest big-endian field holding `v`.
#[inline]
fn width_code(v: u64) -> u8 {
    if v <= 0xFF {
        0
    } else if v <= 0xFFFF {
        1
    } else if v <= 0xFFFF_FFFF {
        2
    } else {
        3
    }
}

/// Writes JSON-B into a caller-provided buffer. Writing past the end is
/// recorded, not a panic: [`Writer::finish`] then reports how much was needed.
pub struct Writer<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> Writer<'b> {
    /// A writer that starts at the beginning of `buf`.
    pub fn new(buf: &'b mut [u8]) -> Self {
        Writer { buf, len: 0 }
    }

    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        let end = self.len + bytes.len();
        if let Some(dst) = self.buf.get_mut(self.len..end) {
            dst.copy_from_slice(bytes);
        }
        self.len = end;
    }

    #[inline]
    fn tag_and_number(&mut self, base: u8, v: u64) {
        let w = width_code(v);
        let n = 1usize << w;
        let start = self.len;
        self.len = start + 1 + n;
        let Some(dst) = self.buf.get_mut(start..start + 1 + n) else {
            return;
        };
        let be = v.to_be_bytes();
        // Fixed-size copies, one per width: one of variable length is a
        // memcpy call, several per message on the hot path.
        if let Some((tag, number)) = dst.split_first_mut() {
            *tag = base + w;
            match number {
                [b] => *b = be[7],
                [_, _] => number.copy_from_slice(&be[6..]),
                [_, _, _, _] => number.copy_from_slice(&be[4..]),
                _ => number.copy_from_slice(&be[8 - number.len()..]),
            }
        }
    }

    /// `{`
    pub fn begin_object(&mut self) {
        self.put(b"{");
    }

    /// `}`
    pub fn end_object(&mut self) {
        self.put(b"}");
    }

    /// A field name (tag `0xB4`+w).
    pub fn name(&mut self, name: &str) {
        self.tag_and_number(TAG_NAME, name.len() as u64);
        self.put(name.as_bytes());
    }

    /// An integer, positive or negative.
    pub fn int(&mut self, v: i64) {
        if v >= 0 {
            self.tag_and_number(TAG_POSITIVE, v as u64);
        } else {
            self.tag_and_number(TAG_NEGATIVE, v.unsigned_abs());
        }
    }

    /// A fixed-size byte array (a DateTime's wire form) as a JSON text
    /// string: `0x22`, the bytes, `0x22`, as the reference writer writes a
    /// DateTime. Printable ASCII other than `"` and `\` (all a DateTime
    /// holds) is written with one fixed-size copy; anything else goes
    /// through [`Writer::text_string`]'s escaping, and invalid UTF-8 is
    /// written as the empty string.
    pub(crate) fn text_fixed<const N: usize>(&mut self, s: &[u8; N]) {
        if !s
            .iter()
            .all(|&b| (0x20..0x7F).contains(&b) && b != b'"' && b != b'\\')
        {
            self.text_string(std::str::from_utf8(s).unwrap_or_default());
            return;
        }
        let start = self.len;
        self.len = start + N + 2;
        if let Some(dst) = self.buf.get_mut(start..start + N + 2) {
            if let Some((open, rest)) = dst.split_first_mut() {
                *open = TAG_QUOTE;
                if let Some((close, body)) = rest.split_last_mut() {
                    body.copy_from_slice(s);
                    *close = TAG_QUOTE;
                }
            }
        }
    }

    /// A string as JSON text: `"`, the string with JSON's escapes (those
    /// serde_json writes: `\"`, `\\` and control characters), `"`. Our
    /// messages use it only for DateTime (`Writer::text_fixed`); the
    /// reader accepts it wherever [`Reader::string_value`] or
    /// [`Reader::datetime_value`] does.
    pub fn text_string(&mut self, s: &str) {
        /// Appends what serde_json writes to the writer's buffer.
        struct Sink<'w, 'b>(&'w mut Writer<'b>);
        impl std::io::Write for Sink<'_, '_> {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.put(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        // Serializing a `&str` fails only if the sink does, and ours never does.
        let _ = serde_json::to_writer(Sink(self), s);
    }

    /// A UTF-8 string.
    pub fn string(&mut self, s: &str) {
        self.tag_and_number(TAG_STRING, s.len() as u64);
        self.put(s.as_bytes());
    }

    /// A binary value.
    pub fn binary(&mut self, b: &[u8]) {
        self.tag_and_number(TAG_BINARY, b.len() as u64);
        self.put(b);
    }

    /// Bytes written so far (or that would have been, past the end).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before anything was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of bytes written, or an error if the buffer was too small.
    pub fn finish(self) -> Result<usize, EncodeError> {
        if self.len <= self.buf.len() {
            Ok(self.len)
        } else {
            Err(EncodeError { needed: self.len })
        }
    }
}

/// Which forms a [`Reader`] accepts for string and DateTime field values
/// (see the module documentation for the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// What the node reads every packet with: string fields are JSON-B
    /// strings, DateTime fields are JSON text strings (the reference's form).
    #[default]
    Strict,
    /// What tools and the client read a service's messages with: also a
    /// JSON text string for a string field and a JSON-B string for a
    /// DateTime field (this project's form before it matched the reference).
    Liberal,
}

/// Reads JSON-B items from a borrowed buffer.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    depth: u8,
    mode: Mode,
}

impl<'a> Reader<'a> {
    /// A strict reader positioned at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self::with_mode(buf, Mode::Strict)
    }

    /// A reader of the given mode positioned at the start of `buf`.
    pub fn with_mode(buf: &'a [u8], mode: Mode) -> Self {
        Reader {
            buf,
            pos: 0,
            depth: 0,
            mode,
        }
    }

    /// The reader's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The next byte, not consumed.
    #[inline]
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// True when every byte has been consumed.
    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = self.peek().ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    #[inline]
    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let rest = self.buf.len() - self.pos;
        if n > rest as u64 {
            return Err(DecodeError::LengthPastEnd);
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    /// Reads the big-endian number of width `1 << (tag & 3)` that follows a tag.
    #[inline]
    fn number(&mut self, tag: u8) -> Result<u64, DecodeError> {
        let n = 1usize << (tag & 3);
        let bytes = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or(DecodeError::Truncated)?;
        // Fixed-size reads, one per width, instead of a byte loop.
        let v = match *bytes {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_be_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_be_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_be_bytes([a, b, c, d, e, f, g, h]),
            _ => return Err(DecodeError::Truncated), // unreachable: n is 1, 2, 4 or 8
        };
        self.pos += n;
        Ok(v)
    }

    /// Consumes `{`, counting depth.
    pub fn begin_object(&mut self) -> Result<(), DecodeError> {
        match self.byte()? {
            b'{' => self.enter(),
            _ => Err(DecodeError::WrongType),
        }
    }

    fn enter(&mut self) -> Result<(), DecodeError> {
        if self.depth >= MAX_DEPTH {
            return Err(DecodeError::TooDeep);
        }
        self.depth += 1;
        Ok(())
    }

    /// Inside an object: the next field's name, or `None` after consuming the closing `}`.
    pub fn next_name(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        let tag = self.byte()?;
        match tag {
            b'}' => {
                self.depth = self.depth.saturating_sub(1);
                Ok(None)
            }
            t if t & !3 == TAG_NAME => {
                let len = self.number(t)?;
                Ok(Some(self.take(len)?))
            }
            b']' => Err(DecodeError::NotAMessage),
            t => Err(DecodeError::UnknownTag(t)),
        }
    }

    /// An integer of any width and sign.
    pub fn int(&mut self) -> Result<i64, DecodeError> {
        let tag = self.peek().ok_or(DecodeError::Truncated)?;
        match tag & !3 {
            TAG_POSITIVE => {
                self.pos += 1;
                let v = self.number(tag)?;
                i64::try_from(v).map_err(|_| DecodeError::IntegerOverflow)
            }
            TAG_NEGATIVE => {
                self.pos += 1;
                let m = self.number(tag)?;
                if m > 1u64 << 63 {
                    Err(DecodeError::IntegerOverflow)
                } else {
                    Ok((m as i64).wrapping_neg())
                }
            }
            _ => self.wrong_type(),
        }
    }

    /// A JSON-B string item (`0x80`+w), in either mode.
    pub fn string(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.length_prefixed(TAG_STRING)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)
    }

    /// A JSON text string item, `"…"` with JSON's escapes, in either mode.
    /// Borrowed from the input unless it holds an escape.
    pub fn text_string(&mut self) -> Result<Cow<'a, str>, DecodeError> {
        match self.peek() {
            Some(TAG_QUOTE) => {
                self.pos += 1;
                self.quoted()
            }
            Some(_) => self.wrong_type(),
            None => Err(DecodeError::Truncated),
        }
    }

    /// The value of a string-typed field: a JSON-B string; in
    /// [`Mode::Liberal`] also a JSON text string.
    #[inline]
    pub fn string_value(&mut self) -> Result<Cow<'a, str>, DecodeError> {
        if self.mode == Mode::Liberal && self.peek() == Some(TAG_QUOTE) {
            return self.text_string();
        }
        self.string().map(Cow::Borrowed)
    }

    /// The text of a DateTime field: a JSON text string (the reference
    /// writer's form and ours); in [`Mode::Liberal`] also a JSON-B string
    /// (the form this project wrote before). The caller parses the text.
    #[inline]
    pub fn datetime_value(&mut self) -> Result<Cow<'a, str>, DecodeError> {
        match self.peek() {
            Some(TAG_QUOTE) => self.text_string(),
            Some(t) if self.mode == Mode::Liberal && t & !3 == TAG_STRING => {
                self.string().map(Cow::Borrowed)
            }
            Some(_) => self.wrong_type(),
            None => Err(DecodeError::Truncated),
        }
    }

    /// The rest of a JSON text string whose opening quote was consumed.
    ///
    /// Scans for the closing unescaped quote (refusing raw control
    /// characters on the way), checks UTF-8, then lets serde_json undo the
    /// escapes of the quoted slice. After those checks an escape is the only
    /// thing serde_json can refuse, so every other error is reported without
    /// touching the heap; a bad escape is found by serde_json (whose error
    /// is boxed) on the path that would have copied the string anyway.
    fn quoted(&mut self) -> Result<Cow<'a, str>, DecodeError> {
        let open = self.pos - 1;
        let mut i = self.pos;
        let mut escaped = false;
        let close = loop {
            match *self.buf.get(i).ok_or(DecodeError::Truncated)? {
                TAG_QUOTE => break i,
                // The escaped byte is skipped: `\"` does not close the string.
                // A bad escape is serde_json's to find.
                b'\\' => {
                    escaped = true;
                    i += 2;
                }
                0..=0x1F => return Err(DecodeError::ControlCharacter),
                _ => i += 1,
            }
        };
        let body = &self.buf[self.pos..close];
        let quoted = &self.buf[open..=close];
        std::str::from_utf8(body).map_err(|_| DecodeError::InvalidUtf8)?;
        let text = if escaped {
            serde_json::from_slice::<String>(quoted).map(Cow::Owned)
        } else {
            serde_json::from_slice::<&'a str>(quoted).map(Cow::Borrowed)
        }
        .map_err(|_| DecodeError::InvalidEscape)?;
        self.pos = close + 1;
        Ok(text)
    }

    /// A binary value.
    pub fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        self.length_prefixed(TAG_BINARY)
    }

    fn length_prefixed(&mut self, base: u8) -> Result<&'a [u8], DecodeError> {
        let tag = self.peek().ok_or(DecodeError::Truncated)?;
        if tag & !3 != base {
            return self.wrong_type();
        }
        self.pos += 1;
        let len = self.number(tag)?;
        self.take(len)
    }

    /// The value under a known field is not of its schema type. The item is
    /// still checked first, so malformed input reports what is really wrong.
    fn wrong_type<T>(&mut self) -> Result<T, DecodeError> {
        self.skip_value()?;
        Err(DecodeError::WrongType)
    }

    /// True (and consumed) if the next value is `null`.
    pub fn null(&mut self) -> bool {
        if self.peek() == Some(TAG_NULL) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Skips one value of any type, including nested objects and arrays
    /// (bounded by [`MAX_DEPTH`]).
    pub fn skip_value(&mut self) -> Result<(), DecodeError> {
        let tag = self.byte()?;
        match tag {
            b'{' => {
                self.enter()?;
                while self.next_name()?.is_some() {
                    self.skip_value()?;
                }
                Ok(())
            }
            b'[' => {
                self.enter()?;
                loop {
                    if self.peek() == Some(b']') {
                        self.pos += 1;
                        self.depth = self.depth.saturating_sub(1);
                        return Ok(());
                    }
                    self.skip_value()?;
                }
            }
            TAG_TRUE | TAG_FALSE | TAG_NULL => Ok(()),
            t => match t & !3 {
                TAG_POSITIVE | TAG_NEGATIVE => self.number(t).map(drop),
                TAG_STRING => {
                    let len = self.number(t)?;
                    let s = self.take(len)?;
                    std::str::from_utf8(s)
                        .map(drop)
                        .map_err(|_| DecodeError::InvalidUtf8)
                }
                TAG_BINARY => {
                    let len = self.number(t)?;
                    self.take(len).map(drop)
                }
                // A JSON text string (a DateTime, or a future field written
                // that way), checked like any other item, in either mode.
                _ if t == TAG_QUOTE => self.quoted().map(drop),
                _ => Err(DecodeError::UnknownTag(t)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(f: impl FnOnce(&mut Writer<'_>)) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf);
        f(&mut w);
        let n = w.finish().expect("fits");
        buf[..n].to_vec()
    }

    #[test]
    fn integers_use_the_shortest_width() {
        assert_eq!(written(|w| w.int(5)), [0xA0, 5]);
        assert_eq!(written(|w| w.int(60000)), [0xA1, 0xEA, 0x60]);
        assert_eq!(written(|w| w.int(0x1_0000)), [0xA2, 0, 1, 0, 0]);
        assert_eq!(written(|w| w.int(1 << 40)), [0xA3, 0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(written(|w| w.int(-1)), [0xA8, 1]);
        assert_eq!(
            written(|w| w.int(i64::MIN)),
            [0xAB, 0x80, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn reader_accepts_any_width_and_sign() {
        for (bytes, v) in [
            (&[0xA0, 5][..], 5i64),
            (&[0xA3, 0, 0, 0, 0, 0, 0, 0, 5], 5),
            (&[0xA9, 0x01, 0x00], -256),
            (&[0xAB, 0x80, 0, 0, 0, 0, 0, 0, 0], i64::MIN),
        ] {
            assert_eq!(Reader::new(bytes).int(), Ok(v));
        }
        assert_eq!(
            Reader::new(&[0xA3, 0x80, 0, 0, 0, 0, 0, 0, 0]).int(),
            Err(DecodeError::IntegerOverflow)
        );
        assert_eq!(
            Reader::new(&[0xAB, 0x80, 0, 0, 0, 0, 0, 0, 1]).int(),
            Err(DecodeError::IntegerOverflow)
        );
    }

    #[test]
    fn lengths_past_the_end_and_truncation() {
        assert_eq!(
            Reader::new(&[0x80, 5, b'a']).string(),
            Err(DecodeError::LengthPastEnd)
        );
        assert_eq!(
            Reader::new(&[0x81, 0]).string(),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Reader::new(&[0x8B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]).binary(),
            Err(DecodeError::LengthPastEnd)
        );
        assert_eq!(
            Reader::new(&[0x80, 1, 0xFF]).string(),
            Err(DecodeError::InvalidUtf8)
        );
    }

    #[test]
    fn skip_bounds_depth() {
        let deep = [b'['; 9];
        assert_eq!(Reader::new(&deep).skip_value(), Err(DecodeError::TooDeep));
        let mut ok = vec![b'['; 8];
        ok.extend([b']'; 8]);
        assert_eq!(Reader::new(&ok).skip_value(), Ok(()));
    }

    #[test]
    fn datetime_is_written_as_json_text() {
        let wire = *b"2026-11-21T12:00:00Z";
        let bytes = written(|w| w.text_fixed(&wire));
        assert_eq!(bytes, [&b"\""[..], &wire, b"\""].concat());
        assert_eq!(bytes.len(), 22, "as long as the JSON-B string 80 14 ...");
        // Anything that would need an escape goes through serde_json.
        assert_eq!(written(|w| w.text_fixed(b"a\"\\\n")), br#""a\"\\\n""#);
        assert_eq!(
            written(|w| w.text_string("a\u{e9}")),
            "\"a\u{e9}\"".as_bytes()
        );
        // Too small a buffer for the fixed form is reported, not a panic.
        let mut buf = [0u8; 21];
        let mut w = Writer::new(&mut buf);
        w.text_fixed(&wire);
        assert_eq!(w.finish(), Err(EncodeError { needed: 22 }));
    }

    #[test]
    fn text_strings_borrow_unless_escaped() {
        let mut r = Reader::new(br#""plain""#);
        assert!(matches!(r.text_string(), Ok(Cow::Borrowed("plain"))));
        assert!(r.at_end());
        let mut r = Reader::new(br#""a\u00e9\n\"""#);
        assert!(matches!(r.text_string(), Ok(Cow::Owned(s)) if s == "a\u{e9}\n\""));
        assert!(r.at_end());
        // The closing quote is the first unescaped one.
        let mut r = Reader::new(br#""a\\"b""#);
        assert_eq!(r.text_string().as_deref(), Ok("a\\"));
        assert_eq!(r.peek(), Some(b'b'));
    }

    #[test]
    fn malformed_text_strings_are_errors() {
        for (bytes, error) in [
            (&b"\""[..], DecodeError::Truncated),
            (b"\"abc", DecodeError::Truncated),
            (b"\"ab\\", DecodeError::Truncated),
            (b"\"ab\\\"", DecodeError::Truncated),
            (b"\"\\q\"", DecodeError::InvalidEscape),
            (b"\"\\u12\"", DecodeError::InvalidEscape),
            (b"\"\\udc00\"", DecodeError::InvalidEscape),
            (b"\"\\\x01\"", DecodeError::InvalidEscape),
            (b"\"\t\"", DecodeError::ControlCharacter),
            (b"\"\x1f\"", DecodeError::ControlCharacter),
            (b"\"\xff\"", DecodeError::InvalidUtf8),
        ] {
            assert_eq!(Reader::new(bytes).text_string(), Err(error), "{bytes:02x?}");
            assert_eq!(Reader::new(bytes).skip_value(), Err(error), "{bytes:02x?}");
        }
        assert_eq!(Reader::new(b"").text_string(), Err(DecodeError::Truncated));
        assert_eq!(
            Reader::new(&[0xA0, 1]).text_string(),
            Err(DecodeError::WrongType)
        );
    }

    #[test]
    fn modes_decide_the_forms_of_string_and_datetime_values() {
        let text = br#""2026-11-21T12:00:00Z""#;
        let string = [&[0x80, 20][..], &text[1..21]].concat();
        for mode in [Mode::Strict, Mode::Liberal] {
            let mut r = Reader::with_mode(text, mode);
            assert_eq!(r.datetime_value().as_deref(), Ok("2026-11-21T12:00:00Z"));
            let mut r = Reader::with_mode(&string, mode);
            assert_eq!(r.string_value().as_deref(), Ok("2026-11-21T12:00:00Z"));
        }
        let mut r = Reader::with_mode(&string, Mode::Liberal);
        assert_eq!(r.datetime_value().as_deref(), Ok("2026-11-21T12:00:00Z"));
        let mut r = Reader::with_mode(text, Mode::Liberal);
        assert_eq!(r.string_value().as_deref(), Ok("2026-11-21T12:00:00Z"));
        let mut r = Reader::new(&string);
        assert_eq!(r.datetime_value(), Err(DecodeError::WrongType));
        assert!(r.at_end(), "the refused item is consumed");
        let mut r = Reader::new(text);
        assert_eq!(r.string_value(), Err(DecodeError::WrongType));
        assert!(r.at_end(), "the refused item is consumed");
        assert_eq!(Reader::new(text).skip_value(), Ok(()));
    }

    #[test]
    fn writer_reports_overflow() {
        let mut buf = [0u8; 3];
        let mut w = Writer::new(&mut buf);
        w.string("hello");
        assert_eq!(w.finish(), Err(EncodeError { needed: 7 }));
    }

    #[test]
    fn writer_len_counts_every_byte_even_past_the_end() {
        let mut buf = [0u8; 4];
        let mut w = Writer::new(&mut buf);
        assert!(w.is_empty());
        assert_eq!(w.len(), 0);
        w.int(5);
        assert!(!w.is_empty());
        assert_eq!(w.len(), 2);
        w.string("abc");
        assert_eq!(w.len(), 7, "counted past the end of the buffer");
        assert_eq!(w.finish(), Err(EncodeError { needed: 7 }));
    }

    #[test]
    fn text_fixed_escapes_quotes_and_backslashes_alone() {
        // Every byte needs an escape: nothing may go through the fixed copy.
        assert_eq!(written(|w| w.text_fixed(b"\"\"")), br#""\"\"""#);
        assert_eq!(written(|w| w.text_fixed(b"\\\\")), br#""\\\\""#);
    }

    #[test]
    fn reader_keeps_its_mode_and_knows_its_end() {
        assert_eq!(Reader::new(&[]).mode(), Mode::Strict);
        assert_eq!(Reader::with_mode(&[], Mode::Liberal).mode(), Mode::Liberal);
        let mut r = Reader::new(&[0xA0, 5]);
        assert!(!r.at_end());
        assert_eq!(r.int(), Ok(5));
        assert!(r.at_end());
    }

    #[test]
    fn only_a_name_tag_or_a_closing_brace_is_a_field() {
        let mut r = Reader::new(&[0xB4, 1, b'x', b'}']);
        assert_eq!(r.next_name(), Ok(Some(&b"x"[..])));
        assert_eq!(r.next_name(), Ok(None));
        assert_eq!(Reader::new(b"]").next_name(), Err(DecodeError::NotAMessage));
        assert_eq!(
            Reader::new(&[0xA0, 0, 0]).next_name(),
            Err(DecodeError::UnknownTag(0xA0))
        );
        assert_eq!(
            Reader::new(&[0x80, 0, 0]).next_name(),
            Err(DecodeError::UnknownTag(0x80))
        );
    }

    #[test]
    fn null_is_consumed_only_when_it_is_next() {
        let mut r = Reader::new(&[TAG_NULL, 0xA0, 5]);
        assert!(r.null());
        assert_eq!(r.int(), Ok(5));
        let mut r = Reader::new(&[0xA0, 5]);
        assert!(!r.null());
        assert_eq!(r.int(), Ok(5), "a value that is not null is left in place");
        assert!(!Reader::new(&[]).null());
    }

    #[test]
    fn skip_value_steps_over_exactly_one_item() {
        for item in [
            &b"[]"[..],
            b"[[]]",
            &[b'[', 0xA0, 1, 0x80, 1, b'x', b']'],
            &[0x88, 2, 1, 2],
            &[0x8B, 0, 0, 0, 0, 0, 0, 0, 1, 9],
            &[b'{', 0xB4, 1, b'a', 0x88, 0, b'}'],
            br#""t""#,
            &[TAG_TRUE],
        ] {
            let bytes = [item, &[0xA0, 7]].concat();
            let mut r = Reader::new(&bytes);
            assert_eq!(r.skip_value(), Ok(()), "{item:02x?}");
            assert_eq!(r.int(), Ok(7), "{item:02x?}: stopped inside or past it");
        }
        // A tag this protocol does not use is not the start of a text string.
        assert_eq!(
            Reader::new(&[0xB3, b'"']).skip_value(),
            Err(DecodeError::UnknownTag(0xB3))
        );
        assert_eq!(
            Reader::new(&[0x01, b'"']).skip_value(),
            Err(DecodeError::UnknownTag(0x01))
        );
    }
}
