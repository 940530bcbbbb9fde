//! `[model] init_from = "DIR"` as a user runs it: the virtualenv's transformers saves small
//! random GPT-2 and Llama models with `save_pretrained` (`tests/hf_import.py`: tied and untied
//! heads, one sharded, one in bf16, a Llama-style tokenizer with `<s>` and `</s>` and no
//! `<|endoftext|>`), and Forge, given only the folder, builds the same model: every logit of
//! fixed ids within 1e-4 of transformers', the same token ids for a prompt, BOS as the document
//! separator. `forge-node train` starts from the folder's weights (at a negligible learning rate
//! the run ends where the folder began) and resumes from its checkpoint without them, keeps its
//! tokenizer's special tokens through a checkpoint and an export, and refuses a `[model]` or a
//! tokenizer that disagrees with the folder.
//! A DiLoCo run starts both its nodes from the sharded Llama folder (the committed model at a
//! negligible learning rate is the folder's), while a node whose copy of the folder differs
//! from the coordinator's is refused, naming the file.

use forge_integration_tests::{
    Run, binary, hf_folders, max_abs_diff, run, run_command, shared_data, tiny_run_config,
};
use forge_trainer::checkpoint::CheckpointDir;
use forge_trainer::config::{LoadRunConfig, RunConfig};
use forge_trainer::data::Tokenizer;
use forge_trainer::import;
use forge_trainer::models::Model;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tch::{Device, Tensor, nn::VarStore};

const LIMIT: Duration = Duration::from_secs(180);
/// Largest |Forge logit - transformers logit| allowed (both fp32 on the CPU).
const TOLERANCE: f64 = 1e-4;
const PROMPT: &str = "Once upon a time, there was a little girl named";

fn node(args: &[&str]) -> Run {
    run("forge-node", args, LIMIT)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// configs/tiny-cpu.toml shrunk for a test (see `tiny_run_config`), starting from `folder`
/// instead of the tiny preset and its trained tokenizer, with `edits` applied; written as
/// `dir/NAME.toml`.
fn config_from(dir: &Path, name: &str, folder: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let run_dir = dir.join(name);
    std::fs::create_dir_all(&run_dir).unwrap();
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("forge-data-cache");
    let base = tiny_run_config(&run_dir, &run_dir.join("run"), &cache, 3, 1000);
    let mut text = std::fs::read_to_string(base).unwrap();
    let init = format!("init_from = {folder:?}");
    let mut all = vec![
        ("preset = \"tiny\"\n", init.as_str()),
        ("family = \"llama\"\n", "\n"),
        ("tokenizer = { train = { vocab_size = 2048 } }\n", "\n"),
    ];
    all.extend_from_slice(edits);
    for (from, to) in all {
        assert!(text.contains(from), "the run config no longer has {from}");
        text = text.replacen(from, to, 1);
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Every tensor of a Hugging Face folder's weights (one file or the shards of its index), fp32.
fn folder_tensors(folder: &Path) -> BTreeMap<String, Tensor> {
    std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .flat_map(|p| Tensor::read_safetensors(p).unwrap())
        .map(|(name, t)| (name, t.to_kind(tch::Kind::Float)))
        .collect()
}

#[test]
fn folders_saved_by_transformers_load_with_the_same_logits_and_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let folders = hf_folders(&tmp.path().join("hf"), PROMPT);
    let reference = read_json(&folders.join("reference.json"));
    for (name, separator, end) in [
        ("gpt2", "<|endoftext|>", "<|endoftext|>"),
        ("llama", "<s>", "</s>"),
        ("llama-bf16", "<s>", "</s>"),
    ] {
        let folder = folders.join(name);
        let hf = &reference[name];
        // The run config names the folder and nothing else of the model.
        let cfg = RunConfig::load(&config_from(tmp.path(), name, &folder, &[])).unwrap();
        let model_cfg = cfg.model_config().unwrap();
        let mut vs = VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), &model_cfg).unwrap();
        import::load_weights(&mut vs, &model_cfg, &folder).unwrap();

        let ids: Vec<i64> = serde_json::from_value(hf["ids"].clone()).unwrap();
        let logits = tch::no_grad(|| model.forward(&Tensor::from_slice(&ids).unsqueeze(0)));
        let logits: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(logits.squeeze_dim(0)).unwrap();
        let theirs: Vec<Vec<f64>> = serde_json::from_value(hf["logits"].clone()).unwrap();
        let diff = max_abs_diff(&logits, &theirs);
        println!(
            "{name}: {} {}-layer, vocab {}: max |logit difference| {diff:.3e} over {} x {} logits",
            model_cfg.family,
            model_cfg.n_layer,
            model_cfg.vocab_size,
            logits.len(),
            logits[0].len()
        );
        assert!(diff < TOLERANCE, "{name}: logits differ by {diff:e}");
        // The comparison can fail: another model's logits are far off.
        let spread = theirs.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(spread > 100.0 * TOLERANCE, "{name}: logits all near 0");

        let tokenizer = Tokenizer::load(&folder.join("tokenizer.json")).unwrap();
        assert_eq!(
            (
                tokenizer.separator().text.as_str(),
                tokenizer.end().text.as_str()
            ),
            (separator, end),
            "{name}"
        );
        assert_eq!(hf["bos_token_id"], tokenizer.separator_id(), "{name}");
        assert_eq!(hf["eos_token_id"], tokenizer.end().id, "{name}");
        let prompt_ids = tokenizer.encode(PROMPT).unwrap();
        assert_eq!(hf["prompt_ids"], serde_json::json!(prompt_ids), "{name}");
        if name != "gpt2" {
            // The Llama-style tokenizer begins every text with BOS, the token Forge puts before
            // every document.
            assert_eq!(hf["prompt_ids_special"][0], tokenizer.separator_id());
        }
    }
}

#[test]
fn training_starts_from_the_folder_and_keeps_its_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let folders = hf_folders(&tmp.path().join("hf"), PROMPT);
    let folder = folders.join("llama-bf16");
    // Three steps at a learning rate that moves no weight by more than 1e-8.
    let config = config_from(
        tmp.path(),
        "run",
        &folder,
        &[("lr = 3e-3\n", "lr = 1e-9\n")],
    );
    let r = node(&["train", "--config", config.to_str().unwrap()]);
    assert!(r.success(), "training from the folder failed: {}", r.stderr);
    let checkpoint = tmp.path().join("run/run/checkpoints/step-00000003");
    let trained: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(checkpoint.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let start = folder_tensors(&folder);
    assert_eq!(
        trained.keys().collect::<Vec<_>>(),
        start.keys().collect::<Vec<_>>()
    );
    let mut diff = 0.0f64;
    for (name, t) in &trained {
        diff = diff.max(f64::try_from((t - &start[name]).abs().max()).unwrap());
    }
    println!("after 3 steps at lr 1e-9: max |weight - folder's bf16 weight| {diff:.3e}");
    assert!(
        diff < 1e-6,
        "the run did not start from the folder: {diff:e}"
    );

    // Resumed, the run takes its parameters from its checkpoint: the folder's weights are not
    // read again (here they are gone).
    std::fs::remove_file(folder.join("model.safetensors")).unwrap();
    let config_arg = config.to_str().unwrap();
    let r = node(&[
        "train",
        "--config",
        config_arg,
        "--set",
        "train.max_steps=4",
    ]);
    assert!(
        r.success(),
        "resuming read the folder's weights: {}",
        r.stderr
    );
    assert!(
        tmp.path()
            .join("run/run/checkpoints/step-00000004")
            .is_dir()
    );

    // The checkpoint keeps the tokenizer's separator, and an export names it as BOS.
    let specials = read_json(&checkpoint.join("tokenizer_config.json"));
    assert_eq!(
        (
            specials["bos_token"].as_str(),
            specials["eos_token"].as_str()
        ),
        (Some("<s>"), Some("</s>"))
    );
    let out = tmp.path().join("exported");
    let r = node(&[
        "export",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--hf",
        out.to_str().unwrap(),
    ]);
    assert!(r.success(), "{}", r.stderr);
    let config = read_json(&out.join("config.json"));
    assert_eq!(
        (
            config["bos_token_id"].as_u64(),
            config["eos_token_id"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(
        read_json(&out.join("generation_config.json"))["eos_token_id"],
        serde_json::json!([2, 1])
    );
    let r = node(&[
        "sample",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "8",
    ]);
    assert!(
        r.success() && r.stdout.starts_with("Once upon a time"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_model_or_tokenizer_that_disagrees_with_the_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let folders = hf_folders(&tmp.path().join("hf"), PROMPT);
    let folder = folders.join("llama");
    let train = |name: &str, edits: &[(&str, &str)]| {
        let config = config_from(tmp.path(), name, &folder, edits);
        let r = node(&["train", "--config", config.to_str().unwrap()]);
        assert_eq!(r.code, Some(1), "{name}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
        r.stderr
    };
    let err = train("layers", &[("[data]", "n_layer = 4\n\n[data]")]);
    assert!(
        err.contains("[model] n_layer = 4 but")
            && err.contains("llama/config.json says num_hidden_layers = 2"),
        "{err}"
    );
    let err = train("preset", &[("[data]", "preset = \"tiny\"\n\n[data]")]);
    assert!(
        err.contains("preset \"tiny\" has vocab_size = 2048"),
        "{err}"
    );
    // seq_len past the folder's 64 positions.
    let err = train("long", &[("seq_len = 32", "seq_len = 128")]);
    assert!(
        err.contains("seq_len 128 exceeds the model's max_seq_len 64"),
        "{err}"
    );
    // GPT-2's tokenizer has far more ids than the folder's model has embedding rows.
    let gpt2 = shared_data().join("gpt2/tokenizer.json");
    let tokenizer = format!("tokenizer = {{ path = {gpt2:?} }}\n\n[train]");
    let err = train("tokenizer", &[("[train]", tokenizer.as_str())]);
    assert!(
        err.contains("has ids up to 50256") && err.contains("not this model's tokenizer"),
        "{err}"
    );
}

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `forge-coordinator serve --config CONFIG --set ...` in `cwd` (where the config's
/// relative paths start); returns it with the address and token that nodes join with.
fn serve(config: &Path, sets: &[String], cwd: &Path) -> (Killed, String, String) {
    let log = cwd.join("coord.log");
    let mut command = Command::new(binary("forge-coordinator"));
    command
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--state-dir", "coord"])
        .args(sets.iter().flat_map(|set| ["--set", set.as_str()]))
        .current_dir(cwd)
        .env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = Killed(command.spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    // Reads every line, so the coordinator never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let join = loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains("forge-node join ") => break line,
            Ok(_) => {}
            Err(_) => panic!(
                "the coordinator printed no join line: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    };
    let mut words = join.split_whitespace().skip(2);
    let addr = words.next().unwrap().to_string();
    let token = words.nth(1).unwrap().to_string();
    (child, addr, token)
}

/// `forge-node join` as node `i` of the run, its workdir in `dir`, reading the run's relative
/// paths under `data_root`; runs it to its end.
fn join(dir: &Path, i: usize, addr: &str, token: &str, data_root: &Path) -> Run {
    let workdir = dir.join(format!("node{i}"));
    let mut command = Command::new(binary("forge-node"));
    command
        .args(["join", addr, "--token", token, "--listen", "127.0.0.1:0"])
        .args(["--workdir", workdir.to_str().unwrap()])
        .args(["--data-root", data_root.to_str().unwrap()])
        .env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "warn");
    run_command(command, Duration::from_secs(300))
}

#[test]
fn a_diloco_run_starts_every_node_from_the_folder_the_coordinator_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    hf_folders(&dir.join("hf"), PROMPT);
    let folder = dir.join("hf/llama");
    // Another copy of the folder, one weight in one shard changed: still a valid folder.
    let bad = dir.join("bad");
    std::fs::create_dir_all(bad.join("hf/llama")).unwrap();
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, bad.join("hf/llama").join(path.file_name().unwrap())).unwrap();
    }
    let shard = bad.join("hf/llama/model-00003-of-00011.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();

    // configs/diloco-tiny-cpu.toml from the folder: init_from instead of the tiny preset and
    // its trained tokenizer, then shrunk on the command line (two rounds of 5 steps of 8 x 32
    // tokens) at a learning rate that moves no weight by more than 1e-7.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/diloco-tiny-cpu.toml"),
    )
    .unwrap();
    let text: String = shipped
        .lines()
        .filter(|l| {
            !["preset =", "family =", "tokenizer ="]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| match l {
            "[model]" => "[model]\ninit_from = \"hf/llama\"\n".to_string(),
            _ => format!("{l}\n"),
        })
        .collect();
    let config = dir.join("run.toml");
    std::fs::write(&config, text).unwrap();
    let data = shared_data().join("tinystories");
    let sets: Vec<String> = [
        format!("data.train={}", data.join("train-sample.txt").display()),
        format!("data.val={}", data.join("valid-sample.txt").display()),
        "train.seq_len=32".into(),
        "train.batch_size=8".into(),
        "train.micro_batch=8".into(),
        "train.max_steps=10".into(),
        "train.lr=1e-9".into(),
        "train.schedule.warmup_steps=2".into(),
        "eval.batches=2".into(),
        "diloco.eval_every_rounds=100".into(),
        "coordinator.checkpoint_every_rounds=1".into(),
    ]
    .into();
    let (_coordinator, addr, token) = serve(&config, &sets, dir);

    // The node with the changed copy joins and is refused before it trains, naming the file.
    let refused = join(dir, 9, &addr, &token, &bad);
    assert_eq!(
        refused.code,
        Some(1),
        "{}\n{}",
        refused.stdout,
        refused.stderr
    );
    assert!(
        refused
            .stderr
            .contains("model-00003-of-00011.safetensors is not the run's")
            && refused.stderr.contains("same folder as the coordinator"),
        "{}",
        refused.stderr
    );

    let nodes: Vec<Run> = std::thread::scope(|scope| {
        let started: Vec<_> = (0..2)
            .map(|i| {
                let (addr, token) = (&addr, &token);
                scope.spawn(move || join(dir, i, addr, token, dir))
            })
            .collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, node) in nodes.iter().enumerate() {
        assert!(node.success(), "node {i}: {}\n{}", node.stdout, node.stderr);
        let committed = node
            .stdout
            .lines()
            .filter(|l| l.starts_with("round") && l.contains("committed"))
            .count();
        assert!(
            committed >= 1,
            "node {i} committed no round:\n{}",
            node.stdout
        );
    }

    // The committed global model is the folder's, moved by no more than the learning rate
    // allows; a node started from anything else would be about 0.1 away.
    let start = folder_tensors(&folder);
    // One replica writes the committed round's checkpoint shard.
    let (_, shard) = (0..2)
        .find_map(|i| {
            let run_dir = dir.join(format!("node{i}/run/diloco-checkpoints"));
            CheckpointDir::new(run_dir, usize::MAX).latest_valid()
        })
        .expect("a committed checkpoint shard");
    let committed: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(shard.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let mut diff = 0.0f64;
    for (name, t) in &committed {
        diff = diff.max(f64::try_from((t - &start[name]).abs().max()).unwrap());
    }
    println!(
        "{}: max |committed weight - folder's weight| {diff:.3e} over {} tensors",
        shard.display(),
        committed.len()
    );
    assert!(
        diff < 1e-6,
        "the run did not start from the folder: {diff:e}"
    );
    // Its documents were separated by the folder's BOS.
    let specials = read_json(&shard.join("tokenizer_config.json"));
    assert_eq!(specials["bos_token"], "<s>");
}
