//! Every decoder of this crate that reads bytes from disk or the network, under
//! [`forge_protocol::fuzz`]: the node key file, the sync stream's chunk headers and payloads as
//! the receiver reads them, and the state transfer's frames as the fetcher (answers, manifest
//! checks) and the server (chunk requests) read them. The frame and message decoding itself is
//! `forge_protocol`'s and fuzzed there; these drive the node's own reading and checks around it.

use std::collections::BTreeMap;
use std::fs;
use std::sync::Arc;

use forge_protocol::codec::Channel;
use forge_protocol::fuzz;
use forge_protocol::messages::{RoundId, TensorKey};
use forge_protocol::quant::{self, Codec, Compression};
use forge_protocol::state::{Request, Response};
use forge_protocol::sync::{SyncChunkHeader, SyncPhase};
use futures::AsyncReadExt;
use futures::executor::block_on;
use futures::io::Cursor;

use crate::p2p::{
    StateSnapshot, check_manifest, chunk_of, load_or_create_keypair, read_frame, read_header,
    read_payload, relay,
};

#[test]
fn fuzz_node_key() {
    let dir = tempfile::tempdir().unwrap();
    // The seed is the key file the node writes on its first start (mode 0600, which rewriting
    // it below keeps).
    let created = load_or_create_keypair(dir.path()).unwrap();
    let path = dir.path().join("node_key");
    let seeds = vec![fs::read(&path).unwrap()];
    assert_eq!(
        load_or_create_keypair(dir.path()).unwrap().public(),
        created.public()
    );
    fuzz::run("node: key file", &seeds, |bytes| {
        fs::write(&path, bytes).unwrap();
        let _ = load_or_create_keypair(dir.path());
    });
}

/// A chunk of `values` encoded with `compression`, and the header a sender writes before it.
fn sync_chunk(compression: &Compression, phase: SyncPhase, values: &[f32]) -> (Vec<u8>, Vec<u8>) {
    let mut payload = Vec::new();
    quant::encode_into(values, compression, &mut payload).unwrap();
    let (codec, zstd) = compression.sync_codec();
    let header = SyncChunkHeader {
        round: RoundId(12),
        group: 0x5eed,
        sender: 2,
        stage: 0,
        phase,
        owner: 1,
        members: 4,
        offset: 256,
        values: values.len() as u32,
        total_len: 1024,
        weight: 4096.0,
        norm: 3.5,
        codec,
        payload_len: payload.len() as u32,
        zstd,
    };
    (header.to_frame().unwrap(), payload)
}

#[test]
fn fuzz_sync_stream() {
    let values: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) / 64.0).collect();
    let chunks = [
        (
            Compression {
                codec: Codec::Fp32,
                zstd: None,
            },
            SyncPhase::ReduceScatter,
        ),
        (
            Compression {
                codec: Codec::Int8 { block_size: 64 },
                zstd: None,
            },
            SyncPhase::AllGather,
        ),
    ]
    .map(|(compression, phase)| sync_chunk(&compression, phase, &values));
    // The header frames are the seeds (so the fuzzer can rebuild a valid frame header around a
    // mutated header); the payload the stream holds after them is the real one that follows the
    // first seed, as many bytes as it announces.
    let seeds: Vec<Vec<u8>> = chunks.iter().map(|(frame, _)| frame.clone()).collect();
    let payload = chunks[0].1.clone();
    for (frame, payload) in &chunks {
        let mut stream = Cursor::new(frame.clone()).chain(Cursor::new(payload.clone()));
        let (header, bytes) = block_on(read_header(&mut stream)).unwrap();
        assert_eq!(bytes, frame.len() as u64);
        let mut buf = Vec::new();
        block_on(read_payload(&mut stream, &header, &mut buf)).unwrap();
        assert_eq!(&buf, payload);
    }
    let mut buf = Vec::new();
    fuzz::run_frames("node: sync stream", Channel::Sync, &seeds, |bytes| {
        // As the receiver reads a stream: a header, then the payload it announces.
        let mut stream = Cursor::new(bytes).chain(Cursor::new(&payload[..]));
        block_on(async {
            if let Ok((header, _)) = read_header(&mut stream).await {
                let _ = read_payload(&mut stream, &header, &mut buf).await;
            }
        });
    });
}

/// A relayed topk chunk as a member decodes it: the container and every member's part.
#[test]
fn fuzz_relayed_chunk() {
    let compression = Compression {
        codec: Codec::TopK {
            block_size: 64,
            k: 4,
            bits: 2,
        },
        zstd: None,
    };
    let codec = crate::join::relay_codec(compression, 100);
    let parts: Vec<Vec<u8>> = (0..3)
        .map(|m| {
            let values: Vec<f32> = (0..100)
                .map(|i| ((i * (m + 3)) % 17) as f32 - 8.0)
                .collect();
            let mut bytes = Vec::new();
            quant::encode_into(&values, &compression, &mut bytes).unwrap();
            bytes
        })
        .collect();
    let mut seed = Vec::new();
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    relay::pack(&refs, &mut seed).unwrap();
    let (mut out, mut sum, mut part) = (vec![0.0f32; 100], vec![0.0f64; 100], vec![0.0f32; 100]);
    relay::decode(&*codec, &seed, 3, 6.0, &mut out, &mut sum, &mut part).unwrap();
    fuzz::run("node: relayed chunk", &[seed], |bytes| {
        let _ = relay::decode(&*codec, bytes, 3, 6.0, &mut out, &mut sum, &mut part);
    });
}

/// A served state: two parameters and a momentum, at version 5.
fn snapshot() -> StateSnapshot {
    let values = |n: usize, scale: f32| Arc::new((0..n).map(|i| i as f32 * scale).collect());
    StateSnapshot {
        version: 5,
        round: 6,
        step: 300,
        tokens: 1 << 20,
        tensors: vec![
            (TensorKey::Param("w".into()), values(6, 0.5)),
            (TensorKey::Momentum("w".into()), values(6, -0.25)),
            (TensorKey::Param("b".into()), values(3, 2.0)),
        ],
    }
}

#[test]
fn fuzz_state_answers() {
    let snapshot = snapshot();
    let expected = snapshot.digests();
    let lengths: BTreeMap<TensorKey, u64> = snapshot
        .tensors
        .iter()
        .map(|(key, values)| (key.clone(), values.len() as u64))
        .collect();
    let no_lengths = BTreeMap::new();
    // What a member's state server answers.
    let seeds: Vec<Vec<u8>> = [
        Response::Manifest(snapshot.manifest()),
        Response::Chunk {
            version: 5,
            tensor: 1,
            offset: 2,
            values: 4,
        },
        Response::OtherVersion { held: Some(4) },
        Response::Refused {
            reason: "values 0..+9 are outside `b`, which has 3".to_string(),
        },
    ]
    .iter()
    .map(|response| response.to_frame().unwrap())
    .collect();
    let manifest = block_on(read_frame(
        &mut Cursor::new(&seeds[0]),
        Response::from_frame,
    ));
    match manifest {
        Ok((Response::Manifest(manifest), _)) => {
            check_manifest(&manifest, &expected, &lengths).unwrap();
        }
        other => panic!("the manifest seed does not read back: {other:?}"),
    }
    fuzz::run_frames("node: state answers", Channel::State, &seeds, |bytes| {
        // As the fetcher reads a peer's answer, then checks a manifest of the version it asked
        // for against the coordinator's hashes, with and without the model's lengths.
        let read = block_on(read_frame(&mut Cursor::new(bytes), Response::from_frame));
        if let Ok((Response::Manifest(manifest), _)) = read
            && manifest.version == snapshot.version
        {
            let _ = check_manifest(&manifest, &expected, &lengths);
            let _ = check_manifest(&manifest, &expected, &no_lengths);
        }
    });
}

#[test]
fn fuzz_state_requests() {
    let snapshot = snapshot();
    // What a fetching member sends.
    let seeds: Vec<Vec<u8>> = [
        Request::Manifest { version: 5 },
        Request::Chunk {
            version: 5,
            tensor: 0,
            offset: 2,
            values: 4,
        },
        Request::Chunk {
            version: 5,
            tensor: 2,
            offset: 0,
            values: 3,
        },
    ]
    .iter()
    .map(|request| request.to_frame().unwrap())
    .collect();
    fuzz::run_frames("node: state requests", Channel::State, &seeds, |bytes| {
        // As the server reads a request, then finds the values a chunk request asks for.
        let read = block_on(read_frame(&mut Cursor::new(bytes), Request::from_frame));
        if let Ok((
            Request::Chunk {
                tensor,
                offset,
                values,
                ..
            },
            _,
        )) = read
            && let Ok(slice) = chunk_of(&snapshot, tensor, offset, values)
        {
            assert_eq!(slice.len(), values as usize);
        }
    });
}
