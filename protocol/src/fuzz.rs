//! A small time-bounded mutation fuzzer for the workspace's decoders, run by each crate's tests
//! (`cargo fuzz` needs a nightly toolchain and libFuzzer, which CI does not have).
//!
//! [`run`] feeds a decoder inputs made from valid encodings (`seeds`) by the edits that break
//! parsers: bit flips, random bytes, length fields overwritten with 0, 1, 2^31, 2^32 - 1 or
//! 2^64 - 1, truncation, insertion, deletion, duplicated spans, and now and then bytes with no
//! seed at all. It stops after `FORGE_FUZZ_SECS` seconds (default 1), prints how many inputs
//! ran, and fails the test with the input in hex if the decoder panicked on one. Errors are
//! expected and fine: the point is that every malformed input is an error, never a panic, an
//! abort or an allocation of what a length field claims.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use crate::codec::{self, Channel, HEADER_LEN};
use crate::rng::SplitMix64;

/// Values that length and count fields are set to.
const INTERESTING: [u64; 8] = [
    0,
    1,
    0x7f,
    0xff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// How long each target runs: `FORGE_FUZZ_SECS` (seconds, fractional allowed), else 1 s.
pub fn budget() -> Duration {
    std::env::var("FORGE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(Duration::from_secs(1), Duration::from_secs_f64)
}

/// Runs `decode` on mutated `seeds` for [`budget`]; returns the number of inputs it ran.
/// Panics (failing the test) with the target's name and the input if `decode` panicked.
pub fn run(target: &str, seeds: &[Vec<u8>], mut decode: impl FnMut(&[u8])) -> u64 {
    let budget = budget();
    let started = Instant::now();
    let mut rng = SplitMix64::new(name_seed(target));
    let mut executions = 0u64;
    // Every seed as it is first: a valid input must decode without a panic too.
    let mut input = Vec::new();
    let mut next_seed = 0;
    while next_seed < seeds.len() || started.elapsed() < budget {
        input.clear();
        if next_seed < seeds.len() {
            input.extend_from_slice(&seeds[next_seed]);
            next_seed += 1;
        } else if seeds.is_empty() || below(&mut rng, 16) == 0 {
            let len = below(&mut rng, 512) as usize;
            input.extend((0..len).map(|_| rng.next_u64() as u8));
        } else {
            input.extend_from_slice(&seeds[below(&mut rng, seeds.len() as u64) as usize]);
            for _ in 0..=below(&mut rng, 4) {
                mutate(&mut input, &mut rng);
            }
        }
        executions += 1;
        if catch_unwind(AssertUnwindSafe(|| decode(&input))).is_err() {
            // The whole input, to replay it: `decode(&std::fs::read(path)?)`.
            let name: String = target
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let path = std::env::temp_dir().join(format!("forge-fuzz-{name}.bin"));
            let saved = match std::fs::write(&path, &input) {
                Ok(()) => format!("saved in {}", path.display()),
                Err(e) => format!("not saved ({e})"),
            };
            let shown: String = input.iter().take(512).map(|b| format!("{b:02x}")).collect();
            panic!(
                "fuzz {target}: the decoder panicked on input {executions} ({} bytes, {saved}; \
                 run_frames inputs start with a tag byte): {shown}",
                input.len()
            );
        }
    }
    println!(
        "fuzz {target}: {executions} inputs in {:.1} s, no panic",
        started.elapsed().as_secs_f64()
    );
    executions
}

/// [`run`] for frames of `channel`: most inputs are a mutated payload behind a header made
/// valid for it (so the mutations reach the payload's decoder instead of stopping at the
/// header's length checks), the rest whole mutated frames. Seeds are whole frames; compressed
/// ones are used as they are.
pub fn run_frames(
    target: &str,
    channel: Channel,
    seeds: &[Vec<u8>],
    mut decode: impl FnMut(&[u8]),
) -> u64 {
    let mut payloads: Vec<Vec<u8>> = Vec::new();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for seed in seeds {
        match codec::parse_header(channel, seed) {
            Ok(header) if !header.compressed && seed.len() == header.frame_len() => {
                payloads.push(seed[HEADER_LEN..].to_vec());
            }
            _ => frames.push(seed.clone()),
        }
    }
    let mut rng = SplitMix64::new(name_seed(target) ^ 0xf4a3);
    let mut framed = Vec::new();
    let tagged: Vec<Vec<u8>> = payloads
        .iter()
        .map(|p| [&[0u8][..], p].concat())
        .chain(frames.iter().map(|f| [&[1u8][..], f].concat()))
        .collect();
    run(target, &tagged, |input| {
        // The first byte says how to read the rest; mutations may change it too.
        let Some((&kind, rest)) = input.split_first() else {
            return;
        };
        if kind % 8 == 1 || below(&mut rng, 8) == 0 {
            decode(rest);
            return;
        }
        framed.clear();
        framed.extend_from_slice(&channel.magic());
        framed.extend_from_slice(&codec::FORMAT_VERSION.to_le_bytes());
        framed.extend_from_slice(&[0, 0]);
        framed.extend_from_slice(&(rest.len() as u32).to_le_bytes());
        framed.extend_from_slice(&(rest.len() as u32).to_le_bytes());
        framed.extend_from_slice(rest);
        decode(&framed);
    })
}

fn name_seed(target: &str) -> u64 {
    let seed = std::env::var("FORGE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    target.bytes().fold(seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn below(rng: &mut SplitMix64, n: u64) -> u64 {
    if n == 0 { 0 } else { rng.next_u64() % n }
}

/// One random edit of `input`.
fn mutate(input: &mut Vec<u8>, rng: &mut SplitMix64) {
    let len = input.len() as u64;
    let at = below(rng, len.max(1)) as usize;
    match below(rng, 8) {
        0 if !input.is_empty() => input[at] ^= 1 << below(rng, 8),
        1 if !input.is_empty() => input[at] = rng.next_u64() as u8,
        2 => {
            // A length or count field, little-endian as bincode and the frame headers write it.
            let value = INTERESTING[below(rng, INTERESTING.len() as u64) as usize];
            let width = [1usize, 2, 4, 8][below(rng, 4) as usize];
            for (i, byte) in value.to_le_bytes().into_iter().take(width).enumerate() {
                if let Some(slot) = input.get_mut(at + i) {
                    *slot = byte;
                }
            }
        }
        3 => input.truncate(at),
        4 => {
            let extra = 1 + below(rng, 16) as usize;
            let bytes: Vec<u8> = (0..extra).map(|_| rng.next_u64() as u8).collect();
            input.splice(at.min(input.len())..at.min(input.len()), bytes);
        }
        5 if !input.is_empty() => {
            let end = (at + 1 + below(rng, 16) as usize).min(input.len());
            input.drain(at..end);
        }
        6 if !input.is_empty() => {
            let end = (at + 1 + below(rng, 64) as usize).min(input.len());
            let span = input[at..end].to_vec();
            input.splice(at..at, span);
        }
        _ => {
            let extra = below(rng, 8) as usize;
            input.extend((0..extra).map(|_| rng.next_u64() as u8));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_decoder_is_caught_with_its_input() {
        let caught = catch_unwind(|| {
            run("self-test", &[vec![1, 2, 3]], |bytes| {
                assert!(bytes.len() != 2, "two bytes");
            })
        });
        let message = caught.unwrap_err();
        let message = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            message.contains("fuzz self-test: the decoder panicked"),
            "{message}"
        );
    }

    #[test]
    fn every_seed_runs_first_and_mutations_follow() {
        let mut seen = Vec::new();
        let runs = run("order", &[vec![7; 4], vec![9; 4]], |bytes| {
            seen.push(bytes.to_vec());
        });
        assert!(runs >= 2);
        assert_eq!(&seen[..2], &[vec![7; 4], vec![9; 4]]);
    }
}
