//! Every decoder of this crate that reads bytes from the network or disk, under
//! [`crate::fuzz::run`]: control frames (both directions, the opening exchange, the identity
//! proof, the status report), sync chunk headers and payloads of every codec, state-transfer
//! requests and answers, frame headers of every channel, and run config text.

use crate::codec::{self, Channel};
use crate::fuzz;
use crate::messages::{
    Capabilities, CoordinatorMessage, Device, DeviceKind, ErrorCode, ErrorReply, Hello, Join,
    Leave, MemberId, NodeMessage, RoundId, RoundReport, TensorKey,
};
use crate::pipeline::{StageDtype, StageHeader, StageKind};
use crate::quant::{self, Codec, Compression};
use crate::session::{
    ControlAction, ControlReply, ControlRequest, IdentityProof, Open, OpenReply, Purpose, Status,
};
use crate::state::{Manifest, Request, Response};
use crate::sync::{SyncChunkHeader, SyncCodec, SyncPhase};

fn capabilities() -> Capabilities {
    Capabilities {
        devices: vec![Device {
            kind: DeviceKind::Cuda,
            name: "NVIDIA GeForce RTX 4090".to_string(),
            memory_bytes: 24 << 30,
        }],
        tokens_per_s: 12_000.0,
        upload_bytes_per_s: 1 << 27,
        download_bytes_per_s: 1 << 27,
        peer_id: "12D3KooWAhmmHHr5pCneMFu4JN8fsSzA3ChxVw8MUXG7tDyW9KNH".to_string(),
        listen_addrs: vec!["/ip4/10.0.0.2/udp/4001/quic-v1".to_string()],
    }
}

#[test]
fn fuzz_node_messages() {
    let seeds: Vec<Vec<u8>> = [
        NodeMessage::Hello(Hello::current()),
        NodeMessage::Join(Join {
            capabilities: capabilities(),
            rejoin: Some(MemberId(3)),
        }),
        NodeMessage::Leave(Leave {
            reason: "done".to_string(),
        }),
        NodeMessage::RoundReport(RoundReport {
            round: RoundId(4),
            tokens_processed: 4096,
            us_per_step: 300_000,
            consumed: Vec::new(),
            outer_step: crate::OuterStep::Failed {
                reason: "nan".to_string(),
                rejected: Some(MemberId(2)),
                unreachable: None,
            },
        }),
    ]
    .iter()
    .map(|m| m.to_frame().unwrap())
    .collect();
    fuzz::run_frames(
        "control: node messages",
        Channel::Control,
        &seeds,
        |bytes| {
            let _ = NodeMessage::from_frame(bytes);
        },
    );
}

#[test]
fn fuzz_coordinator_messages() {
    let seeds: Vec<Vec<u8>> = [
        CoordinatorMessage::Hello(Hello::current()),
        CoordinatorMessage::Error(ErrorReply {
            code: ErrorCode::InvalidJoin,
            message: "the run has its limit".to_string(),
        }),
    ]
    .iter()
    .map(|m| m.to_frame().unwrap())
    .collect();
    fuzz::run_frames(
        "control: coordinator messages",
        Channel::Control,
        &seeds,
        |bytes| {
            let _ = CoordinatorMessage::from_frame(bytes);
        },
    );
}

#[test]
fn fuzz_the_opening_exchange() {
    let open = Open {
        hello: Hello::current(),
        token_secret: "0123456789abcdef".repeat(4),
        purpose: Purpose::Join,
    };
    let proof = IdentityProof {
        public_key: vec![8, 1, 18, 32].into_iter().chain([7u8; 32]).collect(),
        signature: vec![9; 64],
    };
    let refused = OpenReply::Refused(ErrorReply {
        code: ErrorCode::RateLimited,
        message: "too many joins".to_string(),
    });
    let control = ControlRequest {
        action: ControlAction::Stop,
        at_round: Some(crate::RoundId(12)),
    };
    let accepted = ControlReply::Accepted {
        what: "stop at the close of round 12".to_string(),
        pending: Vec::new(),
    };
    let seeds = vec![
        open.to_frame().unwrap(),
        proof.to_frame().unwrap(),
        refused.to_frame().unwrap(),
        control.to_frame().unwrap(),
        accepted.to_frame().unwrap(),
    ];
    fuzz::run_frames(
        "control: open, proof, reply",
        Channel::Control,
        &seeds,
        |bytes| {
            let _ = Open::from_frame(bytes);
            let _ = IdentityProof::from_frame(bytes);
            let _ = OpenReply::from_frame(bytes);
            let _ = Status::from_frame(bytes);
            let _ = ControlRequest::from_frame(bytes);
            let _ = ControlReply::from_frame(bytes);
        },
    );
}

#[test]
fn fuzz_frame_headers_of_every_channel() {
    let seeds = vec![
        NodeMessage::Hello(Hello::current()).to_frame().unwrap(),
        Request::Manifest { version: 3 }.to_frame().unwrap(),
    ];
    fuzz::run("frame headers", &seeds, |bytes| {
        for channel in [
            Channel::Control,
            Channel::Sync,
            Channel::Snapshot,
            Channel::State,
        ] {
            let _ = codec::parse_header(channel, bytes);
            let _ = codec::next_frame_len(channel, bytes);
        }
    });
}

fn sync_header(codec: SyncCodec, zstd: bool, payload_len: u32) -> SyncChunkHeader {
    SyncChunkHeader {
        round: RoundId(9),
        group: 0xfeed,
        sender: 1,
        stage: 0,
        phase: SyncPhase::ReduceScatter,
        owner: 0,
        members: 3,
        offset: 64,
        values: 64,
        total_len: 600,
        weight: 2048.0,
        norm: 12.5,
        codec,
        payload_len,
        zstd,
    }
}

#[test]
fn fuzz_sync_chunk_headers() {
    let seeds = vec![
        sync_header(SyncCodec::F32, false, 256).to_frame().unwrap(),
        sync_header(SyncCodec::Int4Blocks { block: 64 }, true, 40)
            .to_frame()
            .unwrap(),
        sync_header(
            SyncCodec::TopK {
                block: 64,
                k: 5,
                bits: 2,
            },
            false,
            10,
        )
        .to_frame()
        .unwrap(),
    ];
    fuzz::run_frames("sync: chunk headers", Channel::Sync, &seeds, |bytes| {
        if let Ok(header) = SyncChunkHeader::from_frame(bytes) {
            assert!(
                header.check().is_ok(),
                "from_frame returned an unchecked header"
            );
        }
    });
}

#[test]
fn fuzz_pipeline_stage_headers() {
    let seeds = vec![
        StageHeader::new(
            3,
            1,
            StageKind::Activation,
            StageDtype::F32,
            vec![2, 64, 128],
        )
        .to_frame()
        .unwrap(),
        StageHeader::new(3, 0, StageKind::Scalars, StageDtype::F32, vec![2])
            .to_frame()
            .unwrap(),
    ];
    fuzz::run_frames(
        "pipeline: stage headers",
        Channel::Pipeline,
        &seeds,
        |bytes| {
            if let Ok(header) = StageHeader::from_frame(bytes) {
                assert!(
                    header.check().is_ok(),
                    "from_frame returned an unchecked header"
                );
            }
        },
    );
}

#[test]
fn fuzz_sync_payloads_of_every_codec() {
    let values: Vec<f32> = (0..300)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    let compressions: Vec<Compression> = [
        (Codec::Fp32, None),
        (Codec::Bf16, Some(3)),
        (Codec::Int8 { block_size: 64 }, None),
        (Codec::Int8 { block_size: 64 }, Some(1)),
        (Codec::Int4 { block_size: 32 }, None),
        (Codec::Int4 { block_size: 32 }, Some(3)),
        (
            Codec::TopK {
                block_size: 64,
                k: 5,
                bits: 2,
            },
            None,
        ),
        (
            Codec::TopK {
                block_size: 64,
                k: 9,
                bits: 4,
            },
            Some(3),
        ),
    ]
    .into_iter()
    .map(|(codec, zstd)| Compression::new(codec, zstd).unwrap())
    .collect();
    let seeds: Vec<Vec<u8>> = compressions
        .iter()
        .map(|c| quant::encode(&values, c).unwrap())
        .collect();
    let mut out = vec![0.0f32; values.len()];
    fuzz::run("sync: payloads", &seeds, |bytes| {
        for compression in &compressions {
            let _ = quant::decode_into(bytes, &mut out, compression);
            let _ = quant::decode_add_into(bytes, &mut out, compression);
        }
    });
}

#[test]
fn fuzz_state_transfer_requests_and_answers() {
    let manifest = Response::Manifest(Manifest {
        version: 7,
        round: 7,
        step: 175,
        tokens: 1 << 20,
        tensors: vec![
            (TensorKey::Param("wte.weight".to_string()), 1 << 16),
            (TensorKey::Param("lm_head.weight".to_string()), 1 << 16),
        ],
    });
    let seeds = vec![
        manifest.to_frame().unwrap(),
        Response::OtherVersion { held: Some(6) }.to_frame().unwrap(),
        Request::Chunk {
            version: 7,
            tensor: 1,
            offset: 4096,
            values: 4096,
        }
        .to_frame()
        .unwrap(),
    ];
    fuzz::run_frames("state transfer", Channel::State, &seeds, |bytes| {
        let _ = Request::from_frame(bytes);
        if let Ok(Response::Manifest(manifest)) = Response::from_frame(bytes) {
            let _ = manifest.check();
        }
        let _ = crate::state::frame_len(bytes);
    });
}

#[test]
fn fuzz_run_config_text() {
    let seeds: Vec<Vec<u8>> = [
        include_str!("../../configs/tiny-cpu.toml"),
        include_str!("../../configs/diloco-tiny-cpu.toml"),
    ]
    .iter()
    .map(|text| text.as_bytes().to_vec())
    .collect();
    fuzz::run("run config", &seeds, |bytes| {
        if let Ok(text) = std::str::from_utf8(bytes) {
            let _ = crate::RunConfig::parse(text, std::path::Path::new("run.toml"));
        }
    });
}
