//! The fanout publisher: batches of notifications over the node's HTTP API
//! (`POST /v1/notify`), paced, with each publish's time written to its
//! account's clock so the devices can time the delivery.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::engine::{Shared, RING};
use crate::ident::account_name;

/// A keep-alive HTTP/1.1 connection to the control API.
pub(crate) struct Http {
    addr: SocketAddr,
    host: String,
    token: String,
    conn: Option<BufReader<TcpStream>>,
}

/// An HTTP answer.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: String,
}

impl Http {
    /// A client for `url` (`http://host:port`), authorized with `token`.
    pub(crate) fn new(url: &str, token: String) -> Result<Http> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--control {url:?}: expected http://HOST:PORT"))?;
        let host = rest.trim_end_matches('/');
        if host.is_empty() || host.contains('/') {
            bail!("--control {url:?}: expected http://HOST:PORT with no path");
        }
        let addr = host
            .to_socket_addrs()
            .with_context(|| format!("--control {url:?}"))?
            .next()
            .ok_or_else(|| anyhow!("--control {url:?}: no address"))?;
        Ok(Http {
            addr,
            host: host.to_owned(),
            token,
            conn: None,
        })
    }

    fn connect(&mut self) -> Result<&mut BufReader<TcpStream>> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to the control API at {}", self.addr))?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            self.conn = Some(BufReader::new(s));
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// `POST path` with a JSON body; reconnects once if the kept-alive
    /// connection was closed.
    pub(crate) fn post(&mut self, path: &str, body: &str) -> Result<Answer> {
        match self.post_once(path, body) {
            Ok(a) => Ok(a),
            Err(_) => {
                self.conn = None;
                self.post_once(path, body)
            }
        }
    }

    fn post_once(&mut self, path: &str, body: &str) -> Result<Answer> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            self.token,
            body.len()
        );
        let conn = self.connect()?;
        let stream = conn.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut line = String::new();
        if conn.read_line(&mut line)? == 0 {
            bail!("control API closed the connection");
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad HTTP status line {line:?}"))?;
        let mut length = 0usize;
        let mut close = false;
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                bail!("control API closed the connection in the headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                if k == "content-length" {
                    length = v.trim().parse().context("bad Content-Length")?;
                } else if k == "connection" && v.trim().eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        if length > 1 << 20 {
            bail!("control API answer of {length} bytes is too large");
        }
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// Publisher settings.
pub(crate) struct PublishConfig {
    /// Publishes per second; 0 = as fast as the node and the devices keep up.
    pub(crate) rate: f64,
    pub(crate) batch: usize,
    pub(crate) bitmask_hex: String,
    /// Devices per account (for the in-flight guard).
    pub(crate) devices_per_account: Vec<u64>,
}

/// What the publisher did.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct PublishStats {
    /// Publishes the node accepted.
    pub(crate) published: u64,
    /// Publishes accepted while measuring.
    pub(crate) published_measured: u64,
    /// Expected deliveries of all accepted publishes (publishes × devices).
    pub(crate) expected: u64,
    /// HTTP requests.
    pub(crate) requests: u64,
    /// 503 answers (node inboxes full).
    pub(crate) overloaded: u64,
    /// Waits because every account had too many publishes undelivered.
    pub(crate) throttled: u64,
    /// Round trip of one `POST /v1/notify` (request written to answer
    /// read), µs: median, 99th percentile and maximum over the run. The
    /// publish → device latency includes this leg.
    pub(crate) http_rtt_p50_us: u64,
    pub(crate) http_rtt_p99_us: u64,
    pub(crate) http_rtt_max_us: u64,
}

/// Sends one priming publish to every account (bitmask `01`), so each
/// device learns its account's Serial before the measured publishes.
pub(crate) fn prime(http: &mut Http, accounts: u64) -> Result<()> {
    let mut a = 0;
    while a < accounts {
        let end = (a + 1000).min(accounts);
        let body = batch_body((a..end).map(account_name), "01");
        let ans = http.post("/v1/notify", &body)?;
        if ans.status != 202 {
            bail!(
                "priming publish refused: HTTP {} {}",
                ans.status,
                ans.body.trim()
            );
        }
        a = end;
    }
    Ok(())
}

fn batch_body(accounts: impl Iterator<Item = String>, bitmask: &str) -> String {
    let mut body = String::from("{\"notifications\":[");
    for (i, a) in accounts.enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str("{\"account\":\"");
        body.push_str(&a);
        body.push_str("\",\"bitmask\":\"");
        body.push_str(bitmask);
        body.push_str("\"}");
    }
    body.push_str("]}");
    body
}

/// Publishes until `shared.stop`-like `until` returns true.
pub(crate) fn run(
    http: &mut Http,
    cfg: &PublishConfig,
    shared: &Arc<Shared>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<PublishStats> {
    let accounts = shared.accounts.len() as u64;
    let mut stats = PublishStats::default();
    let mut published = vec![0u64; accounts as usize];
    let mut cursor = 0u64;
    let start = shared.now_us();
    let mut entries: Vec<(u64, u32)> = Vec::with_capacity(cfg.batch);
    let mut rtt = crate::engine::histogram();
    // At most this many publishes of one account undelivered (its clock
    // keeps RING publish times).
    let max_ahead = (RING / 2) as u64;
    while !stop.load(Relaxed) {
        let now = shared.now_us();
        let budget = if cfg.rate > 0.0 {
            let allowed = ((now - start) as f64 * cfg.rate / 1e6) as u64;
            (allowed.saturating_sub(stats.published) as usize).min(cfg.batch)
        } else {
            cfg.batch
        };
        if budget == 0 {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        entries.clear();
        let mut scanned = 0;
        while entries.len() < budget && scanned < accounts {
            let a = cursor;
            cursor = (cursor + 1) % accounts;
            scanned += 1;
            let clock = &shared.accounts[a as usize];
            let base = clock.base.load(Relaxed);
            if base == 0 {
                continue; // not primed yet
            }
            let d = cfg.devices_per_account[a as usize].max(1);
            let delivered = clock.delivered.load(Relaxed);
            if published[a as usize] * d > delivered + max_ahead * d {
                continue;
            }
            published[a as usize] += 1;
            let serial = base.wrapping_add(published[a as usize] as u32);
            clock.ring[serial as usize % RING].store(shared.now_us(), Relaxed);
            entries.push((a, serial));
        }
        if entries.is_empty() {
            stats.throttled += 1;
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let body = batch_body(
            entries.iter().map(|&(a, _)| account_name(a)),
            &cfg.bitmask_hex,
        );
        let sent_at = shared.now_us();
        let ans = http.post("/v1/notify", &body)?;
        let _ = rtt.record(shared.now_us().saturating_sub(sent_at));
        stats.requests += 1;
        let accepted = match ans.status {
            202 => entries.len(),
            503 => {
                stats.overloaded += 1;
                serde_json::from_str::<serde_json::Value>(&ans.body)
                    .ok()
                    .and_then(|v| v.get("accepted")?.as_u64())
                    .unwrap_or(0) as usize
            }
            s => bail!("publish refused: HTTP {s} {}", ans.body.trim()),
        };
        // Entries the node did not take were not published: undo them.
        for &(a, _) in entries[accepted..].iter().rev() {
            published[a as usize] -= 1;
        }
        let measuring = shared.measuring.load(Relaxed);
        for &(a, _) in &entries[..accepted] {
            stats.published += 1;
            stats.expected += cfg.devices_per_account[a as usize];
            if measuring {
                stats.published_measured += 1;
            }
        }
        if accepted < entries.len() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if !rtt.is_empty() {
        stats.http_rtt_p50_us = rtt.value_at_quantile(0.5);
        stats.http_rtt_p99_us = rtt.value_at_quantile(0.99);
        stats.http_rtt_max_us = rtt.max();
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls() {
        assert!(Http::new("http://127.0.0.1:15099", "t".into()).is_ok());
        assert!(Http::new("http://127.0.0.1:15099/", "t".into()).is_ok());
        assert!(Http::new("https://127.0.0.1:1", "t".into()).is_err());
        assert!(Http::new("http://127.0.0.1:1/v1", "t".into()).is_err());
        assert!(Http::new("http://", "t".into()).is_err());
    }

    #[test]
    fn batch_bodies_are_json() {
        let body = batch_body((0..3).map(account_name), "0102");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["notifications"].as_array().unwrap().len(), 3);
        assert_eq!(v["notifications"][2]["account"], "load-2@loadgen.example");
        assert_eq!(v["notifications"][0]["bitmask"], "0102");
    }
}
