//! Every message of docs/PROTOCOL.md §2 as a Rust type, with its JSON-B and JSON forms.
//!
//! A message is a struct of optional fields (absent and null are the same
//! thing on the wire) plus the fields it inherits, kept in a `header`:
//! [`ClientHeader`] for client → service messages (`PresenceFromClient` and
//! `Request`), [`ServiceHeader`] for service → client ones
//! (`PresenceFromService` and `Response`). Encoders write a message's own
//! fields first, in schema order, then the inherited ones — the reference
//! writer's order, which the test vectors pin down byte for byte.
//!
//! Decoding borrows strings and binaries from the input ([`Cow::Borrowed`]),
//! so decoding a heartbeat, a status or a notify allocates nothing; only a
//! JSON text string that holds an escape is copied ([`Cow::Owned`]).
//!
//! There are two decoders, differing only in the forms a string or DateTime
//! field's value may take ([`super::jsonb`] has the table):
//! [`Message::decode`] is strict and is what the node reads every packet
//! with; [`Message::decode_liberal`] also accepts the older and the JSON text
//! forms the reference reader accepts, and is what the client and the tools
//! read a service's messages with.

use std::borrow::Cow;
use std::net::SocketAddr;

use serde_json::{Map, Value as Json};

use super::jsonb::{DecodeError, EncodeError, Mode, Reader, Writer};
use super::value::{FieldValue, TextError};
use crate::time::UnixSeconds;

fn read_into<'a, T: FieldValue<'a>>(
    slot: &mut Option<T>,
    r: &mut Reader<'a>,
) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateField);
    }
    if !r.null() {
        *slot = Some(T::read(r)?);
    }
    Ok(())
}

fn take_from_json<'a, T: FieldValue<'a>>(
    slot: &mut Option<T>,
    m: &mut Map<String, Json>,
    wire: &str,
    owner: &str,
) -> Result<(), TextError> {
    match m.remove(wire) {
        None | Some(Json::Null) => Ok(()),
        Some(v) => {
            *slot = Some(T::from_json(&v).map_err(|e| TextError(format!("{owner}.{wire}: {e}")))?);
            Ok(())
        }
    }
}

/// Declares a struct of optional fields with its JSON-B and JSON conversions.
macro_rules! field_set {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $fty:ty => $wire:literal, )*
        }
        $( inherits $header:ident : $hty:ident )?
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct $name<'a> {
            $( $(#[$fmeta])* pub $field: Option<$fty>, )*
            $(
                /// The fields this message inherits.
                pub $header: $hty<'a>,
            )?
        }

        impl<'a> $name<'a> {
            #[allow(unused_variables)]
            fn write_fields(&self, w: &mut Writer<'_>) {
                $(
                    if let Some(v) = &self.$field {
                        w.name($wire);
                        FieldValue::write(v, w);
                    }
                )*
                $( self.$header.write_fields(w); )?
            }

            /// Reads one field into its slot; `Ok(false)` if the name is not ours.
            #[allow(unused_variables)]
            fn read_field(&mut self, name: &[u8], r: &mut Reader<'a>) -> Result<bool, DecodeError> {
                $(
                    if name == $wire.as_bytes() {
                        read_into(&mut self.$field, r)?;
                        return Ok(true);
                    }
                )*
                $( return self.$header.read_field(name, r); )?
                #[allow(unreachable_code)]
                Ok(false)
            }

            #[allow(unused_variables)]
            fn fields_to_json(&self, m: &mut Map<String, Json>) {
                $(
                    if let Some(v) = &self.$field {
                        m.insert($wire.into(), FieldValue::to_json(v));
                    }
                )*
                $( self.$header.fields_to_json(m); )?
            }

            #[allow(unused_variables)]
            fn fields_from_json(&mut self, m: &mut Map<String, Json>, owner: &str) -> Result<(), TextError> {
                $( take_from_json(&mut self.$field, m, $wire, owner)?; )*
                $( self.$header.fields_from_json(m, owner)?; )?
                Ok(())
            }
        }
    };
}

field_set! {
    /// Fields every client → service message inherits
    /// (`PresenceFromClient`, then `Request`).
    ClientHeader {
        /// The client's packet serial number (replay window, docs/PROTOCOL.md §7).
        serial: i64 => "Serial",
        /// The Serial of the notify this message acknowledges.
        acknowledge: i64 => "Acknowledge",
        /// `Request.Service`, normally unset.
        service: Cow<'a, str> => "Service",
        /// `Request.ID`, normally unset.
        id: Cow<'a, [u8]> => "ID",
    }
}

field_set! {
    /// Fields every service → client message inherits
    /// (`PresenceFromService`, then `Response`).
    ServiceHeader {
        /// The source address the request came from.
        endpoint: SocketAddr => "EndPoint",
        /// The service's clock.
        now: UnixSeconds => "Now",
        /// The Serial of the request this answers.
        acknowledge: i64 => "Acknowledge",
        /// `Response.Status` (HTTP-like code).
        status: i64 => "Status",
        /// `Response.StatusExtended`.
        status_extended: i64 => "StatusExtended",
        /// `Response.StatusDescription`.
        status_description: Cow<'a, str> => "StatusDescription",
        /// `Response.ID`, normally unset.
        id: Cow<'a, [u8]> => "ID",
    }
}

field_set! {
    /// Subscribe this device to its account's channel.
    PresenceConnectRequest {
        /// The account the credential was issued for.
        account: Cow<'a, str> => "Account",
        /// The device name the credential was issued for.
        device: Cow<'a, str> => "Device",
        /// The credential's expiry.
        expires: UnixSeconds => "Expires",
        /// The credential's binding MAC (docs/PROTOCOL.md §4).
        binding: Cow<'a, [u8]> => "Binding",
    }
    inherits header: ClientHeader
}

field_set! {
    /// Keep-alive and status request.
    PresenceHeartbeat {}
    inherits header: ClientHeader
}

field_set! {
    /// "What is my address?"
    PresenceEndpointRequest {}
    inherits header: ClientHeader
}

field_set! {
    /// Acknowledges the notify whose Serial is in `header.acknowledge`.
    PresenceAcknowledge {}
    inherits header: ClientHeader
}

field_set! {
    /// DNS proxy: one query in DNS wire format.
    PresenceResolveRequest {
        /// The DNS query.
        dns_request: Cow<'a, [u8]> => "DnsRequest",
    }
    inherits header: ClientHeader
}

field_set! {
    /// Unsubscribe: the connection is removed at once.
    PresenceDisconnectRequest {}
    inherits header: ClientHeader
}

field_set! {
    /// Answers a connect, with any unacknowledged notify state.
    PresenceConnectResponse {
        /// Milliseconds within which the client must heartbeat.
        connection_timeout: i64 => "ConnectionTimeout",
        /// Serial of the latest unacknowledged notify.
        serial: i64 => "Serial",
        /// Stores changed and not yet acknowledged.
        bitmask: Cow<'a, [u8]> => "Bitmask",
    }
    inherits header: ServiceHeader
}

field_set! {
    /// Answers a heartbeat, with any unacknowledged notify state.
    PresenceStatus {
        /// Serial of the latest unacknowledged notify.
        serial: i64 => "Serial",
        /// Stores changed and not yet acknowledged.
        bitmask: Cow<'a, [u8]> => "Bitmask",
    }
    inherits header: ServiceHeader
}

field_set! {
    /// Answers an endpoint request (the address is in `header.endpoint`).
    PresenceEndpointResponse {}
    inherits header: ServiceHeader
}

field_set! {
    /// Service-initiated: stores of the account changed.
    PresenceNotify {
        /// Stores changed (bit i = store i) and not yet acknowledged.
        bitmask: Cow<'a, [u8]> => "Bitmask",
        /// The account's notify serial, to be acknowledged.
        serial: i64 => "Serial",
    }
    inherits header: ServiceHeader
}

field_set! {
    /// Answers a resolve request.
    PresenceResolveResponse {
        /// The DNS answer; absent when the upstream failed (Status 502/504).
        dns_response: Cow<'a, [u8]> => "DnsResponse",
    }
    inherits header: ServiceHeader
}

field_set! {
    /// The request's Serial was not fresh; resume above `serial`.
    PresenceErrorInvalidSerial {
        /// Highest Serial the service has seen on this connection.
        serial: i64 => "Serial",
    }
    inherits header: ServiceHeader
}

field_set! {
    /// Answers a disconnect.
    PresenceDisconnectResponse {}
    inherits header: ServiceHeader
}

field_set! {
    /// The connection was refused: binding invalid (401), expired (403), node full (503).
    PresenceErrorRefused {}
    inherits header: ServiceHeader
}

/// Declares the message enum and its name-based dispatch.
macro_rules! messages {
    ( $( $(#[$meta:meta])* $variant:ident ( $ty:ident ) = $wire:literal, )* ) => {
        /// One protocol message, of any type.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Message<'a> {
            $( $(#[$meta])* $variant($ty<'a>), )*
        }

        impl<'a> Message<'a> {
            /// The message's wire name, e.g. `PresenceHeartbeat`.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Message::$variant(_) => $wire, )*
                }
            }

            fn write_fields(&self, w: &mut Writer<'_>) {
                match self {
                    $( Message::$variant(m) => m.write_fields(w), )*
                }
            }

            fn fields_to_json(&self, m: &mut Map<String, Json>) {
                match self {
                    $( Message::$variant(msg) => msg.fields_to_json(m), )*
                }
            }

            fn read_body(name: &[u8], r: &mut Reader<'a>) -> Result<Self, DecodeError> {
                $(
                    if name == $wire.as_bytes() {
                        let mut m = $ty::default();
                        read_object(r, |field, r| m.read_field(field, r))?;
                        return Ok(Message::$variant(m));
                    }
                )*
                Err(DecodeError::UnknownMessage)
            }

            fn body_from_json(name: &str, m: &mut Map<String, Json>) -> Result<Message<'static>, TextError> {
                $(
                    if name == $wire {
                        let mut msg = $ty::default();
                        msg.fields_from_json(m, $wire)?;
                        return Ok(Message::$variant(msg));
                    }
                )*
                Err(TextError(format!("unknown message type {name:?}")))
            }
        }

        $(
            impl<'a> From<$ty<'a>> for Message<'a> {
                fn from(m: $ty<'a>) -> Self {
                    Message::$variant(m)
                }
            }
        )*
    };
}

messages! {
    /// `PresenceConnectRequest`
    ConnectRequest(PresenceConnectRequest) = "PresenceConnectRequest",
    /// `PresenceHeartbeat`
    Heartbeat(PresenceHeartbeat) = "PresenceHeartbeat",
    /// `PresenceEndpointRequest`
    EndpointRequest(PresenceEndpointRequest) = "PresenceEndpointRequest",
    /// `PresenceAcknowledge`
    Acknowledge(PresenceAcknowledge) = "PresenceAcknowledge",
    /// `PresenceResolveRequest`
    ResolveRequest(PresenceResolveRequest) = "PresenceResolveRequest",
    /// `PresenceDisconnectRequest` (this project's addition)
    DisconnectRequest(PresenceDisconnectRequest) = "PresenceDisconnectRequest",
    /// `PresenceConnectResponse`
    ConnectResponse(PresenceConnectResponse) = "PresenceConnectResponse",
    /// `PresenceStatus`
    Status(PresenceStatus) = "PresenceStatus",
    /// `PresenceEndpointResponse`
    EndpointResponse(PresenceEndpointResponse) = "PresenceEndpointResponse",
    /// `PresenceNotify`
    Notify(PresenceNotify) = "PresenceNotify",
    /// `PresenceResolveResponse`
    ResolveResponse(PresenceResolveResponse) = "PresenceResolveResponse",
    /// `PresenceErrorInvalidSerial`
    ErrorInvalidSerial(PresenceErrorInvalidSerial) = "PresenceErrorInvalidSerial",
    /// `PresenceDisconnectResponse` (this project's addition)
    DisconnectResponse(PresenceDisconnectResponse) = "PresenceDisconnectResponse",
    /// `PresenceErrorRefused` (this project's addition)
    ErrorRefused(PresenceErrorRefused) = "PresenceErrorRefused",
}

/// Reads `{ fields }`, handing each field to `field`; unknown ones are skipped.
fn read_object<'a>(
    r: &mut Reader<'a>,
    mut field: impl FnMut(&[u8], &mut Reader<'a>) -> Result<bool, DecodeError>,
) -> Result<(), DecodeError> {
    r.begin_object().map_err(|e| match e {
        DecodeError::WrongType => DecodeError::NotAMessage,
        e => e,
    })?;
    while let Some(name) = r.next_name()? {
        if !field(name, r)? {
            r.skip_value()?;
        }
    }
    Ok(())
}

impl<'a> Message<'a> {
    /// Decodes one tagged message `{ name { fields } }`, borrowing from
    /// `bytes`, strictly ([`Mode::Strict`]): a DateTime must be JSON text
    /// (`22 … 22`, the reference writer's form) and a string a JSON-B string
    /// (`80`+w). This is what the node reads every packet with.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        Self::decode_in(Reader::new(bytes))
    }

    /// Decodes one tagged message like [`Message::decode`], liberally
    /// ([`Mode::Liberal`]): a DateTime may also be a JSON-B string (`80 14 …`,
    /// as this project wrote it before) and a string field also JSON text
    /// (`"…"` with JSON escapes, copied only if it holds one). This is what
    /// the client state machine and the tools (`mpp decode`) read with.
    pub fn decode_liberal(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        Self::decode_in(Reader::with_mode(bytes, Mode::Liberal))
    }

    #[inline(always)]
    fn decode_in(mut r: Reader<'a>) -> Result<Self, DecodeError> {
        // `read_object` unrolled for its one field, so that the message is
        // built in place instead of moved through an `Option` (three copies
        // of the ~200-byte enum, a third of a heartbeat's decode).
        r.begin_object().map_err(|e| match e {
            DecodeError::WrongType => DecodeError::NotAMessage,
            e => e,
        })?;
        let Some(name) = r.next_name()? else {
            // `{}`: no message.
            return Err(if r.at_end() {
                DecodeError::NotAMessage
            } else {
                DecodeError::TrailingBytes
            });
        };
        let message = Self::read_body(name, &mut r)?;
        if r.next_name()?.is_some() {
            return Err(DecodeError::NotAMessage); // a second message
        }
        if !r.at_end() {
            return Err(DecodeError::TrailingBytes);
        }
        Ok(message)
    }

    /// Encodes the tagged message into `out`, returning its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut w = Writer::new(out);
        w.begin_object();
        w.name(self.name());
        w.begin_object();
        self.write_fields(&mut w);
        w.end_object();
        w.end_object();
        w.finish()
    }

    /// Encodes the tagged message into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 256];
        loop {
            match self.encode(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return buf;
                }
                Err(EncodeError { needed }) => buf.resize(needed, 0),
            }
        }
    }

    /// The JSON text form: `{"PresenceHeartbeat":{"Serial":5,"Acknowledge":3}}`.
    pub fn to_json(&self) -> Json {
        let mut fields = Map::new();
        self.fields_to_json(&mut fields);
        let mut outer = Map::new();
        outer.insert(self.name().into(), Json::Object(fields));
        Json::Object(outer)
    }

    /// The JSON text form on one line.
    pub fn to_json_string(&self) -> String {
        self.to_json().to_string()
    }

    /// The JSON text form indented by one space per level, as in the test vectors.
    pub fn to_json_pretty(&self) -> String {
        use serde::Serialize as _;
        let mut out = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(b" ");
        let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
        // Serializing a Value into a Vec cannot fail.
        let _ = self.to_json().serialize(&mut ser);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Parses the JSON text form. Unknown fields are refused here (unlike in
    /// JSON-B), because a person typed them and a typo should be reported.
    pub fn from_json(v: &Json) -> Result<Message<'static>, TextError> {
        let outer = v
            .as_object()
            .ok_or_else(|| TextError("expected an object {\"MessageName\": {...}}".into()))?;
        let mut entries = outer.iter();
        let (name, body) = match (entries.next(), entries.next()) {
            (Some(entry), None) => entry,
            _ => {
                return Err(TextError(
                    "expected exactly one message name at the top level".into(),
                ))
            }
        };
        let mut fields = body
            .as_object()
            .cloned()
            .ok_or_else(|| TextError(format!("{name}: expected an object of fields")))?;
        let message = Self::body_from_json(name, &mut fields)?;
        if let Some(k) = fields.keys().next() {
            return Err(TextError(format!("{name}: unknown field {k:?}")));
        }
        Ok(message)
    }

    /// Parses JSON text.
    pub fn from_json_str(text: &str) -> Result<Message<'static>, TextError> {
        let v: Json =
            serde_json::from_str(text).map_err(|e| TextError(format!("invalid JSON: {e}")))?;
        Self::from_json(&v)
    }

    /// The inherited client fields, if this is a client → service message.
    pub fn client_header(&self) -> Option<&ClientHeader<'a>> {
        match self {
            Message::ConnectRequest(m) => Some(&m.header),
            Message::Heartbeat(m) => Some(&m.header),
            Message::EndpointRequest(m) => Some(&m.header),
            Message::Acknowledge(m) => Some(&m.header),
            Message::ResolveRequest(m) => Some(&m.header),
            Message::DisconnectRequest(m) => Some(&m.header),
            _ => None,
        }
    }

    /// The inherited service fields, if this is a service → client message.
    pub fn service_header(&self) -> Option<&ServiceHeader<'a>> {
        match self {
            Message::ConnectResponse(m) => Some(&m.header),
            Message::Status(m) => Some(&m.header),
            Message::EndpointResponse(m) => Some(&m.header),
            Message::Notify(m) => Some(&m.header),
            Message::ResolveResponse(m) => Some(&m.header),
            Message::ErrorInvalidSerial(m) => Some(&m.header),
            Message::DisconnectResponse(m) => Some(&m.header),
            Message::ErrorRefused(m) => Some(&m.header),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn heartbeat() -> Message<'static> {
        Message::Heartbeat(PresenceHeartbeat {
            header: ClientHeader {
                serial: Some(5),
                acknowledge: Some(3),
                ..ClientHeader::default()
            },
        })
    }

    #[test]
    fn json_text_form_is_the_name_then_the_fields_in_schema_order() {
        assert_eq!(
            heartbeat().to_json(),
            json!({ "PresenceHeartbeat": { "Serial": 5, "Acknowledge": 3 } })
        );
        assert_eq!(
            heartbeat().to_json_string(),
            r#"{"PresenceHeartbeat":{"Serial":5,"Acknowledge":3}}"#
        );
        assert_eq!(
            heartbeat().to_json_pretty(),
            "{\n \"PresenceHeartbeat\": {\n  \"Serial\": 5,\n  \"Acknowledge\": 3\n }\n}"
        );
    }

    #[test]
    fn json_text_fields_are_read_and_null_is_absent() {
        assert_eq!(
            Message::from_json_str(r#"{"PresenceHeartbeat":{"Serial":5,"Acknowledge":3}}"#),
            Ok(heartbeat())
        );
        assert_eq!(
            Message::from_json_str(
                r#"{"PresenceHeartbeat":{"Serial":5,"Acknowledge":3,"Service":null}}"#
            ),
            Ok(heartbeat())
        );
        assert_eq!(
            Message::from_json_str(r#"{"PresenceHeartbeat":{"Serial":"5"}}"#),
            Err(TextError(
                "PresenceHeartbeat.Serial: expected an integer, found \"5\"".into()
            ))
        );
    }

    #[test]
    fn service_header_is_found_in_every_service_message_and_only_there() {
        let header = ServiceHeader {
            acknowledge: Some(7),
            ..ServiceHeader::default()
        };
        let service: [Message<'_>; 8] = [
            PresenceConnectResponse {
                header: header.clone(),
                ..Default::default()
            }
            .into(),
            PresenceStatus {
                header: header.clone(),
                ..Default::default()
            }
            .into(),
            PresenceEndpointResponse {
                header: header.clone(),
            }
            .into(),
            PresenceNotify {
                header: header.clone(),
                ..Default::default()
            }
            .into(),
            PresenceResolveResponse {
                header: header.clone(),
                ..Default::default()
            }
            .into(),
            PresenceErrorInvalidSerial {
                header: header.clone(),
                ..Default::default()
            }
            .into(),
            PresenceDisconnectResponse {
                header: header.clone(),
            }
            .into(),
            PresenceErrorRefused {
                header: header.clone(),
            }
            .into(),
        ];
        for m in &service {
            assert_eq!(m.service_header(), Some(&header), "{}", m.name());
            assert_eq!(m.client_header(), None, "{}", m.name());
        }
        assert_eq!(heartbeat().service_header(), None);
    }
}
