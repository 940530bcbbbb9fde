#!/usr/bin/env bash
# The whole test suite, from a fresh clone: setup (virtualenv + debug build), formatting and
# lints, then every test of every crate. CI runs exactly this (.ci/run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"
# A test run builds once; incremental caches would add about 2 GiB on disk for no gain here.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

scripts/setup.sh --dev
cargo fmt --all -- --check
# The NCCL reducer is in the default build (NCCL and CUDA are loaded at run time, not linked).
cargo clippy --workspace --all-targets -- -D warnings
# Integration tests start the binaries built by setup.sh --dev (target/debug).
cargo test --workspace
