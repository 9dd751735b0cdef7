//! The value types a message field can hold, in both forms.
//!
//! Each schema type (integer, string, binary, DateTime, UdpEndpoint) knows how
//! to write itself as JSON-B, read itself from JSON-B (borrowing from the input
//! where it can), and convert to and from the JSON text form (binary as
//! unpadded base64url, docs/PROTOCOL.md §1).
//!
//! Two of them have more than one JSON-B form (see [`super::jsonb`] and
//! docs/PROTOCOL.md §1.4–§1.6):
//!
//! - **DateTime** is written as JSON text inside JSON-B, `22`, the 20 ASCII
//!   characters `yyyy-MM-ddTHH:mm:ssZ`, `22` — what the reference writer
//!   (Mathematical-Mesh release_1.0.2, commit 9f38fd02) writes, checked by
//!   running that writer on our vectors. Both readers accept that form; the
//!   liberal one also accepts the JSON-B string `80 14 …` this project wrote
//!   before, and the strict one (the node's) refuses it as
//!   [`DecodeError::WrongType`].
//! - **string** is written as a JSON-B string (`80`+w, length in bytes: the
//!   reference's UTF-16 length is a bug we do not copy). The liberal reader
//!   also accepts a JSON text string with JSON escapes, `"a\u00e9\n"`; the
//!   strict one does not.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value as Json;

use super::jsonb::{DecodeError, Reader, Writer};
use crate::time::UnixSeconds;

/// A JSON text input that does not describe a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TextError(pub String);

/// A schema type: its JSON-B and JSON text forms.
pub(crate) trait FieldValue<'a>: Sized {
    fn write(&self, w: &mut Writer<'_>);
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError>;
    fn to_json(&self) -> Json;
    fn from_json(v: &Json) -> Result<Self, String>;
}

impl<'a> FieldValue<'a> for i64 {
    fn write(&self, w: &mut Writer<'_>) {
        w.int(*self);
    }
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.int()
    }
    fn to_json(&self) -> Json {
        Json::from(*self)
    }
    fn from_json(v: &Json) -> Result<Self, String> {
        v.as_i64()
            .ok_or_else(|| format!("expected an integer, found {v}"))
    }
}

impl<'a> FieldValue<'a> for Cow<'a, str> {
    fn write(&self, w: &mut Writer<'_>) {
        w.string(self);
    }
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.string_value()
    }
    fn to_json(&self) -> Json {
        Json::from(self.as_ref())
    }
    fn from_json(v: &Json) -> Result<Self, String> {
        v.as_str()
            .map(|s| Cow::Owned(s.to_owned()))
            .ok_or_else(|| format!("expected a string, found {v}"))
    }
}

impl<'a> FieldValue<'a> for Cow<'a, [u8]> {
    fn write(&self, w: &mut Writer<'_>) {
        w.binary(self);
    }
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        r.binary().map(Cow::Borrowed)
    }
    fn to_json(&self) -> Json {
        Json::from(URL_SAFE_NO_PAD.encode(self))
    }
    fn from_json(v: &Json) -> Result<Self, String> {
        let s = v
            .as_str()
            .ok_or_else(|| format!("expected base64url text, found {v}"))?;
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map(Cow::Owned)
            .map_err(|e| format!("invalid base64url {s:?}: {e}"))
    }
}

impl<'a> FieldValue<'a> for UnixSeconds {
    fn write(&self, w: &mut Writer<'_>) {
        // JSON text, as the reference writes it; the wire form is ASCII
        // digits and punctuation, so nothing needs an escape.
        w.text_fixed(&self.to_wire());
    }
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let s = r.datetime_value()?;
        UnixSeconds::parse(s.as_bytes()).map_err(|_| DecodeError::InvalidDateTime)
    }
    fn to_json(&self) -> Json {
        Json::from(self.to_string())
    }
    fn from_json(v: &Json) -> Result<Self, String> {
        let s = v
            .as_str()
            .ok_or_else(|| format!("expected a DateTime string, found {v}"))?;
        UnixSeconds::parse(s.as_bytes()).map_err(|e| format!("{s:?}: {e}"))
    }
}

const IP_ADDRESS: &str = "IpAddress";
const PORT: &str = "Port";

/// `UdpEndpoint { IpAddress: binary (4 or 16 bytes), Port: int }` (docs/PROTOCOL.md §2).
impl<'a> FieldValue<'a> for SocketAddr {
    fn write(&self, w: &mut Writer<'_>) {
        w.begin_object();
        w.name(IP_ADDRESS);
        match self.ip() {
            IpAddr::V4(a) => w.binary(&a.octets()),
            IpAddr::V6(a) => w.binary(&a.octets()),
        }
        w.name(PORT);
        w.int(i64::from(self.port()));
        w.end_object();
    }

    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        if r.peek() != Some(b'{') {
            r.skip_value()?;
            return Err(DecodeError::WrongType);
        }
        r.begin_object()?;
        let (mut ip, mut port) = (None, None);
        while let Some(name) = r.next_name()? {
            match name {
                b"IpAddress" => {
                    if ip.is_some() {
                        return Err(DecodeError::DuplicateField);
                    }
                    ip = Some(ip_from_bytes(r.binary()?).ok_or(DecodeError::InvalidEndpoint)?);
                }
                b"Port" => {
                    if port.is_some() {
                        return Err(DecodeError::DuplicateField);
                    }
                    port = Some(u16::try_from(r.int()?).map_err(|_| DecodeError::InvalidEndpoint)?);
                }
                _ => r.skip_value()?,
            }
        }
        match (ip, port) {
            (Some(ip), Some(port)) => Ok(SocketAddr::new(ip, port)),
            _ => Err(DecodeError::InvalidEndpoint),
        }
    }

    fn to_json(&self) -> Json {
        let ip: Cow<'_, [u8]> = match self.ip() {
            IpAddr::V4(a) => Cow::Owned(a.octets().to_vec()),
            IpAddr::V6(a) => Cow::Owned(a.octets().to_vec()),
        };
        let mut m = serde_json::Map::new();
        m.insert(IP_ADDRESS.into(), ip.to_json());
        m.insert(PORT.into(), Json::from(self.port()));
        Json::Object(m)
    }

    fn from_json(v: &Json) -> Result<Self, String> {
        let m = v
            .as_object()
            .ok_or_else(|| format!("expected an EndPoint object, found {v}"))?;
        if let Some(k) = m.keys().find(|k| *k != IP_ADDRESS && *k != PORT) {
            return Err(format!("unknown EndPoint field {k:?}"));
        }
        let ip = m
            .get(IP_ADDRESS)
            .ok_or("EndPoint needs IpAddress")
            .map_err(str::to_owned)
            .and_then(<Cow<'_, [u8]>>::from_json)?;
        let ip = ip_from_bytes(&ip).ok_or("IpAddress must be 4 or 16 bytes")?;
        let port = m
            .get(PORT)
            .and_then(Json::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or("EndPoint needs a Port 0..=65535")?;
        Ok(SocketAddr::new(ip, port))
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b)
            .ok()
            .map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        16 => <[u8; 16]>::try_from(b)
            .ok()
            .map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn endpoint_v4() -> SocketAddr {
        "192.0.2.1:15099".parse().expect("an address")
    }

    fn endpoint_v6() -> SocketAddr {
        "[2001:db8::1]:443".parse().expect("an address")
    }

    #[test]
    fn integers_are_json_numbers() {
        assert_eq!(FieldValue::to_json(&-60_000i64), json!(-60_000));
        assert_eq!(<i64 as FieldValue>::from_json(&json!(42)), Ok(42));
        assert_eq!(
            <i64 as FieldValue>::from_json(&json!("42")),
            Err("expected an integer, found \"42\"".into())
        );
    }

    #[test]
    fn strings_are_json_strings() {
        let s: Cow<'_, str> = Cow::Borrowed("alice@example.com");
        assert_eq!(FieldValue::to_json(&s), json!("alice@example.com"));
        assert_eq!(
            <Cow<'_, str> as FieldValue>::from_json(&json!("phone")),
            Ok(Cow::Borrowed("phone"))
        );
        assert_eq!(
            <Cow<'_, str> as FieldValue>::from_json(&json!(7)),
            Err("expected a string, found 7".into())
        );
    }

    #[test]
    fn binaries_are_unpadded_base64url() {
        let b: Cow<'_, [u8]> = Cow::Borrowed(&[0xFB, 0xFF]);
        assert_eq!(FieldValue::to_json(&b), json!("-_8"));
        assert_eq!(
            <Cow<'_, [u8]> as FieldValue>::from_json(&json!("-_8")),
            Ok(Cow::Borrowed(&[0xFB, 0xFF][..]))
        );
        assert_eq!(
            <Cow<'_, [u8]> as FieldValue>::from_json(&json!("-_8=")),
            Ok(Cow::Borrowed(&[0xFB, 0xFF][..]))
        );
        assert!(<Cow<'_, [u8]> as FieldValue>::from_json(&json!("+/8")).is_err());
    }

    #[test]
    fn datetimes_are_utc_text() {
        let t = UnixSeconds(1_795_262_400);
        assert_eq!(FieldValue::to_json(&t), json!("2026-11-21T12:00:00Z"));
        assert_eq!(
            <UnixSeconds as FieldValue>::from_json(&json!("2026-11-21T12:00:00Z")),
            Ok(t)
        );
        assert_eq!(
            <UnixSeconds as FieldValue>::from_json(&json!(1_795_262_400)),
            Err("expected a DateTime string, found 1795262400".into())
        );
    }

    #[test]
    fn endpoints_are_an_address_and_a_port() {
        assert_eq!(
            FieldValue::to_json(&endpoint_v4()),
            json!({ "IpAddress": "wAACAQ", "Port": 15099 })
        );
        assert_eq!(
            FieldValue::to_json(&endpoint_v6()),
            json!({ "IpAddress": "IAENuAAAAAAAAAAAAAAAAQ", "Port": 443 })
        );
        assert_eq!(
            <SocketAddr as FieldValue>::from_json(&json!({ "IpAddress": "wAACAQ", "Port": 15099 })),
            Ok(endpoint_v4())
        );
        assert_eq!(
            <SocketAddr as FieldValue>::from_json(
                &json!({ "Port": 443, "IpAddress": "IAENuAAAAAAAAAAAAAAAAQ" })
            ),
            Ok(endpoint_v6())
        );
        assert_eq!(
            <SocketAddr as FieldValue>::from_json(
                &json!({ "IpAddress": "wAACAQ", "Port": 15099, "Host": "x" })
            ),
            Err("unknown EndPoint field \"Host\"".into())
        );
    }

    #[test]
    fn an_ip_address_is_4_or_16_bytes() {
        assert_eq!(
            ip_from_bytes(&[192, 0, 2, 1]),
            Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
        );
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            ip_from_bytes(&v6),
            Some(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)))
        );
        assert_eq!(ip_from_bytes(&[0; 5]), None);
        assert_eq!(ip_from_bytes(&[0; 15]), None);
    }
}
