//! What a node sets up before it trains: the signals that stop it, its peer-to-peer address,
//! the capabilities it joins with, the run config adapted to this machine, and the fault a test
//! may inject.

use super::JoinOptions;
use crate::p2p::{self, PeerNet, PeerNetConfig};
use anyhow::{Context, Result, bail};
use forge_protocol::messages::{Capabilities, Device as WireDevice, DeviceKind};
use forge_trainer::bench::TrainStepBench;
use forge_trainer::config::RunConfig;
use forge_trainer::device::{device_memory, parse_devices};
use forge_trainer::diloco::DilocoConfig;
use forge_trainer::models::{ModelConfig, Precision};
use forge_trainer::parallel::Fault;
use libp2p::{Multiaddr, PeerId};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// SIGINT/SIGTERM as a flag the inner steps check between steps, and as a channel the event
/// loop waits on.
pub(super) fn shutdown_signal() -> Result<(Arc<AtomicBool>, watch::Receiver<bool>)> {
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

/// Starts the swarm and listens; returns it with the address peers can reach (the bound port on
/// the IP facing the coordinator, unless `--listen` names an IP) and the node's key, which the
/// control connection proves it holds.
pub(super) async fn start_peer_net(
    opts: &JoinOptions,
    coordinator: SocketAddr,
) -> Result<(PeerNet, Multiaddr, libp2p::identity::Keypair)> {
    let keypair = p2p::load_or_create_keypair(&opts.workdir)?;
    let mut net_cfg = PeerNetConfig::new(keypair.clone());
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
    let advertised = p2p::quic_multiaddr(SocketAddr::new(listen_ip, port));
    Ok((net, advertised, keypair))
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

/// Every device the node trains on, with its memory, and a measured speed: tokens/s of a short
/// train step of the `tiny` reference model on the first device (the run's own model is not
/// known before joining), times the number of GPUs (CPU workers share one CPU, so they add
/// nothing).
pub(super) fn capabilities(
    opts: &JoinOptions,
    peer_id: &PeerId,
    addr: &Multiaddr,
    upload: u64,
) -> Result<Capabilities> {
    let devices = node_devices(opts)?;
    let wire = devices
        .iter()
        .map(|&device| match device {
            tch::Device::Cuda(i) => WireDevice {
                kind: DeviceKind::Cuda,
                name: forge_trainer::flops::cuda_device_name(i)
                    .unwrap_or_else(|| format!("cuda:{i}")),
                memory_bytes: capped(device_memory(device), opts.memory_limit),
            },
            _ => WireDevice {
                kind: DeviceKind::Cpu,
                name: "cpu".into(),
                memory_bytes: capped(device_memory(device), opts.memory_limit),
            },
        })
        .collect();
    let device = devices[0];
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
        threads: opts.threads.map(|n| n as i32),
        peak_tflops: None,
        seed: 0,
    };
    let speed = bench.run().context("measuring this node's speed")?;
    let gpus = devices.iter().filter(|d| d.is_cuda()).count().max(1);
    Ok(Capabilities {
        devices: wire,
        tokens_per_s: speed.tokens_per_s * gpus as f64,
        upload_bytes_per_s: upload,
        download_bytes_per_s: upload,
        peer_id: peer_id.to_string(),
        listen_addrs: vec![addr.to_string()],
    })
}

/// A device's memory as the node reports it under `--memory-limit`; a device that does not
/// know its memory (0) reports the limit.
fn capped(memory_bytes: u64, limit: Option<u64>) -> u64 {
    match (memory_bytes, limit) {
        (0, Some(limit)) => limit,
        (memory, Some(limit)) => memory.min(limit),
        (memory, None) => memory,
    }
}

/// `--memory-limit`: a number of bytes with an optional unit, decimal (KB, MB, GB, TB) or binary
/// (KiB, MiB, GiB, TiB), in any case; for example 300MB or 1.5GiB.
pub(crate) fn parse_memory_size(text: &str) -> std::result::Result<u64, String> {
    const UNITS: [(&str, f64); 9] = [
        ("b", 1.0),
        ("kb", 1e3),
        ("mb", 1e6),
        ("gb", 1e9),
        ("tb", 1e12),
        ("kib", 1024.0),
        ("mib", 1024.0 * 1024.0),
        ("gib", 1024.0 * 1024.0 * 1024.0),
        ("tib", 1024.0 * 1024.0 * 1024.0 * 1024.0),
    ];
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let scale = if unit.is_empty() {
        Some(1.0)
    } else {
        UNITS.iter().find(|(name, _)| *name == unit).map(|u| u.1)
    };
    match (number.trim().parse::<f64>(), scale) {
        (Ok(value), Some(scale)) if value.is_finite() && value * scale >= 1.0 => {
            Ok((value * scale) as u64)
        }
        _ => Err(format!(
            "'{text}' is not a memory size: give a positive number with a unit, for example \
             300MB or 1.5GiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )),
    }
}

/// The devices `--device` names (checked against this machine), one per CPU worker with
/// `--cpu-workers`.
fn node_devices(opts: &JoinOptions) -> Result<Vec<tch::Device>> {
    let devices = parse_devices(&opts.device)?;
    match opts.cpu_workers {
        Some(n) if devices != [tch::Device::Cpu] => bail!(
            "--cpu-workers {n} needs --device cpu, not {}; GPUs train with one worker each",
            opts.device
        ),
        Some(n) => Ok(vec![tch::Device::Cpu; n]),
        None => Ok(devices),
    }
}

/// The run config the coordinator handed out, adapted to this machine: run directory and
/// caches under the workdir, corpus paths and the `init_from` folder under the data root, this
/// node's devices, workers and threads.
pub(super) fn local_config(text: &str, opts: &JoinOptions) -> Result<(RunConfig, DilocoConfig)> {
    let from = Path::new("<run config from the coordinator>");
    let text = forge_protocol::run_config::apply_overrides(
        text,
        from,
        &opts.sets,
        Some(forge_protocol::run_config::NODE_KEYS),
    )?;
    let mut cfg = RunConfig::parse(&text, from)?;
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
    for source in &mut cfg.data.mix {
        source.train = source.train.iter().map(rebase).collect();
    }
    if let Some(forge_trainer::data::TokenizerConfig::Path(p)) = &cfg.data.tokenizer {
        cfg.data.tokenizer = Some(forge_trainer::data::TokenizerConfig::Path(rebase(p)));
    }
    // The node's copy of the folder the run starts from, checked against the coordinator's
    // (`[model] init_sha256`) when the trainer loads it.
    cfg.model.init_from = cfg.model.init_from.as_ref().map(rebase);
    forge_trainer::import::read_init(&mut cfg, from)?;
    cfg.data.cache_dir = opts.workdir.join("cache");
    cfg.train.out_dir = opts.workdir.join("run");
    cfg.train.device = opts.device.clone();
    // The run config's cpu_workers are for CPU nodes; a GPU node trains one worker per GPU.
    match opts.cpu_workers {
        Some(n) => cfg.train.parallel.cpu_workers = n,
        None if opts.device.trim() != "cpu" => cfg.train.parallel.cpu_workers = 1,
        None => {}
    }
    if let Some(n) = opts.threads {
        cfg.train.threads = Some(n as i32);
    }
    // The global state lives with the group: a restarted node takes it from its peers (state
    // transfer), or from its own checkpoint shard only when that holds the version the
    // coordinator names (see resume_checkpoint), never from whatever it saved last.
    cfg.checkpoint.resume = false;
    Ok((cfg, diloco))
}

pub(super) fn upload_bytes_per_s(opts: &JoinOptions) -> u64 {
    // Without a cap, assume gigabit Ethernet for timeouts and the coordinator's planning.
    opts.max_upload_mbps
        .map_or(125_000_000, |m| (m * 1e6 / 8.0) as u64)
}

/// A fault to inject into a data-parallel worker once the node reaches an inner step, for
/// fault-tolerance tests and chaos runs: `FORGE_TEST_WORKER_FAULT=panic@STEP` or `hang@STEP`
/// (worker 1; the hang lasts an hour).
pub(super) fn test_fault() -> Result<Option<(usize, Fault, u64)>> {
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
        "panic" => Fault::Panic,
        "hang" => Fault::Hang(Duration::from_secs(3600)),
        _ => bail!("FORGE_TEST_WORKER_FAULT={spec}: the fault is panic or hang"),
    };
    Ok(Some((1, fault, step)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_memory_size("300MB"), Ok(300_000_000));
        assert_eq!(parse_memory_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_memory_size("2 gib"), Ok(2 << 30));
        assert_eq!(parse_memory_size("4096"), Ok(4096));
        assert_eq!(parse_memory_size("64KiB"), Ok(65_536));
        for bad in ["", "MB", "-1GB", "0", "1.5 parsecs", "12XB", "nanGB"] {
            let err = parse_memory_size(bad).unwrap_err();
            assert!(err.contains("for example 300MB or 1.5GiB"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_limit_caps_known_memory_and_stands_in_for_unknown() {
        assert_eq!(capped(8 << 30, Some(300_000_000)), 300_000_000);
        assert_eq!(capped(1 << 20, Some(300_000_000)), 1 << 20);
        assert_eq!(capped(0, Some(300_000_000)), 300_000_000);
        assert_eq!(capped(8 << 30, None), 8 << 30);
        assert_eq!(capped(0, None), 0);
    }
}
