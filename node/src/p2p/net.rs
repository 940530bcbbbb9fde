//! The swarm and its owner: [`PeerNet`] is the handle the node uses, sending [`Command`]s over a
//! bounded channel to the [`EventLoop`] that owns the libp2p swarm (QUIC, allowlist, address
//! book, raw streams), as in rust-libp2p's file-sharing example.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::core::Endpoint;
use libp2p::core::transport::{ListenerId, PortUse};
use libp2p::identity::Keypair;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, SwarmEvent, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dial_opts::DialOpts, dial_opts::PeerCondition,
    dummy,
};
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::all_reduce::Scratch;
use super::error::{Error, Result};
use super::inbox::Inbox;
use super::pipeline::{PIPELINE, PipelineInbox};
use super::state::{STATE, StateServer};
use super::wire::{SYNC, UploadLimiter};

/// Values per chunk on the wire by default: 4 MiB of fp32, large enough to amortise headers and
/// small enough that a receiver holds little more than one chunk per peer.
pub(crate) const DEFAULT_CHUNK_VALUES: usize = 1 << 20;

/// Largest chunk a sender cuts: its fp32 payload stays under the protocol's 64 MiB chunk limit.
const MAX_CHUNK_VALUES: usize = 1 << 22;

/// Connections without streams are kept this long, so rounds minutes apart reuse them.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(600);

/// Commands waiting for the event loop; senders wait when it is busy.
const COMMAND_QUEUE: usize = 16;

/// Connection events buffered for running all-reduces; one that lags falls back on its timeout.
const PEER_EVENT_QUEUE: usize = 64;

/// A peer's first connection opened, or its last one closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerEvent {
    Connected(PeerId),
    Disconnected(PeerId),
}

/// How the peer-to-peer layer of a node is set up.
#[derive(Debug, Clone)]
pub(crate) struct PeerNetConfig {
    /// The node's identity (see [`super::load_or_create_keypair`]).
    pub(crate) keypair: Keypair,
    /// Cap on the node's total sync upload as the link sees it (framing and acknowledgements
    /// included), so it does not flood a home LAN; `None` is no cap. Set to the uplink's rate, it
    /// also paces the node just below the point where a switch port's queue fills and drops.
    pub(crate) max_upload_bytes_per_s: Option<u64>,
    /// Values per chunk on the wire; every member of a run must use the same value.
    pub(crate) chunk_values: usize,
}

impl PeerNetConfig {
    pub(crate) fn new(keypair: Keypair) -> PeerNetConfig {
        PeerNetConfig {
            keypair,
            max_upload_bytes_per_s: None,
            chunk_values: DEFAULT_CHUNK_VALUES,
        }
    }
}

/// Handle to the node's peer-to-peer layer; cheap to clone. The event loop stops when the last
/// handle is dropped, closing every connection.
#[derive(Clone)]
pub(crate) struct PeerNet {
    pub(super) local_peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    pub(super) control: libp2p_stream::Control,
    pub(super) inbox: Arc<Inbox>,
    pub(super) limiter: Option<Arc<UploadLimiter>>,
    pub(super) chunk_values: usize,
    /// So an all-reduce fails at once when a member leaves.
    pub(super) peer_events: broadcast::Sender<PeerEvent>,
    /// The state this node serves to joiners over `/forge/state/1`.
    pub(super) state: Arc<StateServer>,
    /// Buffers one all-reduce leaves for the next.
    pub(super) scratch: Arc<std::sync::Mutex<Scratch>>,
    /// Pipeline streams opened to this node, until a stage link takes them.
    pub(super) pipeline_inbox: Arc<PipelineInbox>,
}

impl std::fmt::Debug for PeerNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerNet")
            .field("local_peer_id", &self.local_peer_id)
            .field("chunk_values", &self.chunk_values)
            .finish_non_exhaustive()
    }
}

/// Builds the swarm. Spawn [`EventLoop::run`], then call [`PeerNet::start_listening`].
pub(crate) fn new(config: PeerNetConfig) -> Result<(PeerNet, EventLoop)> {
    if config.chunk_values == 0 || config.chunk_values > MAX_CHUNK_VALUES {
        return Err(Error::Config(format!(
            "chunk_values {} must be between 1 and {MAX_CHUNK_VALUES}",
            config.chunk_values
        )));
    }
    let local_peer_id = config.keypair.public().to_peer_id();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair)
        .with_tokio()
        .with_quic()
        .with_behaviour(|_| Behaviour {
            allowed: allow_block_list::Behaviour::default(),
            addresses: AddressBook::default(),
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|err| Error::Config(format!("cannot build the swarm: {err}")))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();
    let mut control = swarm.behaviour().stream.new_control();
    let incoming = control
        .accept(SYNC)
        .map_err(|err| Error::Config(format!("cannot accept {SYNC}: {err}")))?;
    let state_incoming = control
        .accept(STATE)
        .map_err(|err| Error::Config(format!("cannot accept {STATE}: {err}")))?;
    let pipeline_incoming = control
        .accept(PIPELINE)
        .map_err(|err| Error::Config(format!("cannot accept {PIPELINE}: {err}")))?;
    let pipeline_inbox = Arc::new(PipelineInbox::default());
    let inbox = Arc::new(Inbox::default());
    let (commands, command_receiver) = mpsc::channel(COMMAND_QUEUE);
    let (peer_events, _) = broadcast::channel(PEER_EVENT_QUEUE);
    let limiter = config
        .max_upload_bytes_per_s
        .map(|cap| Arc::new(UploadLimiter::for_link(cap)));
    let (state, serving) = StateServer::new(limiter.clone());
    let state = Arc::new(state);
    let net = PeerNet {
        local_peer_id,
        commands,
        control,
        inbox: Arc::clone(&inbox),
        limiter,
        chunk_values: config.chunk_values,
        peer_events: peer_events.clone(),
        state: Arc::clone(&state),
        scratch: Arc::default(),
        pipeline_inbox: Arc::clone(&pipeline_inbox),
    };
    let event_loop = EventLoop {
        swarm,
        peer_events,
        commands: command_receiver,
        incoming,
        inbox,
        state_incoming,
        state,
        pipeline_incoming,
        pipeline_inbox,
        _serving: serving,
        pending_listens: HashMap::new(),
    };
    Ok((net, event_loop))
}

/// The QUIC multiaddr of an IP:port (`/ip4/…/udp/…/quic-v1`).
pub(crate) fn quic_multiaddr(addr: std::net::SocketAddr) -> Multiaddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => libp2p::multiaddr::Protocol::Ip4(ip),
        std::net::IpAddr::V6(ip) => libp2p::multiaddr::Protocol::Ip6(ip),
    };
    Multiaddr::empty()
        .with(ip)
        .with(libp2p::multiaddr::Protocol::Udp(addr.port()))
        .with(libp2p::multiaddr::Protocol::QuicV1)
}

impl PeerNet {
    /// The libp2p peer id this node registers with the coordinator.
    pub(crate) fn peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// Listens on `addr` (for example `/ip4/0.0.0.0/udp/0/quic-v1`); returns the first address
    /// actually bound, with the port the OS picked.
    pub(crate) async fn start_listening(&self, addr: Multiaddr) -> Result<Multiaddr> {
        let (reply, response) = oneshot::channel();
        self.send(Command::StartListening { addr, reply }).await?;
        response.await.map_err(|_| Error::Stopped)?
    }

    /// Replaces the allowlist with the run's members (the coordinator's list for the current
    /// run) and dials those not connected yet. Connections to peers no longer listed are closed.
    pub(crate) async fn set_members(&self, members: Vec<(PeerId, Vec<Multiaddr>)>) -> Result<()> {
        let (reply, response) = oneshot::channel();
        self.send(Command::SetMembers { members, reply }).await?;
        response.await.map_err(|_| Error::Stopped)
    }

    /// Peers with at least one open connection (tests check the allowlist with it; the
    /// benchmark waits for its members with it).
    pub(crate) async fn connected_peers(&self) -> Result<Vec<PeerId>> {
        let (reply, response) = oneshot::channel();
        self.send(Command::ConnectedPeers { reply }).await?;
        response.await.map_err(|_| Error::Stopped)
    }

    async fn send(&self, command: Command) -> Result<()> {
        self.commands
            .send(command)
            .await
            .map_err(|_| Error::Stopped)
    }
}

#[derive(Debug)]
enum Command {
    StartListening {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<Multiaddr>>,
    },
    SetMembers {
        members: Vec<(PeerId, Vec<Multiaddr>)>,
        reply: oneshot::Sender<()>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
}

#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Behaviour {
    /// First, so connections from peers outside the run are denied before anything else sees
    /// them.
    allowed: allow_block_list::Behaviour<AllowedPeers>,
    addresses: AddressBook,
    stream: libp2p_stream::Behaviour,
}

/// Owns the swarm; runs until every [`PeerNet`] handle is dropped.
pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    incoming: libp2p_stream::IncomingStreams,
    inbox: Arc<Inbox>,
    state_incoming: libp2p_stream::IncomingStreams,
    state: Arc<StateServer>,
    pipeline_incoming: libp2p_stream::IncomingStreams,
    pipeline_inbox: Arc<PipelineInbox>,
    /// Dropped with the event loop, which ends the streams being served.
    _serving: watch::Sender<()>,
    peer_events: broadcast::Sender<PeerEvent>,
    pending_listens: HashMap<ListenerId, oneshot::Sender<Result<Multiaddr>>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("local_peer_id", self.swarm.local_peer_id())
            .finish_non_exhaustive()
    }
}

impl EventLoop {
    pub(crate) async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.handle_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => return,
                },
                Some((peer, stream)) = self.incoming.next() => {
                    // Reading the first header may take a while; the accept queue must not wait
                    // for it, or libp2p drops the streams behind it.
                    tokio::spawn(Arc::clone(&self.inbox).handshake(peer, stream));
                }
                // Served in a task per stream, for the same reason.
                Some((peer, stream)) = self.state_incoming.next() => self.state.accept(peer, stream),
                Some((peer, stream)) = self.pipeline_incoming.next() => {
                    self.pipeline_inbox.accept(peer, stream);
                }
            }
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if let Some(reply) = self.pending_listens.remove(&listener_id) {
                    let _ = reply.send(Ok(address));
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(reply) = self.pending_listens.remove(&listener_id) {
                    let reason = match reason {
                        Ok(()) => "listener closed".to_string(),
                        Err(err) => error_chain(&err),
                    };
                    let _ = reply.send(Err(Error::Listen {
                        addr: format!("listener {listener_id:?}"),
                        reason,
                    }));
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, "peer connected");
                if num_established.get() == 1 {
                    // No receiver (no all-reduce running) is fine.
                    let _ = self.peer_events.send(PeerEvent::Connected(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                cause,
                num_established,
                ..
            } => {
                tracing::debug!(peer = %peer_id, ?cause, "peer connection closed");
                if num_established == 0 {
                    let _ = self.peer_events.send(PeerEvent::Disconnected(peer_id));
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "incoming connection failed");
            }
            _ => {}
        }
    }

    fn handle_command(&mut self, command: Command) {
        match command {
            Command::StartListening { addr, reply } => match self.swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    self.pending_listens.insert(id, reply);
                }
                Err(err) => {
                    let _ = reply.send(Err(Error::Listen {
                        addr: addr.to_string(),
                        reason: error_chain(&err),
                    }));
                }
            },
            Command::SetMembers { members, reply } => {
                self.set_members(members);
                let _ = reply.send(());
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
        }
    }

    fn set_members(&mut self, members: Vec<(PeerId, Vec<Multiaddr>)>) {
        let local = *self.swarm.local_peer_id();
        let wanted: HashSet<PeerId> = members.iter().map(|(peer, _)| *peer).collect();
        let behaviour = self.swarm.behaviour_mut();
        let dropped: Vec<PeerId> = behaviour
            .allowed
            .allowed_peers()
            .difference(&wanted)
            .copied()
            .collect();
        for peer in dropped {
            // Also closes every connection to it.
            behaviour.allowed.disallow_peer(peer);
        }
        behaviour.addresses.replace(&members, local);
        for (peer, _) in &members {
            behaviour.allowed.allow_peer(*peer);
        }
        for (peer, addrs) in members {
            if peer == local || addrs.is_empty() {
                continue;
            }
            let dial = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(err) = self.swarm.dial(dial) {
                // Not fatal: the all-reduce dials again when it opens a stream.
                tracing::debug!(%peer, %err, "cannot dial member");
            }
        }
    }
}

/// Where each member listens, so a stream to a member that is not connected (any more) can dial
/// it; libp2p asks behaviours for addresses when it dials by peer id alone.
#[derive(Debug, Default)]
struct AddressBook {
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
}

impl AddressBook {
    fn replace(&mut self, members: &[(PeerId, Vec<Multiaddr>)], local: PeerId) {
        self.addresses = members
            .iter()
            .filter(|(peer, _)| *peer != local)
            .map(|(peer, addrs)| (*peer, addrs.clone()))
            .collect();
    }
}

impl NetworkBehaviour for AddressBook {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> std::result::Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        maybe_peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> std::result::Result<Vec<Multiaddr>, ConnectionDenied> {
        Ok(maybe_peer
            .and_then(|peer| self.addresses.get(&peer))
            .cloned()
            .unwrap_or_default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> std::result::Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// An error with its sources, `a: b: c`; some transport errors print nothing themselves and keep
/// the cause (an address that is not on this machine) in a source.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.retain(|part| !part.is_empty());
    if parts.is_empty() {
        format!("{err:?}")
    } else {
        parts.join(": ")
    }
}
