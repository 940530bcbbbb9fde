//! Error feedback: what a lossy codec dropped from one round's outer gradient is added to the
//! next round's, so over many rounds the receivers see the sum the sender meant.

use super::{Compression, decode_into, encode_into};
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
        let mut bytes = Vec::new();
        self.compress_at(0, x, &mut bytes)?;
        Ok(bytes)
    }

    /// Like [`compress`](ErrorFeedback::compress) for the values `offset..offset + x.len()` of
    /// the buffer: an all-reduce sends a vector in chunks, each with its own slice of residual.
    /// The bytes replace what `out` held (a buffer kept between calls spares the allocation).
    pub fn compress_at(&mut self, offset: usize, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
        self.compress_within(offset, x, f64::INFINITY, out)
            .map(|_| ())
    }

    /// [`compress_at`](ErrorFeedback::compress_at), sending values of L2 norm at most
    /// `max_norm`: when `x` plus the residual would decode to more, it is scaled down before
    /// encoding and what that leaves out stays in the residual (with a sparse codec the residual
    /// of values not sent for many rounds can grow past what receivers accept from a member).
    /// Returns the sum of squares of the values the bytes decode to (in f64).
    pub fn compress_within(
        &mut self,
        offset: usize,
        x: &[f32],
        max_norm: f64,
        out: &mut Vec<u8>,
    ) -> Result<f64> {
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
            encode_into(x, &self.compression, out)?;
            return Ok(squares(x));
        }
        let scratch = &mut self.scratch[offset..end];
        let residual = &mut self.residual[offset..end];
        for ((y, &xi), &e) in scratch.iter_mut().zip(x).zip(residual.iter()) {
            *y = xi + e;
        }
        encode_into(scratch, &self.compression, out)?;
        // Decode into the residual, then turn it into y - decoded in place.
        decode_into(out, residual, &self.compression)?;
        let mut sent = squares(residual);
        if sent.sqrt() > max_norm {
            // Scale y into the bound (a little inside it: quantisation moves values), encode
            // that instead; the residual keeps all of y that was not sent. Past the bound even
            // so (it cannot happen with the block codecs), nothing is sent.
            let factor = (0.99 * max_norm / sent.sqrt()) as f32;
            for (r, &y) in residual.iter_mut().zip(scratch.iter()) {
                *r = y * factor;
            }
            encode_into(residual, &self.compression, out)?;
            decode_into(out, residual, &self.compression)?;
            sent = squares(residual);
            if sent.sqrt() > max_norm {
                residual.fill(0.0);
                encode_into(residual, &self.compression, out)?;
                sent = 0.0;
            }
        }
        for (e, &y) in residual.iter_mut().zip(scratch.iter()) {
            *e = y - *e;
        }
        Ok(sent)
    }
}

/// The sum of squares of `values`, in f64: in eight running sums (element `i` goes to sum
/// `i % 8`) added in a fixed order, so it vectorises and is the same on every machine. A single
/// running sum waits for each addition before the next: several times slower on the
/// all-reduce's path, where this runs over every value sent and received.
pub fn squares(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(v) * f64::from(v);
        }
    }
    for (lane, &v) in lanes.iter_mut().zip(tail) {
        *lane += f64::from(v) * f64::from(v);
    }
    lanes.iter().sum()
}
