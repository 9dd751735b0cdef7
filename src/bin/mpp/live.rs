//! The network subcommands: `subscribe`, `endpoint` and `notify`.
//!
//! `subscribe` and `endpoint` drive the library's sans-IO client
//! ([`mpp::proto::Client`]) over a plain blocking UDP socket: the same state
//! machine the node's tests and the load generator use, so this tool cannot
//! drift from the protocol. `notify` posts to the node's control plane.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use mpp::packet::{Credential, MAX_PACKET};
use mpp::proto::{Client, ClientConfig, ClientEvent, ClientState, DisconnectReason};
use mpp::time::UnixMillis;

use crate::http;
use crate::InvalidInput;

/// A flag set by SIGINT or SIGTERM (signal-hook: the handler only stores
/// to the atomic). A second SIGINT after the first ends the process at once,
/// as a user pressing Ctrl-C twice expects.
fn interruption_flag() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Exit 130 on the second signal (the flag is already set then)…
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&flag))
            .context("cannot handle signals")?;
        // …and set the flag on the first.
        signal_hook::flag::register(signal, Arc::clone(&flag)).context("cannot handle signals")?;
    }
    Ok(flag)
}

/// Arguments shared by the commands that talk to a node over UDP.
#[derive(Args)]
pub(crate) struct NodeArgs {
    /// The device credential (JSON, as printed by `mppd credential issue`).
    #[arg(long)]
    credential: PathBuf,
    /// The node's UDP address; default: the credential's endpoints, the
    /// first one first, the next ones when a node stops answering (a
    /// cluster, docs/PROTOCOL.md §10.5).
    #[arg(long)]
    node: Option<String>,
}

/// Resolves `HOST:PORT` to its first address.
fn resolve(text: &str) -> anyhow::Result<SocketAddr> {
    text.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            InvalidInput(format!("invalid node address {text:?}: expected HOST:PORT")).into()
        })
}

impl NodeArgs {
    /// The credential file, read and checked.
    pub(crate) fn credential(&self) -> anyhow::Result<Credential> {
        let text = std::fs::read_to_string(&self.credential).map_err(|e| {
            InvalidInput(format!(
                "cannot read credential {}: {e}",
                self.credential.display()
            ))
        })?;
        Credential::from_json(&text)
            .map_err(|e| {
                InvalidInput(format!(
                    "invalid credential {}: {e}",
                    self.credential.display()
                ))
            })
            .map_err(Into::into)
    }

    /// The credential, the nodes to use (the first first) and a socket.
    pub(crate) fn open(&self) -> anyhow::Result<(Credential, Vec<SocketAddr>, UdpSocket)> {
        let credential = self.credential()?;
        let nodes: Vec<SocketAddr> = match &self.node {
            Some(n) => vec![resolve(n)?],
            None if credential.endpoints.is_empty() => {
                return Err(InvalidInput(
                    "the credential lists no endpoint: give --node HOST:PORT".into(),
                )
                .into())
            }
            None => credential
                .endpoints
                .iter()
                .map(|e| resolve(e))
                .collect::<anyhow::Result<_>>()?,
        };
        // One family: the first node's (a socket speaks one).
        let v4 = nodes[0].is_ipv4();
        let nodes: Vec<SocketAddr> = nodes.into_iter().filter(|n| n.is_ipv4() == v4).collect();
        let local: SocketAddr = if v4 {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let socket = UdpSocket::bind(local).context("cannot open a UDP socket")?;
        Ok((credential, nodes, socket))
    }
}

/// The client settings of a one-shot command. A command run twice in the
/// same second starts at the same Serials (they follow the clock,
/// docs/PROTOCOL.md D2), so the node drops the second run's connects as
/// replays; the client's next round jumps 64 ahead. A device waits 60 s
/// before that round, a command only a moment: its `--timeout` bounds it.
pub(crate) fn one_shot_config() -> ClientConfig {
    ClientConfig {
        reconnect_ms: 100,
        ..ClientConfig::default()
    }
}

/// A client and its socket, stepped until an event or a deadline.
pub(crate) struct Session {
    pub(crate) client: Client,
    socket: UdpSocket,
    /// The nodes the client may use; datagrams from others are ignored.
    nodes: Vec<SocketAddr>,
    buf: Vec<u8>,
}

impl Session {
    pub(crate) fn new(
        credential: &Credential,
        nodes: &[SocketAddr],
        socket: UdpSocket,
        state: DeviceState,
    ) -> Self {
        // Above every Serial of the last run (and at least the clock).
        let first_serial = state
            .serial
            .map(|s| s.saturating_add(1).max(now().seconds().0));
        let config = ClientConfig {
            mark: state.mark,
            first_serial,
            ..ClientConfig::default()
        };
        Session::with_config(credential, nodes, socket, config)
    }

    /// A session for a one-shot command (`mpp endpoint`, `mpp resolve`).
    pub(crate) fn one_shot(
        credential: &Credential,
        nodes: &[SocketAddr],
        socket: UdpSocket,
    ) -> Self {
        Session::with_config(credential, nodes, socket, one_shot_config())
    }

    fn with_config(
        credential: &Credential,
        nodes: &[SocketAddr],
        socket: UdpSocket,
        config: ClientConfig,
    ) -> Self {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let mut client = Client::new(credential, nodes[0], config, now(), seed);
        client.set_nodes(nodes);
        Session {
            client,
            socket,
            nodes: nodes.to_vec(),
            buf: vec![0u8; MAX_PACKET.max(2048)],
        }
    }

    /// Sends what is queued, waits for one datagram or timer (at most
    /// `max_wait`), and returns the events that produced.
    pub(crate) fn step(&mut self, max_wait: Duration) -> anyhow::Result<Vec<ClientEvent>> {
        while let Some(t) = self.client.poll_transmit(&mut self.buf) {
            // A send error (no route, refused) is like a lost datagram: the
            // client's timers retry.
            let _ = self.socket.send_to(&self.buf[..t.size], t.destination);
        }
        let t = now();
        let wait = self
            .client
            .poll_timeout()
            .map_or(max_wait, |d| {
                Duration::from_millis(d.millis_since(t)).min(max_wait)
            })
            .max(Duration::from_millis(1));
        self.socket.set_read_timeout(Some(wait)).context("socket")?;
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, from)) if self.nodes.contains(&from) => {
                self.client.handle_datagram(now(), &self.buf[..n])
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return Err(e).context("cannot receive"),
        }
        let t = now();
        if self.client.poll_timeout().is_some_and(|d| d <= t) {
            self.client.handle_timeout(t);
        }
        let mut events = Vec::new();
        while let Some(e) = self.client.poll_event() {
            events.push(e);
        }
        while let Some(t) = self.client.poll_transmit(&mut self.buf) {
            let _ = self.socket.send_to(&self.buf[..t.size], t.destination);
        }
        Ok(events)
    }
}

pub(crate) fn now() -> UnixMillis {
    UnixMillis::from_system_clock()
}

fn event_json(event: &ClientEvent) -> serde_json::Value {
    use serde_json::json;
    match event {
        ClientEvent::Connected { endpoint } => {
            json!({"event": "connected", "endpoint": endpoint.to_string()})
        }
        ClientEvent::Notify {
            serial,
            bitmask,
            catch_up,
            resync,
        } => {
            let mut e =
                json!({"event": "notify", "serial": serial, "bitmask": hex::encode(bitmask)});
            // docs/PROTOCOL.md §6: what changed while away, or "everything".
            if *resync {
                e["resync"] = json!(true);
            } else if *catch_up {
                e["catch_up"] = json!(true);
            }
            e
        }
        ClientEvent::Endpoint(a) => json!({"event": "endpoint", "endpoint": a.to_string()}),
        ClientEvent::Resolved(Ok(a)) => json!({"event": "resolved", "response": hex::encode(a)}),
        ClientEvent::Resolved(Err(s)) => json!({"event": "resolved", "status": s}),
        ClientEvent::Disconnected(reason) => match reason {
            DisconnectReason::Requested => json!({"event": "disconnected", "reason": "requested"}),
            DisconnectReason::Timeout => json!({"event": "disconnected", "reason": "timeout"}),
            DisconnectReason::Refused {
                status,
                description,
            } => json!({
                "event": "disconnected",
                "reason": "refused",
                "status": status,
                "description": description,
            }),
        },
    }
}

/// Arguments of `mpp subscribe`.
#[derive(Args)]
pub(crate) struct SubscribeArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Stop after this long (e.g. 30s, 5m); default: until interrupted.
    #[arg(long, value_parser = mpp::time::parse_duration_secs)]
    duration: Option<u64>,
    /// Stop after this many notifications (catch-ups at connect not counted).
    #[arg(long)]
    count: Option<u64>,
    /// Keep the device's mark (the last notify Serial processed) in this
    /// file across runs, so the node can tell what changed while it was
    /// away; created if missing.
    #[arg(long)]
    state: Option<PathBuf>,
}

/// The device state `--state` keeps: `{"mark": N, "serial": S}`, the last
/// notify Serial processed and the last request Serial sent.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DeviceState {
    mark: Option<i64>,
    #[serde(default)]
    serial: Option<i64>,
}

fn read_state(path: &std::path::Path) -> anyhow::Result<DeviceState> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let state: DeviceState = serde_json::from_str(&text)
                .map_err(|e| InvalidInput(format!("invalid state file {}: {e}", path.display())))?;
            Ok(DeviceState {
                mark: state.mark.filter(|&m| m > 0),
                serial: state.serial.filter(|&s| s > 0),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DeviceState::default()),
        Err(e) => {
            Err(InvalidInput(format!("cannot read state file {}: {e}", path.display())).into())
        }
    }
}

/// Writes the state beside the file and renames it over, so a crash leaves
/// the old mark or the new one, never half a file.
fn write_state(path: &std::path::Path, state: DeviceState) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string(&state)?;
    std::fs::write(&tmp, text + "\n")
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write state file {}", path.display()))
}

impl SubscribeArgs {
    pub(crate) fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let (credential, nodes, socket) = self.node.open()?;
        let mut state = match &self.state {
            Some(path) => read_state(path)?,
            None => DeviceState::default(),
        };
        let interrupted = interruption_flag()?;
        let mut session = Session::new(&credential, &nodes, socket, state);
        let mut node = session.client.node();
        let deadline = self
            .duration
            .map(|s| Instant::now() + Duration::from_secs(s));
        let mut notifies = 0u64;
        loop {
            let stop = interrupted.load(Ordering::Relaxed)
                || deadline.is_some_and(|d| Instant::now() >= d)
                || self.count.is_some_and(|c| notifies >= c);
            if stop {
                break;
            }
            let events = session.step(Duration::from_millis(200))?;
            // docs/PROTOCOL.md §10.5: the node stopped answering; the
            // client moved to the next endpoint.
            if session.client.node() != node {
                node = session.client.node();
                let line = serde_json::json!({"event": "failover", "node": node.to_string()});
                writeln!(out, "{line}").context("cannot write standard output")?;
            }
            for event in events {
                if matches!(
                    event,
                    ClientEvent::Notify {
                        catch_up: false,
                        ..
                    }
                ) {
                    notifies += 1;
                }
                writeln!(out, "{}", event_json(&event)).context("cannot write standard output")?;
                out.flush().context("cannot write standard output")?;
            }
            // The mark moves once an event is printed (processed).
            if let Some(path) = &self.state {
                if session.client.mark() != state.mark {
                    state = DeviceState {
                        mark: session.client.mark(),
                        serial: Some(session.client.highest_serial_sent()),
                    };
                    write_state(path, state)?;
                }
            }
            if session.client.state() == ClientState::Aborted {
                anyhow::bail!("the node refused the connection");
            }
        }
        // Unsubscribe politely; give the node a second to confirm.
        session.client.disconnect(now());
        let until = Instant::now() + Duration::from_secs(2);
        while session.client.state() != ClientState::Aborted && Instant::now() < until {
            for event in session.step(Duration::from_millis(100))? {
                writeln!(out, "{}", event_json(&event)).context("cannot write standard output")?;
            }
        }
        // The last Serial sent, so the next run starts above it.
        if let Some(path) = &self.state {
            let last = DeviceState {
                mark: session.client.mark(),
                serial: Some(session.client.highest_serial_sent()),
            };
            if last != state {
                write_state(path, last)?;
            }
        }
        Ok(())
    }
}

/// Arguments of `mpp endpoint`.
#[derive(Args)]
pub(crate) struct EndpointArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

impl EndpointArgs {
    pub(crate) fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let (credential, nodes, socket) = self.node.open()?;
        let node = nodes[0];
        let mut session = Session::one_shot(&credential, &nodes, socket);
        let until = Instant::now() + Duration::from_secs(self.timeout);
        let mut asked = false;
        while Instant::now() < until {
            for event in session.step(Duration::from_millis(200))? {
                match event {
                    ClientEvent::Connected { .. } if !asked => {
                        session.client.request_endpoint();
                        asked = true;
                    }
                    ClientEvent::Endpoint(a) => {
                        writeln!(out, "{a}").context("cannot write standard output")?;
                        session.client.disconnect(now());
                        let _ = session.step(Duration::from_millis(50));
                        return Ok(());
                    }
                    ClientEvent::Disconnected(DisconnectReason::Refused {
                        status,
                        description,
                    }) => {
                        anyhow::bail!("the node refused the connection: {status} {description}");
                    }
                    _ => {}
                }
            }
        }
        anyhow::bail!("no answer from {node} within {} s", self.timeout)
    }
}

/// Arguments of `mpp notify`.
#[derive(Args)]
pub(crate) struct NotifyArgs {
    /// The account to notify.
    #[arg(long)]
    account: String,
    /// Which stores changed, as hex (bit i = store i), 1 to 32 bytes.
    #[arg(long)]
    bitmask: String,
    /// The node's control URL.
    #[arg(long, default_value = "http://127.0.0.1:15099")]
    control: String,
    /// File holding the admin token.
    #[arg(long, conflicts_with = "data_dir")]
    admin_token: Option<PathBuf>,
    /// The node's data directory (its admin.token is used).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl NotifyArgs {
    pub(crate) fn run(self, out: &mut dyn Write) -> anyhow::Result<()> {
        let mask = hex::decode(self.bitmask.trim())
            .map_err(|e| InvalidInput(format!("invalid bitmask {:?}: {e}", self.bitmask)))?;
        if mask.is_empty() || mask.len() > 32 {
            return Err(InvalidInput("the bitmask must be 1 to 32 bytes of hex".into()).into());
        }
        let token_file = match (self.admin_token, self.data_dir) {
            (Some(f), _) => f,
            (None, Some(d)) => d.join("admin.token"),
            (None, None) => PathBuf::from("./mppd-data/admin.token"),
        };
        let token = std::fs::read_to_string(&token_file).map_err(|e| {
            InvalidInput(format!(
                "cannot read admin token {}: {e}",
                token_file.display()
            ))
        })?;
        let body =
            serde_json::json!({"account": self.account, "bitmask": hex::encode(&mask)}).to_string();
        let response = http::post(&self.control, "/v1/notify", token.trim(), &body)?;
        if !(200..300).contains(&response.status) {
            anyhow::bail!(
                "the node answered {}: {}",
                response.status,
                response.body.trim()
            );
        }
        writeln!(out, "{}", response.body.trim()).context("cannot write standard output")
    }
}
