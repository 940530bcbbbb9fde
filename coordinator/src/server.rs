//! The network shell around the coordinator core: a QUIC endpoint, one task per connection, and
//! one event loop that owns the [`Coordinator`] and the [`Store`].
//!
//! Connection tasks check the cluster token, decode frames and hand inputs to the event loop
//! over a bounded channel; the loop feeds them (and the time, on an interval) to the core in
//! batches, commits what changed to the database, and only then sends the core's outputs, so no
//! node ever hears of a state a restart could lose. Heartbeats change nothing that survives a
//! restart (the core restarts every member's timeout anyway), so they are never written.

use forge_protocol::stream::describe;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use forge_coordinator_client::ClusterToken;
use forge_coordinator_client::wire::{read_frame, read_frame_within, write_frame};
use forge_protocol::session::{
    ControlReply, ControlRequest, DataStatus, IDENTITY_CHALLENGE_LEN, IDENTITY_EXPORTER_LABEL,
    IdentityProof, MemberStatus, Open, OpenReply, OpenRoundStatus, Purpose, ReplicaStatus,
    RoundRecord, StagePrediction, StageStatus, Status,
};
use forge_protocol::{CoordinatorMessage, ErrorCode, ErrorReply, Hello, MemberId, NodeMessage};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::core::{
    Coalesced, ConnId, Coordinator, CoordinatorConfig, Event, Input, Limits, Millis, Output,
};
use crate::dashboard::Dashboard;
use crate::error::{Error, Result};
use crate::http::HttpListener;
use crate::latency::Histogram;
use crate::planner::{Plan, ReplicaPlan};
use crate::store::{Changes, RoundHistory, Store};
use crate::tls::{self, Identity};

/// A client has this long to open its control stream and send [`Open`].
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest `Open` frame read from a client that has not shown the token (a real one is
/// about a hundred bytes).
const MAX_OPEN_FRAME: usize = 4 << 10;
/// Frames queued for one slow connection before the coordinator drops it rather than wait.
const OUTBOX_FRAMES: usize = 256;
/// Inputs the event loop takes in one batch (one database commit per batch).
const BATCH: usize = 1024;
/// Peers listed in the changes a batch may hold before it is committed and sent in parts
/// (a few MB).
const HELD_PEERS: usize = 16384;

/// What the coordinator did, for `serve`'s exit line and the heartbeat benchmark.
#[derive(Clone, Debug, Default)]
pub struct ServerStats {
    /// Time inside [`Coordinator::step`] per heartbeat.
    pub heartbeat_step: Histogram,
    /// From a heartbeat frame fully received by its connection task to the core having
    /// handled it (channel queueing, batching and the step).
    pub heartbeat_handling: Histogram,
    /// Time inside `step` for every other message.
    pub other_step: Histogram,
    /// Database commits and their duration.
    pub commits: Histogram,
}

/// How the server came up, for the lines `serve` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Startup {
    /// Empty state directory: a new token and certificate were generated.
    FirstStart,
    /// Token and certificate exist, no run state yet.
    NoRunState,
    /// The previous run's members and rounds were restored.
    Restored,
}

/// A bound coordinator, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    core: Coordinator,
    store: Store,
    identity: Identity,
    history: RoundHistory,
    startup: Startup,
    started: Instant,
    stats: Arc<Mutex<ServerStats>>,
    http: Option<HttpListener>,
    dashboard: Dashboard,
}

pub(crate) enum ToLoop {
    Connected {
        conn: ConnId,
        addr: SocketAddr,
        outbox: mpsc::Sender<Outbound>,
    },
    Input {
        conn: ConnId,
        input: Input,
        received: Instant,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// The operator's request; answered once what it changed is durable.
    Control {
        request: ControlRequest,
        reply: oneshot::Sender<ControlReply>,
    },
}

pub(crate) enum Outbound {
    Frame(Vec<u8>),
    Close,
}

impl Server {
    /// Opens (or creates) the state in `state_dir`, restores the previous run if there is one,
    /// and binds `listen`. `config` is used only when the state directory holds no run yet.
    pub fn bind(config: CoordinatorConfig, listen: SocketAddr, state_dir: &Path) -> Result<Server> {
        // Limits are how this coordinator runs, not part of the run: the config given now
        // applies to a restored run too.
        let limits = config.limits.clone();
        let store = Store::open(state_dir)?;
        let (identity, created) = store.identity()?;
        let mut core = match store.snapshot()? {
            Some(bytes) => {
                let core = Coordinator::from_snapshot(&bytes, Millis(0))?;
                if core.config().run_config != config.run_config {
                    warn!(
                        "the run config differs from the one this state directory was started with; continuing the stored run unchanged (use an empty --state-dir to start a new run)"
                    );
                }
                core
            }
            None => Coordinator::new(config)?,
        };
        core.set_limits(limits);
        let startup = match (
            created,
            core.last_round().is_some() || core.members().count() > 0,
        ) {
            (true, _) => Startup::FirstStart,
            (false, true) => Startup::Restored,
            (false, false) => Startup::NoRunState,
        };
        let history = store.round_history()?;
        let dashboard = Dashboard::restore(store.dashboard_rows()?);
        let idle = Duration::from_millis(core.config().heartbeat_timeout_ms);
        let endpoint = tls::server_endpoint(listen, &identity, idle)?;
        Ok(Server {
            endpoint,
            core,
            store,
            identity,
            history,
            startup,
            started: Instant::now(),
            stats: Arc::default(),
            http: None,
            dashboard,
        })
    }

    /// Also serves the dashboard, its JSON and `/metrics` over HTTP on `addr` (the cluster
    /// token required unless it is a loopback address); returns the bound address and whether
    /// the token is required.
    pub fn serve_http(&mut self, addr: SocketAddr) -> Result<(SocketAddr, bool)> {
        let http = HttpListener::bind(addr, &self.identity.token_secret)?;
        let bound = (http.local_addr()?, http.needs_token());
        self.http = Some(http);
        Ok(bound)
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .map_err(|cause| Error::Tls(format!("cannot read the bound address: {cause}")))
    }

    /// The token nodes need: `SECRET.FINGERPRINT`.
    pub fn token(&self) -> ClusterToken {
        self.identity.token()
    }

    pub fn startup(&self) -> Startup {
        self.startup
    }

    pub fn state_file(&self) -> &Path {
        self.store.path()
    }

    /// The statistics the event loop accumulates; `std::mem::take` on them starts a new window.
    pub fn stats(&self) -> Arc<Mutex<ServerStats>> {
        self.stats.clone()
    }

    /// Serves until `shutdown` resolves; an error means the state could not be made durable,
    /// and the coordinator stops rather than tell nodes about state it may lose.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Server {
            endpoint,
            core,
            store,
            identity,
            history,
            started,
            stats,
            http,
            dashboard,
            ..
        } = self;
        let (to_loop, inbox) = mpsc::channel(4 * BATCH);
        let dashboard = Arc::new(Mutex::new(dashboard));
        let http = http.map(|http| {
            let run = run_summary(&core.config().run_config);
            tokio::spawn(http.serve(to_loop.clone(), dashboard.clone(), run))
        });
        let gate = Arc::new(AddressGate::new(core.config().limits.clone()));
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            Arc::from(identity.token_secret.as_str()),
            gate,
            to_loop,
        ));
        let mut event_loop = EventLoop {
            core,
            store,
            history,
            started,
            conns: BTreeMap::new(),
            stats,
            dashboard,
        };
        let mut result = event_loop.run(inbox, shutdown).await;
        if result.is_ok() {
            // The rows summarised since the last commit (the last round's, typically).
            let changes = Changes {
                dashboard: event_loop.dashboard().take_changed(),
                ..Changes::default()
            };
            if !changes.is_empty() {
                result = event_loop.store.commit(&changes);
            }
        }
        accept.abort();
        if let Some(http) = http {
            http.abort();
        }
        endpoint.close(0u32.into(), b"coordinator shutting down");
        // Lets the close frames leave; nodes reconnect to the next coordinator either way.
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        result
    }
}

/// Per-address caps: open connections, and join connections per second.
struct AddressGate {
    limits: Limits,
    addresses: Mutex<HashMap<IpAddr, AddressUse>>,
}

#[derive(Default)]
struct AddressUse {
    connections: u32,
    /// Joins this address may still open now (refilled at `joins_per_ip_per_s`).
    join_tokens: f64,
    refilled: Option<Instant>,
}

/// One open connection counted against its address; uncounted when dropped.
struct Counted {
    gate: Arc<AddressGate>,
    ip: IpAddr,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut addresses = self.gate.lock();
        if let Some(usage) = addresses.get_mut(&self.ip) {
            usage.connections = usage.connections.saturating_sub(1);
            if usage.connections == 0 && usage.join_tokens >= self.gate.burst() {
                addresses.remove(&self.ip);
            }
        }
    }
}

impl AddressGate {
    fn new(limits: Limits) -> AddressGate {
        AddressGate {
            limits,
            addresses: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, AddressUse>> {
        self.addresses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn burst(&self) -> f64 {
        f64::from(self.limits.joins_per_ip_per_s)
    }

    /// Counts a new connection from `ip`, or says why it is one too many.
    fn connect(self: &Arc<Self>, ip: IpAddr) -> std::result::Result<Counted, String> {
        let mut addresses = self.lock();
        let usage = addresses.entry(ip).or_insert_with(|| AddressUse {
            join_tokens: self.burst(),
            ..AddressUse::default()
        });
        if usage.connections >= self.limits.max_connections_per_ip {
            return Err(format!(
                "{ip} has {} connections open, the limit per address ([coordinator] \
                 max_connections_per_ip); close some or raise the limit",
                usage.connections
            ));
        }
        usage.connections += 1;
        Ok(Counted {
            gate: self.clone(),
            ip,
        })
    }

    /// Takes one join from `ip`'s allowance, or says why it must wait.
    fn join(&self, ip: IpAddr, now: Instant) -> std::result::Result<(), String> {
        let rate = self.burst();
        let mut addresses = self.lock();
        let usage = addresses.entry(ip).or_default();
        if let Some(then) = usage.refilled {
            usage.join_tokens =
                (usage.join_tokens + now.duration_since(then).as_secs_f64() * rate).min(rate);
        }
        usage.refilled = Some(now);
        if usage.join_tokens < 1.0 {
            return Err(format!(
                "{ip} opened more than {} join connections in a second ([coordinator] \
                 joins_per_ip_per_s); the node retries after a pause",
                self.limits.joins_per_ip_per_s
            ));
        }
        usage.join_tokens -= 1.0;
        Ok(())
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    secret: Arc<str>,
    gate: Arc<AddressGate>,
    to_loop: mpsc::Sender<ToLoop>,
) {
    let mut next = 1u64;
    while let Some(incoming) = endpoint.accept().await {
        let conn = ConnId(next);
        next += 1;
        let ip = incoming.remote_address().ip();
        match gate.connect(ip) {
            Ok(counted) => {
                let connection = serve_connection(
                    incoming,
                    conn,
                    secret.clone(),
                    gate.clone(),
                    to_loop.clone(),
                );
                tokio::spawn(async move {
                    connection.await;
                    drop(counted);
                });
            }
            Err(reason) => {
                warn!("refused a connection: {reason}");
                tokio::spawn(refuse(incoming, reason));
            }
        }
    }
}

/// Completes the handshake only to tell the client why it is refused (in the close reason).
async fn refuse(incoming: quinn::Incoming, reason: String) {
    if let Ok(Ok(connection)) = tokio::time::timeout(OPEN_TIMEOUT, incoming).await {
        connection.close(0u32.into(), reason.as_bytes());
    }
}

/// Handshake, token check, then either the node protocol or one status reply.
async fn serve_connection(
    incoming: quinn::Incoming,
    conn: ConnId,
    secret: Arc<str>,
    gate: Arc<AddressGate>,
    to_loop: mpsc::Sender<ToLoop>,
) {
    let addr = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(err) => {
            warn!(%addr, "refused a client at the TLS handshake: {err}");
            return;
        }
    };
    let opened = tokio::time::timeout(OPEN_TIMEOUT, async {
        let (send, mut recv) = connection
            .accept_bi()
            .await
            .map_err(|err| err.to_string())?;
        // Nothing large is read from a client before its token is checked.
        let frame = read_frame_within(&mut recv, MAX_OPEN_FRAME)
            .await
            .map_err(|err| err.to_string())?
            .ok_or("the client closed its stream before sending Open")?;
        let open = Open::from_frame(&frame).map_err(|err| err.to_string())?;
        Ok::<_, String>((send, recv, open))
    })
    .await;
    let (mut send, mut recv, open) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(reason)) => {
            warn!(%addr, "dropped a client before it identified itself: {reason}");
            return;
        }
        Err(_) => {
            warn!(%addr, "dropped a client that sent no Open within {OPEN_TIMEOUT:?}");
            return;
        }
    };
    let refusal = if !tls::secret_matches(&secret, &open.token_secret) {
        warn!(%addr, purpose = ?open.purpose, "refused a client with a wrong cluster token");
        Some(ErrorReply {
            code: ErrorCode::Unauthorized,
            message: "wrong cluster token; pass the token `forge-coordinator serve` printed (it stays the same across restarts of the same --state-dir)".to_string(),
        })
    } else if let Err(err) = Hello::current().check_compatible(&open.hello) {
        warn!(%addr, "refused an incompatible client: {err}");
        Some(ErrorReply {
            code: ErrorCode::IncompatibleVersion,
            message: err.to_string(),
        })
    } else {
        None
    };
    // A join connection proves, right after Open, that it holds the key of its peer id.
    let mut proven = None;
    let refusal = match refusal {
        None if open.purpose == Purpose::Join => match gate.join(addr.ip(), Instant::now()) {
            Err(reason) => {
                warn!(%addr, "refused a join: {reason}");
                Some(ErrorReply {
                    code: ErrorCode::RateLimited,
                    message: reason,
                })
            }
            Ok(()) => match prove(&connection, &mut recv).await {
                Ok(peer_id) => {
                    proven = Some(peer_id);
                    None
                }
                Err(reason) => {
                    warn!(%addr, "refused a join without a valid identity proof: {reason}");
                    Some(ErrorReply {
                        code: ErrorCode::Unauthorized,
                        message: format!(
                            "the join's identity proof does not hold: {reason}; forge-node signs \
                         each connection's challenge with the ed25519 key in its --workdir"
                        ),
                    })
                }
            },
        },
        refusal => refusal,
    };
    if let Some(reply) = refusal {
        if let Ok(frame) = OpenReply::Refused(reply).to_frame() {
            let _ = write_frame(&mut send, &frame).await;
        }
        finish(&connection, send).await;
        return;
    }
    let accepted = OpenReply::Accepted {
        hello: Hello::current(),
    };
    let Ok(frame) = accepted.to_frame() else {
        return;
    };
    if write_frame(&mut send, &frame).await.is_err() {
        return;
    }
    match open.purpose {
        Purpose::Status => {
            let (reply, status) = oneshot::channel();
            if to_loop.send(ToLoop::Status { reply }).await.is_err() {
                return;
            }
            let Ok(status) = status.await else {
                return;
            };
            match status.to_frame() {
                Ok(frame) => {
                    let _ = write_frame(&mut send, &frame).await;
                }
                Err(err) => warn!(%addr, "cannot encode the status report: {err}"),
            }
            finish(&connection, send).await;
        }
        Purpose::Control => {
            let reply = match read_control(&mut recv).await {
                Ok(request) => {
                    let (reply, answer) = oneshot::channel();
                    let control = ToLoop::Control { request, reply };
                    if to_loop.send(control).await.is_err() {
                        return;
                    }
                    let Ok(answer) = answer.await else {
                        return;
                    };
                    if let ControlReply::Accepted { what, .. } = &answer {
                        info!(%addr, "control: {}: {what}", request.action);
                    }
                    answer
                }
                Err(message) => ControlReply::Refused(ErrorReply {
                    code: ErrorCode::InvalidControl,
                    message,
                }),
            };
            match reply.to_frame() {
                Ok(frame) => {
                    let _ = write_frame(&mut send, &frame).await;
                }
                Err(err) => warn!(%addr, "cannot encode a control reply: {err}"),
            }
            finish(&connection, send).await;
        }
        Purpose::Join => {
            let Some(peer_id) = proven else {
                return;
            };
            debug!(%addr, ?conn, %peer_id, "node connection opened");
            serve_node(connection, addr, conn, peer_id, send, recv, to_loop).await;
        }
    }
}

/// Reads a control connection's request (sent right after `Open`, within [`OPEN_TIMEOUT`]).
async fn read_control(recv: &mut quinn::RecvStream) -> std::result::Result<ControlRequest, String> {
    let frame = tokio::time::timeout(OPEN_TIMEOUT, read_frame_within(recv, MAX_OPEN_FRAME))
        .await
        .map_err(|_| format!("no control request within {OPEN_TIMEOUT:?}"))?
        .map_err(|err| err.to_string())?
        .ok_or("the client closed its stream before its control request")?;
    ControlRequest::from_frame(&frame).map_err(|err| format!("undecodable control request: {err}"))
}

/// Reads a join connection's [`IdentityProof`] and returns the peer id whose key signed this
/// connection's challenge (its TLS exporter value), or why it did not.
async fn prove(
    connection: &quinn::Connection,
    recv: &mut quinn::RecvStream,
) -> std::result::Result<String, String> {
    let mut challenge = [0u8; IDENTITY_CHALLENGE_LEN];
    connection
        .export_keying_material(&mut challenge, IDENTITY_EXPORTER_LABEL, &[])
        .map_err(|err| format!("no TLS exporter value ({err:?})"))?;
    let frame = tokio::time::timeout(OPEN_TIMEOUT, read_frame_within(recv, MAX_OPEN_FRAME))
        .await
        .map_err(|_| format!("no identity proof within {OPEN_TIMEOUT:?}"))?
        .map_err(|err| err.to_string())?
        .ok_or("the client closed its stream before its identity proof")?;
    let proof = IdentityProof::from_frame(&frame).map_err(|err| err.to_string())?;
    crate::identity::verify_proof(&proof, &challenge).map(|peer| peer.to_string())
}

/// Ends the stream and gives the client a moment to read what was sent before closing.
async fn finish(connection: &quinn::Connection, mut send: quinn::SendStream) {
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), connection.closed()).await;
    connection.close(0u32.into(), b"done");
}

async fn serve_node(
    connection: quinn::Connection,
    addr: SocketAddr,
    conn: ConnId,
    peer_id: String,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    to_loop: mpsc::Sender<ToLoop>,
) {
    let (outbox, mut outgoing) = mpsc::channel(OUTBOX_FRAMES);
    let refusals = outbox.clone();
    let registered = ToLoop::Connected { conn, addr, outbox };
    if to_loop.send(registered).await.is_err() {
        return;
    }
    let writer_connection = connection.clone();
    let mut writer = tokio::spawn(async move {
        while let Some(outbound) = outgoing.recv().await {
            match outbound {
                Outbound::Frame(frame) => {
                    if write_frame(&mut send, &frame).await.is_err() {
                        break;
                    }
                }
                Outbound::Close => {
                    finish(&writer_connection, send).await;
                    return;
                }
            }
        }
        writer_connection.close(0u32.into(), b"closed by coordinator");
    });
    let mut refused = false;
    loop {
        let input = match read_frame(&mut recv).await {
            Ok(Some(frame)) => match NodeMessage::from_frame(&frame) {
                // The connection proved one key: it joins with that key's peer id or not at all.
                Ok(NodeMessage::Join(join)) if join.capabilities.peer_id != peer_id => {
                    let claimed: String = join.capabilities.peer_id.chars().take(64).collect();
                    warn!(%addr, claimed, proven = peer_id, "refused a join under another peer id");
                    let reply = CoordinatorMessage::Error(ErrorReply {
                        code: ErrorCode::Unauthorized,
                        message: format!(
                            "the join claims peer id {claimed:?} but this connection proved the \
                             key of {peer_id}; a node joins with the peer id of its own key"
                        ),
                    });
                    if let Ok(frame) = reply.to_frame() {
                        let _ = refusals.send(Outbound::Frame(frame)).await;
                    }
                    let _ = refusals.send(Outbound::Close).await;
                    refused = true;
                    break;
                }
                Ok(message) => Input::Message(message),
                Err(err) => {
                    warn!(%addr, "closing a connection that sent an undecodable message: {err}");
                    break;
                }
            },
            Ok(None) => break,
            Err(err) => {
                debug!(%addr, "node connection ended: {err}");
                break;
            }
        };
        let message = ToLoop::Input {
            conn,
            input,
            received: Instant::now(),
        };
        if to_loop.send(message).await.is_err() {
            return;
        }
    }
    let _ = to_loop
        .send(ToLoop::Input {
            conn,
            input: Input::Disconnected,
            received: Instant::now(),
        })
        .await;
    if refused {
        // Let the writer deliver the refusal before the connection closes.
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut writer).await;
    }
    connection.close(0u32.into(), b"stream ended");
    writer.abort();
}

struct EventLoop {
    core: Coordinator,
    store: Store,
    history: RoundHistory,
    started: Instant,
    conns: BTreeMap<ConnId, (SocketAddr, mpsc::Sender<Outbound>)>,
    stats: Arc<Mutex<ServerStats>>,
    dashboard: Arc<Mutex<Dashboard>>,
}

impl EventLoop {
    async fn run(
        &mut self,
        mut inbox: mpsc::Receiver<ToLoop>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        // Ticking several times per heartbeat interval keeps failure detection within a small
        // fraction of the interval past the timeout.
        let tick_ms = (self.core.config().heartbeat_interval_ms / 4).clamp(10, 250);
        let mut ticker = tokio::time::interval(Duration::from_millis(tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let ticked = tokio::select! {
                () = &mut shutdown => return Ok(()),
                _ = ticker.tick() => true,
                received = inbox.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return Ok(());
                    }
                    false
                }
            };
            self.process(ticked, &mut batch)?;
        }
    }

    fn now(&self) -> Millis {
        Millis(self.started.elapsed().as_millis() as u64)
    }

    /// Steps the core through one batch, commits what changed, then sends. A batch whose peer
    /// changes grow past [`HELD_PEERS`] (a burst of joins: each tells every member of the joiner)
    /// is committed and sent in parts, so the memory it holds stays bounded.
    fn process(&mut self, ticked: bool, batch: &mut Vec<ToLoop>) -> Result<()> {
        let mut outputs = Coalesced::default();
        let mut durable = false;
        let mut status_requests = Vec::new();
        let mut control_replies = Vec::new();
        for command in batch.drain(..) {
            match command {
                ToLoop::Connected { conn, addr, outbox } => {
                    self.conns.insert(conn, (addr, outbox));
                }
                ToLoop::Status { reply } => status_requests.push(reply),
                ToLoop::Control { request, reply } => {
                    let (answer, out) = self.core.control(self.now(), request);
                    outputs.extend(out);
                    durable = true;
                    control_replies.push((reply, answer));
                }
                ToLoop::Input {
                    conn,
                    input,
                    received,
                } => {
                    let heartbeat = matches!(input, Input::Message(NodeMessage::Heartbeat(_)));
                    durable |= !matches!(
                        input,
                        Input::Disconnected
                            | Input::Message(NodeMessage::Heartbeat(_) | NodeMessage::Hello(_))
                    );
                    if matches!(input, Input::Disconnected) {
                        self.conns.remove(&conn);
                    }
                    self.observe(conn, &input);
                    let now = self.now();
                    let start = Instant::now();
                    let out = self.core.step(now, conn, input);
                    let done = Instant::now();
                    let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
                    if heartbeat {
                        stats.heartbeat_step.record(done - start);
                        stats.heartbeat_handling.record(done - received);
                    } else {
                        stats.other_step.record(done - start);
                    }
                    drop(stats);
                    outputs.extend(out);
                    if outputs.peers() > HELD_PEERS {
                        self.commit_and_send(std::mem::take(&mut outputs), durable)?;
                        durable = false;
                    }
                }
            }
        }
        if ticked {
            outputs.extend(self.core.tick(self.now()));
        }
        self.commit_and_send(outputs, durable)?;
        // Only now is what the requests changed durable.
        for (reply, answer) in control_replies {
            let _ = reply.send(answer);
        }
        if !status_requests.is_empty() {
            let status = self.status();
            for reply in status_requests {
                let _ = reply.send(status.clone());
            }
        }
        Ok(())
    }

    /// Persists what `outputs` (and, when `durable`, the inputs behind them) changed, then sends.
    fn commit_and_send(&mut self, outputs: Coalesced, mut durable: bool) -> Result<()> {
        let mut changes = Changes::default();
        for output in outputs.outputs() {
            if let Output::Event(event) = output {
                durable = true;
                self.on_event(event, &mut changes);
            }
        }
        if durable {
            changes.snapshot = Some(self.core.to_snapshot()?);
            // The dashboard's rows ride along with a commit that happens anyway.
            changes.dashboard = self.dashboard().take_changed();
        }
        if !changes.is_empty() {
            let start = Instant::now();
            // The loop waits for the fsync on purpose: nothing may be sent before it is durable.
            self.store.commit(&changes)?;
            let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            stats.commits.record(start.elapsed());
        }
        for output in outputs.into_outputs() {
            self.dispatch(output);
        }
        Ok(())
    }

    fn addr(&self, conn: ConnId) -> String {
        self.conns
            .get(&conn)
            .map_or_else(|| format!("{conn:?}"), |(addr, _)| addr.to_string())
    }

    /// What the dashboard takes from a member's message: its activity and its round summaries.
    fn observe(&mut self, conn: ConnId, input: &Input) {
        let Input::Message(message) = input else {
            return;
        };
        if !matches!(
            message,
            NodeMessage::Heartbeat(_) | NodeMessage::RoundSummary(_)
        ) {
            return;
        }
        let Some(member) = self.core.member_on(conn) else {
            return;
        };
        let mut dashboard = self.dashboard();
        match message {
            NodeMessage::Heartbeat(heartbeat) => dashboard.heartbeat(member, heartbeat.clone()),
            NodeMessage::RoundSummary(summary) if !dashboard.summary(member, summary) => {
                debug!(%member, round = %summary.round, "ignored a round summary");
            }
            _ => {}
        }
    }

    fn dashboard(&self) -> std::sync::MutexGuard<'_, Dashboard> {
        self.dashboard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the dashboard takes from the core's events.
    fn show(&self, event: &Event) {
        let mut dashboard = self.dashboard();
        match event {
            Event::Left { member, reason } => {
                dashboard.member_gone(*member, "left", reason.clone(), unix_ms())
            }
            Event::Dead { member, silent_ms } => dashboard.member_gone(
                *member,
                "dead",
                format!("silent for {silent_ms} ms"),
                unix_ms(),
            ),
            Event::Rejected {
                member,
                by,
                round,
                reason,
            } => dashboard.member_gone(
                *member,
                "removed",
                format!("{by} rejected its contribution to {round}: {reason}"),
                unix_ms(),
            ),
            Event::RoundOpened { round, .. } => dashboard.round_opened(*round),
            Event::RoundClosed {
                round,
                committed,
                included,
                ..
            } => dashboard.round_closed(*round, *committed, included.len(), unix_ms()),
            _ => {}
        }
    }

    fn on_event(&mut self, event: &Event, changes: &mut Changes) {
        self.show(event);
        match event {
            Event::Refused { conn, reason } => {
                warn!(addr = %self.addr(*conn), "refused: {reason}");
            }
            Event::Joined { member, peer_id } => info!(%member, peer_id, "joined"),
            Event::Resumed { member } => info!(%member, "reconnected"),
            Event::Left { member, reason } => info!(%member, "left: {reason}"),
            Event::Dead { member, silent_ms } => {
                warn!(%member, "declared dead after {silent_ms} ms of silence");
            }
            Event::Rejected { member, reason, .. } => {
                warn!(%member, "removed from the run: {reason}");
            }
            Event::Benched {
                member,
                until,
                reason,
                ..
            } => {
                warn!(%member, "on standby up to and including {until}: {reason}");
            }
            Event::PlanChanged { replicas, standby } => {
                info!(replicas, standby = standby.len(), "plan changed");
            }
            Event::RoundOpened {
                round,
                participants,
            } => info!(%round, participants = participants.len(), "round opened"),
            Event::RoundClosed {
                round,
                committed,
                included,
                excluded,
            } => {
                info!(
                    %round,
                    committed,
                    included = included.len(),
                    excluded = ?excluded,
                    "round closed"
                );
                let record = RoundRecord {
                    round: *round,
                    committed: *committed,
                    included: included.clone(),
                    excluded: excluded.clone(),
                    closed_at_unix_ms: unix_ms(),
                };
                self.history.push(record.clone());
                changes.rounds.push(record);
            }
            Event::HashDisagreement {
                round,
                tensors,
                disagreeing,
            } => warn!(%round, ?tensors, ?disagreeing, "reports disagree"),
            Event::CheckpointCommitted { round } => {
                info!(%round, "checkpoint committed");
                changes.checkpoints.push((*round, unix_ms()));
            }
            Event::Warning { message } => warn!("{message}"),
            Event::ControlRequested { action, what } => info!("control {action}: {what}"),
            Event::ControlApplied {
                action,
                round,
                what,
            } => match round {
                Some(round) => info!(%round, "control {action} applied: {what}"),
                None => info!("control {action} applied: {what}"),
            },
            Event::Finished { version, round } => info!(
                "the run is finished: {round} committed its final version {version}; its \
                 checkpoint is the run's model"
            ),
            Event::InitialState { member } => {
                info!(%member, "version 0 is the initial state this member announced")
            }
            Event::DataStream { member, windows } => info!(
                "the run's training stream is the one {member} tokenized: {windows} windows \
                 per epoch"
            ),
            Event::DataConsumed {
                round,
                replica,
                ranges,
                returned,
            } => info!(
                "{round}: replica {} read stream positions [{}], returned [{}]",
                replica.0,
                describe(ranges),
                describe(returned)
            ),
        }
    }

    fn dispatch(&mut self, output: Output) {
        match output {
            Output::Send { to, message } => self.send(to, &message),
            Output::Close { conn } => {
                if let Some((_, outbox)) = self.conns.remove(&conn) {
                    let _ = outbox.try_send(Outbound::Close);
                }
            }
            Output::Event(_) => {}
        }
    }

    fn send(&mut self, to: ConnId, message: &CoordinatorMessage) {
        let Some((addr, outbox)) = self.conns.get(&to) else {
            return;
        };
        let frame = match message.to_frame() {
            Ok(frame) => frame,
            Err(err) => {
                warn!(%addr, "cannot encode a message: {err}");
                return;
            }
        };
        match outbox.try_send(Outbound::Frame(frame)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The loop never waits for one connection: a node this far behind is dropped
                // and reconnects.
                warn!(%addr, "dropping a connection that is {OUTBOX_FRAMES} messages behind");
                self.conns.remove(&to);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // Its writer has ended; the disconnect is on its way to the core.
                debug!(%addr, "not sending to a connection that has closed");
                self.conns.remove(&to);
            }
        }
    }

    fn status(&self) -> Status {
        let now = self.core.now();
        let plan = self.core.plan();
        let mut replicas: BTreeMap<_, ReplicaStatus> = BTreeMap::new();
        let mut standby = Vec::new();
        let members = self
            .core
            .member_views()
            .map(|view| {
                match view.assignment {
                    Some(assignment) => replicas
                        .entry(assignment.replica)
                        .or_insert_with(|| ReplicaStatus {
                            replica: assignment.replica,
                            data_shard: assignment.data_shard,
                            stages: Vec::new(),
                            predicted_us_per_micro_batch: plan
                                .and_then(|plan| planned_replica(plan, view.member))
                                .map(|replica| micros(replica.bottleneck_s())),
                        })
                        .stages
                        .push(StageStatus {
                            member: view.member,
                            stage: assignment.stage,
                            predicted: plan.and_then(|plan| predicted_stage(plan, view.member)),
                        }),
                    None => standby.push(view.member),
                }
                MemberStatus {
                    member: view.member,
                    peer_id: view.capabilities.peer_id.clone(),
                    devices: view.capabilities.devices.clone(),
                    tokens_per_s: view.capabilities.tokens_per_s,
                    upload_bytes_per_s: view.capabilities.upload_bytes_per_s,
                    download_bytes_per_s: view.capabilities.download_bytes_per_s,
                    connected: view.connected,
                    last_heartbeat_ms_ago: now.0.saturating_sub(view.last_heard.0),
                    assignment: view.assignment,
                }
            })
            .collect();
        let mut replicas: Vec<ReplicaStatus> = replicas.into_values().collect();
        for replica in &mut replicas {
            replica
                .stages
                .sort_by_key(|stage| stage.stage.map_or(0, |s| s.stage));
        }
        let open_round =
            self.core
                .open_round_view()
                .map(
                    |(round, participants, reported, deadline)| OpenRoundStatus {
                        round,
                        participants,
                        reported,
                        deadline_in_ms: deadline.0.saturating_sub(now.0),
                    },
                );
        Status {
            software_version: env!("CARGO_PKG_VERSION").to_string(),
            members,
            replicas,
            standby,
            open_round,
            last_round: self.core.last_round(),
            rounds_committed: self.history.committed,
            rounds_abandoned: self.history.abandoned,
            recent_rounds: self.history.recent.iter().cloned().collect(),
            global_version: self.core.global().version,
            last_checkpoint: self.core.last_checkpoint(),
            data: self
                .core
                .data_progress()
                .map(|(windows, consumed, returned)| DataStatus {
                    windows,
                    consumed,
                    returned,
                }),
            plan: self.core.run_plan(),
            pending_control: self.core.pending_control(),
            aborted: self.core.aborted(),
        }
    }
}

/// The replica of `plan` that `member` holds a stage of.
fn planned_replica(plan: &Plan, member: MemberId) -> Option<&ReplicaPlan> {
    plan.replicas
        .iter()
        .find(|replica| replica.stages.iter().any(|stage| stage.node == member.0))
}

/// The planner's cost of `member`'s stage.
fn predicted_stage(plan: &Plan, member: MemberId) -> Option<StagePrediction> {
    let stage = planned_replica(plan, member)?
        .stages
        .iter()
        .find(|stage| stage.node == member.0)?;
    Some(StagePrediction {
        memory_bytes: stage.memory_bytes,
        compute_us: micros(stage.compute_s),
        transfer_us: micros(stage.transfer_s),
    })
}

/// Seconds as whole microseconds (saturating: a member that reported no speed costs forever).
fn micros(seconds: f64) -> u64 {
    (seconds * 1e6).round() as u64
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// What the dashboard says of the run itself, from its config (the TOML nodes get).
fn run_summary(text: &str) -> serde_json::Value {
    let Ok(run) = forge_protocol::RunConfig::parse(text, Path::new("run.toml")) else {
        return serde_json::Value::Null;
    };
    let model = run.model_config().ok();
    serde_json::json!({
        "model": model.as_ref().map(|m| format!("{:?} {} layers, d_model {}", m.family, m.n_layer, m.d_model)),
        "params": model.as_ref().map(|m| m.param_count()),
        "inner_steps": run.diloco.as_ref().map(|d| d.inner_steps),
        "final_version": run.final_version(),
        "tokens_per_step": run.train.batch_size as i64 * run.train.seq_len,
    })
}
