//! `mpp resolve`: a DNS query through a node's resolve proxy
//! (docs/PROTOCOL.md §2, §6.10), printed like `dig +short`, or whole with
//! `--json`.
//!
//! The DNS wire format is `hickory-proto`'s on both sides (the query built,
//! the answer parsed): nothing here reads DNS bytes by hand. The MPP side is
//! the library's sans-IO [`mpp::proto::Client`], over UDP or, with
//! `--transport http`, over the web transport (`POST
//! /.well-known/mmmpresence/`, one request per packet, the node holding a
//! resolve's request open until the upstream answers). Bad names or types
//! are invalid input (exit 2); a failed resolve (the Status of the
//! ResolveResponse: 502, 504, 425, 429…) exits 1 and names the status.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use mpp::packet::{Credential, MAX_PACKET};
use mpp::proto::{Client, ClientEvent, DisconnectReason};

use crate::live::{now, NodeArgs, Session};
use crate::{http, InvalidInput};

/// The UDP payload size the query announces (EDNS0): answers up to this
/// come back whole instead of truncated, in several MPP fragments if need be.
const EDNS_PAYLOAD: u16 = 4096;

/// How the query reaches the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Transport {
    /// MPP over UDP (the credential's endpoint or --node).
    Udp,
    /// The web transport: HTTP POSTs to --web.
    Http,
}

/// Arguments of `mpp resolve`.
#[derive(Args)]
pub(crate) struct ResolveArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The name to look up, e.g. example.com.
    name: String,
    /// The record type (A, AAAA, TXT, MX, … or TYPEnnn).
    #[arg(default_value = "A")]
    rtype: String,
    /// Print the whole answer as JSON (header, every section) instead of
    /// the answer's data, one record per line.
    #[arg(long)]
    json: bool,
    /// udp, or http for the web transport.
    #[arg(long, value_enum, default_value = "udp")]
    transport: Transport,
    /// The web transport's base URL (with --transport http).
    #[arg(long, default_value = "http://127.0.0.1:15099")]
    web: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

/// The record type named by `text`: a mnemonic (any case) or `TYPEnnn`.
fn record_type(text: &str) -> Result<RecordType, InvalidInput> {
    let upper = text.trim().to_ascii_uppercase();
    if let Some(code) = upper.strip_prefix("TYPE") {
        if let Ok(code) = code.parse::<u16>() {
            return Ok(RecordType::from(code));
        }
    }
    upper
        .parse::<RecordType>()
        .map_err(|_| InvalidInput(format!("unknown record type {text:?}")))
}

/// The query, as wire bytes: recursion desired, EDNS0 with
/// [`EDNS_PAYLOAD`].
fn build_query(name: &str, rtype: &str) -> Result<(Vec<u8>, u16), InvalidInput> {
    let rtype = record_type(rtype)?;
    if name.trim().is_empty() {
        return Err(InvalidInput("the name is empty".into()));
    }
    let mut fqdn = Name::from_utf8(name.trim())
        .map_err(|e| InvalidInput(format!("invalid name {name:?}: {e}")))?;
    fqdn.set_fqdn(true);
    let id = rand::random::<u16>();
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(fqdn, rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    message.set_edns(edns);
    let bytes = message
        .to_vec()
        .map_err(|e| InvalidInput(format!("cannot encode the query for {name:?}: {e}")))?;
    Ok((bytes, id))
}

/// A character-string as `dig` shows it: quoted, `"` and `\` escaped,
/// bytes outside printable ASCII as `\DDD`.
fn quoted(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 2);
    out.push('"');
    for &b in bytes {
        match b {
            b'"' | b'\\' => {
                out.push('\\');
                out.push(char::from(b));
            }
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\{b:03}");
            }
        }
    }
    out.push('"');
    out
}

/// A record's data as `dig +short` prints it; `None` when it has no text
/// form (an OPT record).
fn data_text(record: &Record) -> Option<String> {
    match &record.data {
        RData::TXT(txt) => Some(
            txt.txt_data
                .iter()
                .map(|s| quoted(s))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        RData::OPT(_) => None,
        other => {
            // Display may fail for some types: then there is no text form
            // (write! reports it, where format! would panic).
            let mut text = String::new();
            write!(text, "{other}").ok().map(|()| text)
        }
    }
}

fn record_json(record: &Record) -> serde_json::Value {
    serde_json::json!({
        "name": record.name.to_string(),
        "type": record.record_type().to_string(),
        "class": record.dns_class.to_string(),
        "ttl": record.ttl,
        "data": data_text(record),
    })
}

/// The whole answer as JSON.
fn answer_json(message: &Message) -> serde_json::Value {
    let m = &message.metadata;
    let section = |records: &[Record]| -> Vec<serde_json::Value> {
        records
            .iter()
            .filter(|r| r.record_type() != RecordType::OPT)
            .map(record_json)
            .collect()
    };
    serde_json::json!({
        "status": rcode_name(m.response_code),
        "rcode": u16::from(m.response_code),
        "id": m.id,
        "flags": {
            "qr": m.message_type == MessageType::Response,
            "aa": m.authoritative,
            "tc": m.truncation,
            "rd": m.recursion_desired,
            "ra": m.recursion_available,
            "ad": m.authentic_data,
            "cd": m.checking_disabled,
        },
        "question": message.queries.iter().map(|q| serde_json::json!({
            "name": q.name().to_string(),
            "type": q.query_type().to_string(),
            "class": q.query_class().to_string(),
        })).collect::<Vec<_>>(),
        "answer": section(&message.answers),
        "authority": section(&message.authorities),
        "additional": section(&message.additionals),
    })
}

/// The response code as `dig` names it (NOERROR, NXDOMAIN…).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => format!("RCODE{}", u16::from(other)),
    }
}

/// What a failed resolve's Status means (docs/PROTOCOL.md §2.4).
fn status_reason(status: i64) -> &'static str {
    match status {
        413 => "the query is too large",
        425 => "the node has not validated this address yet",
        429 => "too many resolves from this connection",
        502 => "no upstream resolver, or it failed",
        503 => "too many resolves wait for the upstream",
        504 => "the upstream did not answer in time",
        _ => "the resolve failed",
    }
}

impl ResolveArgs {
    pub(crate) fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let (query, id) = build_query(&self.name, &self.rtype)?;
        let deadline = Instant::now() + Duration::from_secs(self.timeout);
        let answer = match self.transport {
            Transport::Udp => {
                let (credential, nodes, socket) = self.node.open()?;
                let session = Session::one_shot(&credential, &nodes, socket);
                resolve_udp(session, &query, deadline, self.timeout)?
            }
            Transport::Http => {
                let credential = self.node.credential()?;
                resolve_http(&credential, &self.web, &query, deadline, self.timeout)?
            }
        };
        let message = Message::from_vec(&answer)
            .map_err(|e| anyhow::anyhow!("the upstream's answer does not parse: {e}"))?;
        if message.metadata.id != id {
            anyhow::bail!(
                "the answer's id {} is not the query's {id}",
                message.metadata.id
            );
        }
        let text = if self.json {
            format!("{}\n", answer_json(&message))
        } else {
            message
                .answers
                .iter()
                .filter_map(data_text)
                .map(|l| l + "\n")
                .collect()
        };
        out.write_all(text.as_bytes())
            .context("cannot write standard output")
    }
}

/// The outcome of a resolve event: the answer, a retry, or the failure.
enum Outcome {
    Answer(Vec<u8>),
    Retry,
}

/// A `Resolved` event: the answer; a 425 once (the address validates with
/// the echo the resolve itself carried, so the next try is answered); any
/// other Status an error.
fn resolved(result: Result<Vec<u8>, i64>, retried: &mut bool) -> anyhow::Result<Outcome> {
    match result {
        Ok(answer) => Ok(Outcome::Answer(answer)),
        Err(425) if !*retried => {
            *retried = true;
            Ok(Outcome::Retry)
        }
        Err(status) => anyhow::bail!(
            "resolve failed: Status {status} ({})",
            status_reason(status)
        ),
    }
}

fn refused(reason: &DisconnectReason) -> anyhow::Error {
    match reason {
        DisconnectReason::Refused {
            status,
            description,
        } => anyhow::anyhow!("the node refused the connection: {status} {description}"),
        DisconnectReason::Timeout => anyhow::anyhow!("the node stopped answering"),
        DisconnectReason::Requested => anyhow::anyhow!("disconnected"),
    }
}

fn resolve_udp(
    mut session: Session,
    query: &[u8],
    deadline: Instant,
    timeout: u64,
) -> anyhow::Result<Vec<u8>> {
    let node = session.client.node();
    let mut asked = false;
    let mut retried = false;
    while Instant::now() < deadline {
        for event in session.step(Duration::from_millis(200))? {
            match event {
                ClientEvent::Connected { .. } if !asked => {
                    session.client.resolve(query.to_vec());
                    asked = true;
                }
                ClientEvent::Resolved(result) => match resolved(result, &mut retried)? {
                    Outcome::Answer(answer) => {
                        session.client.disconnect(now());
                        let _ = session.step(Duration::from_millis(50));
                        return Ok(answer);
                    }
                    Outcome::Retry => session.client.resolve(query.to_vec()),
                },
                ClientEvent::Disconnected(reason @ DisconnectReason::Refused { .. }) => {
                    return Err(refused(&reason));
                }
                _ => {}
            }
        }
    }
    anyhow::bail!("no answer from {node} within {timeout} s")
}

/// The web transport: each packet the client produces is one POST, and
/// the node's replies (each prefixed by its u16be length) go back into it.
fn resolve_http(
    credential: &Credential,
    web: &str,
    query: &[u8],
    deadline: Instant,
    timeout: u64,
) -> anyhow::Result<Vec<u8>> {
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    // The client's node address is not used: packets go where we post them.
    let unused = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut client = Client::new(
        credential,
        unused,
        crate::live::one_shot_config(),
        now(),
        seed,
    );
    let mut buf = vec![0u8; MAX_PACKET];
    let mut asked = false;
    let mut retried = false;
    while Instant::now() < deadline {
        let mut posted = false;
        while let Some(t) = client.poll_transmit(&mut buf) {
            posted = true;
            let response = http::post_bytes(web, "/.well-known/mmmpresence/", &buf[..t.size])?;
            if response.status != 200 {
                anyhow::bail!(
                    "the node answered {}: {}",
                    response.status,
                    String::from_utf8_lossy(&response.body).trim()
                );
            }
            for packet in unframe(&response.body)? {
                client.handle_datagram(now(), packet);
            }
        }
        let t = now();
        if client.poll_timeout().is_some_and(|d| d <= t) {
            client.handle_timeout(t);
        }
        while let Some(event) = client.poll_event() {
            match event {
                ClientEvent::Connected { .. } if !asked => {
                    client.resolve(query.to_vec());
                    asked = true;
                }
                ClientEvent::Resolved(result) => match resolved(result, &mut retried)? {
                    Outcome::Answer(answer) => {
                        client.disconnect(now());
                        if let Some(t) = client.poll_transmit(&mut buf) {
                            let _ =
                                http::post_bytes(web, "/.well-known/mmmpresence/", &buf[..t.size]);
                        }
                        return Ok(answer);
                    }
                    Outcome::Retry => client.resolve(query.to_vec()),
                },
                // A round of connects unanswered (its Serials were seen,
                // D2): the next follows at once; the deadline bounds it.
                ClientEvent::Disconnected(reason @ DisconnectReason::Refused { .. }) => {
                    return Err(refused(&reason));
                }
                _ => {}
            }
        }
        if !posted {
            // Nothing to send until a timer: wait for it (bounded).
            let wait = client
                .poll_timeout()
                .map_or(100, |d| d.millis_since(now()).clamp(1, 100));
            std::thread::sleep(Duration::from_millis(wait));
        }
    }
    anyhow::bail!("no answer from {web} within {timeout} s")
}

/// The packets of a web-transport answer (docs/PROTOCOL.md §9).
fn unframe(body: &[u8]) -> anyhow::Result<Vec<&[u8]>> {
    let mut packets = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (len, tail) = match rest {
            [a, b, tail @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), tail),
            _ => anyhow::bail!("the web transport's answer is cut short"),
        };
        let packet = tail
            .get(..len)
            .context("the web transport's answer is cut short")?;
        packets.push(packet);
        rest = &tail[len..];
    }
    Ok(packets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_types_are_checked() {
        assert!(build_query("example.com", "A").is_ok());
        assert!(build_query("example.com", "txt").is_ok());
        assert!(build_query("example.com", "TYPE65").is_ok());
        assert!(build_query("example.com", "BOGUS").is_err());
        assert!(build_query("a..b", "A").is_err());
        assert!(build_query(&"x".repeat(64), "A").is_err());
        assert!(build_query("", "A").is_err());
    }

    #[test]
    fn the_query_asks_for_recursion_and_a_large_payload() {
        let (bytes, id) = build_query("example.test", "TXT").expect("query");
        let m = Message::from_vec(&bytes).expect("parses");
        assert_eq!(m.metadata.id, id);
        assert!(m.metadata.recursion_desired);
        assert_eq!(m.queries[0].query_type(), RecordType::TXT);
        assert_eq!(m.queries[0].name().to_string(), "example.test.");
        assert_eq!(m.edns.as_ref().map(Edns::max_payload), Some(EDNS_PAYLOAD));
    }

    #[test]
    fn character_strings_are_quoted_as_dig_does() {
        assert_eq!(quoted(b"a \"b\" \\c"), "\"a \\\"b\\\" \\\\c\"");
        assert_eq!(quoted(&[0, 200]), "\"\\000\\200\"");
    }

    #[test]
    fn framed_answers_split_and_cut_ones_are_errors() {
        assert_eq!(
            unframe(&[0, 1, 7, 0, 2, 8, 9]).expect("frames"),
            vec![&[7][..], &[8, 9][..]]
        );
        assert!(unframe(&[0, 3, 1]).is_err());
        assert!(unframe(&[0]).is_err());
    }
}
