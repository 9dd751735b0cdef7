//! Starting and stopping a node: the data directory, the socket group, the
//! shard threads, the control-plane thread, and an orderly shutdown.
//!
//! [`start`] does everything that can fail before any thread runs (reading
//! the keys, binding UDP and HTTP, probing io_uring), so a bad setting is
//! reported once, clearly, and nothing is left half-started.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::config::{parse_cpu_list, IoChoice, NodeConfig};
use crate::control::{NodeApi, NodeMetrics, Overloaded, ShardMetrics};
use crate::net::{self, IoBackend, Waker};
use crate::packet::{Credential, CredentialError, MasterKey};
use crate::proto::ServerConfig;
use crate::router::{Router, ShardMessage};
use crate::shard::{self, Clock, DnsQuery, ShardSetup};
use crate::time::UnixSeconds;

/// File holding the master key (64 hex digits) in the data directory.
pub const MASTER_KEY_FILE: &str = "master.key";
/// File holding the admin bearer token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The keys a node keeps on disk.
pub struct DataDir {
    /// The master key all credentials and packet keys derive from.
    pub master: [u8; 32],
    /// The bearer token for control-plane writes.
    pub admin_token: String,
}

/// Opens the data directory, creating it, a random master key and a random
/// admin token (mode 0600) on first use.
pub fn open_data_dir(dir: &Path) -> Result<DataDir, String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
    }
    let read_or_create = |name: &str| -> Result<String, String> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
                let text = hex::encode(bytes);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                io::Write::write_all(&mut f, format!("{text}\n").as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                Ok(text)
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    };
    let master = MasterKey::from_hex(&read_or_create(MASTER_KEY_FILE)?)
        .map(|key| *key.as_bytes())
        .map_err(|e| format!("{}: {e}", dir.join(MASTER_KEY_FILE).display()))?;
    let admin_token = read_or_create(ADMIN_TOKEN_FILE)?;
    if admin_token.len() < 16 {
        return Err(format!(
            "{}: the admin token must be at least 16 characters",
            dir.join(ADMIN_TOKEN_FILE).display()
        ));
    }
    Ok(DataDir {
        master,
        admin_token,
    })
}

/// The `host:port` endpoints written into credentials.
pub fn public_endpoints(config: &NodeConfig, udp: SocketAddr) -> Vec<String> {
    if !config.public_endpoints.is_empty() {
        return config.public_endpoints.clone();
    }
    let ip = if udp.ip().is_unspecified() {
        match udp {
            SocketAddr::V4(_) => "127.0.0.1".to_string(),
            SocketAddr::V6(_) => "[::1]".to_string(),
        }
    } else {
        match udp {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    };
    vec![format!("{ip}:{}", udp.port())]
}

/// The control plane's view of the running node.
struct NodeHandle {
    router: Arc<Router>,
    master: MasterKey,
    endpoints: Vec<String>,
    metrics: Vec<Arc<Mutex<ShardMetrics>>>,
    backend: IoBackend,
    clock: Clock,
    started: crate::time::UnixMillis,
}

impl NodeApi for NodeHandle {
    fn publish(&self, account: &str, bitmask: &[u8]) -> Result<(), Overloaded> {
        let shard = self.router.shard_of_account(account);
        let message = ShardMessage::Publish {
            account: account.to_owned(),
            bitmask: bitmask.to_vec(),
        };
        self.router.send(shard, message).map_err(|_| Overloaded)
    }

    fn issue_credential(
        &self,
        account: &str,
        device: &str,
        ttl_secs: u64,
    ) -> Result<Credential, CredentialError> {
        let now = self.clock.now().seconds();
        let expires = UnixSeconds(now.0.saturating_add(ttl_secs.min(i64::MAX as u64) as i64));
        Credential::issue(
            &self.master,
            account,
            device,
            expires,
            self.endpoints.clone(),
            &mut rand::rngs::OsRng,
        )
    }

    fn web_request(
        &self,
        peer: SocketAddr,
        packet: Vec<u8>,
    ) -> Result<tokio::sync::oneshot::Receiver<Vec<Vec<u8>>>, Overloaded> {
        let shard = crate::packet::peek_conn_id(&packet)
            .map_or(0, |id| self.router.shard_of_affinity(id.affinity()));
        let (reply, receiver) = tokio::sync::oneshot::channel();
        self.router
            .send(
                shard,
                ShardMessage::Web {
                    peer,
                    packet,
                    reply,
                },
            )
            .map_err(|_| Overloaded)?;
        Ok(receiver)
    }

    fn metrics(&self) -> NodeMetrics {
        NodeMetrics {
            io_backend: self.backend.name(),
            threads: self.metrics.len(),
            uptime_secs: self.clock.now().millis_since(self.started) / 1000,
            shards: self
                .metrics
                .iter()
                .filter_map(|m| m.lock().ok().map(|g| g.clone()))
                .collect(),
        }
    }
}

/// A started node.
pub struct Node {
    /// The UDP address actually bound (port 0 resolved).
    pub udp: SocketAddr,
    /// The HTTP address actually bound.
    pub http: SocketAddr,
    /// The I/O backend in use.
    pub backend: IoBackend,
    /// Shard count.
    pub shards: usize,
    /// The admin token.
    pub admin_token: String,
    shard_threads: Vec<JoinHandle<io::Result<()>>>,
    control_thread: Option<JoinHandle<()>>,
    stop: Arc<tokio::sync::Notify>,
}

impl Node {
    /// Asks the node to stop (as SIGTERM does).
    pub fn shutdown(&self) {
        self.stop.notify_one();
    }

    /// Waits for every thread to finish; the first shard error, if any.
    pub fn wait(mut self) -> io::Result<()> {
        let mut result = Ok(());
        for t in self.shard_threads.drain(..) {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = result.and(Err(e)),
                Err(_) => result = result.and(Err(io::Error::other("a shard thread panicked"))),
            }
        }
        if let Some(t) = self.control_thread.take() {
            let _ = t.join();
        }
        result
    }
}

fn choose_backend(choice: IoChoice) -> Result<IoBackend, String> {
    match choice {
        IoChoice::Mmsg => Ok(IoBackend::Mmsg),
        IoChoice::Uring => net::uring::probe().map(|()| IoBackend::Uring).map_err(|e| {
            format!("io_uring is not available here ({e}); use --io mmsg or --io auto")
        }),
        IoChoice::Auto => {
            let b = net::detect_backend();
            if b == IoBackend::Mmsg {
                tracing::warn!("io_uring unavailable: using recvmmsg/sendmmsg");
            }
            Ok(b)
        }
    }
}

/// Starts a node: binds everything, then spawns the shards and the control
/// plane. `stop_on_signals` makes SIGINT/SIGTERM stop it (the `mppd` binary);
/// tests call [`Node::shutdown`] instead.
pub fn start(config: &NodeConfig, stop_on_signals: bool) -> Result<Node, String> {
    config.validate()?;
    let data = open_data_dir(&config.data_dir)?;
    let shards = config.shard_count();
    let cpus = parse_cpu_list(&config.cpus)?;
    let cpus = if cpus.is_empty() {
        core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.id)
            .collect()
    } else {
        cpus
    };
    let backend = choose_backend(config.io)?;
    let sockets = net::socket::bind_group(config.udp, shards, config.socket_buffer)
        .map_err(|e| format!("cannot bind UDP {}: {e}", config.udp))?;
    let udp = sockets
        .first()
        .and_then(|s| s.local_addr().ok())
        .ok_or("no UDP socket bound")?;
    if let Some(first) = sockets.first() {
        net::steer::attach_steering(first, shards as u32).unwrap_or_else(|e| {
            tracing::warn!(%e, "cBPF steering unavailable: misrouted datagrams go through the router");
        });
    }
    let http_listener = std::net::TcpListener::bind(config.http)
        .map_err(|e| format!("cannot bind HTTP {}: {e}", config.http))?;
    http_listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot configure HTTP listener: {e}"))?;
    let http = http_listener
        .local_addr()
        .map_err(|e| format!("cannot read HTTP address: {e}"))?;

    let wakers: Vec<Arc<Waker>> = (0..shards)
        .map(|_| Waker::new().map(Arc::new))
        .collect::<io::Result<_>>()
        .map_err(|e| format!("cannot create eventfd: {e}"))?;
    let (router, inboxes) = Router::new(wakers.clone(), config.inbox_capacity);
    let clock = Clock::new();
    let (dns_tx, dns_rx) = tokio::sync::mpsc::channel::<DnsQuery>(1024);
    let dns = config.dns_upstream.map(|_| dns_tx);
    let server_config = ServerConfig {
        connection_timeout_ms: config.connection_timeout_ms,
        max_connections: config.max_connections.div_ceil(shards).max(1),
        stun_rate_per_sec: config.stun_rate_per_sec,
        stun_burst: config.stun_burst,
        ..ServerConfig::default()
    };
    let metrics: Vec<Arc<Mutex<ShardMetrics>>> = (0..shards)
        .map(|i| {
            Arc::new(Mutex::new(ShardMetrics {
                shard: i,
                ..ShardMetrics::default()
            }))
        })
        .collect();

    let mut shard_threads = Vec::with_capacity(shards);
    for (i, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
        let setup = ShardSetup {
            id: i,
            cpu: if config.pin && !cpus.is_empty() {
                Some(cpus[i % cpus.len()])
            } else {
                None
            },
            backend,
            batch: config.batch,
            spin: std::time::Duration::from_micros(config.spin_us),
            socket,
            inbox,
            waker: wakers[i].clone(),
            router: router.clone(),
            server: server_config.clone(),
            master: data.master,
            dns: dns.clone(),
            metrics: metrics[i].clone(),
            clock,
        };
        let t = std::thread::Builder::new()
            .name(format!("mpp-shard-{i}"))
            .spawn(move || shard::run(setup))
            .map_err(|e| format!("cannot start shard thread: {e}"))?;
        shard_threads.push(t);
    }

    let handle = Arc::new(NodeHandle {
        router: router.clone(),
        master: MasterKey::new(data.master),
        endpoints: public_endpoints(config, udp),
        metrics,
        backend,
        clock,
        started: clock.now(),
    });
    let stop = Arc::new(tokio::sync::Notify::new());
    let control_thread = spawn_control(
        http_listener,
        handle,
        data.admin_token.clone(),
        router,
        stop.clone(),
        stop_on_signals,
        config.dns_upstream.map(|up| (up, dns_rx)),
    )?;
    Ok(Node {
        udp,
        http,
        backend,
        shards,
        admin_token: data.admin_token,
        shard_threads,
        control_thread: Some(control_thread),
        stop,
    })
}

fn spawn_control(
    listener: std::net::TcpListener,
    node: Arc<NodeHandle>,
    admin_token: String,
    router: Arc<Router>,
    stop: Arc<tokio::sync::Notify>,
    stop_on_signals: bool,
    dns: Option<(SocketAddr, tokio::sync::mpsc::Receiver<DnsQuery>)>,
) -> Result<JoinHandle<()>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the control runtime: {e}"))?;
    let signals = if stop_on_signals {
        Some(Signals::install(&runtime)?)
    } else {
        None
    };
    std::thread::Builder::new()
        .name("mpp-control".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(%e, "control listener");
                        router.shutdown_all();
                        return;
                    }
                };
                if let Some((upstream, queries)) = dns {
                    tokio::spawn(crate::dns::forward(upstream, queries, router.clone()));
                }
                let shutdown = {
                    let router = router.clone();
                    async move {
                        wait_for_stop(stop, signals).await;
                        tracing::info!("shutting down");
                        router.shutdown_all();
                    }
                };
                let api: Arc<dyn NodeApi> = node;
                if let Err(e) = crate::control::serve(listener, api, admin_token, shutdown).await {
                    tracing::error!(%e, "control plane stopped");
                    router.shutdown_all();
                }
            });
        })
        .map_err(|e| format!("cannot start the control thread: {e}"))
}

/// SIGINT and SIGTERM streams. Created before `start` returns, so a signal
/// that arrives right after the start-up line is caught, not fatal.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install(runtime: &tokio::runtime::Runtime) -> Result<Self, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = runtime.enter();
        let term =
            signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
        let int =
            signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
        Ok(Signals { term, int })
    }
}

async fn wait_for_stop(stop: Arc<tokio::sync::Notify>, signals: Option<Signals>) {
    match signals {
        None => stop.notified().await,
        Some(mut s) => {
            tokio::select! {
                _ = stop.notified() => {}
                _ = s.term.recv() => {}
                _ = s.int.recv() => {}
            }
        }
    }
}
