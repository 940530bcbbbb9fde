//! Learning-rate schedules: the [`Schedule`] shapes of `[train.schedule]` (defined with the run
//! config in `forge_protocol::run_config`), plus √batch scaling of the peak.

pub use forge_protocol::run_config::Schedule;

/// Peak learning rate scaled by √(batch_tokens / reference_batch_tokens) when a reference is
/// given (the square-root rule for Adam-type optimizers).
pub fn scaled_peak_lr(lr: f64, batch_tokens: u64, reference_batch_tokens: Option<u64>) -> f64 {
    match reference_batch_tokens {
        Some(reference) if reference > 0 => lr * (batch_tokens as f64 / reference as f64).sqrt(),
        _ => lr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn sqrt_batch_scaling() {
        assert!(close(scaled_peak_lr(1e-3, 4096, Some(1024)), 2e-3));
        assert!(close(scaled_peak_lr(1e-3, 4096, None), 1e-3));
    }
}
