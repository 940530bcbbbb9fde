//! The digest of a state tensor: SHA-256 of its values as f32 little-endian bytes, in order.
//!
//! Every side computes it this one way: the trainer for the hashes a node reports after an
//! outer step and for checkpoint checks, the node for tensors fetched from peers, so a value
//! the coordinator commits can be checked anywhere.

use sha2::{Digest as _, Sha256};

/// Values turned into bytes at a time, so hashing a large tensor needs no copy of it.
const SLICE_VALUES: usize = 16 << 10;

/// SHA-256 of `values` as f32 little-endian bytes.
pub fn tensor_digest(values: &[f32]) -> [u8; 32] {
    let mut hasher = TensorHasher::new();
    hasher.update(values);
    hasher.finish()
}

/// [`tensor_digest`] of a tensor that arrives in parts: feeding the parts in order gives the
/// digest of their concatenation.
#[derive(Debug, Clone, Default)]
pub struct TensorHasher {
    hash: Sha256,
    bytes: Vec<u8>,
}

impl TensorHasher {
    pub fn new() -> TensorHasher {
        TensorHasher::default()
    }

    /// Hashes the next values of the tensor.
    pub fn update(&mut self, values: &[f32]) {
        for slice in values.chunks(SLICE_VALUES) {
            self.bytes.clear();
            for value in slice {
                self.bytes.extend_from_slice(&value.to_le_bytes());
            }
            self.hash.update(&self.bytes);
        }
    }

    pub fn finish(self) -> [u8; 32] {
        self.hash.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_is_sha256_of_little_endian_f32() {
        let values: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let direct: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(tensor_digest(&values), direct);
        let empty: [u8; 32] = Sha256::digest([]).into();
        assert_eq!(tensor_digest(&[]), empty);
    }

    #[test]
    fn parts_hash_like_the_whole() {
        let values: Vec<f32> = (0..50_000).map(|i| (i as f32 * 0.01).sin()).collect();
        let mut hasher = TensorHasher::new();
        for part in [
            &values[..3],
            &values[3..20_000],
            &values[20_000..20_000],
            &values[20_000..],
        ] {
            hasher.update(part);
        }
        assert_eq!(hasher.finish(), tensor_digest(&values));
    }

    #[test]
    fn a_known_value_keeps_its_digest() {
        // [1.0, -2.0] is the bytes 00 00 80 3f 00 00 00 c0; a change here would change every
        // committed hash.
        let hex: String = tensor_digest(&[1.0, -2.0])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "ee4ac73c2bd27756ab82780f27c73a7bc4d3f0bb6acb37e008bc27eccd7e588b"
        );
    }
}
