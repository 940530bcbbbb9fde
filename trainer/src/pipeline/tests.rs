use super::*;

#[test]
fn tensors_cross_the_wire_in_fp32_exactly_and_in_bf16_rounded() {
    let _rng = crate::rng();
    tch::manual_seed(5);
    let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
    let (shape, bytes) = to_wire(&x, StageDtype::F32).unwrap();
    let header = StageHeader::new(1, 0, StageKind::Activation, StageDtype::F32, shape.clone());
    assert!(from_wire(&header, &bytes, Device::Cpu).unwrap().equal(&x));

    let (shape16, bytes16) = to_wire(&x, StageDtype::Bf16).unwrap();
    assert_eq!(bytes16.len() * 2, bytes.len());
    let header16 = StageHeader::new(1, 0, StageKind::Activation, StageDtype::Bf16, shape16);
    let back = from_wire(&header16, &bytes16, Device::Cpu).unwrap();
    assert!(back.equal(&x.to_kind(Kind::BFloat16).to_kind(Kind::Float)));

    // A payload that is not what the header says is refused, not reshaped.
    let err = from_wire(&header, &bytes[4..], Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("declared"), "{err}");
}

#[test]
fn a_stage_refuses_layers_that_break_the_pipeline_order() {
    let cfg = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    // Stage 1 of 2 holding the embeddings; stage 0 of 2 holding the head.
    let embeds = LayerRange { start: 0, end: 3 };
    let err = PipelineStage::new(&cfg, 1, embeds, 1, 2, Device::Cpu, adamw).unwrap_err();
    assert!(err.to_string().contains("first stage must hold"), "{err}");
    let whole = LayerRange::whole(cfg.n_layer as u32);
    assert!(PipelineStage::new(&cfg, 1, whole, 0, 2, Device::Cpu, adamw).is_err());
    assert!(PipelineStage::new(&cfg, 1, whole, 0, 1, Device::Cpu, adamw).is_ok());
}

#[test]
fn a_message_out_of_schedule_is_an_error_naming_both_sides() {
    let cfg = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
    let adamw = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut links = MemoryLink::mesh(2, Duration::from_secs(5));
    let mut last = PipelineStage::new(
        &cfg,
        1,
        LayerRange { start: 3, end: 6 },
        1,
        2,
        Device::Cpu,
        adamw,
    )
    .unwrap();
    // Stage 0 sends a gradient where an activation of micro-batch 0 is due.
    let (shape, bytes) = to_wire(
        &Tensor::zeros([1, 4, 128], (Kind::Float, Device::Cpu)),
        StageDtype::F32,
    )
    .unwrap();
    let header = StageHeader::new(0, 0, StageKind::Gradient, StageDtype::F32, shape);
    links[0].send(1, &header, &bytes).unwrap();
    let targets = Tensor::zeros([1, 4], (Kind::Int64, Device::Cpu));
    let schedule = ScheduleConfig {
        micro_batches: 1,
        wire: StageDtype::F32,
    };
    let err = last
        .gradients(&mut links[1], None, Some(&targets), schedule)
        .unwrap_err();
    assert!(err.to_string().contains("expected Activation"), "{err}");
}
