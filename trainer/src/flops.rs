//! Peak dense throughput of known accelerators, for model FLOPs utilisation (MFU).

/// Peak dense TFLOP/s for bf16 (tensor cores, fp32 accumulate), by GPU name fragment. The
/// first fragment contained in the reported name wins, so more specific names come first.
const GPU_PEAK_BF16_TFLOPS: &[(&str, f64)] = &[
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("RTX A6000", 154.8),
    ("RTX 5090", 209.5),
    ("RTX 4090", 165.2),
    ("RTX 4080", 97.5),
    ("RTX 3090", 71.0),
    ("RTX 3080", 59.5),
];

/// Peak TFLOP/s for a GPU of this name at the given precision, if the table knows it. fp32
/// matmuls use TF32 tensor cores at half the bf16 rate on these parts.
pub fn gpu_peak_tflops(name: &str, bf16: bool) -> Option<f64> {
    GPU_PEAK_BF16_TFLOPS
        .iter()
        .find(|(fragment, _)| name.contains(fragment))
        .map(|(_, peak)| if bf16 { *peak } else { *peak / 2.0 })
}

/// The name of CUDA device `index` as `nvidia-smi` reports it (tch exposes no device query).
pub fn cuda_device_name(index: usize) -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name",
            "--format=csv,noheader",
            &format!("--id={index}"),
        ])
        .output()
        .ok()?;
    let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specific_names_win() {
        assert_eq!(gpu_peak_tflops("NVIDIA H100 PCIe", true), Some(756.0));
        assert_eq!(gpu_peak_tflops("NVIDIA H200", true), Some(989.4));
        assert_eq!(gpu_peak_tflops("NVIDIA L40S", true), Some(362.1));
        assert_eq!(gpu_peak_tflops("NVIDIA A10G", false), Some(35.0));
        assert_eq!(gpu_peak_tflops("Some CPU", true), None);
    }
}
