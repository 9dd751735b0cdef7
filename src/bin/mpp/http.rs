//! A minimal HTTP/1.1 client for the node's control plane and web transport
//! (`http://` only, one request per connection), enough for `mpp notify`
//! and `mpp resolve --transport http` without pulling an HTTP client
//! library into the tool.

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
    let auth = format!("Authorization: Bearer {token}\r\n");
    let raw = request(base, path, &auth, "application/json", body.as_bytes())?;
    Ok(Response {
        status: raw.status,
        body: String::from_utf8_lossy(&raw.body).into_owned(),
    })
}

/// Status and raw body of a response.
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

/// `POST {base}{path}` with a binary body (the web transport's packets).
pub(crate) fn post_bytes(base: &str, path: &str, body: &[u8]) -> anyhow::Result<RawResponse> {
    request(base, path, "", "application/octet-stream", body)
}

fn request(
    base: &str,
    path: &str,
    extra_headers: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<RawResponse> {
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| InvalidInput(format!("invalid URL {base:?}: expected http://HOST:PORT")))?;
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let addr = authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| InvalidInput(format!("invalid URL {base:?}: expected http://HOST:PORT")))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .context("socket")?;
    let head = format!(
        "POST {prefix}{path} HTTP/1.1\r\nHost: {authority}\r\n{extra_headers}\
         Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream
        .write_all(&request)
        .context("cannot send the request")?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context("cannot read the response")?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("not an HTTP response")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("not an HTTP response")?;
    Ok(RawResponse {
        status,
        body: raw[end + 4..].to_vec(),
    })
}
