//! `sim-member`: members that train nothing but follow the protocol honestly (heartbeats, one
//! agreeing report per round, checkpoint shards reported durable), for tests, demos and the
//! heartbeat benchmark. Built on the same [`CoordinatorClient`] `forge-node` uses.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use forge_coordinator::{ClientOptions, CoordinatorClient, Notification};
use forge_protocol::{
    CheckpointShardDurable, CoordinatorMessage, DataDigest, Digest, OuterStep, Ready, RoundId,
    RoundOutcome, RoundReport, TensorHash, TensorKey,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::commands::runtime;

/// The training stream every simulated member claims: a million windows of nothing.
fn sim_data() -> DataDigest {
    DataDigest {
        corpus: Digest(Sha256::digest(b"sim-member corpus").into()),
        tokenizer: Digest(Sha256::digest(b"sim-member tokenizer").into()),
        windows: 1 << 20,
    }
}

/// What a simulated member says it brings (the library's one description of it).
pub(crate) use forge_coordinator::identity::simulated_capabilities as capabilities;

/// What every honest member computes for a round: the same bytes everywhere.
fn round_digest(round: RoundId) -> Digest {
    Digest(Sha256::digest(format!("forge sim round {}", round.0)).into())
}

pub(crate) fn run(
    addr: SocketAddr,
    token: &str,
    count: usize,
    peer_prefix: &str,
    seconds: Option<u64>,
    idle_timeout_ms: u64,
    train_ms: u64,
) -> anyhow::Result<()> {
    let runtime = runtime()?;
    runtime.block_on(async {
        let options = ClientOptions {
            idle_timeout: Duration::from_millis(idle_timeout_ms),
            reconnect_max: Duration::from_millis(idle_timeout_ms.clamp(200, 5_000)),
            ..ClientOptions::default()
        };
        let mut members = Vec::with_capacity(count);
        for index in 0..count {
            // A valid peer id that stands for the name, the same at every start.
            let name = format!("{peer_prefix}-{index}");
            let key = forge_coordinator::identity::named_keypair(&name);
            let peer_id = key.public().to_peer_id().to_string();
            let (client, accepted, notifications) = CoordinatorClient::connect(
                addr,
                token,
                key,
                capabilities(peer_id.clone()),
                options.clone(),
            )
            .await
            .with_context(|| format!("{name} cannot join"))?;
            println!(
                "{name} joined as member {} (peer id {peer_id})",
                accepted.member.0
            );
            // Every simulated member has the same (empty) data, so the coordinator plans it.
            client
                .ready(Ready {
                    data: sim_data(),
                    us_per_step: 0,
                })
                .await?;
            members.push(tokio::spawn(follow(
                name,
                client,
                notifications,
                seconds,
                Duration::from_millis(train_ms),
            )));
        }
        for member in members {
            member.await??;
        }
        Ok(())
    })
}

/// Plays one member until `seconds` pass (then leaves) or the client stops.
async fn follow(
    peer_id: String,
    client: CoordinatorClient,
    mut notifications: UnboundedReceiver<Notification>,
    seconds: Option<u64>,
    train: Duration,
) -> anyhow::Result<()> {
    let mut reported: Option<RoundId> = None;
    let deadline = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    loop {
        let notification = tokio::select! {
            () = &mut deadline => {
                client.leave("sim-member finished").await?;
                println!("{peer_id} left");
                return Ok(());
            }
            notification = notifications.recv() => notification,
        };
        let Some(notification) = notification else {
            anyhow::bail!("{peer_id}: the client stopped without saying why");
        };
        match notification {
            Notification::Message(CoordinatorMessage::RoundOpened(opened)) => {
                let me = client.member();
                let participant = opened.participants.iter().any(|p| p.member == me);
                if participant && reported.is_none_or(|last| opened.round > last) {
                    reported = Some(opened.round);
                    let digest = round_digest(opened.round);
                    // Reads its replica's whole lease.
                    let replica = opened
                        .participants
                        .iter()
                        .find(|p| p.member == me)
                        .map(|p| p.assignment.replica);
                    let consumed = opened
                        .data
                        .iter()
                        .find(|lease| Some(lease.replica) == replica)
                        .map(|lease| lease.ranges.clone())
                        .unwrap_or_default();
                    let report = RoundReport {
                        round: opened.round,
                        tokens_processed: 4_096,
                        us_per_step: 0,
                        consumed,
                        outer_step: OuterStep::Ok {
                            params_hash: digest,
                            tensor_hashes: vec![TensorHash {
                                key: TensorKey::Param("model.embed_tokens.weight".to_string()),
                                digest,
                            }],
                        },
                    };
                    // The simulated inner steps take `train`; notifications keep flowing
                    // meanwhile. A failed report means the client stopped, which the
                    // notifications report.
                    let client = client.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(train).await;
                        let _ = client.report(report).await;
                    });
                }
            }
            Notification::Message(CoordinatorMessage::RoundClosed(closed)) => {
                let me = client.member();
                let (Some(request), RoundOutcome::Committed { tensor_hashes, .. }) =
                    (closed.checkpoint, closed.outcome)
                else {
                    continue;
                };
                for writer in request.writers.iter().filter(|w| w.member == me) {
                    client
                        .shard_durable(CheckpointShardDurable {
                            round: closed.round,
                            shard: writer.shard,
                            tensor_hashes: tensor_hashes.clone(),
                        })
                        .await?;
                }
            }
            Notification::Rejoined {
                accepted,
                kept_member,
            } => {
                println!(
                    "{peer_id} reconnected as member {} ({})",
                    accepted.member.0,
                    if kept_member { "kept its id" } else { "new id" }
                );
            }
            Notification::Disconnected { reason } => {
                println!("{peer_id} disconnected: {reason}");
            }
            Notification::Stopped { reason } => anyhow::bail!("{peer_id}: {reason}"),
            Notification::Message(_) => {}
        }
    }
}
