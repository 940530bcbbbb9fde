//! `forge-node join`: a node of a DiLoCo run. It joins the coordinator (which hands out the run
//! config, the replica, the data shard and the round schedule), trains its replica for H inner
//! steps per round, all-reduces the weighted pseudo-gradient with the round's other members
//! over libp2p/QUIC, reports the hash of the resulting global state, and applies the outer step
//! only when the coordinator commits the round.
//!
//! This file is the shell: connections, the event loop, the jobs (state fetch, inner steps,
//! all-reduce, evaluation, checkpoint shards) and printing. What to do when is decided by the
//! node's round state machine in [`crate::round`], which does no I/O.

use crate::p2p::{
    self, AllReduceError, ChunkCodec, PeerNet, PeerNetConfig, StateSnapshot, all_reduce_timeout,
};
use crate::round::{
    Action, Exit, Fetched, Input, ReduceFailure, Reduced, RoundLog, Rounds, RoundsConfig, Trained,
    failed_report,
};
use anyhow::{Context, Result, anyhow, bail};
use forge_coordinator_client::{ClientOptions, CoordinatorClient, Notification};
use forge_protocol::messages::{
    Capabilities, Device as WireDevice, DeviceKind, Digest, GlobalState, JoinAccepted, MemberId,
    Peer, RoundId, RoundOpened, TensorHash,
};
use forge_protocol::quant::{self, Compression, ErrorFeedback};
use forge_protocol::sync::SyncCodec;
use forge_trainer::bench::TrainStepBench;
use forge_trainer::checkpoint::CheckpointDir;
use forge_trainer::config::RunConfig;
use forge_trainer::device::parse_device;
use forge_trainer::diloco::{DilocoConfig, OuterOptimizer, Proposal};
use forge_trainer::models::{ModelConfig, Precision};
use forge_trainer::outer_state::{self, FlatState, OuterCheckpoint, Resumed};
use forge_trainer::parallel::Fault;
use forge_trainer::train::Trainer;
use libp2p::{Multiaddr, PeerId};
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// What `forge-node join` was told on its command line.
#[derive(Debug, Clone)]
pub(crate) struct JoinOptions {
    pub(crate) coordinator: String,
    pub(crate) token: String,
    pub(crate) device: String,
    pub(crate) workdir: PathBuf,
    /// Relative corpus paths in the run config are taken from here.
    pub(crate) data_root: PathBuf,
    /// Address for peer connections; an unspecified IP advertises the one facing the coordinator.
    pub(crate) listen: SocketAddr,
    pub(crate) max_upload_mbps: Option<f64>,
}

/// Runs a node until the run's budget is spent, SIGTERM/SIGINT, or a fatal error.
pub(crate) fn run(opts: JoinOptions) -> Result<()> {
    if let Err(err) = std::fs::create_dir_all(&opts.workdir) {
        // AlreadyExists is what create_dir_all reports when a file is in the way.
        let why = if err.kind() == std::io::ErrorKind::AlreadyExists {
            "it exists and is not a directory; pass --workdir a directory, or a path that does not exist yet".to_string()
        } else {
            err.to_string()
        };
        anyhow::bail!(
            "cannot create the workdir {}: {why}",
            opts.workdir.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(node(opts))
}

async fn node(opts: JoinOptions) -> Result<()> {
    let (stop, shutdown) = shutdown_signal()?;
    let coordinator: SocketAddr = tokio::net::lookup_host(&opts.coordinator)
        .await
        .with_context(|| format!("resolving the coordinator address {}", opts.coordinator))?
        .next()
        .with_context(|| format!("{} resolves to no address", opts.coordinator))?;
    // Peer-to-peer layer first: its peer id and address go into the join.
    let (net, advertised) = start_peer_net(&opts, coordinator).await?;
    let upload = upload_bytes_per_s(&opts);
    let caps = tokio::task::block_in_place(|| {
        capabilities(&opts.device, &net.peer_id(), &advertised, upload)
    })?;
    tracing::info!(
        "peer {} at {advertised}; {:.0} tokens/s on the reference model",
        net.peer_id(),
        caps.tokens_per_s
    );
    let (client, accepted, notes) =
        CoordinatorClient::connect(coordinator, &opts.token, caps, ClientOptions::default())
            .await
            .with_context(|| format!("joining the coordinator at {coordinator}"))?;
    println!("joined {coordinator} as member {}", accepted.member.0);
    let (shell, queue) = Shell::start(&opts, &accepted, net, client, stop)?;
    shell.run(queue, notes, shutdown).await
}

/// SIGINT/SIGTERM as a flag the inner steps check between steps, and as a channel the event
/// loop waits on.
fn shutdown_signal() -> Result<(Arc<AtomicBool>, watch::Receiver<bool>)> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = watch::channel(false);
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let flag = Arc::clone(&stop);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        flag.store(true, Ordering::Relaxed);
        tx.send_replace(true);
    });
    Ok((stop, rx))
}

/// Starts the swarm and listens; returns it with the address peers can reach: the bound port on
/// the IP facing the coordinator (unless `--listen` names an IP).
async fn start_peer_net(
    opts: &JoinOptions,
    coordinator: SocketAddr,
) -> Result<(PeerNet, Multiaddr)> {
    let keypair = p2p::load_or_create_keypair(&opts.workdir)?;
    let mut net_cfg = PeerNetConfig::new(keypair);
    net_cfg.max_upload_bytes_per_s = opts.max_upload_mbps.map(|_| upload_bytes_per_s(opts));
    let (net, event_loop) = p2p::new(net_cfg)?;
    tokio::spawn(event_loop.run());
    let listen_ip = if opts.listen.ip().is_unspecified() {
        local_ip_towards(coordinator)?
    } else {
        opts.listen.ip()
    };
    let bound = net
        .start_listening(p2p::quic_multiaddr(opts.listen))
        .await?;
    let port = bound
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Udp(port) => Some(port),
            _ => None,
        })
        .unwrap_or(opts.listen.port());
    Ok((net, p2p::quic_multiaddr(SocketAddr::new(listen_ip, port))))
}

/// What the node's jobs work on, and the round state machine that says which job comes next.
struct Shell {
    rounds: Rounds<Proposal>,
    trainer: Trainer,
    outer: OuterOptimizer,
    codec: QuantCodec,
    diloco: DilocoConfig,
    net: PeerNet,
    client: CoordinatorClient,
    /// `rounds.jsonl` in the run directory.
    rounds_log: File,
    /// Checkpoint shards this node writes when the coordinator asks, and resumes from after a
    /// whole-cluster restart.
    checkpoints: CheckpointDir,
    /// This node's upload rate in bytes/s, for timeouts.
    bandwidth: f64,
    stop: Arc<AtomicBool>,
    fault: Option<(usize, Fault, u64)>,
}

impl Shell {
    /// Builds the trainer and the outer optimizer from the coordinator's run config, follows
    /// the assignment and resumes from the local checkpoint shard if it holds the run's global
    /// state. Returns the actions to carry out first.
    fn start(
        opts: &JoinOptions,
        accepted: &JoinAccepted,
        net: PeerNet,
        client: CoordinatorClient,
        stop: Arc<AtomicBool>,
    ) -> Result<(Shell, VecDeque<Action<Proposal>>)> {
        let (cfg, diloco) = local_config(&accepted.run_config, opts)?;
        let total_steps = cfg.total_steps();
        let mut trainer = tokio::task::block_in_place(|| Trainer::new(cfg))?;
        let outer = OuterOptimizer::new(trainer.var_store(), diloco)?;
        let codec = QuantCodec {
            compression: diloco.compression,
            feedback: ErrorFeedback::new(diloco.compression, outer.numel())?,
        };
        let out_dir = trainer.config().train.out_dir.clone();
        let rounds_path = out_dir.join("rounds.jsonl");
        let rounds_log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&rounds_path)
            .with_context(|| format!("opening {}", rounds_path.display()))?;
        let config = RoundsConfig {
            total_steps,
            eval_every_rounds: diloco.eval_every_rounds,
            numel: outer.numel() as u64,
        };
        let (rounds, first) = Rounds::new(config, accepted, Instant::now());
        let checkpoints = CheckpointDir::new(
            out_dir.join("diloco-checkpoints"),
            trainer.config().checkpoint.keep,
        );
        let mut shell = Shell {
            rounds,
            codec,
            diloco,
            net,
            client,
            rounds_log,
            checkpoints,
            bandwidth: upload_bytes_per_s(opts) as f64,
            stop,
            fault: test_fault()?,
            outer,
            trainer: {
                // The assignment's data shard is set before a resume restores its position.
                for action in &first {
                    if let Action::FollowShard { index, count } = action {
                        trainer.set_data_shard(*index as usize, *count as usize)?;
                    }
                }
                trainer
            },
        };
        let held = shell.resume(&accepted.global)?;
        let resumed = Input::Resumed {
            held,
            step: shell.trainer.step(),
        };
        let queue = shell.rounds.handle(Instant::now(), resumed).into();
        Ok((shell, queue))
    }

    /// The global version this node holds at start: 0 for a new run; the run's version when the
    /// newest local checkpoint shard holds it (then served to peers that lost theirs); None when
    /// the node must fetch it from its peers.
    fn resume(&mut self, global: &GlobalState) -> Result<Option<u64>> {
        if global.version == 0 {
            return Ok(Some(0));
        }
        let resumed = tokio::task::block_in_place(|| {
            resume_checkpoint(
                &self.checkpoints,
                global,
                &mut self.trainer,
                &mut self.outer,
            )
        });
        match resumed {
            Ok(Some(dir)) => {
                let round = global.round.map_or(0, |r| r.0);
                publish_state(&self.net, &self.outer, &self.trainer, global.version, round)?;
                println!(
                    "resumed global state v{} from {} (inner step {})",
                    global.version,
                    dir.display(),
                    self.trainer.step()
                );
                Ok(Some(global.version))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                println!("not resuming from the local checkpoint: {e:#}; fetching from peers");
                Ok(None)
            }
        }
    }

    /// The event loop: carries out the state machine's actions, feeding each job's result back,
    /// and waits for the coordinator or a signal when there is nothing to do.
    async fn run(
        mut self,
        mut queue: VecDeque<Action<Proposal>>,
        mut notes: mpsc::UnboundedReceiver<Notification>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut stop_seen = false;
        loop {
            while let Some(action) = queue.pop_front() {
                if let Action::Exit(exit) = action {
                    return self.exit(exit).await;
                }
                if let Some(input) = self.carry_out(action, &mut notes, &mut queue).await? {
                    queue.extend(self.rounds.handle(Instant::now(), input));
                }
            }
            let input = tokio::select! {
                note = notes.recv() => note.map_or(Input::CoordinatorGone, Input::Note),
                _ = shutdown.changed(), if !stop_seen => {
                    stop_seen = true;
                    // A round announced just before the signal is still finished.
                    while let Ok(note) = notes.try_recv() {
                        queue.extend(self.rounds.handle(Instant::now(), Input::Note(note)));
                    }
                    Input::StopRequested
                }
            };
            queue.extend(self.rounds.handle(Instant::now(), input));
        }
    }

    /// Carries out one action; a job's result comes back as the next input.
    async fn carry_out(
        &mut self,
        action: Action<Proposal>,
        notes: &mut mpsc::UnboundedReceiver<Notification>,
        queue: &mut VecDeque<Action<Proposal>>,
    ) -> Result<Option<Input<Proposal>>> {
        match action {
            Action::Say(line) => println!("{line}"),
            Action::SetMembers(peers) => self.net.set_members(peers_of(&peers)?).await?,
            Action::FollowShard { index, count } => self
                .trainer
                .set_data_shard(index as usize, count as usize)?,
            Action::FetchState(open) => return Ok(Some(self.fetch(&open).await)),
            Action::Train(round) => {
                tracing::debug!("{round}: inner steps from step {}", self.trainer.step());
                let trained = self.train()?;
                // What the coordinator said while this node trained (a participant declared
                // gone) decides whether the all-reduce starts at all.
                while let Ok(note) = notes.try_recv() {
                    queue.extend(self.rounds.handle(Instant::now(), Input::Note(note)));
                }
                return Ok(Some(trained));
            }
            Action::AllReduce {
                round,
                participants,
                tokens,
            } => {
                let input = self.all_reduce(round, &participants, tokens, notes, queue);
                return Ok(Some(input.await?));
            }
            Action::AbortAllReduce {
                round,
                peer,
                reason,
            } => {
                let failure = failure_of(&declared_gone(round, &peer, &reason), 0.0);
                return Ok(Some(Input::Reduced(Err(failure))));
            }
            Action::Report(report) => self.client.report(report).await?,
            Action::ApplyOuterStep(proposal) => {
                self.outer.commit(proposal, self.trainer.var_store());
                // The outer step happened once, on worker 0: every local worker takes it.
                self.trainer.broadcast_params()?;
            }
            Action::Evaluate => {
                let (loss, bpb) = tokio::task::block_in_place(|| self.trainer.evaluate());
                return Ok(Some(Input::Evaluated { loss, bpb }));
            }
            Action::PublishState { version, round } => {
                publish_state(&self.net, &self.outer, &self.trainer, version, round)?
            }
            Action::WriteCheckpoint {
                round,
                shard,
                version,
                tensor_hashes,
            } => {
                tracing::debug!("{round}: writing checkpoint shard {shard} of v{version}");
                let meta = OuterCheckpoint {
                    version,
                    round: round.0,
                    tensor_hashes,
                };
                let written = tokio::task::block_in_place(|| {
                    write_checkpoint(&self.checkpoints, &self.trainer, &self.outer, &meta)
                });
                let written = written
                    .map(|dir| dir.display().to_string())
                    .map_err(|e| format!("{e:#}"));
                return Ok(Some(Input::CheckpointWritten(written)));
            }
            Action::ShardDurable(durable) => self.client.shard_durable(durable).await?,
            Action::Record(log) => self.record(&log)?,
            Action::Exit(_) => unreachable!("the event loop takes exits"),
        }
        Ok(None)
    }

    /// Fetches the round's global state from its other participants.
    async fn fetch(&mut self, open: &RoundOpened) -> Input<Proposal> {
        let me = self.rounds.member();
        let fetched = fetch_global_state(
            open,
            me,
            &self.net,
            &mut self.trainer,
            &mut self.outer,
            self.bandwidth,
        )
        .await;
        Input::StateFetched(match fetched {
            Ok((seconds, round)) => Ok(Fetched {
                step: self.trainer.step(),
                made_by_round: round,
                seconds,
            }),
            Err(e) => Err(format!("{e:#}")),
        })
    }

    /// The round's inner steps: H of them, fewer at the end of the budget or when the round's
    /// time budget runs out, none once stopped.
    fn train(&mut self) -> Result<Input<Proposal>> {
        if let Some((rank, fault)) = self
            .fault
            .take_if(|(_, _, at)| self.trainer.step() >= *at)
            .map(|(rank, fault, _)| (rank, fault))
        {
            self.trainer.inject_fault(rank, fault)?;
        }
        let budget = (self.diloco.round_seconds > 0.0)
            .then(|| Duration::from_secs_f64(self.diloco.round_seconds));
        let left = self
            .trainer
            .config()
            .total_steps()
            .saturating_sub(self.trainer.step());
        let steps = self.diloco.round_steps(self.trainer.step()).min(left);
        let inner =
            tokio::task::block_in_place(|| self.trainer.inner_steps(steps, budget, &self.stop));
        Ok(Input::Trained(
            inner
                .map(|inner| Trained {
                    steps: inner.steps,
                    tokens: inner.tokens,
                    mean_loss: inner.mean_loss(),
                    seconds: inner.seconds,
                    step: self.trainer.step(),
                })
                .map_err(|e| format!("{e:#}")),
        ))
    }

    /// All-reduces the pseudo-gradient weighted by this node's tokens and proposes the outer
    /// step. Notes that arrive meanwhile go to the state machine; one that declares a
    /// participant gone gives the all-reduce up.
    async fn all_reduce(
        &mut self,
        round: RoundId,
        participants: &[Peer],
        tokens: u64,
        notes: &mut mpsc::UnboundedReceiver<Notification>,
        queue: &mut VecDeque<Action<Proposal>>,
    ) -> Result<Input<Proposal>> {
        let members = peers_of(participants)?;
        let mut data = self.outer.pseudo_gradient(self.trainer.var_store());
        let weight = tokens.max(1) as f64;
        for v in &mut data {
            *v *= weight as f32;
        }
        let encoded_bytes = self.codec.compression.codec.body_len(data.len()) as u64;
        let request = p2p::AllReduceRequest {
            round: round.0,
            members: members.iter().map(|(id, _)| *id).collect(),
            data,
            weight,
            timeout: all_reduce_timeout(encoded_bytes, members.len(), self.bandwidth),
        };
        let started = Instant::now();
        let result = {
            let all_reduce = self.net.all_reduce(request, &mut self.codec);
            tokio::pin!(all_reduce);
            loop {
                tokio::select! {
                    result = &mut all_reduce => break result,
                    Some(note) = notes.recv() => {
                        let mut abort = None;
                        for action in self.rounds.handle(Instant::now(), Input::Note(note)) {
                            match action {
                                Action::AbortAllReduce { peer, reason, .. } => {
                                    abort = Some(declared_gone(round, &peer, &reason));
                                }
                                other => queue.push_back(other),
                            }
                        }
                        if let Some(e) = abort {
                            break Err(e);
                        }
                    }
                }
            }
        };
        let sync_s = started.elapsed().as_secs_f64();
        let out = match result {
            Ok(out) => out,
            Err(e) => return Ok(Input::Reduced(Err(failure_of(&e, sync_s)))),
        };
        let proposal = self.outer.propose(&out.average)?;
        self.net.recycle_average(out.average);
        Ok(Input::Reduced(Ok(Reduced {
            params_hash: proposal.params_hash,
            tensor_hashes: proposal
                .tensor_hashes
                .iter()
                .map(|(key, d)| TensorHash {
                    key: key.clone(),
                    digest: Digest(*d),
                })
                .collect(),
            proposal,
            bytes_sent: out.bytes_sent,
            bytes_received: out.bytes_received,
            total_weight: out.total_weight,
            sync_s,
        })))
    }

    /// Appends the round to `rounds.jsonl` and prints it.
    fn record(&mut self, log: &RoundLog) -> Result<()> {
        writeln!(self.rounds_log, "{}", serde_json::to_string(log)?)?;
        println!("{}", log.line());
        Ok(())
    }

    async fn exit(self, exit: Exit) -> Result<()> {
        match exit {
            Exit::Leave(reason) => {
                println!("leaving: {reason}");
                self.client.leave(&reason).await.ok();
                let (loss, bpb) = tokio::task::block_in_place(|| self.trainer.evaluate());
                println!(
                    "final validation loss {loss:.4} ({bpb:.4} bits per byte) after {} inner steps",
                    self.trainer.step()
                );
                println!(
                    "sample: {}",
                    tokio::task::block_in_place(|| self.trainer.sample())
                );
                Ok(())
            }
            Exit::Failed { round, reason } => {
                let failed = failed_report(round, reason.clone(), None, None);
                self.client.report(failed).await.ok();
                self.client
                    .leave(&format!("node failed: {reason}"))
                    .await
                    .ok();
                Err(anyhow!(reason))
            }
            Exit::Stopped(reason) => Err(anyhow!(reason)),
        }
    }
}

/// The error of an all-reduce given up because the coordinator declared a participant gone.
fn declared_gone(round: RoundId, peer: &str, reason: &str) -> AllReduceError {
    match peer.parse() {
        Ok(peer) => AllReduceError::PeerFailed {
            round: round.0,
            peer,
            reason: format!("the coordinator declared it gone: {reason}"),
        },
        Err(_) => {
            AllReduceError::InvalidRequest(format!("participant peer id {peer} does not parse"))
        }
    }
}

/// A failed all-reduce as the state machine sees it: why, and whom it blames.
fn failure_of(e: &AllReduceError, sync_s: f64) -> ReduceFailure {
    ReduceFailure {
        reason: e.to_string(),
        peer: e.peer().map(|p| p.to_string()),
        rejected: matches!(e, AllReduceError::Rejected { .. }),
        sync_s,
    }
}

/// The node's codec: the run's compression, with error feedback over the whole flattened
/// pseudo-gradient (chunks are ranges of it).
struct QuantCodec {
    compression: Compression,
    feedback: ErrorFeedback,
}

impl ChunkCodec for QuantCodec {
    fn encode_contribution(
        &mut self,
        offset: usize,
        x: &[f32],
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<()> {
        self.feedback.compress_at(offset, x, out)
    }

    fn encode_result(&self, x: &[f32], out: &mut Vec<u8>) -> forge_protocol::Result<()> {
        quant::encode_into(x, &self.compression, out)
    }

    fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> forge_protocol::Result<()> {
        quant::decode_into(bytes, out, &self.compression)
    }

    fn id(&self) -> (SyncCodec, bool) {
        self.compression.sync_codec()
    }
}

/// The local IP a packet to `target` would leave from (no packet is sent).
fn local_ip_towards(target: SocketAddr) -> Result<IpAddr> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()?;
    let socket = std::net::UdpSocket::bind(bind)?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

/// Devices and a measured speed: tokens/s of a short train step of the `tiny` reference model
/// on the chosen device (the run's own model is not known before joining).
fn capabilities(
    device_spec: &str,
    peer_id: &PeerId,
    addr: &Multiaddr,
    upload: u64,
) -> Result<Capabilities> {
    let device = parse_device(device_spec)?;
    let memory = |key: &str| -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024)
    };
    let devices = match device {
        tch::Device::Cuda(i) => vec![WireDevice {
            kind: DeviceKind::Cuda,
            name: forge_trainer::flops::cuda_device_name(i).unwrap_or_else(|| format!("cuda:{i}")),
            memory_bytes: 0,
        }],
        _ => vec![WireDevice {
            kind: DeviceKind::Cpu,
            name: "cpu".into(),
            memory_bytes: memory("MemTotal:"),
        }],
    };
    let bench = TrainStepBench {
        model: ModelConfig::preset("tiny", None)?,
        batch: 4,
        seq_len: 64,
        device,
        precision: if device == tch::Device::Cpu {
            Precision::Fp32
        } else {
            Precision::Bf16
        },
        warmup: 1,
        steps: 2,
        threads: None,
        peak_tflops: None,
        seed: 0,
    };
    let speed = bench.run().context("measuring this node's speed")?;
    Ok(Capabilities {
        devices,
        tokens_per_s: speed.tokens_per_s,
        upload_bytes_per_s: upload,
        download_bytes_per_s: upload,
        peer_id: peer_id.to_string(),
        listen_addrs: vec![addr.to_string()],
    })
}

/// The run config the coordinator handed out, adapted to this machine: run directory and
/// caches under the workdir, corpus paths under the data root, this node's device.
fn local_config(text: &str, opts: &JoinOptions) -> Result<(RunConfig, DilocoConfig)> {
    let mut cfg = RunConfig::parse(text, Path::new("<run config from the coordinator>"))?;
    let Some(diloco) = cfg.diloco else {
        bail!(
            "the coordinator's run config has no [diloco] section; add one (see configs/diloco-tiny-cpu.toml)"
        );
    };
    let rebase = |p: &PathBuf| {
        if p.is_absolute() {
            p.clone()
        } else {
            opts.data_root.join(p)
        }
    };
    cfg.data.train = cfg.data.train.iter().map(rebase).collect();
    cfg.data.val = cfg.data.val.iter().map(rebase).collect();
    if let forge_trainer::data::TokenizerConfig::Path(p) = &cfg.data.tokenizer {
        cfg.data.tokenizer = forge_trainer::data::TokenizerConfig::Path(rebase(p));
    }
    cfg.data.cache_dir = opts.workdir.join("cache");
    cfg.train.out_dir = opts.workdir.join("run");
    cfg.train.device = opts.device.clone();
    // The global state lives with the group: a restarted node takes it from its peers (state
    // transfer), or from its own checkpoint shard only when that holds the version the
    // coordinator names (see resume_checkpoint), never from whatever it saved last.
    cfg.checkpoint.resume = false;
    Ok((cfg, diloco))
}

fn peers_of(participants: &[Peer]) -> Result<Vec<(PeerId, Vec<Multiaddr>)>> {
    participants
        .iter()
        .map(|p| {
            let id: PeerId = p.peer_id.parse().with_context(|| {
                format!(
                    "member {} sent an invalid peer id {:?}",
                    p.member.0, p.peer_id
                )
            })?;
            let addrs = p
                .listen_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect();
            Ok((id, addrs))
        })
        .collect()
}

fn upload_bytes_per_s(opts: &JoinOptions) -> u64 {
    // Without a cap, assume gigabit Ethernet for timeouts and the coordinator's planning.
    opts.max_upload_mbps
        .map_or(125_000_000, |m| (m * 1e6 / 8.0) as u64)
}

/// A fault to inject into a data-parallel worker once the node reaches an inner step, for
/// fault-tolerance tests and chaos runs: `FORGE_TEST_WORKER_FAULT=panic@STEP` or `hang@STEP`
/// (worker 1; the hang lasts an hour).
fn test_fault() -> Result<Option<(usize, forge_trainer::parallel::Fault, u64)>> {
    let Ok(spec) = std::env::var("FORGE_TEST_WORKER_FAULT") else {
        return Ok(None);
    };
    let (kind, step) = spec
        .split_once('@')
        .with_context(|| format!("FORGE_TEST_WORKER_FAULT={spec}: use panic@STEP or hang@STEP"))?;
    let step: u64 = step
        .parse()
        .with_context(|| format!("FORGE_TEST_WORKER_FAULT={spec}: STEP must be a number"))?;
    let fault = match kind {
        "panic" => forge_trainer::parallel::Fault::Panic,
        "hang" => forge_trainer::parallel::Fault::Hang(Duration::from_secs(3600)),
        _ => bail!("FORGE_TEST_WORKER_FAULT={spec}: the fault is panic or hang"),
    };
    Ok(Some((1, fault, step)))
}

/// Writes this node's checkpoint shard (the whole model: global parameters, outer momentum,
/// the inner optimizer, data positions, step) atomically.
fn write_checkpoint(
    ckpts: &CheckpointDir,
    trainer: &Trainer,
    outer: &OuterOptimizer,
    meta: &OuterCheckpoint,
) -> Result<PathBuf> {
    Ok(outer_state::write(ckpts, trainer, outer, meta)?)
}

/// Loads the newest local checkpoint shard if it holds `global` (same version, every tensor's
/// digest equal to the committed hash); `None` when there is none or it holds another version.
fn resume_checkpoint(
    ckpts: &CheckpointDir,
    global: &forge_protocol::messages::GlobalState,
    trainer: &mut Trainer,
    outer: &mut OuterOptimizer,
) -> Result<Option<PathBuf>> {
    match outer_state::resume(ckpts, global, trainer, outer)? {
        Resumed::Shard(dir) => Ok(Some(dir)),
        Resumed::OtherVersion { dir, version } => {
            println!(
                "the local checkpoint {} holds global version {version}, the run is at {}",
                dir.display(),
                global.version
            );
            Ok(None)
        }
        Resumed::NoCheckpoint => Ok(None),
    }
}

/// Serves this node's committed global state (`version`) to peers that join or fell behind.
fn publish_state(
    net: &PeerNet,
    outer: &OuterOptimizer,
    trainer: &Trainer,
    version: u64,
    round: u64,
) -> Result<()> {
    let state = outer_state::snapshot(trainer, outer)?;
    net.publish_state(Some(Arc::new(StateSnapshot {
        version,
        round,
        step: state.step,
        tokens: state.tokens,
        tensors: state.tensors,
    })));
    Ok(())
}

/// Fetches global state `open.global_version` (parameters and outer momentum, checked against
/// the coordinator's hashes) from the round's other participants and takes it, with the run's
/// schedule position. Returns the seconds it took and the round that made that state.
async fn fetch_global_state(
    open: &RoundOpened,
    me: MemberId,
    net: &PeerNet,
    trainer: &mut Trainer,
    outer: &mut OuterOptimizer,
    bandwidth: f64,
) -> Result<(f64, u64)> {
    let started = Instant::now();
    let peers: Vec<PeerId> = peers_of(&open.participants)?
        .into_iter()
        .zip(&open.participants)
        .filter(|(_, p)| p.member != me)
        .map(|((id, _), _)| id)
        .collect();
    let expected = outer_state::expected_tensors(&open.tensor_hashes);
    if expected.is_empty() || peers.is_empty() {
        bail!(
            "round {} starts from global state v{} but there is {} to check it against or fetch \
             it from",
            open.round.0,
            open.global_version,
            if peers.is_empty() {
                "no peer"
            } else {
                "no hash"
            }
        );
    }
    let state_bytes = 8 * outer.numel() as u64;
    let timeout = all_reduce_timeout(state_bytes, 2, bandwidth);
    // Peers publish a version when they process its commit, which can be a moment after this
    // node hears of the round: retry for a while before giving up.
    let give_up = Instant::now() + timeout;
    let (snapshot, stats) = loop {
        match net
            .fetch_state(&peers, open.global_version, &expected, timeout)
            .await
        {
            Ok(fetched) => break fetched,
            Err(e) if Instant::now() < give_up => {
                tracing::info!(
                    "fetching global state v{}: {e}; retrying",
                    open.global_version
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let state = FlatState {
        step: snapshot.step,
        tokens: snapshot.tokens,
        tensors: snapshot.tensors,
    };
    tokio::task::block_in_place(|| outer_state::restore(trainer, outer, &state))?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "round {}: fetched global state v{} ({:.1} MB from {} peers, {} chunks fetched again) in \
         {seconds:.2} s; continuing at inner step {}",
        open.round.0,
        open.global_version,
        stats.bytes as f64 / 1e6,
        stats.per_peer_bytes.iter().filter(|(_, b)| *b > 0).count(),
        stats.refetched_chunks,
        state.step
    );
    Ok((seconds, snapshot.round))
}
