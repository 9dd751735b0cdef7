//! A minimal HTTP/1.1 client for the node's control plane (`http://` only,
//! one request per connection), enough for `mpp notify` without pulling an
//! HTTP client library into the tool.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::Context as _;

use crate::InvalidInput;

/// Status and body of a response.
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// `POST {base}{path}` with a bearer token and a JSON body.
pub(crate) fn post(base: &str, path: &str, token: &str, body: &str) -> anyhow::Result<Response> {
    let rest = base.strip_prefix("http://").ok_or_else(|| {
        InvalidInput(format!(
            "invalid control URL {base:?}: expected http://HOST:PORT"
        ))
    })?;
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let addr = authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            InvalidInput(format!(
                "invalid control URL {base:?}: expected http://HOST:PORT"
            ))
        })?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .context("socket")?;
    let request = format!(
        "POST {prefix}{path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .context("cannot send the request")?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context("cannot read the response")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("not an HTTP response")?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}
