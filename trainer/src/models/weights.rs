//! Weights in the Hugging Face safetensors layout: load with every key and shape checked,
//! save with the same names the family uses on the Hub.

use super::{Family, ModelConfig};
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor, nn::VarStore};

/// Keys in Hub files that are buffers, not parameters (old GPT-2 attention masks, old Llama
/// rotary tables). They carry nothing a model needs and are skipped.
fn is_buffer(key: &str) -> bool {
    key.ends_with(".attn.bias")
        || key.ends_with(".attn.masked_bias")
        || key.ends_with("rotary_emb.inv_freq")
}

/// Maps a key from a Hub file onto this crate's parameter name. GPT-2 files saved from
/// `GPT2Model` lack the `transformer.` prefix that `GPT2LMHeadModel` files have.
fn canonical_key(cfg: &ModelConfig, key: &str) -> String {
    if cfg.family == Family::Gpt2 && !key.starts_with("transformer.") && key != "lm_head.weight" {
        format!("transformer.{key}")
    } else {
        key.to_string()
    }
}

/// Reads a safetensors file into `vs`, which must hold exactly the model's parameters.
/// Every parameter must be present with its shape; extra keys are an error, except buffers and
/// a tied output head that equals the embedding.
pub fn load(vs: &mut VarStore, cfg: &ModelConfig, path: &Path) -> Result<()> {
    std::fs::metadata(path).map_err(Error::io(format!("reading weights {}", path.display())))?;
    let tensors = Tensor::read_safetensors(path).map_err(Error::torch(format!(
        "reading safetensors {}",
        path.display()
    )))?;
    load_tensors(vs, cfg, path, tensors)
}

/// One file of a model's weights, with the tensors an index puts in it (which it must hold).
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    pub path: PathBuf,
    pub tensors: Vec<String>,
}

/// [`load`] for a model whose tensors are spread over `shards` (a Hugging Face folder's
/// `model.safetensors`, or the shards of its index). `source` names the weights in errors.
/// Tensors of any float dtype (fp32, bf16, fp16) are converted to fp32; a shard cut short is
/// named as one.
pub fn load_shards(
    vs: &mut VarStore,
    cfg: &ModelConfig,
    source: &Path,
    shards: &[Shard],
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for Shard {
        path,
        tensors: listed,
    } in shards
    {
        check_complete(path)?;
        let read = Tensor::read_safetensors(path).map_err(Error::torch(format!(
            "reading safetensors {}",
            path.display()
        )))?;
        for (name, tensor) in read {
            if let Some(other) = seen.insert(name.clone(), path.clone()) {
                return Err(Error::WeightsMismatch {
                    path: source.to_path_buf(),
                    why: format!(
                        "{name} is in both {} and {}",
                        other.display(),
                        path.display()
                    ),
                });
            }
            tensors.push((name, tensor));
        }
        if let Some(absent) = listed.iter().find(|name| seen.get(*name) != Some(path)) {
            return Err(Error::WeightsMismatch {
                path: source.to_path_buf(),
                why: format!(
                    "the index puts {absent} in {}, which does not hold it",
                    path.display()
                ),
            });
        }
    }
    load_tensors(vs, cfg, source, tensors)
}

/// Refuses a safetensors file that ends before the tensor data its header describes (an
/// interrupted download or copy), naming it and the sizes.
fn check_complete(path: &Path) -> Result<()> {
    let header = read_header(path)?;
    let data_bytes = header
        .tensors()
        .values()
        .map(|info| info.data_offsets.1 as u64)
        .max()
        .unwrap_or(0);
    let mut len = [0u8; 8];
    let mut file = std::fs::File::open(path)
        .map_err(Error::io(format!("reading weights {}", path.display())))?;
    file.read_exact(&mut len)
        .map_err(Error::io(format!("reading weights {}", path.display())))?;
    let expected = 8 + u64::from_le_bytes(len) + data_bytes;
    let actual = file
        .metadata()
        .map_err(Error::io(format!("reading weights {}", path.display())))?
        .len();
    if actual < expected {
        return Err(Error::WeightsMismatch {
            path: path.to_path_buf(),
            why: format!(
                "the file is truncated: its header describes {expected} bytes, it holds \
                 {actual} (an interrupted download or copy?); fetch it again"
            ),
        });
    }
    Ok(())
}

/// Checks `tensors` (read from `path`) against the parameters of `vs` as [`load`] describes,
/// then copies them in as fp32.
fn load_tensors(
    vs: &mut VarStore,
    cfg: &ModelConfig,
    path: &Path,
    tensors: Vec<(String, Tensor)>,
) -> Result<()> {
    let mismatch = |why: String| Error::WeightsMismatch {
        path: path.to_path_buf(),
        why,
    };
    let mut file: BTreeMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !is_buffer(k))
        .map(|(k, t)| (canonical_key(cfg, &k), t))
        .collect();
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().collect();
    let missing: Vec<&String> = vars.keys().filter(|k| !file.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(mismatch(format!(
            "{} parameter(s) missing, e.g. {}",
            missing.len(),
            preview(&missing)
        )));
    }
    if cfg.tie_embeddings {
        // Some exports write the tied head out; accept it only when it is the embedding.
        if let Some(head) = file.remove("lm_head.weight") {
            let embed_key = match cfg.family {
                Family::Gpt2 => "transformer.wte.weight",
                Family::Llama => "model.embed_tokens.weight",
            };
            let same = file
                .get(embed_key)
                .is_some_and(|e| e.size() == head.size() && e.equal(&head));
            if !same {
                return Err(mismatch(format!(
                    "the file has an lm_head.weight that differs from {embed_key}, but the model \
                     ties its head; set tie_embeddings = false to load an untied head"
                )));
            }
        }
    }
    let extra: Vec<&String> = file.keys().filter(|k| !vars.contains_key(*k)).collect();
    if !extra.is_empty() {
        return Err(mismatch(format!(
            "{} tensor(s) the model does not have, e.g. {}",
            extra.len(),
            preview(&extra)
        )));
    }
    for (name, var) in &vars {
        let src = &file[name];
        if src.size() != var.size() {
            return Err(mismatch(format!(
                "{name} has shape {:?} in the file but {:?} in the model",
                src.size(),
                var.size()
            )));
        }
        if !src.is_floating_point() {
            return Err(mismatch(format!(
                "{name} is {:?}, not a float tensor",
                src.kind()
            )));
        }
    }
    tch::no_grad(|| {
        for (name, mut var) in vars {
            var.copy_(&file[&name].to_kind(Kind::Float).to_device(var.device()));
        }
    });
    Ok(())
}

/// Writes every parameter of `vs` to a safetensors file under its Hub name (fp32, CPU), with the
/// `{"format": "pt"}` metadata that Hugging Face's `save_pretrained` writes, so the file is a
/// PyTorch checkpoint to every tool that reads it.
pub fn save(vs: &VarStore, path: &Path) -> Result<()> {
    save_named(&cpu_f32(vs, false), path)
}

/// Every variable of `vs` as a contiguous fp32 CPU tensor, by name: copies of their values when
/// `copy` (a snapshot that training may go on from), otherwise views where the variable is
/// already one.
pub fn cpu_f32(vs: &VarStore, copy: bool) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .map(|(k, t)| {
            let cpu = t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float);
            let t = if copy && cpu.data_ptr() == t.data_ptr() {
                cpu.copy()
            } else {
                cpu.contiguous()
            };
            (k, t)
        })
        .collect()
}

/// Writes named fp32 CPU tensors as a safetensors file (`pt` format metadata).
pub fn save_named(named: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let views = named
        .iter()
        .map(|(name, t)| (name.as_str(), F32View::of(t)));
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize_to_file(views, &metadata, path).map_err(|e| Error::Io {
        context: format!("writing safetensors {}", path.display()),
        source: std::io::Error::other(e.to_string()),
    })
}

/// A contiguous fp32 CPU tensor as the safetensors writer reads it: its bytes are copied out
/// one tensor at a time, while the file is written.
struct F32View<'a> {
    tensor: &'a Tensor,
    shape: Vec<usize>,
}

impl<'a> F32View<'a> {
    fn of(tensor: &'a Tensor) -> Self {
        let shape = tensor.size().iter().map(|&d| d as usize).collect();
        F32View { tensor, shape }
    }
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut bytes = vec![0u8; self.data_len()];
        self.tensor.copy_data_u8(&mut bytes, self.tensor.numel());
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.tensor.numel() * std::mem::size_of::<f32>()
    }
}

/// Largest header [`read_header`] accepts (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The header of a safetensors file (tensor names, dtypes, shapes, metadata), read without its
/// tensor data.
pub(crate) fn read_header(path: &Path) -> Result<safetensors::tensor::Metadata> {
    let bad = |why: String| Error::Checkpoint {
        path: path.to_path_buf(),
        why,
    };
    let mut file = std::fs::File::open(path)
        .map_err(Error::io(format!("reading weights {}", path.display())))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("not a safetensors file: no header length ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "not a safetensors file: its header length {len} is over {MAX_HEADER_BYTES} bytes"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("its {len}-byte header is cut short ({e})")))?;
    serde_json::from_slice(&header).map_err(|e| {
        bad(format!(
            "not a safetensors file: its header does not parse ({e})"
        ))
    })
}

fn preview(keys: &[&String]) -> String {
    let shown: Vec<&str> = keys.iter().take(4).map(|k| k.as_str()).collect();
    let more = if keys.len() > shown.len() {
        ", ..."
    } else {
        ""
    };
    format!("{}{more}", shown.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::Model;
    use tch::Device;

    fn build(cfg: &ModelConfig) -> (VarStore, Model) {
        let _rng = crate::rng();
        let vs = VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), cfg).unwrap();
        (vs, model)
    }

    #[test]
    fn save_then_load_gives_the_same_logits() {
        let dir = std::env::temp_dir().join(format!("forge-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for family in [Family::Gpt2, Family::Llama] {
            let cfg = ModelConfig::preset("tiny", Some(family)).unwrap();
            let (vs_a, a) = build(&cfg);
            let file = dir.join(format!("{family}.safetensors"));
            save(&vs_a, &file).unwrap();
            let (mut vs_b, b) = build(&cfg);
            load(&mut vs_b, &cfg, &file).unwrap();
            let ids = {
                let _rng = crate::rng();
                Tensor::randint(cfg.vocab_size, [1, 8], (Kind::Int64, Device::Cpu))
            };
            let diff = f64::try_from((a.forward(&ids) - b.forward(&ids)).abs().max()).unwrap();
            assert_eq!(diff, 0.0, "{family}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn saved_files_carry_the_pytorch_format_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        let (vs, _model) = build(&cfg);
        let file = dir.path().join("model.safetensors");
        save(&vs, &file).unwrap();
        let header = read_header(&file).unwrap();
        let format = header.metadata().as_ref().and_then(|m| m.get("format"));
        assert_eq!(format.map(String::as_str), Some("pt"));
        let tensors = header.tensors();
        assert_eq!(tensors.len(), vs.variables().len());
        assert_eq!(
            tensors["model.layers.0.mlp.gate_proj.weight"].shape,
            vec![cfg.d_ff as usize, cfg.d_model as usize]
        );

        std::fs::write(
            dir.path().join("short.safetensors"),
            [200u8, 0, 0, 0, 0, 0, 0, 0, b'{'],
        )
        .unwrap();
        let err = read_header(&dir.path().join("short.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("short.safetensors") && err.contains("cut short"),
            "{err}"
        );
    }

    #[test]
    fn wrong_family_or_shape_is_named() {
        let dir = std::env::temp_dir().join(format!("forge-weights-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gpt2 = ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap();
        let (vs, _m) = build(&gpt2);
        let file = dir.join("gpt2.safetensors");
        save(&vs, &file).unwrap();

        let llama = ModelConfig::preset("tiny", Some(Family::Llama)).unwrap();
        let (mut vs_l, _l) = build(&llama);
        let err = load(&mut vs_l, &llama, &file).unwrap_err().to_string();
        assert!(
            err.contains("missing") && err.contains("another family"),
            "{err}"
        );

        let mut wider = gpt2.clone();
        wider.d_ff = 512;
        let (mut vs_w, _w) = build(&wider);
        let err = load(&mut vs_w, &wider, &file).unwrap_err().to_string();
        assert!(
            err.contains("c_fc.bias has shape [384] in the file but [512]"),
            "{err}"
        );

        std::fs::write(dir.join("garbage.safetensors"), b"not a safetensors file").unwrap();
        let (mut vs_g, _g) = build(&gpt2);
        let err = load(&mut vs_g, &gpt2, &dir.join("garbage.safetensors")).unwrap_err();
        assert!(err.to_string().contains("garbage.safetensors"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn gpt2_keys_without_the_transformer_prefix_load() {
        let cfg = ModelConfig::preset("tiny", Some(Family::Gpt2)).unwrap();
        assert_eq!(
            canonical_key(&cfg, "h.0.ln_1.weight"),
            "transformer.h.0.ln_1.weight"
        );
        assert_eq!(canonical_key(&cfg, "lm_head.weight"), "lm_head.weight");
        assert!(is_buffer("h.3.attn.bias") && !is_buffer("h.3.attn.c_attn.bias"));
    }
}
