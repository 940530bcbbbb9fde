//! Every decoder of this crate that reads bytes from disk, under [`forge_protocol::fuzz::run`]:
//! token cache files, a saved tokenizer, checkpoint manifests, and the DiLoCo outer state of a
//! checkpoint shard (`outer.json` and `outer.safetensors`). Each seed is a file this crate wrote;
//! each mutated input is written to one path in a temporary directory and read back with the
//! function production uses.

use crate::checkpoint::{self, CheckpointDir, Manifest, hash_file};
use crate::data::{CorpusFormat, TokenCache, Tokenizer};
use crate::diloco::{DilocoConfig, OuterOptimizer};
use crate::outer_state::{OuterCheckpoint, Resumed, load_committed, write_outer_files};
use forge_protocol::fuzz;
use forge_protocol::messages::{GlobalState, RoundId};
use std::fs;
use std::path::{Path, PathBuf};
use tch::{Device, nn};

/// A byte-level BPE of `vocab_size` trained on a few sentences (milliseconds).
fn small_tokenizer(vocab_size: usize) -> Tokenizer {
    let docs: Vec<_> = (0..50)
        .map(|i| Ok(format!("the cat sat on mat {i}. the dog ran.")))
        .collect();
    Tokenizer::train(docs.into_iter(), vocab_size).unwrap()
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

#[test]
fn fuzz_token_cache() {
    let tok = small_tokenizer(300);
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let sources = [
        write(dir.path(), "a.txt", "the cat\n<|endoftext|>\nthe dog ran."),
        write(
            dir.path(),
            "b.jsonl",
            "{\"text\": \"the cat sat on the mat.\"}\n{\"text\": \"☃ 42\"}\n",
        ),
    ];
    let seeds: Vec<Vec<u8>> = sources
        .iter()
        .map(|src| {
            let cache = TokenCache::build_or_open(
                std::slice::from_ref(src),
                CorpusFormat::Auto,
                "text",
                &tok,
                &cache_dir,
                "train",
            )
            .unwrap();
            fs::read(cache.path()).unwrap()
        })
        .collect();
    let path = dir.path().join("fuzz.tokens");
    fuzz::run("trainer: token cache", &seeds, |bytes| {
        fs::write(&path, bytes).unwrap();
        // A cache that opens must hold every token its header promises.
        if let Ok(cache) = TokenCache::open(&path, &tok) {
            let _ = cache.tokens().to_vec();
        }
    });
}

#[test]
fn fuzz_saved_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    let seeds: Vec<Vec<u8>> = [257, 300]
        .into_iter()
        .map(|vocab_size| {
            let tok = small_tokenizer(vocab_size);
            tok.save(&path).unwrap();
            assert_eq!(Tokenizer::load(&path).unwrap().hash(), tok.hash());
            fs::read(&path).unwrap()
        })
        .collect();
    // What fuzzing showed: a syntax error inside "decoder" made the tokenizers crate panic, and
    // a mutated token id was taken as is, which for an id near 2^32 makes that crate allocate
    // for every id below it (serializing the vocabulary for the hash). Both are errors now.
    let json = String::from_utf8(seeds[1].clone()).unwrap();
    let bad_decoder = json.replacen("\"decoder\": {", "\"decoder\": {\"x\": ,", 1);
    assert_ne!(bad_decoder, json);
    fs::write(&path, &bad_decoder).unwrap();
    let err = Tokenizer::load(&path).unwrap_err().to_string();
    assert!(err.contains("does not parse"), "{err}");
    let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
    let vocab = value["model"]["vocab"].as_object_mut().unwrap();
    let last = vocab
        .iter()
        .max_by_key(|(_, id)| id.as_u64())
        .map(|(token, _)| token.clone())
        .unwrap();
    vocab.insert(last, 4_000_000_000u32.into());
    fs::write(&path, value.to_string()).unwrap();
    let err = Tokenizer::load(&path).unwrap_err().to_string();
    assert!(err.contains("token id of 4000000000"), "{err}");

    fuzz::run("trainer: saved tokenizer", &seeds, |bytes| {
        fs::write(&path, bytes).unwrap();
        // A tokenizer that loads is used at once: it must encode and decode without a panic.
        if let Ok(tok) = Tokenizer::load(&path) {
            if let Ok(ids) = tok.encode("the cat sat. ☃") {
                let _ = tok.decode_text(&ids);
            }
            let _ = tok.decode(&[tok.separator_id()]);
        }
    });
}

#[test]
fn fuzz_checkpoint_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = CheckpointDir::new(dir.path(), 2);
    let step_dir = ckpts
        .save(7, |d| {
            fs::write(d.join("model.safetensors"), [7u8; 100]).unwrap();
            fs::write(d.join("state.json"), b"{\"step\": 7}").unwrap();
            Ok(())
        })
        .unwrap();
    assert_eq!(checkpoint::verify(&step_dir).unwrap().step, 7);
    let manifest = step_dir.join("manifest.json");
    let seeds = vec![fs::read(&manifest).unwrap()];
    fuzz::run("trainer: checkpoint manifest", &seeds, |bytes| {
        fs::write(&manifest, bytes).unwrap();
        let _ = checkpoint::verify(&step_dir);
        let _ = ckpts.latest_valid();
    });
}

/// A checkpoint shard of a two-parameter model's outer state after one committed outer step,
/// as a DiLoCo node writes it, with the coordinator's view of that state.
struct OuterShard {
    _dir: tempfile::TempDir,
    ckpts: CheckpointDir,
    step_dir: PathBuf,
    global: GlobalState,
}

fn outer_shard() -> OuterShard {
    let (_vs, outer, tensor_hashes) = crate::outer_state::tests::trained();
    let global = GlobalState {
        version: 3,
        round: Some(RoundId(4)),
        tensor_hashes,
    };
    let meta = OuterCheckpoint {
        version: global.version,
        round: 4,
        tensor_hashes: global.tensor_hashes.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let ckpts = CheckpointDir::new(dir.path(), 2);
    let step_dir = ckpts
        .save(40, |d| write_outer_files(d, &outer, &meta))
        .unwrap();
    OuterShard {
        _dir: dir,
        ckpts,
        step_dir,
        global,
    }
}

/// Fuzzes one file of the outer state shard through [`load_committed`], the trainer-free part
/// of a node's resume. The manifest is rewritten to match each input, so the shard passes the
/// checkpoint's integrity check and the input reaches the outer state's own decoding.
fn fuzz_outer_file(target: &str, name: &str) {
    let shard = outer_shard();
    let file = shard.step_dir.join(name);
    let manifest_path = shard.step_dir.join("manifest.json");
    let mut manifest: Manifest =
        serde_json::from_slice(&fs::read(&manifest_path).unwrap()).unwrap();
    let seeds = vec![fs::read(&file).unwrap()];
    let fresh = nn::VarStore::new(Device::Cpu);
    let _ = fresh.root().var("w", &[2, 3], nn::Init::Const(9.0));
    let _ = fresh.root().var("b", &[3], nn::Init::Const(9.0));
    let mut node = OuterOptimizer::new(&fresh, DilocoConfig::default()).unwrap();
    // The seed shard resumes: the inputs start from a file that decodes all the way.
    let resumed = load_committed(&shard.ckpts, &shard.global, &mut node).unwrap();
    assert_eq!(resumed, Resumed::Shard(shard.step_dir.clone()));
    fuzz::run(target, &seeds, |bytes| {
        fs::write(&file, bytes).unwrap();
        manifest
            .files
            .insert(name.to_string(), hash_file(&file).unwrap());
        fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
        let _ = load_committed(&shard.ckpts, &shard.global, &mut node);
    });
}

#[test]
fn fuzz_outer_meta() {
    fuzz_outer_file("trainer: outer.json", "outer.json");
}

#[test]
fn fuzz_outer_safetensors() {
    fuzz_outer_file("trainer: outer.safetensors", "outer.safetensors");
}
