//! The node's side of the control connection: join, heartbeats, reports, leave, and the
//! coordinator's notifications, kept alive across dropped connections and coordinator restarts.
//!
//! [`CoordinatorClient`] is a cheap handle that sends commands over a bounded channel to an event
//! loop task that owns the QUIC connection. The loop sends a heartbeat every interval the
//! coordinator asked for, and when the connection drops it reconnects with jittered exponential
//! backoff and joins again naming its old member id, so a node that was away for less than the
//! heartbeat timeout keeps its id, its assignment and its place in the open round. A round
//! report or checkpoint shard not yet acknowledged is sent again after such a reconnect.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use forge_protocol::session::{
    ControlReply, ControlRequest, IDENTITY_CHALLENGE_LEN, IDENTITY_EXPORTER_LABEL, IdentityProof,
    Open, OpenReply, Purpose, Status, identity_proof_message,
};
use forge_protocol::{
    Activity, Capabilities, CheckpointShardDurable, CheckpointShardFailed, CoordinatorMessage,
    ErrorCode, Heartbeat, Hello, InitialState, Join, JoinAccepted, Leave, MemberId, NodeMessage,
    Ready, RoundId, RoundReport, RoundSummary, TensorHash,
};
use libp2p_identity::Keypair;
use rand::Rng;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::tls::{self, ClusterToken};
use crate::wire::{read_frame, write_frame};

/// Times the first join is tried again when the coordinator refuses it for the join rate of
/// this address.
const JOIN_RATE_RETRIES: u32 = 20;

/// How the client connects and reconnects.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// First reconnect delay; it doubles per failed attempt up to `reconnect_max`, and each wait
    /// is drawn uniformly from its upper half so many nodes do not reconnect in lockstep.
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Stop reconnecting after this long without a connection (`None`: never stop).
    pub give_up_after: Option<Duration>,
    /// A coordinator silent this long is considered gone and the client reconnects.
    pub idle_timeout: Duration,
    /// Longest wait for one connection attempt (handshake, token check and join).
    pub connect_timeout: Duration,
    /// A QUIC endpoint to share between many clients (one UDP socket); by default each client
    /// binds its own.
    pub endpoint: Option<quinn::Endpoint>,
}

impl Default for ClientOptions {
    fn default() -> ClientOptions {
        ClientOptions {
            reconnect_initial: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
            give_up_after: None,
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            endpoint: None,
        }
    }
}

/// What the coordinator (or the connection) tells the node.
#[derive(Clone, Debug, PartialEq)]
pub enum Notification {
    /// A message from the coordinator: `RoundOpened`, `RoundClosed`, `Assigned`, `MemberDead`,
    /// `CheckpointCommitted` or an `Error` reply.
    Message(CoordinatorMessage),
    /// The connection dropped; the client is reconnecting.
    Disconnected { reason: String },
    /// Connected again. `kept_member` is false when the coordinator had declared the old member
    /// dead: the node is a new member and must treat itself as a fresh joiner.
    Rejoined {
        accepted: JoinAccepted,
        kept_member: bool,
    },
    /// The client stopped for good (refused on reconnect, or gave up); commands now fail.
    Stopped { reason: String },
}

/// A handle on the control connection; clone it freely.
#[derive(Clone, Debug)]
pub struct CoordinatorClient {
    commands: mpsc::Sender<Command>,
    member: watch::Receiver<MemberId>,
}

#[derive(Debug)]
enum Command {
    Progress(Heartbeat),
    Send {
        message: NodeMessage,
        reply: oneshot::Sender<Result<()>>,
    },
    Leave {
        reason: String,
        reply: oneshot::Sender<Result<()>>,
    },
}

impl CoordinatorClient {
    /// Connects to the coordinator at `addr`, proves membership with `token`, proves on every
    /// connection that it holds `identity` (the key of `capabilities.peer_id`), and joins with
    /// `capabilities`. Fails at once (no retry) if the first attempt fails; after that the
    /// client reconnects by itself. Returns the handle, the join reply (run config, member id,
    /// assignment) and the stream of notifications.
    pub async fn connect(
        addr: SocketAddr,
        token: &str,
        identity: Keypair,
        capabilities: Capabilities,
        options: ClientOptions,
    ) -> Result<(
        CoordinatorClient,
        JoinAccepted,
        mpsc::UnboundedReceiver<Notification>,
    )> {
        let token: ClusterToken = token.parse()?;
        let key = identity.public().to_peer_id().to_string();
        if capabilities.peer_id != key {
            return Err(Error::IdentityMismatch {
                claimed: capabilities.peer_id,
                key,
            });
        }
        let endpoint = match &options.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => client_endpoint(addr)?,
        };
        let config = tls::client_config(&token, options.idle_timeout)?;
        let dialer = Dialer {
            addr,
            token,
            identity: Some(identity),
            endpoint,
            config,
            connect_timeout: options.connect_timeout,
        };
        // Joins refused for their rate (many nodes behind one address starting at once) are
        // tried again after a jittered pause; any other refusal ends the attempt.
        let mut attempts = 0;
        let (link, accepted) = loop {
            match dialer.join(&capabilities, None).await {
                Err(Error::Refused {
                    code: ErrorCode::RateLimited,
                    ..
                }) if attempts < JOIN_RATE_RETRIES => {
                    attempts += 1;
                    let pause = rand::thread_rng().gen_range(500..=1_500);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                joined => break joined?,
            }
        };
        let (commands, command_rx) = mpsc::channel(64);
        // Notifications are few per round; an unbounded queue means a slow consumer can never
        // hold up the heartbeats.
        let (notify, notifications) = mpsc::unbounded_channel();
        let (member_tx, member) = watch::channel(accepted.member);
        let event_loop = EventLoop {
            dialer,
            options,
            capabilities,
            commands: command_rx,
            notify,
            member: member_tx,
            heartbeat_every: Duration::from_millis(accepted.heartbeat_interval_ms.max(1)),
            node: NodeState::default(),
        };
        tokio::spawn(event_loop.run(link));
        Ok((
            CoordinatorClient { commands, member },
            accepted,
            notifications,
        ))
    }

    /// The current member id (it changes only if the coordinator declared the node dead).
    pub fn member(&self) -> MemberId {
        *self.member.borrow()
    }

    /// What the next heartbeats say: what the node is doing, the round it trains in and the
    /// inner steps done in it. Callable from any thread, the trainer's included; an update the
    /// full command queue cannot take is dropped (the next one says more).
    pub fn set_progress(&self, round: Option<RoundId>, inner_steps_done: u64, activity: Activity) {
        let progress = Heartbeat {
            round,
            inner_steps_done,
            activity,
        };
        let _ = self.commands.try_send(Command::Progress(progress));
    }

    /// Sends a closed round's summary for the coordinator's dashboard (best effort: not sent
    /// again after a reconnect).
    pub async fn round_summary(&self, summary: RoundSummary) -> Result<()> {
        self.send(NodeMessage::RoundSummary(summary)).await
    }

    /// Reports the outcome of a round; re-sent after a reconnect until `RoundClosed` arrives.
    pub async fn report(&self, report: RoundReport) -> Result<()> {
        self.send(NodeMessage::RoundReport(report)).await
    }

    /// Reports a checkpoint shard durable; re-sent after a reconnect until the checkpoint is
    /// committed.
    pub async fn shard_durable(&self, durable: CheckpointShardDurable) -> Result<()> {
        self.send(NodeMessage::CheckpointShardDurable(durable))
            .await
    }

    /// Tells the coordinator this node could not write its checkpoint shard (best effort: a
    /// report lost in a reconnect only leaves that checkpoint pending until a newer one).
    pub async fn shard_failed(&self, failed: CheckpointShardFailed) -> Result<()> {
        self.send(NodeMessage::CheckpointShardFailed(failed)).await
    }

    /// Announces this node's version 0 (see [`InitialState`]); announced again after a
    /// reconnect.
    pub async fn initial_state(&self, tensor_hashes: Vec<TensorHash>) -> Result<()> {
        self.send(NodeMessage::InitialState(InitialState { tensor_hashes }))
            .await
    }

    /// Says the node is ready to train, with its training stream (see [`Ready`]); said again
    /// after a reconnect, since a node that rejoins as a new member must be checked again.
    pub async fn ready(&self, ready: Ready) -> Result<()> {
        self.send(NodeMessage::Ready(ready)).await
    }

    /// Sends a heartbeat now, besides the periodic ones.
    pub async fn heartbeat(&self) -> Result<()> {
        self.send(NodeMessage::Heartbeat(Heartbeat {
            round: None,
            inner_steps_done: 0,
            activity: Activity::Idle,
        }))
        .await
    }

    /// Leaves the run gracefully and stops the client.
    pub async fn leave(self, reason: &str) -> Result<()> {
        let (reply, done) = oneshot::channel();
        self.command(Command::Leave {
            reason: reason.to_string(),
            reply,
        })
        .await?;
        done.await.map_err(|_| stopped())?
    }

    async fn send(&self, message: NodeMessage) -> Result<()> {
        let (reply, done) = oneshot::channel();
        self.command(Command::Send { message, reply }).await?;
        done.await.map_err(|_| stopped())?
    }

    async fn command(&self, command: Command) -> Result<()> {
        self.commands.send(command).await.map_err(|_| stopped())
    }
}

fn stopped() -> Error {
    Error::ClientStopped {
        reason: "its event loop ended".to_string(),
    }
}

/// Asks the coordinator at `addr` for its status (a read-only connection using the same token).
pub async fn fetch_status(addr: SocketAddr, token: &str, timeout: Duration) -> Result<Status> {
    let frame = exchange(addr, token, timeout, Purpose::Status, None, "its status").await?;
    Status::from_frame(&frame).map_err(Error::Protocol)
}

/// Asks the coordinator at `addr` to save, stop, abort or anneal the run (the cluster token
/// authenticates the operator); its answer says what will happen and when, or why not.
pub async fn send_control(
    addr: SocketAddr,
    token: &str,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlReply> {
    let frame = request.to_frame().map_err(Error::Protocol)?;
    let what = "its answer to the control request";
    let frame = exchange(addr, token, timeout, Purpose::Control, Some(frame), what).await?;
    ControlReply::from_frame(&frame).map_err(Error::Protocol)
}

/// One request and one answer on a connection opened for `purpose` (no request: the
/// coordinator answers the opening), within `timeout`; `what` names the answer in errors.
async fn exchange(
    addr: SocketAddr,
    token: &str,
    timeout: Duration,
    purpose: Purpose,
    request: Option<Vec<u8>>,
    what: &str,
) -> Result<Vec<u8>> {
    let token: ClusterToken = token.parse()?;
    let dialer = Dialer {
        addr,
        config: tls::client_config(&token, timeout)?,
        token,
        identity: None,
        endpoint: client_endpoint(addr)?,
        connect_timeout: timeout,
    };
    let fetch = async {
        let (connection, mut send, mut recv) = dialer.open(purpose).await?;
        if let Some(request) = &request {
            write_frame(&mut send, request).await?;
        }
        let frame = read_frame(&mut recv).await?.ok_or_else(|| Error::Stream {
            reason: format!("the coordinator closed the stream before sending {what}"),
        })?;
        connection.close(0u32.into(), b"done");
        Ok::<_, Error>(frame)
    };
    let frame = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| Error::Connect {
            addr,
            reason: format!("no {what} within {timeout:?}"),
        })??;
    dialer.endpoint.wait_idle().await;
    Ok(frame)
}

/// The proof that this node holds `identity`, for the connection whose join challenge (TLS
/// exporter value) is `challenge`.
pub fn prove_identity(
    identity: &Keypair,
    challenge: &[u8; IDENTITY_CHALLENGE_LEN],
) -> IdentityProof {
    let signature = identity
        .sign(&identity_proof_message(challenge))
        .expect("ed25519 signing cannot fail");
    IdentityProof {
        public_key: identity.public().encode_protobuf(),
        signature,
    }
}

fn client_endpoint(addr: SocketAddr) -> Result<quinn::Endpoint> {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    tls::endpoint(local, None).map_err(|cause| Error::Bind { addr: local, cause })
}

/// Everything needed to open a control connection again.
struct Dialer {
    addr: SocketAddr,
    token: ClusterToken,
    /// The node's key, for the identity proof of a join connection.
    identity: Option<Keypair>,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    connect_timeout: Duration,
}

/// An open node connection: the writing half, and the reader task's messages.
struct Link {
    connection: quinn::Connection,
    send: quinn::SendStream,
    incoming: mpsc::Receiver<std::result::Result<CoordinatorMessage, String>>,
}

impl Dialer {
    fn connect_error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Connect {
            addr: self.addr,
            reason: reason.to_string(),
        }
    }

    /// Connects, sends [`Open`] and waits for the coordinator to accept it.
    async fn open(
        &self,
        purpose: Purpose,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), self.addr, tls::SERVER_NAME)
            .map_err(|err| self.connect_error(err))?;
        let connection = connecting.await.map_err(|err| self.connect_error(err))?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|err| self.connect_error(err))?;
        let open = Open {
            hello: Hello::current(),
            token_secret: self.token.secret.clone(),
            purpose,
        };
        write_frame(&mut send, &open.to_frame().map_err(Error::Protocol)?).await?;
        if purpose == Purpose::Join {
            let identity = self.identity.as_ref().ok_or_else(|| Error::Stream {
                reason: "a join connection needs the node's key".to_string(),
            })?;
            let mut challenge = [0u8; IDENTITY_CHALLENGE_LEN];
            connection
                .export_keying_material(&mut challenge, IDENTITY_EXPORTER_LABEL, &[])
                .map_err(|err| Error::Tls(format!("no TLS exporter value: {err:?}")))?;
            let proof = prove_identity(identity, &challenge);
            write_frame(&mut send, &proof.to_frame().map_err(Error::Protocol)?).await?;
        }
        let frame = read_frame(&mut recv).await?.ok_or_else(|| Error::Stream {
            reason: "the coordinator closed the stream without answering".to_string(),
        })?;
        match OpenReply::from_frame(&frame).map_err(Error::Protocol)? {
            OpenReply::Accepted { .. } => Ok((connection, send, recv)),
            OpenReply::Refused(reply) => Err(Error::Refused {
                addr: self.addr,
                code: reply.code,
                message: reply.message,
            }),
        }
    }

    /// Opens a node connection and joins (as `rejoin` if given), within the connect timeout.
    async fn join(
        &self,
        capabilities: &Capabilities,
        rejoin: Option<MemberId>,
    ) -> Result<(Link, JoinAccepted)> {
        let attempt = async {
            let (connection, mut send, mut recv) = self.open(Purpose::Join).await?;
            for message in [
                NodeMessage::Hello(Hello::current()),
                NodeMessage::Join(Join {
                    capabilities: capabilities.clone(),
                    rejoin,
                }),
            ] {
                write_frame(&mut send, &message.to_frame().map_err(Error::Protocol)?).await?;
            }
            loop {
                let frame = read_frame(&mut recv).await?.ok_or_else(|| Error::Stream {
                    reason: "the coordinator closed the stream during the join".to_string(),
                })?;
                match CoordinatorMessage::from_frame(&frame).map_err(Error::Protocol)? {
                    CoordinatorMessage::Hello(_) => {}
                    CoordinatorMessage::JoinAccepted(accepted) => {
                        let (messages, incoming) = mpsc::channel(256);
                        tokio::spawn(read_messages(recv, messages));
                        let link = Link {
                            connection,
                            send,
                            incoming,
                        };
                        return Ok((link, accepted));
                    }
                    CoordinatorMessage::Error(reply) => {
                        return Err(Error::Refused {
                            addr: self.addr,
                            code: reply.code,
                            message: reply.message,
                        });
                    }
                    other => {
                        return Err(Error::UnexpectedMessage {
                            expected: "JoinAccepted",
                            got: format!("{other:?}"),
                        });
                    }
                }
            }
        };
        tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| {
                self.connect_error(format!("no join answer within {:?}", self.connect_timeout))
            })?
    }
}

/// Reads frames on its own task: `read_frame` is not cancel-safe, so it must not sit in a
/// `select!` that may drop it half-way through a frame.
async fn read_messages(
    mut recv: quinn::RecvStream,
    messages: mpsc::Sender<std::result::Result<CoordinatorMessage, String>>,
) {
    loop {
        let next = match read_frame(&mut recv).await {
            Ok(Some(frame)) => {
                CoordinatorMessage::from_frame(&frame).map_err(|err| err.to_string())
            }
            Ok(None) => Err("the coordinator closed the stream".to_string()),
            Err(err) => Err(err.to_string()),
        };
        let end = next.is_err();
        if messages.send(next).await.is_err() || end {
            return;
        }
    }
}

/// Why a connected session ended.
enum Ended {
    Broken(String),
    /// The coordinator no longer knows this member: join again as a new one.
    Forgotten(String),
    /// The coordinator removed this member for bad contributions: stop, do not rejoin.
    Expelled(String),
    Stop,
}

/// What the node said that must survive a reconnect.
#[derive(Default)]
struct NodeState {
    progress: Option<Heartbeat>,
    unacknowledged_report: Option<RoundReport>,
    unacknowledged_shards: Vec<CheckpointShardDurable>,
    /// Announced again after every reconnect: the coordinator keeps only the first while the
    /// run is at version 0 and ignores it afterwards.
    initial_state: Option<InitialState>,
    /// Said again after every reconnect.
    ready: Option<Ready>,
}

impl NodeState {
    fn heartbeat(&self) -> Heartbeat {
        self.progress.clone().unwrap_or(Heartbeat {
            round: None,
            inner_steps_done: 0,
            activity: Activity::Idle,
        })
    }

    fn remember(&mut self, message: &NodeMessage) {
        match message {
            NodeMessage::RoundReport(report) => self.unacknowledged_report = Some(report.clone()),
            NodeMessage::CheckpointShardDurable(shard) => {
                self.unacknowledged_shards.push(shard.clone());
            }
            NodeMessage::InitialState(initial) => self.initial_state = Some(initial.clone()),
            NodeMessage::Ready(ready) => self.ready = Some(ready.clone()),
            _ => {}
        }
    }

    /// A command while disconnected: progress and reports are kept for the next connection.
    /// False when the node left.
    fn offline(&mut self, command: Command) -> bool {
        match command {
            Command::Progress(progress) => self.progress = Some(progress),
            Command::Send { message, reply } => {
                self.remember(&message);
                let _ = reply.send(Ok(()));
            }
            Command::Leave { reply, .. } => {
                // No connection to leave over; the coordinator times the member out.
                let _ = reply.send(Ok(()));
                return false;
            }
        }
        true
    }
}

struct EventLoop {
    dialer: Dialer,
    options: ClientOptions,
    capabilities: Capabilities,
    commands: mpsc::Receiver<Command>,
    notify: mpsc::UnboundedSender<Notification>,
    member: watch::Sender<MemberId>,
    heartbeat_every: Duration,
    node: NodeState,
}

impl EventLoop {
    async fn run(mut self, mut link: Link) {
        loop {
            let ended = self.serve(&mut link).await;
            link.connection.close(0u32.into(), b"reconnecting");
            let rejoin = match ended {
                Ended::Stop => return,
                Ended::Broken(reason) => {
                    self.tell(Notification::Disconnected { reason });
                    Some(*self.member.borrow())
                }
                Ended::Forgotten(reason) => {
                    self.tell(Notification::Disconnected { reason });
                    None
                }
                Ended::Expelled(reason) => {
                    self.tell(Notification::Stopped { reason });
                    return;
                }
            };
            match self.reconnect(rejoin).await {
                Some(next) => link = next,
                None => return,
            }
        }
    }

    fn tell(&self, notification: Notification) {
        // Nobody listening is fine: a benchmark client ignores notifications.
        let _ = self.notify.send(notification);
    }

    async fn write(&self, link: &mut Link, message: &NodeMessage) -> Result<()> {
        let frame = message.to_frame().map_err(Error::Protocol)?;
        write_frame(&mut link.send, &frame).await
    }

    /// Runs a connected session until it breaks or the node leaves.
    async fn serve(&mut self, link: &mut Link) -> Ended {
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    let message = NodeMessage::Heartbeat(self.node.heartbeat());
                    if let Err(err) = self.write(link, &message).await {
                        return Ended::Broken(err.to_string());
                    }
                }
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        return Ended::Stop;
                    };
                    match command {
                        Command::Progress(progress) => self.node.progress = Some(progress),
                        Command::Send { message, reply } => {
                            self.node.remember(&message);
                            let result = self.write(link, &message).await;
                            let broken = result.as_ref().err().map(ToString::to_string);
                            // Reports and shards are kept for re-sending, so a broken write
                            // still counts as accepted.
                            let _ = reply.send(Ok(()));
                            if let Some(reason) = broken {
                                return Ended::Broken(reason);
                            }
                        }
                        Command::Leave { reason, reply } => {
                            let result = self.write(link, &NodeMessage::Leave(Leave { reason })).await;
                            let _ = link.send.finish();
                            // The coordinator closes the connection once it has read the Leave.
                            let _ = tokio::time::timeout(
                                Duration::from_secs(2),
                                link.connection.closed(),
                            )
                            .await;
                            let _ = reply.send(result);
                            return Ended::Stop;
                        }
                    }
                }
                incoming = link.incoming.recv() => {
                    let message = match incoming {
                        Some(Ok(message)) => message,
                        Some(Err(reason)) => return Ended::Broken(reason),
                        None => return Ended::Broken("the reader stopped".to_string()),
                    };
                    if let Some(ended) = self.on_message(&message) {
                        self.tell(Notification::Message(message));
                        return ended;
                    }
                    self.tell(Notification::Message(message));
                }
            }
        }
    }

    /// Bookkeeping on a coordinator message; `Some` when the session must end.
    fn on_message(&mut self, message: &CoordinatorMessage) -> Option<Ended> {
        let me = *self.member.borrow();
        match message {
            CoordinatorMessage::RoundClosed(closed)
                if self
                    .node
                    .unacknowledged_report
                    .as_ref()
                    .is_some_and(|report| report.round <= closed.round) =>
            {
                self.node.unacknowledged_report = None;
            }
            CoordinatorMessage::CheckpointCommitted(committed) => {
                self.node
                    .unacknowledged_shards
                    .retain(|shard| shard.round > committed.round);
            }
            CoordinatorMessage::Error(reply) if reply.code == ErrorCode::DataMismatch => {
                return Some(Ended::Expelled(format!(
                    "the coordinator refused this node ({me}): {}",
                    reply.message
                )));
            }
            CoordinatorMessage::MemberDead(dead) if dead.member == me && dead.expelled => {
                return Some(Ended::Expelled(format!(
                    "the coordinator removed this node ({me}) from the run: {}; check this node's \
                     data, precision and hardware (its outer gradients were rejected) before \
                     joining again",
                    dead.reason
                )));
            }
            CoordinatorMessage::MemberDead(dead) if dead.member == me => {
                return Some(Ended::Forgotten(format!(
                    "the coordinator declared this node ({me}) dead: {}",
                    dead.reason
                )));
            }
            CoordinatorMessage::Error(reply) if reply.code == ErrorCode::UnknownMember => {
                return Some(Ended::Forgotten(reply.message.clone()));
            }
            _ => {}
        }
        None
    }

    /// Reconnects with backoff; `None` when the client stops (refused, gave up, or left).
    async fn reconnect(&mut self, rejoin: Option<MemberId>) -> Option<Link> {
        let since = Instant::now();
        let mut delay = self.options.reconnect_initial;
        loop {
            let wait = rand::thread_rng().gen_range(delay / 2..=delay);
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    command = self.commands.recv() => match command {
                        Some(command) => if !self.node.offline(command) {
                            return None;
                        },
                        None => return None,
                    },
                }
            }
            let attempt = self.dialer.join(&self.capabilities, rejoin);
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    result = &mut attempt => break result,
                    command = self.commands.recv() => match command {
                        Some(command) => if !self.node.offline(command) {
                            return None;
                        },
                        None => return None,
                    },
                }
            };
            match result {
                Ok((mut link, accepted)) => {
                    let kept_member = Some(accepted.member) == rejoin;
                    self.member.send_replace(accepted.member);
                    self.heartbeat_every =
                        Duration::from_millis(accepted.heartbeat_interval_ms.max(1));
                    if !kept_member {
                        // The old member's round and checkpoint no longer count.
                        self.node.unacknowledged_report = None;
                        self.node.unacknowledged_shards.clear();
                    }
                    let mut pending: Vec<NodeMessage> = Vec::new();
                    pending.extend(self.node.ready.clone().map(NodeMessage::Ready));
                    pending.extend(
                        self.node
                            .initial_state
                            .clone()
                            .map(NodeMessage::InitialState),
                    );
                    pending.extend(
                        self.node
                            .unacknowledged_report
                            .clone()
                            .map(NodeMessage::RoundReport),
                    );
                    pending.extend(
                        self.node
                            .unacknowledged_shards
                            .iter()
                            .cloned()
                            .map(NodeMessage::CheckpointShardDurable),
                    );
                    self.tell(Notification::Rejoined {
                        accepted,
                        kept_member,
                    });
                    let mut resent = Ok(());
                    for message in &pending {
                        resent = self.write(&mut link, message).await;
                        if resent.is_err() {
                            break;
                        }
                    }
                    if resent.is_ok() {
                        return Some(link);
                    }
                }
                // Too many joins from this address just now: the next attempt may pass.
                Err(Error::Refused {
                    code: ErrorCode::RateLimited,
                    ..
                }) => {}
                Err(Error::Refused { message, .. }) => {
                    self.tell(Notification::Stopped {
                        reason: format!(
                            "the coordinator refused to take this node back: {message}"
                        ),
                    });
                    return None;
                }
                Err(_) => {}
            }
            if self
                .options
                .give_up_after
                .is_some_and(|limit| since.elapsed() >= limit)
            {
                self.tell(Notification::Stopped {
                    reason: format!(
                        "no connection to the coordinator at {} for {:?}; gave up",
                        self.dialer.addr,
                        since.elapsed()
                    ),
                });
                return None;
            }
            delay = (delay * 2).min(self.options.reconnect_max);
        }
    }
}
