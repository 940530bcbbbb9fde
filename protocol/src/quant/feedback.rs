//! Error feedback: what a lossy codec dropped from one round's outer gradient is added to the
//! next round's, so over many rounds the receivers see the sum the sender meant.

use super::{Compression, decode_into, encode};
use crate::error::{Error, Result};

/// The residual `e` of one buffer (for example one all-reduce chunk a node sends every round).
///
/// [`compress`](ErrorFeedback::compress) encodes `y = x + e` and keeps `e = y - decode(bytes)`,
/// computed from the very bytes it returns, so the residual is exactly what the receivers miss.
#[derive(Debug)]
pub struct ErrorFeedback {
    compression: Compression,
    residual: Vec<f32>,
    /// `y` for the current call; kept to avoid an allocation per round.
    scratch: Vec<f32>,
}

impl ErrorFeedback {
    /// Zero residual for a buffer of `len` values.
    pub fn new(compression: Compression, len: usize) -> Result<ErrorFeedback> {
        compression.validate()?;
        Ok(ErrorFeedback {
            compression,
            residual: vec![0.0; len],
            scratch: vec![0.0; len],
        })
    }

    pub fn compression(&self) -> &Compression {
        &self.compression
    }

    /// What the receivers have not yet been sent.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Forgets the residual, for example when the round it belonged to was abandoned and the
    /// global parameters were restored.
    pub fn reset(&mut self) {
        self.residual.fill(0.0);
    }

    /// Encodes `x` plus the carried residual and updates the residual. When `x` is refused (a
    /// non-finite value, a length that is not this buffer's) the residual is unchanged.
    pub fn compress(&mut self, x: &[f32]) -> Result<Vec<u8>> {
        if x.len() != self.residual.len() {
            return Err(Error::ValueCountMismatch {
                expected: self.residual.len(),
                found: x.len() as u64,
            });
        }
        self.compress_at(0, x)
    }

    /// Like [`compress`](ErrorFeedback::compress) for the values `offset..offset + x.len()` of
    /// the buffer: an all-reduce sends a vector in chunks, each with its own slice of residual.
    pub fn compress_at(&mut self, offset: usize, x: &[f32]) -> Result<Vec<u8>> {
        let end = offset
            .checked_add(x.len())
            .filter(|&end| end <= self.residual.len());
        let Some(end) = end else {
            return Err(Error::ValueCountMismatch {
                expected: self.residual.len().saturating_sub(offset),
                found: x.len() as u64,
            });
        };
        if self.compression.codec.is_lossless() {
            // The residual is always zero: send x itself, with no decode round trip.
            return encode(x, &self.compression);
        }
        let scratch = &mut self.scratch[offset..end];
        let residual = &mut self.residual[offset..end];
        for ((y, &xi), &e) in scratch.iter_mut().zip(x).zip(residual.iter()) {
            *y = xi + e;
        }
        let bytes = encode(scratch, &self.compression)?;
        // Decode into the residual, then turn it into y - decoded in place.
        decode_into(&bytes, residual, &self.compression)?;
        for (e, &y) in residual.iter_mut().zip(scratch.iter()) {
            *e = y - *e;
        }
        Ok(bytes)
    }
}
