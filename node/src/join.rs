//! `forge-node join`: a node of a DiLoCo run. It joins the coordinator (which hands out the run
//! config, the replica, the data shard and the round schedule), trains its replica for H inner
//! steps per round, all-reduces the weighted pseudo-gradient with the round's other members
//! over libp2p/QUIC, reports the hash of the resulting global state, and applies the outer step
//! only when the coordinator commits the round.

use crate::p2p::{
    self, AllReduceError, AllReduceOutput, AllReduceRequest, ChunkCodec, PeerNet, PeerNetConfig,
    StateSnapshot, all_reduce_timeout,
};
use anyhow::{Context, Result, bail};
use forge_coordinator::client::{ClientOptions, CoordinatorClient, Notification};
use forge_protocol::messages::{
    Assignment, Capabilities, CheckpointShardDurable, CoordinatorMessage, Device as WireDevice,
    DeviceKind, Digest, MemberId, OuterStep, Peer, RoundClosed, RoundId, RoundOpened, RoundOutcome,
    RoundReport, TensorHash,
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
use forge_trainer::train::Trainer;
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use std::collections::VecDeque;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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

/// One line of `rounds.jsonl` in the node's run directory.
#[derive(Debug, Clone, Serialize)]
struct RoundLog {
    round: u64,
    inner_steps: u64,
    step: u64,
    tokens: u64,
    loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_bpb: Option<f64>,
    members: usize,
    /// Tokens all members processed this round (the all-reduce's total weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    group_tokens: Option<f64>,
    outcome: String,
    bytes_sent: u64,
    bytes_received: u64,
    /// Bytes an fp32 all-reduce of the same parameters would send (2(K-1)/K × 4 × params).
    fp32_bytes: u64,
    sync_s: f64,
    inner_s: f64,
    /// Seconds spent fetching the global state from peers before this round (joiners, and
    /// nodes that missed a commit).
    #[serde(skip_serializing_if = "Option::is_none")]
    state_fetch_s: Option<f64>,
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

fn digest_hex(d: &[u8; 32]) -> String {
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
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

/// A round this node has reported and is waiting to hear the outcome of.
struct Pending {
    round: RoundId,
    proposal: Option<Proposal>,
    log: RoundLog,
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
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let coordinator: SocketAddr = tokio::net::lookup_host(&opts.coordinator)
        .await
        .with_context(|| format!("resolving the coordinator address {}", opts.coordinator))?
        .next()
        .with_context(|| format!("{} resolves to no address", opts.coordinator))?;

    // Peer-to-peer layer first: its peer id and address go into the join.
    let keypair = p2p::load_or_create_keypair(&opts.workdir)?;
    let mut net_cfg = PeerNetConfig::new(keypair);
    net_cfg.max_upload_bytes_per_s = opts.max_upload_mbps.map(|_| upload_bytes_per_s(&opts));
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
    // Advertise the address peers can reach: the bound port on the IP facing the coordinator.
    let port = bound
        .iter()
        .find_map(|p| match p {
            libp2p::multiaddr::Protocol::Udp(port) => Some(port),
            _ => None,
        })
        .unwrap_or(opts.listen.port());
    let advertised = p2p::quic_multiaddr(SocketAddr::new(listen_ip, port));
    let upload = upload_bytes_per_s(&opts);
    let caps = tokio::task::block_in_place(|| {
        capabilities(&opts.device, &net.peer_id(), &advertised, upload)
    })?;
    tracing::info!(
        "peer {} at {advertised}; {:.0} tokens/s on the reference model",
        net.peer_id(),
        caps.tokens_per_s
    );

    let (client, accepted, mut notes) =
        CoordinatorClient::connect(coordinator, &opts.token, caps, ClientOptions::default())
            .await
            .with_context(|| format!("joining the coordinator at {coordinator}"))?;
    println!("joined {coordinator} as member {}", accepted.member.0);
    let (cfg, diloco) = local_config(&accepted.run_config, &opts)?;
    let total_steps = cfg.total_steps();
    let mut trainer = tokio::task::block_in_place(|| Trainer::new(cfg))?;
    let mut shard = None;
    if let Some(a) = &accepted.assignment {
        follow_shard(&mut trainer, &mut shard, a)?;
    }
    let mut outer = OuterOptimizer::new(trainer.var_store(), diloco)?;
    let mut codec = QuantCodec {
        compression: diloco.compression,
        feedback: ErrorFeedback::new(diloco.compression, outer.numel())?,
    };
    let rounds_path = trainer.config().train.out_dir.join("rounds.jsonl");
    let mut rounds_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&rounds_path)
        .with_context(|| format!("opening {}", rounds_path.display()))?;
    let bandwidth = upload as f64;
    let mut pending: Option<Pending> = None;
    let mut rounds_done = 0u64;
    let joined_at = Instant::now();
    let mut contributed = false;
    // Peers of the other replicas (they may fetch the global state from this node) and of the
    // current round.
    let mut sync_peers: Vec<Peer> = accepted.sync_peers.clone();
    let mut participants: Vec<Peer> = Vec::new();
    // The global version this node's outer state holds. Version 0, the run's initial state, is
    // the same on every node (same seed); later ones come from a commit or from peers. None: this
    // node missed a commit and must fetch the state before it can contribute again.
    let mut held: Option<u64> = Some(0);
    // Coordinator notifications that arrived while a round was being played, in order.
    let mut backlog: VecDeque<Notification> = VecDeque::new();
    // The last round this node played: a round is played once, however often it is announced.
    let mut last_opened: Option<RoundId> = None;
    let mut injected_fault = test_fault()?;
    // Checkpoint shards this node writes when the coordinator asks, and resumes from after a
    // whole-cluster restart.
    let diloco_ckpts = CheckpointDir::new(
        trainer.config().train.out_dir.join("diloco-checkpoints"),
        trainer.config().checkpoint.keep,
    );
    if accepted.global.version > 0 {
        match tokio::task::block_in_place(|| {
            resume_checkpoint(&diloco_ckpts, &accepted.global, &mut trainer, &mut outer)
        }) {
            Ok(Some(dir)) => {
                held = Some(accepted.global.version);
                // Nodes that lost their state fetch it from this one.
                publish_state(
                    &net,
                    &outer,
                    &trainer,
                    accepted.global.version,
                    accepted.global.round.map_or(0, |r| r.0),
                )?;
                println!(
                    "resumed global state v{} from {} (inner step {})",
                    accepted.global.version,
                    dir.display(),
                    trainer.step()
                );
            }
            Ok(None) => held = None,
            Err(e) => {
                println!("not resuming from the local checkpoint: {e:#}; fetching from peers");
                held = None;
            }
        }
    }

    let outcome = loop {
        if stop.load(Ordering::Relaxed) {
            // Finish a round that was already announced to this node before leaving (its inner
            // steps stop at once; what it trained since the last round is still contributed), so
            // its peers do not wait for it.
            while let Ok(note) = notes.try_recv() {
                backlog.push_back(note);
            }
            let announced = backlog.iter().any(|note| {
                matches!(note, Notification::Message(CoordinatorMessage::RoundOpened(open))
                    if unplayed(last_opened, open.round))
            });
            if !announced || trainer.step() >= total_steps {
                break "stopped by signal".to_string();
            }
        }
        if trainer.step() >= total_steps && pending.is_none() {
            break format!("finished the budget of {total_steps} inner steps");
        }
        let note = match backlog.pop_front() {
            Some(note) => Some(note),
            None => tokio::select! {
                note = notes.recv() => note,
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
            },
        };
        let Some(note) = note else {
            break "the coordinator connection closed".to_string();
        };
        match note {
            Notification::Message(CoordinatorMessage::RoundOpened(open)) => {
                if !unplayed(last_opened, open.round) {
                    // Sent again after a reconnect (or a coordinator restart) before our report
                    // arrived: this node played that round and its report is being resent.
                    tracing::debug!("{} opened again; already played", open.round);
                    continue;
                }
                last_opened = Some(open.round);
                if let Some(stale) = pending.take() {
                    // Its RoundClosed never reached this node (cut off from the coordinator):
                    // the outer step is dropped; the version check below fetches whatever the
                    // others committed.
                    println!(
                        "round {}: no outcome heard; its outer step is dropped",
                        stale.round.0
                    );
                }
                participants = open.participants.clone();
                net.set_members(allowlist(&participants, &sync_peers)?)
                    .await?;
                let mut state_fetch_s = None;
                if held != Some(open.global_version) {
                    match fetch_global_state(
                        &open,
                        client.member(),
                        &net,
                        &mut trainer,
                        &mut outer,
                        bandwidth,
                    )
                    .await
                    {
                        Ok((seconds, round)) => {
                            held = Some(open.global_version);
                            state_fetch_s = Some(seconds);
                            publish_state(&net, &outer, &trainer, open.global_version, round)?;
                        }
                        Err(e) => {
                            // Without the group's state this node cannot contribute; the round
                            // fails for it (and, through the all-reduce, for the others) rather
                            // than mixing states. The next round tries again.
                            let reason = format!(
                                "could not fetch global state v{}: {e:#}",
                                open.global_version
                            );
                            println!("round {}: {reason}", open.round.0);
                            let failed = RoundReport {
                                round: open.round,
                                tokens_processed: 0,
                                outer_step: OuterStep::Failed {
                                    reason,
                                    rejected: None,
                                    unreachable: None,
                                },
                            };
                            client.report(failed).await?;
                            continue;
                        }
                    }
                }
                if let Some((rank, fault)) = injected_fault
                    .take_if(|(_, _, at)| trainer.step() >= *at)
                    .map(|(rank, fault, _)| (rank, fault))
                {
                    trainer.inject_fault(rank, fault)?;
                }
                let p = play_round(
                    &open,
                    &mut trainer,
                    &mut outer,
                    &mut codec,
                    &net,
                    &diloco,
                    &stop,
                    bandwidth,
                    (&mut notes, &mut backlog),
                )
                .await;
                let p = match p {
                    Ok(p) => p,
                    Err(e) => {
                        // Training itself failed (a data-parallel worker crashed or hangs, the
                        // loss diverged): fail this round and leave, telling the coordinator why.
                        let reason = format!("{e:#}");
                        let failed = RoundReport {
                            round: open.round,
                            tokens_processed: 0,
                            outer_step: OuterStep::Failed {
                                reason: reason.clone(),
                                rejected: None,
                                unreachable: None,
                            },
                        };
                        client.report(failed).await.ok();
                        client.leave(&format!("node failed: {reason}")).await.ok();
                        return Err(e);
                    }
                };
                let mut p = p;
                p.pending.log.state_fetch_s = state_fetch_s;
                if !contributed && matches!(p.report.outer_step, OuterStep::Ok { .. }) {
                    contributed = true;
                    println!(
                        "first contribution (round {}) {:.1} s after joining",
                        open.round.0,
                        joined_at.elapsed().as_secs_f64()
                    );
                }
                client.report(p.report).await?;
                pending = Some(p.pending);
            }
            Notification::Message(CoordinatorMessage::RoundClosed(closed)) => {
                if let Some(p) = pending.take_if(|p| p.round == closed.round) {
                    rounds_done += 1;
                    let log = finish_round(
                        client.member(),
                        p,
                        &closed,
                        &mut trainer,
                        &mut outer,
                        &diloco,
                        rounds_done,
                        &mut held,
                    )?;
                    if let (
                        Some(version),
                        RoundOutcome::Committed {
                            version: committed,
                            tensor_hashes,
                        },
                    ) = (held, &closed.outcome)
                        && version == *committed
                    {
                        publish_state(&net, &outer, &trainer, version, closed.round.0)?;
                        let me = client.member();
                        if let Some(writer) = closed
                            .checkpoint
                            .as_ref()
                            .and_then(|c| c.writers.iter().find(|w| w.member == me))
                        {
                            let durable = OuterCheckpoint {
                                version,
                                round: closed.round.0,
                                tensor_hashes: tensor_hashes.clone(),
                            };
                            match tokio::task::block_in_place(|| {
                                write_checkpoint(&diloco_ckpts, &trainer, &outer, &durable)
                            }) {
                                Ok(dir) => {
                                    println!(
                                        "round {}: checkpoint shard {} written to {}",
                                        closed.round.0,
                                        writer.shard,
                                        dir.display()
                                    );
                                    client
                                        .shard_durable(CheckpointShardDurable {
                                            round: closed.round,
                                            shard: writer.shard,
                                            tensor_hashes: tensor_hashes.clone(),
                                        })
                                        .await?;
                                }
                                // The coordinator keeps the previous committed checkpoint.
                                Err(e) => println!(
                                    "round {}: checkpoint shard {} not written: {e:#}",
                                    closed.round.0, writer.shard
                                ),
                            }
                        }
                    }
                    writeln!(rounds_log, "{}", serde_json::to_string(&log)?)?;
                    print_round(&log);
                }
            }
            Notification::Message(CoordinatorMessage::Assigned(a)) => {
                match a.assignment {
                    Some(a) => follow_shard(&mut trainer, &mut shard, &a)?,
                    None if shard.is_some() => {
                        // Benched (most peers could not reach this node) or no data shard free.
                        println!("on standby: the coordinator left this node out of its plan");
                        shard = None;
                    }
                    None => {}
                }
                // Admit new replicas' nodes now: they fetch the global state from their peers.
                sync_peers = a.sync_peers;
                net.set_members(allowlist(&participants, &sync_peers)?)
                    .await?;
            }
            Notification::Message(CoordinatorMessage::MemberDead(dead)) => {
                println!("member {} is gone: {}", dead.member.0, dead.reason);
            }
            Notification::Message(other) => tracing::debug!("coordinator: {other:?}"),
            Notification::Disconnected { reason } => {
                println!("coordinator connection lost ({reason}); reconnecting")
            }
            Notification::Rejoined {
                kept_member,
                accepted,
            } => {
                println!("reconnected to the coordinator (same member: {kept_member})");
                if !kept_member {
                    // A fresh joiner: the outcome of a round it reported to its old self never
                    // comes, and its assignment and peers are the new ones.
                    if let Some(stale) = pending.take() {
                        println!(
                            "round {}: outcome lost with the old membership; its outer step is dropped",
                            stale.round.0
                        );
                    }
                    if let Some(a) = &accepted.assignment {
                        follow_shard(&mut trainer, &mut shard, a)?;
                    }
                    sync_peers = accepted.sync_peers;
                    net.set_members(allowlist(&participants, &sync_peers)?)
                        .await?;
                }
            }
            Notification::Stopped { reason } => {
                bail!("the coordinator stopped this node: {reason}")
            }
        }
    };
    println!("leaving: {outcome}");
    client.leave(&outcome).await.ok();
    let (loss, bpb) = tokio::task::block_in_place(|| trainer.evaluate());
    println!(
        "final validation loss {loss:.4} ({bpb:.4} bits per byte) after {} inner steps",
        trainer.step()
    );
    println!(
        "sample: {}",
        tokio::task::block_in_place(|| trainer.sample())
    );
    Ok(())
}

/// Points the trainer at the data shard of `assignment` if it is not the one it reads
/// (`shard`: index and count).
fn follow_shard(
    trainer: &mut Trainer,
    shard: &mut Option<(u32, u32)>,
    assignment: &Assignment,
) -> Result<()> {
    let next = (assignment.data_shard.index, assignment.data_shard.count);
    if *shard != Some(next) {
        trainer.set_data_shard(next.0 as usize, next.1 as usize)?;
        *shard = Some(next);
    }
    Ok(())
}

/// Whether `round` comes after the last round this node played: a round is played once, however
/// often it is announced (again after a reconnect or a coordinator restart).
fn unplayed(last_opened: Option<RoundId>, round: RoundId) -> bool {
    last_opened.is_none_or(|last| round > last)
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

/// Who may connect to this node: the round's participants and the other replicas' nodes.
fn allowlist(participants: &[Peer], sync_peers: &[Peer]) -> Result<Vec<(PeerId, Vec<Multiaddr>)>> {
    let mut peers: Vec<Peer> = participants.to_vec();
    for peer in sync_peers {
        if !peers.iter().any(|p| p.member == peer.member) {
            peers.push(peer.clone());
        }
    }
    peers_of(&peers)
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

fn upload_bytes_per_s(opts: &JoinOptions) -> u64 {
    // Without a cap, assume gigabit Ethernet for timeouts and the coordinator's planning.
    opts.max_upload_mbps
        .map_or(125_000_000, |m| (m * 1e6 / 8.0) as u64)
}

struct Played {
    report: RoundReport,
    pending: Pending,
}

/// Inner steps, then the all-reduce and the proposed outer step.
// The round's whole context; bundling it in a struct would only rename the parameters.
#[allow(clippy::too_many_arguments)]
async fn play_round(
    open: &RoundOpened,
    trainer: &mut Trainer,
    outer: &mut OuterOptimizer,
    codec: &mut QuantCodec,
    net: &PeerNet,
    diloco: &DilocoConfig,
    stop: &AtomicBool,
    bandwidth: f64,
    (notes, backlog): (
        &mut mpsc::UnboundedReceiver<Notification>,
        &mut VecDeque<Notification>,
    ),
) -> Result<Played> {
    let members = peers_of(&open.participants)?;
    let budget =
        (diloco.round_seconds > 0.0).then(|| Duration::from_secs_f64(diloco.round_seconds));
    let left = trainer
        .config()
        .total_steps()
        .saturating_sub(trainer.step());
    let inner = tokio::task::block_in_place(|| {
        trainer.inner_steps(diloco.round_steps(trainer.step()).min(left), budget, stop)
    })?;

    let mut data = outer.pseudo_gradient(trainer.var_store());
    let weight = inner.tokens.max(1) as f64;
    for v in &mut data {
        *v *= weight as f32;
    }
    let k = members.len();
    let encoded_bytes = codec.compression.codec.body_len(data.len()) as u64;
    let request = AllReduceRequest {
        round: open.round.0,
        members: members.iter().map(|(id, _)| *id).collect(),
        data,
        weight,
        timeout: all_reduce_timeout(encoded_bytes, k, bandwidth),
    };
    let sync_started = Instant::now();
    let result = all_reduce_unless_a_member_dies(net, request, codec, open, notes, backlog).await;
    let sync_s = sync_started.elapsed().as_secs_f64();
    let fp32_bytes = (2.0 * (k as f64 - 1.0) / k as f64 * 4.0 * outer.numel() as f64) as u64;
    let mut log = RoundLog {
        round: open.round.0,
        inner_steps: inner.steps,
        step: trainer.step(),
        tokens: inner.tokens,
        loss: inner.mean_loss(),
        eval_loss: None,
        eval_bpb: None,
        members: k,
        group_tokens: None,
        outcome: String::new(),
        bytes_sent: 0,
        bytes_received: 0,
        fp32_bytes,
        sync_s,
        inner_s: inner.seconds,
        state_fetch_s: None,
    };
    let (outer_step, proposal) = match result {
        Ok(out) => {
            log.bytes_sent = out.bytes_sent;
            log.bytes_received = out.bytes_received;
            log.group_tokens = Some(out.total_weight);
            let proposal = outer.propose(&out.average)?;
            net.recycle_average(out.average);
            let step = OuterStep::Ok {
                params_hash: Digest(proposal.params_hash),
                tensor_hashes: proposal
                    .tensor_hashes
                    .iter()
                    .map(|(key, d)| TensorHash {
                        key: key.clone(),
                        digest: Digest(*d),
                    })
                    .collect(),
            };
            (step, Some(proposal))
        }
        Err(e) => {
            // The coordinator learns whom this node blames (a dead, slow or poisoning peer), and
            // removes a member whose contribution this node rejected.
            let blamed = e
                .peer()
                .map_or_else(|| "none".to_string(), |p| p.to_string());
            let member_of = |peer: &PeerId| {
                let peer = peer.to_string();
                open.participants
                    .iter()
                    .find(|p| p.peer_id == peer)
                    .map(|p| p.member)
            };
            let (rejected, unreachable) = match &e {
                AllReduceError::Rejected { peer, .. } => (member_of(peer), None),
                AllReduceError::Timeout { peer, .. }
                | AllReduceError::PeerFailed { peer, .. }
                | AllReduceError::Aborted { blamed: peer, .. } => (None, member_of(peer)),
                _ => (None, None),
            };
            println!("round {}: all-reduce failed: {e}", open.round.0);
            (
                OuterStep::Failed {
                    reason: format!("{e} [blamed peer: {blamed}]"),
                    rejected,
                    unreachable,
                },
                None,
            )
        }
    };
    Ok(Played {
        report: RoundReport {
            round: open.round,
            tokens_processed: inner.tokens,
            outer_step,
        },
        pending: Pending {
            round: open.round,
            proposal,
            log,
        },
    })
}

/// The round's all-reduce, given up as soon as the coordinator says one of its participants is
/// dead (now, or while this node was training): waiting for the all-reduce's own timeout would
/// only delay the round's close. Other notifications go to `backlog` for the node's loop.
async fn all_reduce_unless_a_member_dies(
    net: &PeerNet,
    request: AllReduceRequest,
    codec: &mut QuantCodec,
    open: &RoundOpened,
    notes: &mut mpsc::UnboundedReceiver<Notification>,
    backlog: &mut VecDeque<Notification>,
) -> Result<AllReduceOutput, AllReduceError> {
    let dead_participant = |note: &Notification| match note {
        Notification::Message(CoordinatorMessage::MemberDead(dead)) if !dead.left => open
            .participants
            .iter()
            .find(|p| p.member == dead.member)
            .map(|p| (p.peer_id.clone(), dead.reason.clone())),
        _ => None,
    };
    let died = |peer: String, reason: String| match peer.parse() {
        Ok(peer) => AllReduceError::PeerFailed {
            round: open.round.0,
            peer,
            reason: format!("the coordinator declared it gone: {reason}"),
        },
        Err(_) => {
            AllReduceError::InvalidRequest(format!("participant peer id {peer} does not parse"))
        }
    };
    while let Ok(note) = notes.try_recv() {
        backlog.push_back(note);
    }
    if let Some((peer, reason)) = backlog.iter().find_map(dead_participant) {
        return Err(died(peer, reason));
    }
    let all_reduce = net.all_reduce(request, codec);
    tokio::pin!(all_reduce);
    loop {
        tokio::select! {
            result = &mut all_reduce => return result,
            Some(note) = notes.recv() => {
                let dead = dead_participant(&note);
                backlog.push_back(note);
                if let Some((peer, reason)) = dead {
                    return Err(died(peer, reason));
                }
            }
        }
    }
}

/// Applies or drops the round's outer step as the coordinator decided; `held` becomes the
/// global version this node now holds (None: it must fetch the committed state).
#[allow(clippy::too_many_arguments)]
fn finish_round(
    me: MemberId,
    pending: Pending,
    closed: &RoundClosed,
    trainer: &mut Trainer,
    outer: &mut OuterOptimizer,
    diloco: &DilocoConfig,
    rounds_done: u64,
    held: &mut Option<u64>,
) -> Result<RoundLog> {
    let mut log = pending.log;
    match (&closed.outcome, pending.proposal) {
        (RoundOutcome::Committed { version, .. }, Some(proposal)) => {
            let hash = proposal.params_hash;
            if closed.included.contains(&me) {
                outer.commit(proposal, trainer.var_store());
                // The outer step happened once, on worker 0: every local worker takes it.
                trainer.broadcast_params()?;
                *held = Some(*version);
                log.outcome = format!("committed v{version} {}", digest_hex(&hash));
            } else {
                // Our hash lost the vote: our global state is no longer the group's. Take
                // nothing; the next round starts by fetching the committed state from peers.
                *held = None;
                log.outcome = format!(
                    "committed v{version} without this node (its hash {} disagreed); fetching \
                     the committed state next round",
                    digest_hex(&hash)
                );
            }
        }
        (RoundOutcome::Committed { version, .. }, None) => {
            // The others committed without us: fetch their state before contributing again.
            *held = None;
            log.outcome = format!("committed v{version} without this node");
        }
        (RoundOutcome::Abandoned { reason }, _) => {
            log.outcome = format!("abandoned: {reason}");
        }
    }
    if rounds_done % diloco.eval_every_rounds == 0
        || trainer.step() >= trainer.config().total_steps()
    {
        let (loss, bpb) = tokio::task::block_in_place(|| trainer.evaluate());
        log.eval_loss = Some(loss);
        log.eval_bpb = Some(bpb);
    }
    Ok(log)
}

fn print_round(log: &RoundLog) {
    let eval = log
        .eval_loss
        .map(|l| format!(" val {l:.4} ({:.3} bpb)", log.eval_bpb.unwrap_or(f64::NAN)))
        .unwrap_or_default();
    println!(
        "round {:>4} | {} members | steps {:>5} | loss {:.4}{eval} | sent {:.2} MB ({:.1}% of fp32) | sync {:.2}s | {}",
        log.round,
        log.members,
        log.step,
        log.loss,
        log.bytes_sent as f64 / 1e6,
        100.0 * log.bytes_sent as f64 / log.fp32_bytes.max(1) as f64,
        log.sync_s,
        log.outcome
    );
}
