//! `forge-node export --hf` as a user runs it: a model of each family trained with `forge-node
//! train` is exported, and Hugging Face transformers (the virtualenv's, driven by
//! `tests/hf_export.py`) loads the folder with `AutoModelForCausalLM` and `AutoTokenizer` and
//! agrees with Forge on the same checkpoint: every logit of a fixed input within 1e-4, the
//! prompt's token ids, and the greedy continuation token for token.

use forge_integration_tests::{Run, max_abs_diff, run, run_command, tiny_run_config, venv_python};
use forge_trainer::data::Tokenizer;
use forge_trainer::sample::{SampleConfig, generate};
use forge_trainer::train::load_checkpoint_model;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const LIMIT: Duration = Duration::from_secs(180);
/// Largest |Forge logit - transformers logit| allowed (both fp32 on the CPU).
const TOLERANCE: f64 = 1e-4;
const STEPS: u64 = 8;
const PROMPT: &str = "Once upon a time, there was a little girl named";
const NEW_TOKENS: usize = 24;

/// One exported run and what Forge computes from its checkpoint.
struct Case {
    family: &'static str,
    architecture: &'static str,
    export: PathBuf,
    ids: Vec<i64>,
    /// (T, vocab).
    logits: Vec<Vec<f32>>,
    prompt_ids: Vec<u32>,
    greedy: Vec<u32>,
    decoded: String,
}

fn node(args: &[&str]) -> Run {
    run("forge-node", args, LIMIT)
}

/// Trains a tiny model of `family` (with `[model]` overrides `extra`) for a few steps, exports
/// it, and computes Forge's side of the comparison from the checkpoint.
fn train_and_export(
    tmp: &Path,
    family: &'static str,
    architecture: &'static str,
    extra: &str,
) -> Case {
    let dir = tmp.join(family);
    std::fs::create_dir(&dir).unwrap();
    let out = dir.join("run");
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("forge-data-cache");
    let config = tiny_run_config(&dir, &out, &cache, STEPS, 1000);
    let mut text = std::fs::read_to_string(&config).unwrap();
    // A small learning rate: a few steps at the usual one collapse the model onto "." (its
    // greedy continuation is then "...." and would show nothing), this one keeps it varied.
    let family_line = format!("family = \"{family}\"\n{extra}");
    for (from, to) in [
        ("family = \"llama\"\n", family_line.as_str()),
        ("lr = 3e-3\n", "lr = 1e-4\n"),
    ] {
        assert!(text.contains(from), "tiny-cpu.toml no longer has {from}");
        text = text.replacen(from, to, 1);
    }
    std::fs::write(&config, text).unwrap();

    let r = node(&["train", "--config", config.to_str().unwrap()]);
    assert!(r.success(), "{family} training failed: {}", r.stderr);
    let export = dir.join("hf");
    let r = node(&[
        "export",
        "--checkpoint",
        out.to_str().unwrap(),
        "--hf",
        export.to_str().unwrap(),
    ]);
    assert!(r.success(), "{family} export failed: {}", r.stderr);
    assert!(
        r.stdout.contains(&format!("exported step {STEPS} ")) && r.stdout.contains(architecture),
        "{}",
        r.stdout
    );

    let checkpoint = out.join(format!("checkpoints/step-{STEPS:08}"));
    let (_vs, model, _state) = load_checkpoint_model(&checkpoint, Device::Cpu).unwrap();
    let tokenizer = Tokenizer::load(&checkpoint.join("tokenizer.json")).unwrap();
    let prompt_ids = tokenizer.encode(PROMPT).unwrap();
    // The prompt, end of text, and ids from the top of the tokenizer's and the model's vocabularies.
    let vocab = model.config().vocab_size;
    let mut ids: Vec<i64> = prompt_ids.iter().map(|&t| t as i64).collect();
    ids.extend([
        tokenizer.separator_id() as i64,
        tokenizer.vocab_size() as i64 - 1,
        vocab - 1,
        3,
    ]);
    let logits = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).unsqueeze(0)));
    assert_eq!(logits.kind(), Kind::Float);
    let logits: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(logits.squeeze_dim(0)).unwrap();
    let greedy_cfg = SampleConfig {
        max_new_tokens: NEW_TOKENS,
        temperature: 0.0,
        top_k: 0,
        seed: 0,
    };
    let greedy = generate(
        &model,
        &prompt_ids,
        &greedy_cfg,
        &tokenizer.stop_ids(),
        Device::Cpu,
    );
    let decoded = tokenizer.decode(&greedy).unwrap();
    Case {
        family,
        architecture,
        export,
        ids,
        logits,
        prompt_ids,
        greedy,
        decoded,
    }
}

/// Runs `tests/hf_export.py` on every case's folder; its report for each, in order.
fn transformers_reports(tmp: &Path, cases: &[Case]) -> Vec<Value> {
    let request = json!({
        "exports": cases.iter().map(|c| json!({"folder": c.export, "ids": c.ids})).collect::<Vec<_>>(),
        "prompt": PROMPT,
        "max_new_tokens": NEW_TOKENS,
    });
    let request_path = tmp.join("request.json");
    let result_path = tmp.join("result.json");
    std::fs::write(&request_path, request.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hf_export.py");
    let mut python = Command::new(venv_python());
    python
        .arg(&script)
        .arg(&request_path)
        .arg(&result_path)
        // Local folders only: never reach for the Hub.
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_VERBOSITY", "error");
    let r = run_command(python, LIMIT);
    assert!(
        r.success(),
        "transformers could not load the export (scripts/setup.sh installs transformers into \
         the virtualenv):\n{}",
        r.stderr
    );
    serde_json::from_slice(&std::fs::read(&result_path).unwrap()).unwrap()
}

#[test]
fn transformers_loads_the_export_and_agrees_with_forge() {
    let tmp = tempfile::tempdir().unwrap();
    // Llama with grouped-query attention, an untied head, Llama 3's RoPE base and a vocabulary
    // larger than the tokenizer's; GPT-2 as the preset has it.
    let cases = [
        train_and_export(
            tmp.path(),
            "llama",
            "LlamaForCausalLM",
            "vocab_size = 2112\nn_kv_head = 2\ntie_embeddings = false\nrope_theta = 500000.0\n",
        ),
        train_and_export(tmp.path(), "gpt2", "GPT2LMHeadModel", ""),
    ];
    let reports = transformers_reports(tmp.path(), &cases);
    assert_eq!(reports.len(), cases.len());
    for (case, hf) in cases.iter().zip(&reports) {
        let family = case.family;
        assert_eq!(hf["class"], case.architecture, "{family}");
        assert_eq!(hf["dtype"], "torch.float32", "{family}");
        for keys in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
            assert_eq!(hf[keys], json!([]), "{family}: transformers reports {keys}");
        }
        let theirs: Vec<Vec<f64>> = serde_json::from_value(hf["logits"].clone()).unwrap();
        let diff = max_abs_diff(&case.logits, &theirs);
        println!(
            "{family}: max |logit difference| {diff:.3e} over {} x {} logits",
            case.logits.len(),
            case.logits[0].len()
        );
        assert!(diff < TOLERANCE, "{family}: logits differ by {diff:e}");
        assert_eq!(
            hf["prompt_ids"],
            json!(case.prompt_ids),
            "{family}: tokenizer"
        );
        assert_eq!(hf["greedy"], json!(case.greedy), "{family}: greedy tokens");
        assert_eq!(hf["decoded"], case.decoded, "{family}: decoded text");
        println!("{family}: greedy continuation {:?}", case.decoded);
    }

    // A second export into the same folder is refused, unless forced.
    let (checkpoint, folder) = (cases[1].export.with_file_name("run"), &cases[1].export);
    let args = |force: bool| {
        let mut args = vec![
            "export".to_string(),
            "--checkpoint".to_string(),
            checkpoint.display().to_string(),
            "--hf".to_string(),
            folder.display().to_string(),
        ];
        if force {
            args.push("--force".to_string());
        }
        args
    };
    let again = args(false);
    let r = node(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("not empty") && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    let forced = args(true);
    let r = node(&forced.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.success(), "{}", r.stderr);
}

#[test]
fn export_errors_name_the_problem_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    let r = node(&[
        "export",
        "--checkpoint",
        tmp.path().join("no-run").to_str().unwrap(),
        "--hf",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("no valid checkpoint at") && r.stderr.contains("no-run"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(!out.exists());
}
