//! Forge's inner optimizers against PyTorch's (`torch.optim.Muon` with `torch.optim.AdamW` for
//! the other parameters, `torch.optim.Adafactor`, `torch.optim.AdamW`) from the project's
//! virtualenv: `tests/optimizers.py` takes a few steps with fixed random gradients and a
//! changing learning rate on parameters named like a small Llama's; Forge takes the same steps
//! from the same start, and every parameter and state tensor must agree.

use forge_integration_tests::{run_command, venv_python};
use forge_trainer::optim::{
    AdafactorConfig, AdamWConfig, MuonConfig, MuonLrAdjust, NsPrecision, Optimizer,
    OptimizerConfig, OptimizerKind,
};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tch::{Device, Tensor, nn::VarStore};

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from((a - b).abs().max()).unwrap()
}

const LRS: [f64; 6] = [0.02, 0.02, 0.015, 0.01, 0.01, 0.005];

/// Runs PyTorch's side of `cfg` and Forge's; returns the largest difference of the parameters
/// and of the state tensors.
fn compare(name: &str, cfg: OptimizerConfig, adamw: AdamWConfig) -> (f64, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let case = tmp.path().join("case.json");
    let out = tmp.path().join("torch.safetensors");
    let kind = match cfg.kind {
        OptimizerKind::Adamw => "adamw",
        OptimizerKind::Muon => "muon",
        OptimizerKind::Adafactor => "adafactor",
    };
    let adjust = match cfg.muon.adjust_lr_fn {
        MuonLrAdjust::Original => "original",
        MuonLrAdjust::MatchRmsAdamw => "match_rms_adamw",
        MuonLrAdjust::None => "none",
    };
    let m = cfg.muon;
    let f = cfg.adafactor;
    let request = json!({
        "kind": kind,
        "lrs": LRS,
        "adamw": {"beta1": adamw.beta1, "beta2": adamw.beta2, "eps": adamw.eps,
                  "weight_decay": adamw.weight_decay},
        "muon": {"momentum": m.momentum, "nesterov": m.nesterov, "ns_steps": m.ns_steps,
                 "adjust_lr_fn": adjust, "weight_decay": m.weight_decay},
        "adafactor": {"beta2_decay": f.beta2_decay, "eps1": f.eps1, "eps2": f.eps2, "d": f.d,
                      "weight_decay": f.weight_decay},
    });
    std::fs::write(&case, request.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("optimizers.py");
    let mut command = Command::new(venv_python());
    command.arg(&script).arg(&case).arg(&out);
    let ran = run_command(command, Duration::from_secs(120));
    assert!(
        ran.success(),
        "{name}: the PyTorch side failed: {}",
        ran.stderr
    );
    let torch: HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();

    // The same parameters, under the same names, from the same start.
    let vs = VarStore::new(Device::Cpu);
    let mut names: Vec<String> = torch
        .keys()
        .filter_map(|k| k.strip_prefix("init.").map(str::to_string))
        .collect();
    names.sort();
    for n in &names {
        let (path, leaf) = n.rsplit_once('.').unwrap();
        let p = path.split('.').fold(vs.root(), |p, part| p / part);
        let init = &torch[&format!("init.{n}")];
        let var = p.var(leaf, &init.size(), tch::nn::Init::Const(0.0));
        tch::no_grad(|| var.shallow_clone().copy_(init));
    }
    let mut opt = Optimizer::new(&vs, &cfg, adamw);
    for (step, lr) in LRS.iter().enumerate() {
        let grads: Vec<Tensor> = names
            .iter()
            .map(|n| torch[&format!("grad.{step}.{n}")].shallow_clone())
            .collect();
        opt.step(*lr, &grads);
    }
    let mine: HashMap<String, Tensor> = vs.variables().into_iter().collect();
    let params = names
        .iter()
        .map(|n| max_abs_diff(&mine[n], &torch[&format!("final.{n}")]))
        .fold(0.0, f64::max);
    let state: HashMap<String, Tensor> = opt.state_tensors().into_iter().collect();
    let theirs: Vec<(&String, &Tensor)> = torch
        .iter()
        .filter(|(k, _)| k.starts_with("state."))
        .collect();
    assert_eq!(
        theirs.len() + 1,
        state.len(),
        "{name}: one state tensor per PyTorch state tensor (and `step`)"
    );
    let states = theirs
        .iter()
        .map(|(k, t)| {
            let key = k.strip_prefix("state.").unwrap();
            let mine = state
                .get(key)
                .unwrap_or_else(|| panic!("{name}: Forge has no state tensor {key}"));
            max_abs_diff(mine, t)
        })
        .fold(0.0, f64::max);
    let moved = names
        .iter()
        .map(|n| max_abs_diff(&mine[n], &torch[&format!("init.{n}")]))
        .fold(0.0, f64::max);
    println!(
        "{name}: max |Δ| parameters {params:.3e}, state {states:.3e} (after {} steps that moved \
         the parameters by up to {moved:.3e})",
        LRS.len()
    );
    assert!(moved > 1e-3, "{name}: the steps moved nothing");
    (params, states)
}

#[test]
fn forge_optimizers_take_pytorchs_steps() {
    let adamw = AdamWConfig {
        weight_decay: 0.1,
        ..AdamWConfig::default()
    };
    let muon = |adjust_lr_fn, nesterov| OptimizerConfig {
        kind: OptimizerKind::Muon,
        muon: MuonConfig {
            adjust_lr_fn,
            nesterov,
            // torch.optim.Muon's arithmetic: Newton–Schulz in bf16 on every device.
            ns_precision: NsPrecision::Bf16,
            ..MuonConfig::default()
        },
        ..OptimizerConfig::default()
    };
    let adafactor = |weight_decay| OptimizerConfig {
        kind: OptimizerKind::Adafactor,
        adafactor: AdafactorConfig {
            weight_decay,
            ..AdafactorConfig::default()
        },
        ..OptimizerConfig::default()
    };
    let cases = [
        ("adamw", OptimizerConfig::default(), 1e-6, 1e-6),
        // Newton–Schulz runs in bf16 on both sides; the same libtorch kernels give the same bits
        // up to summation order.
        (
            "muon (original)",
            muon(MuonLrAdjust::Original, true),
            1e-5,
            1e-6,
        ),
        (
            "muon (match_rms_adamw)",
            muon(MuonLrAdjust::MatchRmsAdamw, true),
            1e-5,
            1e-6,
        ),
        (
            "muon (no Nesterov)",
            muon(MuonLrAdjust::Original, false),
            1e-5,
            1e-6,
        ),
        ("adafactor", adafactor(0.0), 1e-6, 1e-6),
        ("adafactor (weight decay)", adafactor(0.01), 1e-6, 1e-6),
    ];
    for (name, cfg, params_tol, state_tol) in cases {
        let (params, state) = compare(name, cfg, adamw);
        assert!(
            params <= params_tol,
            "{name}: parameters differ by {params:.3e}"
        );
        assert!(state <= state_tol, "{name}: state differs by {state:.3e}");
    }
}
