//! Parsing and checking of `--device` strings: `cpu`, `cuda` (every visible GPU), `cuda:N`,
//! `cuda:0,cuda:2`.

use crate::error::{Error, Result};
use tch::Device;

/// Parses a device list and checks that every device exists on this machine.
pub fn parse_devices(spec: &str) -> Result<Vec<Device>> {
    let spec = spec.trim();
    let invalid = |why: String| Error::InvalidDevice {
        spec: spec.to_string(),
        why,
    };
    if spec.is_empty() {
        return Err(invalid(
            "empty; pass cpu, cuda, cuda:N or a comma list".into(),
        ));
    }
    if spec == "cpu" {
        return Ok(vec![Device::Cpu]);
    }
    let gpus = tch::Cuda::device_count();
    if spec == "cuda" {
        if gpus == 0 {
            return Err(invalid(no_gpu_hint()));
        }
        return Ok((0..gpus as usize).map(Device::Cuda).collect());
    }
    let mut devices = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let Some(index) = part.strip_prefix("cuda:") else {
            return Err(invalid(format!(
                "'{part}' is not a device; use cpu, cuda, or cuda:N (for example cuda:0,cuda:1)"
            )));
        };
        let index: usize = index
            .parse()
            .map_err(|_| invalid(format!("'{part}' has no valid GPU index after 'cuda:'")))?;
        if gpus == 0 {
            return Err(invalid(no_gpu_hint()));
        }
        if index >= gpus as usize {
            return Err(invalid(format!(
                "cuda:{index} does not exist: {gpus} CUDA device(s) visible (cuda:0..cuda:{}); \
                 check CUDA_VISIBLE_DEVICES",
                gpus - 1
            )));
        }
        if devices.contains(&Device::Cuda(index)) {
            return Err(invalid(format!("cuda:{index} is listed twice")));
        }
        devices.push(Device::Cuda(index));
    }
    Ok(devices)
}

/// Parses a spec that must name exactly one device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let devices = parse_devices(spec)?;
    match devices.as_slice() {
        [one] => Ok(*one),
        _ => Err(Error::InvalidDevice {
            spec: spec.to_string(),
            why: format!(
                "this command runs on one device but the spec names {}; pass cpu or cuda:N",
                devices.len()
            ),
        }),
    }
}

fn no_gpu_hint() -> String {
    "no GPU found (libtorch sees 0 CUDA devices); pass --device cpu or check CUDA_VISIBLE_DEVICES \
     and the NVIDIA driver"
        .to_string()
}

/// A device's memory in bytes: a GPU's total memory from the CUDA driver (0 when this build has
/// no `nccl` feature or the driver cannot say), the machine's RAM for the CPU (0 when
/// `/proc/meminfo` cannot be read).
pub fn device_memory(device: Device) -> u64 {
    match device {
        #[cfg(feature = "nccl")]
        Device::Cuda(i) => crate::parallel::cuda_total_memory(i).unwrap_or(0),
        Device::Cpu => std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map_or(0, |kb| kb * 1024),
        _ => 0,
    }
}

/// A short name for logs and benchmark records (`cpu`, `cuda:0`).
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses() {
        assert_eq!(parse_devices("cpu").unwrap(), vec![Device::Cpu]);
        assert_eq!(parse_device(" cpu ").unwrap(), Device::Cpu);
    }

    #[test]
    fn garbage_is_rejected_with_the_fix() {
        let err = parse_devices("tpu").unwrap_err().to_string();
        assert!(err.contains("'tpu' is not a device"), "{err}");
        let err = parse_devices("cuda:x").unwrap_err().to_string();
        assert!(err.contains("no valid GPU index"), "{err}");
        assert!(parse_devices("").is_err());
    }

    #[test]
    fn missing_gpu_is_named() {
        if tch::Cuda::device_count() > 0 {
            return; // this check is for machines without a GPU
        }
        let err = parse_devices("cuda").unwrap_err().to_string();
        assert!(
            err.contains("no GPU found") && err.contains("--device cpu"),
            "{err}"
        );
        let err = parse_device("cuda:3").unwrap_err().to_string();
        assert!(err.contains("no GPU found"), "{err}");
    }
}
