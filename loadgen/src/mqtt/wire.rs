//! MQTT 3.1.1 control packets as this client writes and reads them: the
//! fixed header and its remaining-length varint, a byte stream split into
//! frames whatever the reads' boundaries, CONNECT, SUBSCRIBE, PUBLISH at
//! QoS 0 or 1 and its PUBACK, and the checks of CONNACK and SUBACK.
//!
//! It exists so that the framing is tested apart from sockets. It must not
//! touch a socket or keep any connection's state beyond the bytes of a
//! frame not yet complete.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Result};

/// Packet types (the high nibble of the fixed header).
pub(super) const CONNECT: u8 = 1;
pub(super) const CONNACK: u8 = 2;
pub(super) const PUBLISH: u8 = 3;
pub(super) const PUBACK: u8 = 4;
pub(super) const SUBSCRIBE: u8 = 8;
pub(super) const SUBACK: u8 = 9;
pub(super) const PINGREQ: u8 = 12;
pub(super) const PINGRESP: u8 = 13;
pub(super) const DISCONNECT: u8 = 14;

/// The largest remaining length MQTT can encode (four varint bytes).
const MAX_REMAINING_LENGTH: usize = 268_435_455;
/// The largest frame this client accepts from a broker.
const MAX_FRAME: usize = 4 << 20;
/// Keepalive announced in CONNECT; a PINGREQ goes out every half of it.
pub(super) const KEEPALIVE_S: u16 = 60;
/// Packet identifier of each subscriber's one SUBSCRIBE.
pub(super) const SUBSCRIBE_ID: u16 = 1;

/// What can be wrong with the bytes a broker sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// A remaining length of more than four bytes.
    MalformedLength,
    /// A frame larger than this client accepts (or MQTT can encode).
    TooLarge(usize),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::MalformedLength => {
                write!(f, "malformed remaining length (more than 4 bytes)")
            }
            FrameError::TooLarge(n) => write!(f, "frame of {n} bytes is too large"),
        }
    }
}

impl std::error::Error for FrameError {}

/// One control packet: the fixed header's first byte and the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    /// Packet type (high nibble) and flags (low nibble).
    pub(crate) header: u8,
    /// Variable header and payload.
    pub(crate) body: &'a [u8],
}

impl Frame<'_> {
    /// The packet type.
    pub(crate) fn kind(&self) -> u8 {
        self.header >> 4
    }
}

/// Appends the remaining-length varint of `len`.
pub(crate) fn encode_remaining_length(len: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    if len > MAX_REMAINING_LENGTH {
        return Err(FrameError::TooLarge(len));
    }
    let mut x = len;
    loop {
        let mut byte = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if x == 0 {
            return Ok(());
        }
    }
}

/// Decodes a remaining-length varint: `(value, bytes used)`, or `None` when
/// `buf` ends before it does.
pub(crate) fn decode_remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(FrameError::MalformedLength)
}

/// The first whole frame of `buf` and the bytes it takes, or `None` when
/// `buf` holds only part of one.
pub(crate) fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(&header) = buf.first() else {
        return Ok(None);
    };
    let Some((len, n)) = decode_remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let total = 1 + n + len;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            header,
            body: &buf[1 + n..total],
        },
        total,
    )))
}

/// Splits a TCP byte stream into frames, whatever the reads' boundaries.
#[derive(Debug, Default)]
pub(crate) struct FrameStream {
    /// The start of a frame not yet complete (usually empty).
    pending: Vec<u8>,
}

impl FrameStream {
    /// Calls `on_frame` for each frame completed by `data` (the bytes of one
    /// read), in order, and keeps any trailing part for the next read.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        mut on_frame: impl FnMut(Frame<'_>) -> Result<()>,
    ) -> Result<()> {
        if self.pending.is_empty() {
            let used = split_frames(data, &mut on_frame)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            self.pending.extend_from_slice(data);
            let used = split_frames(&self.pending, &mut on_frame)?;
            self.pending.drain(..used);
            if self.pending.is_empty() && self.pending.capacity() > 64 << 10 {
                self.pending = Vec::new();
            }
        }
        Ok(())
    }

    /// Bytes held back for the next read.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Calls `on_frame` for each whole frame at the start of `buf`; returns the
/// bytes they took.
fn split_frames(buf: &[u8], on_frame: &mut impl FnMut(Frame<'_>) -> Result<()>) -> Result<usize> {
    let mut pos = 0;
    while let Some((frame, n)) = parse_frame(&buf[pos..])? {
        on_frame(frame)?;
        pos += n;
    }
    Ok(pos)
}

/// Appends a frame with `header` and `parts` as its body.
fn put_frame(out: &mut Vec<u8>, header: u8, parts: &[&[u8]]) -> Result<(), FrameError> {
    let len = parts.iter().map(|p| p.len()).sum();
    out.push(header);
    encode_remaining_length(len, out)?;
    for p in parts {
        out.extend_from_slice(p);
    }
    Ok(())
}

/// A length-prefixed MQTT string.
fn mqtt_string(s: &str) -> Result<Vec<u8>> {
    let len = u16::try_from(s.len()).map_err(|_| anyhow!("string of {} bytes", s.len()))?;
    let mut v = len.to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    Ok(v)
}

/// CONNECT, MQTT 3.1.1, clean session.
pub(crate) fn connect_frame(client_id: &str, keepalive_s: u16) -> Result<Vec<u8>> {
    let mut var = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    var.extend_from_slice(&keepalive_s.to_be_bytes());
    let mut out = Vec::with_capacity(16 + client_id.len());
    put_frame(&mut out, CONNECT << 4, &[&var, &mqtt_string(client_id)?])?;
    Ok(out)
}

/// SUBSCRIBE to one topic filter at `qos`.
pub(crate) fn subscribe_frame(packet_id: u16, topic: &str, qos: u8) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(8 + topic.len());
    put_frame(
        &mut out,
        (SUBSCRIBE << 4) | 0x02,
        &[&packet_id.to_be_bytes(), &mqtt_string(topic)?, &[qos]],
    )?;
    Ok(out)
}

/// Appends a PUBLISH: QoS 0 without a packet identifier, QoS 1 with `id`.
pub(crate) fn put_publish(
    out: &mut Vec<u8>,
    topic: &[u8],
    payload: &[u8],
    id: Option<u16>,
) -> Result<()> {
    let len = u16::try_from(topic.len()).map_err(|_| anyhow!("topic too long"))?;
    match id {
        None => put_frame(out, PUBLISH << 4, &[&len.to_be_bytes(), topic, payload])?,
        Some(id) => put_frame(
            out,
            (PUBLISH << 4) | (1 << 1),
            &[&len.to_be_bytes(), topic, &id.to_be_bytes(), payload],
        )?,
    }
    Ok(())
}

/// Appends the PUBACK of a QoS 1 PUBLISH.
pub(crate) fn put_puback(out: &mut Vec<u8>, id: u16) {
    let [hi, lo] = id.to_be_bytes();
    out.extend_from_slice(&[PUBACK << 4, 2, hi, lo]);
}

/// The packet identifier of a PUBLISH at QoS 1 or 2 (none at QoS 0).
pub(crate) fn publish_packet_id(frame: &Frame<'_>) -> Option<u16> {
    let b = frame.body;
    if (frame.header >> 1) & 3 == 0 {
        return None;
    }
    let at = 2 + usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The packet identifier a PUBACK acknowledges.
pub(crate) fn puback_id(frame: &Frame<'_>) -> Option<u16> {
    match frame.body {
        [hi, lo] => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

/// The application payload of a PUBLISH (after topic and packet id).
pub(crate) fn publish_payload<'a>(frame: &Frame<'a>) -> Option<&'a [u8]> {
    let b = frame.body;
    let topic_len = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    let qos = (frame.header >> 1) & 3;
    let start = 2 + topic_len + if qos > 0 { 2 } else { 0 };
    b.get(start..)
}

/// What a CONNACK return code means (MQTT 3.1.1 table 3.1).
fn connack_meaning(code: u8) -> &'static str {
    match code {
        0 => "accepted",
        1 => "unacceptable protocol version",
        2 => "client identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    }
}

/// Checks a CONNACK's return code.
pub(super) fn check_connack(frame: &Frame<'_>, who: &str, broker: SocketAddr) -> Result<()> {
    match frame.body {
        [_, 0] => Ok(()),
        [_, code] => bail!(
            "broker {broker} refused {who}: CONNACK return code {code} ({})",
            connack_meaning(*code)
        ),
        _ => bail!("broker {broker} sent {who} a malformed CONNACK"),
    }
}

/// Checks a SUBACK for our one SUBSCRIBE at `qos`: a broker that grants
/// less than asked is an error (the run would measure another guarantee).
pub(super) fn check_suback(frame: &Frame<'_>, who: &str, topic: &str, qos: u8) -> Result<()> {
    match frame.body {
        [hi, lo, code, ..] if u16::from_be_bytes([*hi, *lo]) == SUBSCRIBE_ID => match code {
            0..=2 if *code >= qos => Ok(()),
            0..=2 => bail!("broker granted {who} QoS {code} for {topic:?}, not the QoS {qos} asked"),
            _ => bail!("broker rejected {who}'s subscription to {topic:?} (SUBACK return code 0x{code:02x})"),
        },
        _ => bail!("broker sent {who} a malformed SUBACK"),
    }
}

/// A packet type's name, for errors.
pub(super) fn kind_name(kind: u8) -> &'static str {
    const NAMES: [&str; 16] = [
        "reserved-0",
        "CONNECT",
        "CONNACK",
        "PUBLISH",
        "PUBACK",
        "PUBREC",
        "PUBREL",
        "PUBCOMP",
        "SUBSCRIBE",
        "SUBACK",
        "UNSUBSCRIBE",
        "UNSUBACK",
        "PINGREQ",
        "PINGRESP",
        "DISCONNECT",
        "reserved-15",
    ];
    NAMES[usize::from(kind & 15)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rl(len: usize) -> Vec<u8> {
        let mut v = Vec::new();
        encode_remaining_length(len, &mut v).unwrap();
        v
    }

    #[test]
    fn remaining_length_edges() {
        for (len, bytes) in [
            (0, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xff, 0x7f]),
            (16_384, vec![0x80, 0x80, 0x01]),
            (2_097_151, vec![0xff, 0xff, 0x7f]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
            (268_435_455, vec![0xff, 0xff, 0xff, 0x7f]),
        ] {
            assert_eq!(rl(len), bytes, "encoding {len}");
            assert_eq!(
                decode_remaining_length(&bytes).unwrap(),
                Some((len, bytes.len())),
                "decoding {len}"
            );
            // Every proper prefix is "need more", never an error.
            for cut in 0..bytes.len() {
                assert_eq!(decode_remaining_length(&bytes[..cut]).unwrap(), None);
            }
        }
        assert_eq!(
            encode_remaining_length(268_435_456, &mut Vec::new()),
            Err(FrameError::TooLarge(268_435_456))
        );
    }

    #[test]
    fn malformed_length_is_an_error() {
        let bad = [0x30, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(parse_frame(&bad), Err(FrameError::MalformedLength));
        let mut s = FrameStream::default();
        let e = s.feed(&bad, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("malformed remaining length"), "{e}");
        // Split across reads, too.
        let mut s = FrameStream::default();
        s.feed(&bad[..3], |_| Ok(())).unwrap();
        assert!(s.feed(&bad[3..], |_| Ok(())).is_err());
        // Longer than this client takes.
        let mut big = vec![0x30];
        encode_remaining_length(MAX_FRAME + 1, &mut big).unwrap();
        assert_eq!(parse_frame(&big), Err(FrameError::TooLarge(MAX_FRAME + 1)));
    }

    fn publish(payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_publish(&mut v, b"mpp/loadgen", payload, None).unwrap();
        v
    }

    fn collect(stream: &mut FrameStream, data: &[u8], out: &mut Vec<(u8, Vec<u8>)>) {
        stream
            .feed(data, |f| {
                out.push((f.header, f.body.to_vec()));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn publish_round_trip() {
        let payload: Vec<u8> = (0..200).map(|i| i as u8).collect();
        let frame = publish(&payload);
        // 2 + 11 topic + 200 payload = 213: a two-byte remaining length.
        assert_eq!(&frame[..3], &[0x30, 0xd5, 0x01]);
        let (f, n) = parse_frame(&frame).unwrap().unwrap();
        assert_eq!(n, frame.len());
        assert_eq!(f.kind(), PUBLISH);
        assert_eq!(publish_payload(&f), Some(&payload[..]));
        // A QoS 1 PUBLISH carries a packet identifier before the payload.
        let body = [&[0u8, 1, b't'][..], &[0, 7], b"xyz"].concat();
        let f = Frame {
            header: 0x32,
            body: &body,
        };
        assert_eq!(publish_payload(&f), Some(&b"xyz"[..]));
        let short = Frame {
            header: 0x30,
            body: &[0, 9, b'a'],
        };
        assert_eq!(publish_payload(&short), None);
    }

    #[test]
    fn publish_split_across_reads() {
        let payload: Vec<u8> = (0..300).map(|i| (i * 7) as u8).collect();
        let frame = publish(&payload);
        for cut in 0..=frame.len() {
            let mut s = FrameStream::default();
            let mut got = Vec::new();
            collect(&mut s, &frame[..cut], &mut got);
            if cut < frame.len() {
                assert!(got.is_empty(), "cut {cut}");
                assert_eq!(s.pending(), cut);
            }
            collect(&mut s, &frame[cut..], &mut got);
            assert_eq!(got.len(), 1, "cut {cut}");
            assert_eq!(s.pending(), 0);
            let f = Frame {
                header: got[0].0,
                body: &got[0].1,
            };
            assert_eq!(publish_payload(&f), Some(&payload[..]));
        }
        // One byte per read.
        let mut s = FrameStream::default();
        let mut got = Vec::new();
        for b in &frame {
            collect(&mut s, std::slice::from_ref(b), &mut got);
        }
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut data = publish(b"first-payload-16");
        data.extend_from_slice(&[PINGRESP << 4, 0]);
        data.extend(publish(b"second-payload16"));
        let third = publish(b"third-payload-16");
        data.extend_from_slice(&third[..5]);
        let mut s = FrameStream::default();
        let mut got = Vec::new();
        collect(&mut s, &data, &mut got);
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], (PINGRESP << 4, vec![]));
        assert_eq!(s.pending(), 5);
        collect(&mut s, &third[5..], &mut got);
        assert_eq!(got.len(), 4);
        let payloads: Vec<&[u8]> = got
            .iter()
            .filter(|(h, _)| h >> 4 == PUBLISH)
            .map(|(h, b)| {
                publish_payload(&Frame {
                    header: *h,
                    body: b,
                })
                .unwrap()
            })
            .collect();
        assert_eq!(
            payloads,
            vec![
                &b"first-payload-16"[..],
                b"second-payload16",
                b"third-payload-16"
            ]
        );
    }

    #[test]
    fn handshake_frames() {
        let c = connect_frame("lg1s2", 60).unwrap();
        assert_eq!(
            c,
            [
                &[0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 5][..],
                b"lg1s2"
            ]
            .concat()
        );
        let s = subscribe_frame(1, "a/b", 0).unwrap();
        assert_eq!(s, [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'b', 0]);
        let broker: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let ok = Frame {
            header: 0x20,
            body: &[0, 0],
        };
        assert!(check_connack(&ok, "x", broker).is_ok());
        let refused = Frame {
            header: 0x20,
            body: &[0, 5],
        };
        let e = check_connack(&refused, "x", broker).unwrap_err();
        assert!(e.to_string().contains("not authorized"), "{e}");
        let granted = Frame {
            header: 0x90,
            body: &[0, 1, 0],
        };
        assert!(check_suback(&granted, "x", "t", 0).is_ok());
        // Asked QoS 1, granted 0: another guarantee than the run measures.
        let e = check_suback(&granted, "x", "t", 1).unwrap_err();
        assert!(e.to_string().contains("granted x QoS 0"), "{e}");
        let granted_1 = Frame {
            header: 0x90,
            body: &[0, 1, 1],
        };
        assert!(check_suback(&granted_1, "x", "t", 1).is_ok());
        let failed = Frame {
            header: 0x90,
            body: &[0, 1, 0x80],
        };
        assert!(check_suback(&failed, "x", "t", 0).is_err());
    }

    #[test]
    fn qos1_publish_and_puback_round_trip() {
        let mut v = Vec::new();
        put_publish(&mut v, b"mpp/loadgen", b"0123456789abcdef", Some(0x1234)).unwrap();
        // QoS 1 in the fixed header; 2 + 11 topic + 2 id + 16 payload.
        assert_eq!(&v[..2], &[0x32, 31]);
        let (f, n) = parse_frame(&v).unwrap().unwrap();
        assert_eq!(n, v.len());
        assert_eq!(publish_packet_id(&f), Some(0x1234));
        assert_eq!(publish_payload(&f), Some(&b"0123456789abcdef"[..]));
        // QoS 0 carries no identifier.
        let q0 = publish(b"0123456789abcdef");
        let (f0, _) = parse_frame(&q0).unwrap().unwrap();
        assert_eq!(publish_packet_id(&f0), None);
        let mut ack = Vec::new();
        put_puback(&mut ack, 0x1234);
        assert_eq!(ack, [0x40, 2, 0x12, 0x34]);
        let (a, _) = parse_frame(&ack).unwrap().unwrap();
        assert_eq!(a.kind(), PUBACK);
        assert_eq!(puback_id(&a), Some(0x1234));
        let bad = Frame {
            header: 0x40,
            body: &[1],
        };
        assert_eq!(puback_id(&bad), None);
    }
}
