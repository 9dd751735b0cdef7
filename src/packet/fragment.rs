//! Fragments: service → client messages of 2 to 16 packets (docs/PROTOCOL.md §5).
//!
//! The sender cuts a message too large for one packet into `k ≤ 16` chunks,
//! each the plaintext `FF ‖ message id (u16be) ‖ i (u8) ‖ k (u8) ‖ bytes`; the
//! client's [`Reassembler`] puts them back together. Memory is bounded at all
//! times (at most 4 messages × 16 chunks × one packet's worth of bytes), and
//! time comes in as an argument: this file must not read the clock, and must
//! not look inside the reassembled message (that is the codec's job).

use super::framing::MAX_PLAINTEXT;
use crate::time::UnixMillis;

/// First plaintext byte of a fragment; a whole message starts with `{`
/// (docs/PROTOCOL.md §3, §5).
pub const FRAGMENT_MARKER: u8 = 0xFF;
/// `FF ‖ message id (2) ‖ i (1) ‖ k (1)` (docs/PROTOCOL.md §5).
pub const FRAGMENT_HEADER_LEN: usize = 5;
/// Most chunks one message may be cut into (docs/PROTOCOL.md §5).
pub const MAX_FRAGMENTS: usize = 16;
/// Most message bytes one chunk carries.
pub const MAX_FRAGMENT_DATA: usize = MAX_PLAINTEXT - FRAGMENT_HEADER_LEN;
/// An incomplete message is discarded this long after its first chunk
/// arrived (docs/PROTOCOL.md §5: 2 s).
pub const FRAGMENT_TIMEOUT_MS: u64 = 2000;
/// Most messages a connection reassembles at once (docs/PROTOCOL.md §5).
pub const MAX_MESSAGES_IN_PROGRESS: usize = 4;

/// Why a chunk could not be produced or was refused. Fieldless: the client
/// counts these, it does not answer them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FragmentError {
    /// The message would need more than 16 chunks; send an error instead
    /// (docs/PROTOCOL.md §5).
    #[error("message needs more than {MAX_FRAGMENTS} fragments")]
    MessageTooLarge,
    /// The output buffer cannot hold the chunk.
    #[error("buffer too small for the fragment")]
    BufferTooSmall,
    /// The plaintext is shorter than the fragment header.
    #[error("fragment shorter than its header")]
    Truncated,
    /// The plaintext does not start with 0xFF.
    #[error("not a fragment")]
    NotAFragment,
    /// `k` is 0 or above 16.
    #[error("fragment count out of range")]
    BadCount,
    /// `i ≥ k`.
    #[error("fragment index out of range")]
    BadIndex,
    /// The chunk carries more bytes than fit in one packet.
    #[error("fragment longer than one packet")]
    ChunkTooLong,
    /// A chunk's `k` differs from earlier chunks of the same message id; the
    /// whole set has been dropped.
    #[error("fragment count differs within one message; message dropped")]
    InconsistentCount,
}

/// How many chunks a message of `len` bytes is cut into, or `None` if it
/// would need more than 16 (docs/PROTOCOL.md §5). Messages that fit in one packet
/// (`len ≤ MAX_PLAINTEXT`) are normally sent whole instead.
pub fn fragment_count(len: usize) -> Option<usize> {
    let k = len.div_ceil(MAX_FRAGMENT_DATA).max(1);
    (k <= MAX_FRAGMENTS).then_some(k)
}

/// Writes chunk `index` of `message` (with id `message_id`) into `out` and
/// returns its length: the plaintext of one packet, ready to be sealed.
pub fn write_fragment(
    message: &[u8],
    message_id: u16,
    index: usize,
    out: &mut [u8],
) -> Result<usize, FragmentError> {
    let count = fragment_count(message.len()).ok_or(FragmentError::MessageTooLarge)?;
    if index >= count {
        return Err(FragmentError::BadIndex);
    }
    chunk(message, message_id, index, count).write_to(out)
}

fn chunk(message: &[u8], message_id: u16, index: usize, count: usize) -> FragmentChunk<'_> {
    let start = (index * MAX_FRAGMENT_DATA).min(message.len());
    let end = (start + MAX_FRAGMENT_DATA).min(message.len());
    let id = message_id.to_be_bytes();
    // index < count ≤ 16, so both fit a byte.
    FragmentChunk {
        header: [FRAGMENT_MARKER, id[0], id[1], index as u8, count as u8],
        data: &message[start..end],
    }
}

/// One chunk of a message: header plus a borrowed slice of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentChunk<'a> {
    header: [u8; FRAGMENT_HEADER_LEN],
    data: &'a [u8],
}

impl FragmentChunk<'_> {
    /// The message id.
    pub fn message_id(&self) -> u16 {
        u16::from_be_bytes([self.header[1], self.header[2]])
    }

    /// This chunk's index `i`.
    pub fn index(&self) -> usize {
        usize::from(self.header[3])
    }

    /// The number of chunks `k` of the message.
    pub fn count(&self) -> usize {
        usize::from(self.header[4])
    }

    /// The message bytes this chunk carries.
    pub fn data(&self) -> &[u8] {
        self.data
    }

    /// Length of the chunk's plaintext, header included.
    pub fn wire_len(&self) -> usize {
        FRAGMENT_HEADER_LEN + self.data.len()
    }

    /// Writes the chunk's plaintext into `out`, returning its length.
    pub fn write_to(&self, out: &mut [u8]) -> Result<usize, FragmentError> {
        let len = self.wire_len();
        let out = out.get_mut(..len).ok_or(FragmentError::BufferTooSmall)?;
        out[..FRAGMENT_HEADER_LEN].copy_from_slice(&self.header);
        out[FRAGMENT_HEADER_LEN..].copy_from_slice(self.data);
        Ok(len)
    }

    /// The chunk's plaintext in a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.wire_len());
        v.extend_from_slice(&self.header);
        v.extend_from_slice(self.data);
        v
    }
}

/// The chunks of one message, in order.
#[derive(Debug, Clone)]
pub struct Fragments<'a> {
    message: &'a [u8],
    message_id: u16,
    count: usize,
    next: usize,
}

impl<'a> Fragments<'a> {
    /// Cuts `message` into chunks with id `message_id`; refuses a message that
    /// would need more than 16 (docs/PROTOCOL.md §5).
    pub fn new(message: &'a [u8], message_id: u16) -> Result<Self, FragmentError> {
        let count = fragment_count(message.len()).ok_or(FragmentError::MessageTooLarge)?;
        Ok(Fragments {
            message,
            message_id,
            count,
            next: 0,
        })
    }

    /// The number of chunks `k`.
    pub fn count(&self) -> usize {
        self.count
    }
}

impl<'a> Iterator for Fragments<'a> {
    type Item = FragmentChunk<'a>;

    fn next(&mut self) -> Option<FragmentChunk<'a>> {
        if self.next >= self.count {
            return None;
        }
        let c = chunk(self.message, self.message_id, self.next, self.count);
        self.next += 1;
        Some(c)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.count - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Fragments<'_> {}

/// A message being reassembled.
#[derive(Debug)]
struct Partial {
    id: u16,
    count: u8,
    /// Bit i set when chunk i has arrived.
    received: u16,
    /// When the first chunk arrived; the set expires 2 s later.
    started: UnixMillis,
    /// `count` slots, each empty until its chunk arrives.
    chunks: Vec<Vec<u8>>,
}

/// A message delivered recently, so late duplicates of its chunks are ignored
/// instead of starting a set that can never complete.
#[derive(Debug, Clone, Copy)]
struct Delivered {
    id: u16,
    at: UnixMillis,
}

/// Reassembles one connection's fragmented messages (docs/PROTOCOL.md §5); owned by
/// the client's connection state, fed every plaintext that starts with 0xFF.
///
/// Limits: at most [`MAX_MESSAGES_IN_PROGRESS`] messages at once, each at most
/// [`MAX_FRAGMENTS`] chunks of at most [`MAX_FRAGMENT_DATA`] bytes; a set is
/// discarded [`FRAGMENT_TIMEOUT_MS`] after its first chunk arrived. A chunk
/// of a 5th new message evicts the set that started earliest: an old
/// incomplete set is the likeliest to have lost a chunk, and refusing would let
/// one stuck set block fresh messages for the full 2 s. Duplicate chunks, also
/// of a message delivered within the last 2 s, are ignored.
#[derive(Debug, Default)]
pub struct Reassembler {
    partial: Vec<Partial>,
    delivered: [Option<Delivered>; MAX_MESSAGES_IN_PROGRESS],
    next_delivered: usize,
}

impl Reassembler {
    /// An empty reassembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one fragment plaintext (starting with 0xFF) received at `now`;
    /// returns the whole message once its last chunk is in.
    pub fn push(
        &mut self,
        now: UnixMillis,
        plaintext: &[u8],
    ) -> Result<Option<Vec<u8>>, FragmentError> {
        self.expire(now);
        let (header, data) = plaintext
            .split_first_chunk::<FRAGMENT_HEADER_LEN>()
            .ok_or(FragmentError::Truncated)?;
        let [marker, id_hi, id_lo, index, count] = *header;
        if marker != FRAGMENT_MARKER {
            return Err(FragmentError::NotAFragment);
        }
        if count == 0 || usize::from(count) > MAX_FRAGMENTS {
            return Err(FragmentError::BadCount);
        }
        if index >= count {
            return Err(FragmentError::BadIndex);
        }
        if data.len() > MAX_FRAGMENT_DATA {
            return Err(FragmentError::ChunkTooLong);
        }
        let id = u16::from_be_bytes([id_hi, id_lo]);
        if self.delivered.iter().flatten().any(|d| d.id == id) {
            return Ok(None);
        }
        let slot = match self.partial.iter().position(|p| p.id == id) {
            Some(slot) => {
                if self.partial[slot].count != count {
                    self.partial.swap_remove(slot);
                    return Err(FragmentError::InconsistentCount);
                }
                slot
            }
            None => {
                if count == 1 {
                    self.remember(id, now);
                    return Ok(Some(data.to_vec()));
                }
                if self.partial.len() >= MAX_MESSAGES_IN_PROGRESS {
                    self.evict_oldest();
                }
                self.partial.push(Partial {
                    id,
                    count,
                    received: 0,
                    started: now,
                    chunks: vec![Vec::new(); usize::from(count)],
                });
                self.partial.len() - 1
            }
        };
        let set = &mut self.partial[slot];
        let bit = 1u16 << index;
        if set.received & bit != 0 {
            return Ok(None);
        }
        set.received |= bit;
        if let Some(c) = set.chunks.get_mut(usize::from(index)) {
            c.extend_from_slice(data);
        }
        if set.received.count_ones() < u32::from(set.count) {
            return Ok(None);
        }
        let set = self.partial.swap_remove(slot);
        self.remember(id, now);
        Ok(Some(set.chunks.concat()))
    }

    /// Discards incomplete sets whose first chunk arrived 2 s or more before
    /// `now`; returns how many were discarded.
    pub fn expire(&mut self, now: UnixMillis) -> usize {
        let before = self.partial.len();
        self.partial
            .retain(|p| now.millis_since(p.started) < FRAGMENT_TIMEOUT_MS);
        for d in &mut self.delivered {
            if d.is_some_and(|d| now.millis_since(d.at) >= FRAGMENT_TIMEOUT_MS) {
                *d = None;
            }
        }
        before - self.partial.len()
    }

    /// When the earliest incomplete set expires, if any: the time to call
    /// [`Reassembler::expire`].
    pub fn poll_timeout(&self) -> Option<UnixMillis> {
        self.partial
            .iter()
            .map(|p| p.started.plus_millis(FRAGMENT_TIMEOUT_MS))
            .min()
    }

    /// Number of messages being reassembled.
    pub fn in_progress(&self) -> usize {
        self.partial.len()
    }

    /// Forgets everything, e.g. when the connection is replaced.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = (0..self.partial.len()).min_by_key(|&i| self.partial[i].started) {
            self.partial.swap_remove(oldest);
        }
    }

    fn remember(&mut self, id: u16, at: UnixMillis) {
        self.delivered[self.next_delivered] = Some(Delivered { id, at });
        self.next_delivered = (self.next_delivered + 1) % self.delivered.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::SeedableRng;

    fn message(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn chunks(msg: &[u8], id: u16) -> Vec<Vec<u8>> {
        Fragments::new(msg, id)
            .expect("fits")
            .map(|c| c.to_vec())
            .collect()
    }

    #[test]
    fn counts() {
        assert_eq!(fragment_count(0), Some(1));
        assert_eq!(fragment_count(MAX_FRAGMENT_DATA), Some(1));
        assert_eq!(fragment_count(MAX_FRAGMENT_DATA + 1), Some(2));
        assert_eq!(fragment_count(5000), Some(5));
        assert_eq!(fragment_count(16 * MAX_FRAGMENT_DATA), Some(16));
        assert_eq!(fragment_count(16 * MAX_FRAGMENT_DATA + 1), None);
        assert_eq!(fragment_count(usize::MAX), None);
    }

    #[test]
    fn chunk_layout() {
        let msg = message(5000);
        let cs = chunks(&msg, 0xABCD);
        assert_eq!(cs.len(), 5);
        for (i, c) in cs.iter().enumerate() {
            assert_eq!(&c[..5], &[0xFF, 0xAB, 0xCD, i as u8, 5]);
            assert!(c.len() <= MAX_PLAINTEXT);
            let mut out = [0u8; MAX_PLAINTEXT];
            let n = write_fragment(&msg, 0xABCD, i, &mut out).expect("fits");
            assert_eq!(&out[..n], &c[..]);
        }
        let joined: Vec<u8> = cs.iter().flat_map(|c| c[5..].to_vec()).collect();
        assert_eq!(joined, msg);
        let mut small = [0u8; 10];
        assert_eq!(
            write_fragment(&msg, 1, 0, &mut small),
            Err(FragmentError::BufferTooSmall)
        );
        assert_eq!(
            write_fragment(&msg, 1, 5, &mut small),
            Err(FragmentError::BadIndex)
        );
    }

    #[test]
    fn seventeen_fragments_refused() {
        let msg = message(16 * MAX_FRAGMENT_DATA + 1);
        assert_eq!(
            Fragments::new(&msg, 1).map(|f| f.count()),
            Err(FragmentError::MessageTooLarge)
        );
        let mut out = [0u8; MAX_PLAINTEXT];
        assert_eq!(
            write_fragment(&msg, 1, 0, &mut out),
            Err(FragmentError::MessageTooLarge)
        );
        let mut r = Reassembler::new();
        assert_eq!(
            r.push(UnixMillis(0), &[0xFF, 0, 1, 0, 17]),
            Err(FragmentError::BadCount)
        );
        let full = message(16 * MAX_FRAGMENT_DATA);
        assert_eq!(chunks(&full, 1).len(), 16);
    }

    #[test]
    fn shuffled_with_duplicates_reassembles() {
        let msg = message(5000);
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..50 {
            let mut cs = chunks(&msg, 7);
            let dups: Vec<Vec<u8>> = cs.iter().step_by(2).cloned().collect();
            cs.extend(dups);
            cs.shuffle(&mut rng);
            let mut r = Reassembler::new();
            let mut out = Vec::new();
            for (t, c) in cs.iter().enumerate() {
                if let Some(m) = r.push(UnixMillis(t as u64), c).expect("valid chunk") {
                    out.push(m);
                }
            }
            assert_eq!(out, vec![msg.clone()]);
            assert_eq!(r.in_progress(), 0);
        }
    }

    #[test]
    fn interleaved_messages() {
        let (a, b) = (message(3000), message(2000));
        let (ca, cb) = (chunks(&a, 1), chunks(&b, 2));
        let mut r = Reassembler::new();
        let t = UnixMillis(0);
        let mut got = Vec::new();
        for (x, y) in ca.iter().zip(cb.iter().chain(std::iter::repeat(&cb[0]))) {
            got.extend(r.push(t, x).expect("ok"));
            got.extend(r.push(t, y).expect("ok"));
        }
        assert_eq!(got, vec![b, a]);
    }

    #[test]
    fn single_chunk_message() {
        let mut r = Reassembler::new();
        assert_eq!(
            r.push(UnixMillis(0), &[0xFF, 0, 9, 0, 1, b'x']),
            Ok(Some(b"x".to_vec()))
        );
        assert_eq!(r.push(UnixMillis(1), &[0xFF, 0, 9, 0, 1, b'x']), Ok(None));
    }

    #[test]
    fn fifth_message_evicts_oldest() {
        let mut r = Reassembler::new();
        let msgs: Vec<Vec<u8>> = (0..5).map(|i| message(2000 + i)).collect();
        let sets: Vec<Vec<Vec<u8>>> = msgs
            .iter()
            .zip(0u16..)
            .map(|(m, id)| chunks(m, id))
            .collect();
        for (t, set) in sets.iter().enumerate() {
            assert_eq!(r.push(UnixMillis(t as u64), &set[0]), Ok(None));
            assert!(r.in_progress() <= MAX_MESSAGES_IN_PROGRESS);
        }
        assert_eq!(r.in_progress(), 4);
        // Message 0 was evicted: its second chunk starts a new set (evicting 1).
        assert_eq!(r.push(UnixMillis(10), &sets[0][1]), Ok(None));
        assert_eq!(r.push(UnixMillis(11), &sets[1][1]), Ok(None));
        // Messages 3 and 4 survived and complete.
        assert_eq!(
            r.push(UnixMillis(12), &sets[3][1]),
            Ok(Some(msgs[3].clone()))
        );
        assert_eq!(
            r.push(UnixMillis(13), &sets[4][1]),
            Ok(Some(msgs[4].clone()))
        );
    }

    #[test]
    fn incomplete_set_times_out_after_two_seconds() {
        let msg = message(2000);
        let cs = chunks(&msg, 3);
        let mut r = Reassembler::new();
        assert_eq!(r.push(UnixMillis(1000), &cs[0]), Ok(None));
        assert_eq!(r.poll_timeout(), Some(UnixMillis(3000)));
        assert_eq!(r.expire(UnixMillis(2999)), 0);
        assert_eq!(r.push(UnixMillis(2999), &cs[1]), Ok(Some(msg.clone())));

        let mut r = Reassembler::new();
        assert_eq!(r.push(UnixMillis(1000), &cs[0]), Ok(None));
        assert_eq!(r.expire(UnixMillis(3000)), 1);
        assert_eq!(r.poll_timeout(), None);
        // The late chunk starts a fresh set instead of completing the old one.
        assert_eq!(r.push(UnixMillis(3000), &cs[1]), Ok(None));
        assert_eq!(r.in_progress(), 1);

        // Expiry also happens on push.
        let mut r = Reassembler::new();
        assert_eq!(r.push(UnixMillis(0), &cs[0]), Ok(None));
        assert_eq!(r.push(UnixMillis(2000), &cs[1]), Ok(None));
        assert_eq!(r.push(UnixMillis(2001), &cs[0]), Ok(Some(msg)));
    }

    #[test]
    fn inconsistent_count_drops_set() {
        let msg = message(3000);
        let cs = chunks(&msg, 4);
        let mut r = Reassembler::new();
        assert_eq!(r.push(UnixMillis(0), &cs[0]), Ok(None));
        let mut bad = cs[1].clone();
        bad[4] = 4;
        assert_eq!(
            r.push(UnixMillis(1), &bad),
            Err(FragmentError::InconsistentCount)
        );
        assert_eq!(r.in_progress(), 0);
        assert_eq!(r.push(UnixMillis(2), &cs[1]), Ok(None));
        assert_eq!(r.push(UnixMillis(3), &cs[2]), Ok(None));
        assert_eq!(r.push(UnixMillis(4), &cs[0]), Ok(Some(msg)));
    }

    #[test]
    fn malformed_chunks() {
        let mut r = Reassembler::new();
        let t = UnixMillis(0);
        assert_eq!(r.push(t, &[]), Err(FragmentError::Truncated));
        assert_eq!(r.push(t, &[0xFF, 0, 0, 0]), Err(FragmentError::Truncated));
        assert_eq!(r.push(t, b"{\"a\":1}"), Err(FragmentError::NotAFragment));
        assert_eq!(r.push(t, &[0xFF, 0, 0, 0, 0]), Err(FragmentError::BadCount));
        assert_eq!(r.push(t, &[0xFF, 0, 0, 2, 2]), Err(FragmentError::BadIndex));
        assert_eq!(
            r.push(t, &[0xFF, 0, 0, 255, 3]),
            Err(FragmentError::BadIndex)
        );
        let mut long = vec![0xFF, 0, 0, 0, 2];
        long.resize(FRAGMENT_HEADER_LEN + MAX_FRAGMENT_DATA + 1, 0);
        assert_eq!(r.push(t, &long), Err(FragmentError::ChunkTooLong));
        assert_eq!(r.in_progress(), 0);
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut r = Reassembler::new();
        for t in 0..20_000u64 {
            let len = rand::Rng::gen_range(&mut rng, 0..40);
            let mut buf = vec![0u8; len];
            rand::RngCore::fill_bytes(&mut rng, &mut buf);
            if let Some(b) = buf.first_mut() {
                *b = 0xFF;
            }
            if let Some(b) = buf.get_mut(4) {
                *b %= 18;
            }
            let _ = r.push(UnixMillis(t / 10), &buf);
            assert!(r.in_progress() <= MAX_MESSAGES_IN_PROGRESS);
        }
    }

    /// A chunk's accessors and `Fragments`' count and size hint describe
    /// what goes on the wire.
    #[test]
    fn chunk_accessors_match_the_wire() {
        let msg = message(2 * MAX_FRAGMENT_DATA + 100);
        let mut f = Fragments::new(&msg, 0xBEEF).expect("fits");
        // `f.count()` would be `Iterator::count` (it takes `self`, found
        // before the inherent `&self` method), so name the inherent one.
        assert_eq!(Fragments::count(&f), 3);
        let mut at = 0;
        for i in 0..3 {
            assert_eq!(f.size_hint(), (3 - i, Some(3 - i)));
            assert_eq!(f.len(), 3 - i);
            let c = f.next().expect("a chunk");
            assert_eq!(c.message_id(), 0xBEEF);
            assert_eq!(c.index(), i);
            assert_eq!(c.count(), 3);
            let end = (at + MAX_FRAGMENT_DATA).min(msg.len());
            assert_eq!(c.data(), &msg[at..end]);
            assert_eq!(c.wire_len(), FRAGMENT_HEADER_LEN + end - at);
            let v = c.to_vec();
            assert_eq!(v.len(), c.wire_len());
            assert_eq!(&v[FRAGMENT_HEADER_LEN..], c.data());
            at = end;
        }
        assert_eq!(at, msg.len());
        assert_eq!(f.size_hint(), (0, Some(0)));
        assert_eq!(f.next(), None);
        assert_eq!(Fragments::count(&f), 3, "the count, not what is left");
    }

    /// docs/PROTOCOL.md §5: up to 16 chunks; a message of exactly 16
    /// reassembles (17 is refused, `seventeen_fragments_refused`).
    #[test]
    fn sixteen_fragments_reassemble() {
        let msg = message(16 * MAX_FRAGMENT_DATA);
        let cs = chunks(&msg, 16);
        assert_eq!(cs.len(), 16);
        let mut r = Reassembler::new();
        let (last, rest) = cs.split_last().expect("chunks");
        for c in rest {
            assert_eq!(r.push(UnixMillis(0), c), Ok(None));
        }
        assert_eq!(r.push(UnixMillis(0), last), Ok(Some(msg)));
    }

    /// A single-chunk message: what the reassembler gives back for it.
    fn single(id: u16) -> [u8; 6] {
        let [hi, lo] = id.to_be_bytes();
        [FRAGMENT_MARKER, hi, lo, 0, 1, b'x']
    }

    /// `clear` forgets the sets in progress and the messages delivered.
    #[test]
    fn clear_forgets_everything() {
        let msg = message(2000);
        let cs = chunks(&msg, 3);
        let mut r = Reassembler::new();
        assert_eq!(r.push(UnixMillis(0), &single(9)), Ok(Some(b"x".to_vec())));
        assert_eq!(r.push(UnixMillis(0), &cs[0]), Ok(None));
        r.clear();
        assert_eq!(r.in_progress(), 0);
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(
            r.push(UnixMillis(1), &single(9)),
            Ok(Some(b"x".to_vec())),
            "no longer a duplicate"
        );
        assert_eq!(r.push(UnixMillis(1), &cs[1]), Ok(None), "a fresh set");
        assert_eq!(r.push(UnixMillis(1), &cs[0]), Ok(Some(msg)));
    }

    /// The last four messages delivered are remembered (late duplicates of
    /// any of them are ignored); a fifth pushes out the first.
    #[test]
    fn four_delivered_messages_are_remembered() {
        let mut r = Reassembler::new();
        for id in 1..=4 {
            assert_eq!(r.push(UnixMillis(0), &single(id)), Ok(Some(b"x".to_vec())));
        }
        for id in 1..=4 {
            assert_eq!(r.push(UnixMillis(1), &single(id)), Ok(None), "{id} again");
        }
        assert_eq!(r.push(UnixMillis(2), &single(5)), Ok(Some(b"x".to_vec())));
        assert_eq!(
            r.push(UnixMillis(3), &single(1)),
            Ok(Some(b"x".to_vec())),
            "1 was pushed out by 5"
        );
        for id in [3, 4, 5, 1] {
            assert_eq!(r.push(UnixMillis(4), &single(id)), Ok(None), "{id} again");
        }
    }
}
