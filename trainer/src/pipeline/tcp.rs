//! [`StageLink`] over byte streams: every pair of stages joined by one bidirectional stream,
//! each read by a thread of its own into a queue, so a send never waits for the peer to read.
//! [`TcpLink::mesh`] joins stages over TCP; a node joins them over libp2p streams.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use forge_protocol::codec::{self, Channel, HEADER_LEN};
use forge_protocol::pipeline::StageHeader;

use super::{Message, StageLink};
use crate::error::{Error, Result};

/// One stage's streams to every other stage of its pipeline.
pub struct StreamLink {
    stage: u32,
    to: Vec<Option<Box<dyn Write + Send>>>,
    from: Vec<Option<mpsc::Receiver<Result<Message>>>>,
    timeout: Duration,
    sent: u64,
}

impl std::fmt::Debug for StreamLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLink")
            .field("stage", &self.stage)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The reading and the writing half of one stream to another stage.
pub type StreamPair = (Box<dyn Read + Send>, Box<dyn Write + Send>);

impl StreamLink {
    /// Stage `stage`'s link from its open streams: `streams[j]` joins it to stage `j` (`None`
    /// for itself). Each reading half gets a thread; `timeout` bounds every wait for a message.
    pub fn new(
        stage: u32,
        streams: Vec<Option<StreamPair>>,
        timeout: Duration,
    ) -> Result<StreamLink> {
        let mut to = Vec::with_capacity(streams.len());
        let mut from = Vec::with_capacity(streams.len());
        for (j, pair) in streams.into_iter().enumerate() {
            let Some((reader, writer)) = pair else {
                to.push(None);
                from.push(None);
                continue;
            };
            let (tx, rx) = mpsc::channel();
            std::thread::Builder::new()
                .name(format!("stage-{j}-reader"))
                .spawn(move || read_messages(reader, j as u32, tx))
                .map_err(io_error("starting a reader thread".to_string()))?;
            to.push(Some(writer));
            from.push(Some(rx));
        }
        Ok(StreamLink {
            stage,
            to,
            from,
            timeout,
            sent: 0,
        })
    }

    /// Bytes this stage has sent (headers and tensors).
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }
}

/// Stages joined over TCP.
#[derive(Debug)]
pub struct TcpLink;

fn io_error(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |err| Error::Pipeline(format!("{what}: {err}"))
}

impl TcpLink {
    /// Joins stage `stage` to every other: it dials each lower stage at `addrs[j]` (retrying
    /// until `timeout`) and accepts each higher one on `listener` (bound at `addrs[stage]`).
    /// A connection opens with the dialling stage's index. `timeout` also bounds every wait for
    /// a message.
    pub fn mesh(
        stage: u32,
        addrs: &[SocketAddr],
        listener: TcpListener,
        timeout: Duration,
    ) -> Result<StreamLink> {
        let n = addrs.len();
        let mut streams: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
        let deadline = Instant::now() + timeout;
        for (j, addr) in addrs.iter().enumerate().take(stage as usize) {
            let mut stream = loop {
                match TcpStream::connect_timeout(addr, timeout) {
                    Ok(stream) => break stream,
                    Err(err) if Instant::now() >= deadline => {
                        return Err(Error::Pipeline(format!(
                            "stage {stage} cannot reach stage {j} at {addr}: {err}"
                        )));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            stream
                .write_all(&stage.to_le_bytes())
                .map_err(io_error(format!("greeting stage {j}")))?;
            streams[j] = Some(stream);
        }
        for _ in stage as usize + 1..n {
            let (mut stream, peer) = listener
                .accept()
                .map_err(io_error(format!("stage {stage} waiting for higher stages")))?;
            stream
                .set_read_timeout(Some(timeout))
                .map_err(io_error(format!("configuring the connection from {peer}")))?;
            let mut index = [0u8; 4];
            stream
                .read_exact(&mut index)
                .map_err(io_error(format!("reading the stage index of {peer}")))?;
            let j = u32::from_le_bytes(index) as usize;
            if j <= stage as usize || j >= n || streams[j].is_some() {
                return Err(Error::Pipeline(format!(
                    "{peer} says it is stage {j}, which stage {stage} does not expect"
                )));
            }
            streams[j] = Some(stream);
        }
        let pairs = streams
            .into_iter()
            .enumerate()
            .map(|(j, stream)| {
                let Some(stream) = stream else {
                    return Ok(None);
                };
                stream
                    .set_nodelay(true)
                    .and_then(|()| stream.set_read_timeout(None))
                    .map_err(io_error(format!("configuring the connection to stage {j}")))?;
                let reader = stream
                    .try_clone()
                    .map_err(io_error(format!("the connection to stage {j}")))?;
                Ok(Some((
                    Box::new(reader) as Box<dyn Read + Send>,
                    Box::new(stream) as Box<dyn Write + Send>,
                )))
            })
            .collect::<Result<Vec<_>>>()?;
        StreamLink::new(stage, pairs, timeout)
    }
}

/// Reads messages from stage `from` until the connection ends or sends something malformed
/// (then the error is the last thing queued).
fn read_messages(mut stream: Box<dyn Read + Send>, from: u32, tx: mpsc::Sender<Result<Message>>) {
    loop {
        let message = read_message(&mut stream, from);
        let end = message.is_err();
        if tx.send(message).is_err() || end {
            return;
        }
    }
}

fn read_message(stream: &mut dyn Read, from: u32) -> Result<Message> {
    let bad = |err: String| Error::Pipeline(format!("stage {from}: {err}"));
    let mut frame = vec![0u8; HEADER_LEN];
    stream
        .read_exact(&mut frame)
        .map_err(|err| bad(format!("connection ended: {err}")))?;
    let frame_header =
        codec::parse_header(Channel::Pipeline, &frame).map_err(|err| bad(err.to_string()))?;
    frame.resize(frame_header.frame_len(), 0);
    stream
        .read_exact(&mut frame[HEADER_LEN..])
        .map_err(|err| bad(format!("connection ended mid-frame: {err}")))?;
    let header = StageHeader::from_frame(&frame).map_err(|err| bad(err.to_string()))?;
    let mut payload = vec![0u8; header.payload_len as usize];
    stream
        .read_exact(&mut payload)
        .map_err(|err| bad(format!("connection ended mid-tensor: {err}")))?;
    Ok((header, payload))
}

impl StageLink for StreamLink {
    fn send(&mut self, to: u32, header: &StageHeader, payload: &[u8]) -> Result<()> {
        let stage = self.stage;
        let stream = self
            .to
            .get_mut(to as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::Pipeline(format!("stage {stage} has no link to stage {to}")))?;
        let frame = header
            .to_frame()
            .map_err(|err| Error::Pipeline(err.to_string()))?;
        stream
            .write_all(&frame)
            .and_then(|()| stream.write_all(payload))
            .and_then(|()| stream.flush())
            .map_err(io_error(format!("sending to stage {to}")))?;
        self.sent += (frame.len() + payload.len()) as u64;
        Ok(())
    }

    fn recv(&mut self, from: u32) -> Result<Message> {
        let stage = self.stage;
        let rx = self
            .from
            .get(from as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| {
                Error::Pipeline(format!("stage {stage} has no link from stage {from}"))
            })?;
        match rx.recv_timeout(self.timeout) {
            Ok(message) => message,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Pipeline(format!(
                "stage {from} sent nothing for {:?}",
                self.timeout
            ))),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Pipeline(format!(
                "the connection from stage {from} ended"
            ))),
        }
    }
}
