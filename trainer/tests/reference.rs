//! Reference numerics: Forge's forward logits, loss and every gradient against an independent
//! float64 PyTorch implementation (`scripts/make_reference.py` writes the fixtures).

use forge_trainer::models::{Family, Model, ModelConfig, cross_entropy, weights};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor, nn::VarStore};

const TOLERANCE: f64 = 1e-4;

fn fixture_dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(family)
}

fn load_config(dir: &Path) -> ModelConfig {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from((a - b).abs().max()).unwrap()
}

fn check_family(family: &str) {
    let dir = fixture_dir(family);
    let cfg = load_config(&dir);
    let expected: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("expected.safetensors"))
            .unwrap()
            .into_iter()
            .collect();

    let mut vs = VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), &cfg).unwrap();
    weights::load(&mut vs, &cfg, &dir.join("weights.safetensors")).unwrap();

    let logits = model.forward(&expected["input_ids"]);
    let loss = cross_entropy(&logits, &expected["targets"]);
    loss.backward();

    let logits_diff = max_abs_diff(&logits, &expected["logits"]);
    let loss_diff = max_abs_diff(&loss.reshape([1]), &expected["loss"]);
    let mut grad_diff = 0.0f64;
    let mut worst = String::new();
    let vars = vs.variables();
    for (name, var) in &vars {
        let d = max_abs_diff(&var.grad(), &expected[&format!("grad.{name}")]);
        if d > grad_diff {
            grad_diff = d;
            worst = name.clone();
        }
    }
    println!(
        "{family}: max |Δ| logits {logits_diff:.3e}, loss {loss_diff:.3e}, \
         grads {grad_diff:.3e} ({} tensors, worst {worst})",
        vars.len()
    );
    assert!(
        logits_diff < TOLERANCE,
        "{family} logits differ by {logits_diff}"
    );
    assert!(
        loss_diff < TOLERANCE,
        "{family} loss differs by {loss_diff}"
    );
    assert!(
        grad_diff < TOLERANCE,
        "{family} grad of {worst} differs by {grad_diff}"
    );
}

#[test]
fn gpt2_matches_pytorch() {
    check_family("gpt2");
}

#[test]
fn llama_with_gqa_and_untied_head_matches_pytorch() {
    check_family("llama");
}

#[test]
fn a_fixture_for_another_model_is_refused_with_the_reason() {
    let dir = fixture_dir("llama");
    let mut cfg = load_config(&dir);
    cfg.family = Family::Gpt2;
    cfg.n_kv_head = cfg.n_head;
    cfg.tie_embeddings = true;
    let mut vs = VarStore::new(Device::Cpu);
    let _model = Model::new(&vs.root(), &cfg).unwrap();
    let err = weights::load(&mut vs, &cfg, &dir.join("weights.safetensors")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("does not match the model") && msg.contains("missing"),
        "{msg}"
    );

    // Same family, but the fixture's untied head cannot load into a tied model.
    let mut cfg = load_config(&dir);
    cfg.tie_embeddings = true;
    let mut vs = VarStore::new(Device::Cpu);
    let _model = Model::new(&vs.root(), &cfg).unwrap();
    let msg = weights::load(&mut vs, &cfg, &dir.join("weights.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tie_embeddings = false"), "{msg}");
}
