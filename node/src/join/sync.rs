//! The node's side of the all-reduce: its codec (the run's compression, with error feedback)
//! the request it makes of its pseudo-gradient, and how a finished or failed all-reduce reads
//! to the round state machine.

use super::peers_of;
use crate::p2p::{
    AllReduceError, AllReduceOutput, AllReduceRequest, ChunkCodec, all_reduce_timeout,
};
use crate::round::{ReduceFailure, Reduced};
use forge_protocol::messages::{Digest, Peer, RoundId, TensorHash, TensorKey};
use forge_protocol::quant::{self, Compression, ErrorFeedback};
use forge_protocol::stream::{self, DataLease};
use forge_protocol::sync::SyncCodec;
use forge_trainer::diloco::Proposal;

/// The error of an all-reduce given up because the coordinator declared participant `peer`
/// gone, or (no peer) because the run was aborted.
pub(super) fn declared_gone(round: RoundId, peer: Option<&str>, reason: &str) -> AllReduceError {
    let Some(peer) = peer else {
        return AllReduceError::GivenUp(reason.to_string());
    };
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
pub(super) fn failure_of(e: &AllReduceError, sync_s: f64) -> ReduceFailure {
    ReduceFailure {
        reason: e.to_string(),
        peer: e.peer().map(|p| p.to_string()),
        rejected: matches!(e, AllReduceError::Rejected { .. }),
        sync_s,
    }
}

/// The node's codec: the run's compression, with error feedback over the whole flattened
/// pseudo-gradient (chunks are ranges of it). A sparse codec's contributions are relayed by
/// their owners, not re-encoded (see `p2p::relay`).
pub(super) struct QuantCodec {
    pub(super) compression: Compression,
    pub(super) feedback: ErrorFeedback,
}

impl QuantCodec {
    /// The run's `compression` for a pseudo-gradient of `numel` values, no residual yet.
    pub(super) fn new(compression: Compression, numel: usize) -> forge_protocol::Result<Self> {
        Ok(QuantCodec {
            compression,
            feedback: ErrorFeedback::new(compression, numel)?,
        })
    }

    /// Whether owners relay the contributions (see `p2p::relay`): for top-k.
    fn sparse(&self) -> bool {
        matches!(self.compression.codec, quant::Codec::TopK { .. })
    }
}

impl ChunkCodec for QuantCodec {
    fn encode_contribution(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        self.feedback.compress_within(offset, x, max_norm, out)
    }

    fn encode_result(
        &mut self,
        _offset: usize,
        x: &[f32],
        _max_norm: f64,
        out: &mut Vec<u8>,
    ) -> forge_protocol::Result<f64> {
        if crate::hostile::mode() == Some(crate::hostile::Mode::PoisonResults) {
            let poisoned: Vec<f32> = x.iter().map(|v| v * crate::hostile::POISON).collect();
            quant::encode_into(&poisoned, &self.compression, out)?;
            return Ok(quant::squares(&poisoned));
        }
        // A dense codec rounds the average once, within a half step per value: nothing for
        // error feedback to carry (and a relaying codec never encodes an average).
        quant::encode_into(x, &self.compression, out)?;
        Ok(quant::squares(x))
    }

    fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> forge_protocol::Result<()> {
        quant::decode_into(bytes, out, &self.compression)
    }

    fn id(&self) -> (SyncCodec, bool) {
        self.compression.sync_codec()
    }

    fn relays(&self) -> bool {
        self.sparse()
    }
}

/// The all-reduce of `round` among `participants` of this node's pseudo-gradient, weighted by
/// the tokens it trained on, with a timeout sized for the encoded bytes and this node's link.
pub(super) fn request(
    round: RoundId,
    participants: &[Peer],
    mut data: Vec<f32>,
    tokens: u64,
    codec: &QuantCodec,
    bandwidth: f64,
) -> Result<AllReduceRequest, ReduceFailure> {
    let members = peers_of(participants);
    if let Some(bad) = participants
        .iter()
        .find(|p| !members.iter().any(|(m, _, _)| m.member == p.member))
    {
        return Err(ReduceFailure {
            reason: format!(
                "participant {} has an invalid peer id {:?}; nobody can exchange the round with it",
                bad.member.0, bad.peer_id
            ),
            peer: Some(bad.peer_id.clone()),
            rejected: false,
            sync_s: 0.0,
        });
    }
    let weight = tokens.max(1) as f64;
    for v in &mut data {
        *v *= weight as f32;
    }
    let mut encoded_bytes = codec.compression.codec.body_len(data.len()) as u64;
    if codec.sparse() {
        // Owners relay every member's bytes: the all-gather carries K times the contribution,
        // (K + 1) / 2 times what the ring bound assumes in all.
        encoded_bytes = encoded_bytes * (members.len() as u64 + 1) / 2;
    }
    Ok(AllReduceRequest {
        round: round.0,
        members: members.iter().map(|(_, id, _)| *id).collect(),
        data,
        weight,
        max_weights: Vec::new(),
        timeout: all_reduce_timeout(encoded_bytes, members.len(), bandwidth),
    })
}

/// The most weight (tokens) each participant may claim in a round with `leases`: what its
/// replica's lease holds at `seq_len` tokens per position (at least the 1 a node that trained
/// nothing sends). No caps without leases.
pub(super) fn max_weights(participants: &[Peer], leases: &[DataLease], seq_len: u64) -> Vec<f64> {
    if leases.is_empty() {
        return Vec::new();
    }
    participants
        .iter()
        .map(|p| {
            leases
                .iter()
                .find(|lease| lease.replica == p.assignment.replica)
                .map_or(f64::INFINITY, |lease| {
                    (stream::total(&lease.ranges) as f64 * seq_len as f64).max(1.0)
                })
        })
        .collect()
}

/// Tensor digests as the protocol carries them.
pub(super) fn wire_hashes(hashes: &[(TensorKey, [u8; 32])]) -> Vec<TensorHash> {
    hashes
        .iter()
        .map(|(key, d)| TensorHash {
            key: key.clone(),
            digest: Digest(*d),
        })
        .collect()
}

/// A finished all-reduce and the outer step it proposes, as the round state machine takes it.
pub(super) fn reduced(proposal: Proposal, out: &AllReduceOutput, sync_s: f64) -> Reduced<Proposal> {
    Reduced {
        params_hash: proposal.params_hash,
        tensor_hashes: wire_hashes(&proposal.tensor_hashes),
        outer_lr: proposal.outer_lr,
        proposal,
        bytes_sent: out.bytes_sent,
        bytes_received: out.bytes_received,
        total_weight: out.total_weight,
        sync_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use forge_protocol::messages::{Assignment, DataShard, MemberId, ReplicaId};

    fn peer(member: u64, peer_id: String) -> Peer {
        Peer {
            member: MemberId(member),
            assignment: Assignment {
                replica: ReplicaId(member),
                data_shard: DataShard { index: 0, count: 1 },
                stage: None,
            },
            peer_id,
            listen_addrs: vec!["/ip4/127.0.0.1/udp/4001/quic-v1".into()],
        }
    }

    /// Each participant may weigh what its replica's lease holds, in tokens; nothing is capped
    /// without leases.
    #[test]
    fn weight_caps_follow_the_leases() {
        use forge_protocol::stream::SeqRange;
        let participants = [
            peer(1, "a".into()),
            peer(2, "b".into()),
            peer(3, "c".into()),
        ];
        let leases = [
            DataLease {
                replica: ReplicaId(1),
                ranges: vec![SeqRange::new(0, 40), SeqRange::new(100, 108)],
            },
            DataLease {
                replica: ReplicaId(2),
                ranges: vec![],
            },
        ];
        let caps = max_weights(&participants, &leases, 32);
        assert_eq!(caps, [48.0 * 32.0, 1.0, f64::INFINITY]);
        assert!(max_weights(&participants, &[], 32).is_empty());
    }

    /// A participant whose peer id does not parse fails the round for this node, blaming it
    /// (the coordinator benches a member most others blame); the node does not exit.
    #[test]
    fn a_participant_with_an_invalid_peer_id_fails_the_round_blaming_it() {
        let compression = Compression::new(quant::Codec::Fp32, None).unwrap();
        let codec = QuantCodec::new(compression, 4).unwrap();
        let good = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
            .to_string();
        let participants = [peer(1, good.clone()), peer(2, "sim-0".into())];
        let Err(failure) = request(RoundId(3), &participants, vec![0.0; 4], 10, &codec, 1e6) else {
            panic!("the round must fail");
        };
        assert_eq!(failure.peer.as_deref(), Some("sim-0"));
        assert!(!failure.rejected);
        assert!(
            failure
                .reason
                .contains("participant 2 has an invalid peer id")
        );
        let ok = request(
            RoundId(3),
            &participants[..1],
            vec![0.0; 4],
            10,
            &codec,
            1e6,
        )
        .unwrap();
        assert_eq!(ok.members, [good.parse().unwrap()]);
    }

    /// One topk codec (blocks of 64 keeping 4, 2 bits) per member, for vectors of `len` values.
    fn topk_codecs(peers: usize, len: usize) -> Vec<Box<dyn ChunkCodec>> {
        let compression: Compression =
            serde_json::from_str(r#"{ "codec": "topk", "block_size": 64, "density": 0.0625 }"#)
                .unwrap();
        (0..peers)
            .map(|_| Box::new(QuantCodec::new(compression, len).unwrap()) as Box<dyn ChunkCodec>)
            .collect()
    }

    /// Member `m`'s contribution of `len` values: `±weights[m]` where `keep(m, e)`, else 0.
    fn signed(weights: &[f64], len: usize, keep: impl Fn(usize, usize) -> bool) -> Vec<Vec<f32>> {
        (0..weights.len())
            .map(|m| {
                (0..len)
                    .map(|e| match (keep(m, e), (e + m) % 2) {
                        (false, _) => 0.0,
                        (true, 0) => weights[m] as f32,
                        (true, _) => -(weights[m] as f32),
                    })
                    .collect()
            })
            .collect()
    }

    /// One topk all-reduce of `data` among `nets`: every member gets the same bits, the exact
    /// weighted average within 1e-6 of each value. Returns it.
    async fn relayed_exactly(
        nets: &[crate::p2p::PeerNet],
        round: u64,
        data: &[Vec<f32>],
        weights: &[f64],
    ) -> Vec<f32> {
        use crate::p2p::tests::{all_reduce_everywhere, bits, reference_average};
        let mut codecs = topk_codecs(nets.len(), data[0].len());
        let timeout = std::time::Duration::from_secs(20);
        let outputs =
            all_reduce_everywhere(nets, round, data, weights, &[], &mut codecs, timeout).await;
        let outputs: Vec<_> = outputs.into_iter().map(Result::unwrap).collect();
        for output in &outputs[1..] {
            assert_eq!(bits(&output.average), bits(&outputs[0].average));
        }
        let exact = reference_average(data, weights);
        for (e, (got, want)) in outputs[0].average.iter().zip(&exact).enumerate() {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "round {round}, element {e}: {got} against {want}"
            );
        }
        outputs.into_iter().next().unwrap().average
    }

    /// With topk the owners relay the members' values: when each member's contribution is
    /// exactly `k` values per block (at the block's absmax, which 2 bits keep), on supports
    /// that differ from member to member, the average of four members has `4k` values per
    /// block, and every one of them arrives (an owner that re-encoded the sum with top-k would
    /// keep `k`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn topk_owners_relay_every_members_values() {
        use crate::p2p::tests::{CHUNK_VALUES, cluster, small_chunks};
        let nets = cluster(4, small_chunks).await;
        let (block, k, len) = (64, 4, 8 * CHUNK_VALUES);
        let weights = [100.0, 300.0, 200.0, 50.0];
        let data = signed(&weights, len, |m, e| (e % block) / k == m);
        let average = relayed_exactly(&nets, 1, &data, &weights).await;
        let nonzero = average.iter().filter(|v| **v != 0.0).count();
        assert_eq!(nonzero, len / block * 4 * k);
    }

    /// Relayed topk with fewer values than members (some owners own nothing) and with a partial
    /// last block: every member gets the exact average (each block keeps all of its few values,
    /// all at the block's absmax, which 2 bits keep; a zero would round to a third of it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn topk_relays_vectors_shorter_than_the_member_count() {
        use crate::p2p::tests::{cluster, small_chunks};
        let nets = cluster(4, small_chunks).await;
        let weights = [1.0, 2.0, 3.0, 4.0];
        for len in [3, 5] {
            let data = signed(&weights, len, |_, _| true);
            relayed_exactly(&nets, len as u64, &data, &weights).await;
        }
    }

    /// topk among four members over rounds of similar pseudo-gradients (a fixed direction plus
    /// noise, as consecutive rounds' are): every round succeeds, every member gets the same
    /// bits, and with the members' error feedback the sum of the averages over the rounds
    /// closes in on the sum of the exact averages.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn topk_all_reduces_agree_and_their_sum_tracks_the_exact_one() {
        use crate::p2p::tests::{
            CHUNK_VALUES, all_reduce_everywhere, bits, cluster, contributions, reference_average,
            small_chunks,
        };
        let peers = 4;
        let nets = cluster(peers, small_chunks).await;
        let len = 8 * CHUNK_VALUES + 5;
        let mut codecs = topk_codecs(peers, len);
        let (base, weights) = contributions(peers, len, 7);
        let mut got = vec![0.0f64; len];
        let mut want = vec![0.0f64; len];
        let mut gaps = Vec::new();
        for round in 1..=40u64 {
            let (noise, _) = contributions(peers, len, 100 + round);
            let data: Vec<Vec<f32>> = base
                .iter()
                .zip(&noise)
                .map(|(b, n)| b.iter().zip(n).map(|(b, n)| b + 0.3 * n).collect())
                .collect();
            let outputs = all_reduce_everywhere(
                &nets,
                round,
                &data,
                &weights,
                &[],
                &mut codecs,
                std::time::Duration::from_secs(20),
            )
            .await;
            let outputs: Vec<_> = outputs
                .into_iter()
                .map(|o| o.unwrap_or_else(|e| panic!("round {round}: {e}")))
                .collect();
            for output in &outputs[1..] {
                assert_eq!(bits(&output.average), bits(&outputs[0].average));
            }
            let exact = reference_average(&data, &weights);
            for e in 0..len {
                got[e] += f64::from(outputs[0].average[e]);
                want[e] += f64::from(exact[e]);
            }
            let gap: f64 = got.iter().zip(&want).map(|(g, w)| (g - w).powi(2)).sum();
            let norm: f64 = want.iter().map(|w| w * w).sum();
            gaps.push((gap / norm).sqrt());
        }
        println!(
            "topk (k 4 of 64), relative gap of the summed averages after rounds 10, 20, 40: \
             {:.3}, {:.3}, {:.3}",
            gaps[9], gaps[19], gaps[39]
        );
        assert!(gaps[39] < gaps[9], "{gaps:?}");
        assert!(gaps[39] < 0.5, "{gaps:?}");
    }
}
