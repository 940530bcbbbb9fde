//! Text generation from a model: temperature and top-k sampling, seeded.

use crate::models::Model;
use tch::{Device, Kind, Tensor};

pub use forge_protocol::run_config::SampleConfig;

/// Continues `prompt` (token ids) and returns only the new tokens. Stops early at any of `stop`
/// (the tokenizer's [`stop_ids`](crate::data::Tokenizer::stop_ids)), which is not included; an
/// empty prompt starts with `stop[0]`, the document separator.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    cfg: &SampleConfig,
    stop: &[u32],
    device: Device,
) -> Vec<u32> {
    let max_len = model.config().max_seq_len as usize;
    let vocab = model.config().vocab_size;
    let mut tokens: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    if tokens.is_empty() {
        // An empty prompt starts a new document.
        tokens.push(stop.first().map_or(0, |&s| s as i64));
    }
    let start = tokens.len();
    // Seeded sampling draws from libtorch's process-wide generator; keep other threads out.
    let _rng = crate::rng();
    tch::manual_seed(cfg.seed);
    tch::no_grad(|| {
        for _ in 0..cfg.max_new_tokens {
            let window = &tokens[tokens.len().saturating_sub(max_len)..];
            let ids = Tensor::from_slice(window).to_device(device).unsqueeze(0);
            let logits = model.forward(&ids).select(1, -1).squeeze_dim(0); // (vocab)
            let next = if cfg.temperature <= 0.0 {
                logits.argmax(0, false)
            } else {
                let mut scaled = logits / cfg.temperature;
                if cfg.top_k > 0 && cfg.top_k < vocab {
                    let (top, _) = scaled.topk(cfg.top_k, 0, true, true);
                    let kth = top.select(0, cfg.top_k - 1);
                    scaled = scaled
                        .where_self(&scaled.ge_tensor(&kth), &Tensor::from(f64::NEG_INFINITY));
                }
                scaled
                    .softmax(0, Kind::Float)
                    .multinomial(1, false)
                    .squeeze()
            };
            let next = i64::try_from(next).unwrap_or(0);
            if stop.iter().any(|&s| s as i64 == next) {
                break;
            }
            tokens.push(next);
        }
    });
    tokens[start..].iter().map(|&t| t as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ModelConfig;
    use tch::nn::VarStore;

    #[test]
    fn greedy_is_deterministic_and_sampling_is_seeded() {
        let cfg = ModelConfig::preset("tiny", None).unwrap();
        let vs = VarStore::new(Device::Cpu);
        let model = {
            let _rng = crate::rng();
            tch::manual_seed(3);
            Model::new(&vs.root(), &cfg).unwrap()
        };
        let greedy = SampleConfig {
            max_new_tokens: 8,
            temperature: 0.0,
            top_k: 0,
            seed: 0,
        };
        let a = generate(&model, &[1, 2, 3], &greedy, &[], Device::Cpu);
        assert_eq!(a.len(), 8);
        assert_eq!(a, generate(&model, &[1, 2, 3], &greedy, &[], Device::Cpu));
        let sampled = SampleConfig {
            temperature: 1.0,
            top_k: 5,
            ..greedy
        };
        let s1 = generate(&model, &[1, 2, 3], &sampled, &[], Device::Cpu);
        let s2 = generate(&model, &[1, 2, 3], &sampled, &[], Device::Cpu);
        assert_eq!(s1, s2);
        assert!(s1.iter().all(|&t| (t as i64) < cfg.vocab_size));
    }
}
