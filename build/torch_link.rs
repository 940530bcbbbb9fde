//! Build script shared by every crate that links libtorch (trainer, node, tests).
//!
//! Two things the torch-sys build script cannot do for downstream binaries:
//! - an rpath to the libtorch folder, so binaries and test executables run without the user
//!   exporting `LD_LIBRARY_PATH` (a run-time `LD_LIBRARY_PATH` still wins: the rpath is
//!   emitted as DT_RUNPATH, which is how a binary built here runs against another machine's torch);
//! - `--no-as-needed` for `libtorch_cuda`: nothing references its symbols directly, so an
//!   as-needed linker drops it and `tch::Cuda::is_available()` then reports false on a GPU machine.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        // torch-sys did not report a folder (doc-only builds): nothing to add.
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib_dir}");
    for cuda_lib in ["torch_cuda", "torch_cuda_cu", "torch_cuda_cpp"] {
        if Path::new(&lib_dir)
            .join(format!("lib{cuda_lib}.so"))
            .exists()
        {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-l{cuda_lib}");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
