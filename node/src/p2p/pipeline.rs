//! `/forge/pipeline/1`: the streams between the stages of one pipeline. Every stage opens one
//! stream to each higher stage and greets it with its stage index; the higher stage takes the
//! stream from the peer it expects at that index. The streams then carry
//! [`forge_protocol::pipeline`] messages, read by [`StreamLink`]'s threads.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use forge_protocol::pipeline::PIPELINE_PROTOCOL;
use forge_trainer::pipeline::{StreamLink, StreamPair};
use futures::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use libp2p::{PeerId, Stream, StreamProtocol};
use tokio::sync::Notify;

use super::error::{Error, Result};
use super::net::PeerNet;

pub(crate) const PIPELINE: StreamProtocol = StreamProtocol::new(PIPELINE_PROTOCOL);

/// Pipeline streams other nodes opened to this one, by peer, until a link takes them.
#[derive(Debug, Default)]
pub(crate) struct PipelineInbox {
    streams: Mutex<HashMap<PeerId, Vec<Stream>>>,
    arrived: Notify,
}

impl PipelineInbox {
    pub(crate) fn accept(&self, peer: PeerId, stream: Stream) {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let queued = streams.entry(peer).or_default();
        // A peer has one stream to this node per pipeline link; more waiting is a peer that
        // reconnected (the newest is the one it uses) or one that floods.
        if queued.len() >= 4 {
            queued.remove(0);
        }
        queued.push(stream);
        drop(streams);
        self.arrived.notify_waiters();
    }

    /// The oldest stream `peer` opened, waiting up to `deadline`.
    async fn take(&self, peer: PeerId, deadline: Instant) -> Option<Stream> {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(queued) = streams.get_mut(&peer)
                    && !queued.is_empty()
                {
                    return Some(queued.remove(0));
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, arrived).await.is_err() {
                return None;
            }
        }
    }
}

/// The reading half of a libp2p stream as a blocking reader, for a stage's reader thread.
struct BlockingRead(ReadHalf<Stream>);

impl Read for BlockingRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        futures::executor::block_on(self.0.read(buf))
    }
}

/// The writing half of a libp2p stream as a blocking writer, for the training thread.
struct BlockingWrite(WriteHalf<Stream>);

impl Write for BlockingWrite {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        futures::executor::block_on(self.0.write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        futures::executor::block_on(self.0.flush())
    }
}

fn pair(stream: Stream) -> StreamPair {
    let (read, write) = stream.split();
    (Box::new(BlockingRead(read)), Box::new(BlockingWrite(write)))
}

impl PeerNet {
    /// Joins this node, stage `stage` of a pipeline whose stage `j` is `peers[j]`, to the other
    /// stages (which must be members: [`PeerNet::set_members`]). Fails naming the stage that
    /// did not connect within `timeout`, which also bounds every later wait for a message.
    pub(crate) async fn pipeline_link(
        &self,
        stage: u32,
        peers: &[PeerId],
        timeout: Duration,
    ) -> Result<StreamLink> {
        let me = stage as usize;
        if peers.get(me) != Some(&self.local_peer_id) {
            return Err(Error::Pipeline(format!(
                "this node is not stage {stage} of the pipeline {peers:?}"
            )));
        }
        let deadline = Instant::now() + timeout;
        let mut streams: Vec<Option<StreamPair>> = (0..peers.len()).map(|_| None).collect();
        for (j, peer) in peers.iter().enumerate().skip(me + 1) {
            let mut control = self.control.clone();
            let mut stream = loop {
                // The first stream on a connection being set up can fail; try until the deadline.
                match tokio::time::timeout(timeout, control.open_stream(*peer, PIPELINE)).await {
                    Ok(Ok(stream)) => break stream,
                    outcome if Instant::now() >= deadline => {
                        let why = match outcome {
                            Ok(Err(err)) => err.to_string(),
                            _ => format!("no answer within {timeout:?}"),
                        };
                        return Err(Error::Pipeline(format!(
                            "stage {j} ({peer}) cannot be reached: {why}"
                        )));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            stream
                .write_all(&stage.to_le_bytes())
                .await
                .map_err(|err| Error::Pipeline(format!("greeting stage {j} ({peer}): {err}")))?;
            streams[j] = Some(pair(stream));
        }
        for (j, peer) in peers.iter().enumerate().take(me) {
            let Some(mut stream) = self.pipeline_inbox.take(*peer, deadline).await else {
                return Err(Error::Pipeline(format!(
                    "stage {j} ({peer}) opened no pipeline stream within {timeout:?}"
                )));
            };
            let mut index = [0u8; 4];
            let read = tokio::time::timeout(timeout, stream.read_exact(&mut index)).await;
            match read {
                Ok(Ok(())) if u32::from_le_bytes(index) as usize == j => {}
                Ok(Ok(())) => {
                    return Err(Error::Pipeline(format!(
                        "{peer} says it is stage {}, this node expects it as stage {j}",
                        u32::from_le_bytes(index)
                    )));
                }
                _ => {
                    return Err(Error::Pipeline(format!(
                        "stage {j} ({peer}) sent no greeting within {timeout:?}"
                    )));
                }
            }
            streams[j] = Some(pair(stream));
        }
        StreamLink::new(stage, streams, timeout).map_err(|err| Error::Pipeline(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p2p::tests::{bounded, cluster};
    use forge_protocol::pipeline::StageDtype;
    use forge_trainer::models::LayerRange;
    use forge_trainer::models::{Family, ModelConfig};
    use forge_trainer::optim::AdamWConfig;
    use forge_trainer::pipeline::{MemoryLink, PipelineStage, ScheduleConfig, StageLink};
    use tch::{Device, Kind, Tensor};

    /// Loss and gradients of the tiny GPT-2 in two stages over `links`, with one AdamW step
    /// between two batches.
    fn two_stages(links: Vec<Box<dyn StageLink>>) -> Vec<(Vec<Tensor>, f64)> {
        let cfg = ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap();
        let adamw = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let ranges = [
            LayerRange { start: 0, end: 3 },
            LayerRange { start: 3, end: 6 },
        ];
        let schedule = ScheduleConfig {
            micro_batches: 2,
            wire: StageDtype::F32,
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = links
                .into_iter()
                .enumerate()
                .map(|(s, mut link)| {
                    let (cfg, ranges) = (&cfg, &ranges);
                    scope.spawn(move || {
                        let ids = (Tensor::arange(64, (Kind::Int64, Device::Cpu)).reshape([4, 16])
                            * 31)
                            .remainder(2048);
                        let targets = (&ids * 7 + 3).remainder(2048);
                        let mut stage =
                            PipelineStage::new(cfg, 9, ranges[s], s as u32, 2, Device::Cpu, adamw)
                                .unwrap();
                        let batch = (Some(&ids), Some(&targets));
                        stage
                            .step(link.as_mut(), batch.0, batch.1, schedule, 1e-3, 1.0)
                            .unwrap();
                        stage
                            .gradients(link.as_mut(), batch.0, batch.1, schedule)
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Two nodes joined by `/forge/pipeline/1` compute, bit for bit, what two stages joined in
    /// memory do (which the trainer's tests hold against the whole model).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_run_a_pipeline_over_libp2p_as_in_memory() {
        let nets = cluster(2, |config| config).await;
        let peers: Vec<PeerId> = nets.iter().map(PeerNet::peer_id).collect();
        let timeout = Duration::from_secs(30);
        let (first, second) = bounded("joining the stages", async {
            tokio::join!(
                nets[0].pipeline_link(0, &peers, timeout),
                nets[1].pipeline_link(1, &peers, timeout)
            )
        })
        .await;
        let links: Vec<Box<dyn StageLink>> =
            vec![Box::new(first.unwrap()), Box::new(second.unwrap())];
        let over_libp2p = tokio::task::spawn_blocking(move || two_stages(links))
            .await
            .unwrap();
        let memory: Vec<Box<dyn StageLink>> = MemoryLink::mesh(2, timeout)
            .into_iter()
            .map(|l| Box::new(l) as Box<dyn StageLink>)
            .collect();
        let in_memory = two_stages(memory);
        for (stage, ((grads, loss), (want, want_loss))) in
            over_libp2p.iter().zip(&in_memory).enumerate()
        {
            assert_eq!(loss.to_bits(), want_loss.to_bits(), "stage {stage}: loss");
            assert_eq!(grads.len(), want.len());
            for (g, w) in grads.iter().zip(want) {
                assert!(g.equal(w), "stage {stage}: a gradient differs");
            }
        }
        assert!(over_libp2p[1].1 > 0.0, "the last stage computed a loss");

        // A node that is not the stage it claims is refused before anything is sent.
        let err = nets[0].pipeline_link(1, &peers, timeout).await.unwrap_err();
        assert!(err.to_string().contains("not stage 1"), "{err}");
    }
}
