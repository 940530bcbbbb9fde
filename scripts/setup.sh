#!/usr/bin/env bash
# Idempotent setup: a project-local virtualenv with torch 2.11.0 (the libtorch that tch 0.24
# expects), transformers (the Hugging Face export test loads exports with it) and pyarrow (it writes
# the Parquet files of the corpus tests), Chromium (the dashboard test's browser, from the
# distribution when run as root), then a build of the workspace. A second run skips what is already done.
#
#   scripts/setup.sh            venv + release binaries (target/release)
#   scripts/setup.sh --dev      venv + debug binaries (target/debug), what the tests use
#   scripts/setup.sh --no-build venv only
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$FORGE_ROOT"

profile=release
case "${1:-}" in
  "") ;;
  --dev) profile=dev ;;
  --no-build) profile=none ;;
  *) echo "usage: scripts/setup.sh [--dev|--no-build]" >&2; exit 2 ;;
esac

die() { echo "setup: $*" >&2; exit 1; }
say() { echo "setup: $*" >&2; }
# Free KiB on the disk that holds path $1, or would hold it (its nearest existing ancestor).
free_kb() {
  local p="$1"
  while [[ ! -e "$p" ]]; do p="$(dirname "$p")"; done
  df -Pk "$p" | awk 'NR==2 {print $4}'
}

torch_version() { "$FORGE_VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true; }

# 1. Python virtualenv with torch.
# (`|| true`: with no virtualenv yet the test fails, and under `set -e` that would end the script.)
installed="$(test -x "$FORGE_VENV/bin/python" && torch_version || true)"
if [[ "${installed%%+*}" == "$FORGE_TORCH_VERSION" ]]; then
  say "torch $installed already in $FORGE_VENV"
else
  command -v python3 >/dev/null \
    || die "python3 not found; install Python 3.9 or newer (Debian: apt-get install python3 python3-venv)"
  python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
    || die "python3 is $(python3 --version 2>&1); torch $FORGE_TORCH_VERSION needs Python 3.9 or newer"
  if [[ -n "$installed" ]]; then
    say "the virtualenv has torch $installed, but tch 0.24 needs exactly $FORGE_TORCH_VERSION; installing $FORGE_TORCH_VERSION over it"
  else
    free=$(free_kb "$FORGE_VENV")
    (( free >= 8 * 1024 * 1024 )) \
      || die "only $((free / 1024)) MiB free for $FORGE_VENV; installing torch $FORGE_TORCH_VERSION with its CUDA libraries needs about 8 GiB (4.7 GiB installed, its wheels while installing). Free some space, or set FORGE_VENV to a folder on a bigger disk"
    if [[ ! -x "$FORGE_VENV/bin/python" ]]; then
      say "creating virtualenv $FORGE_VENV"
      python3 -m venv "$FORGE_VENV" \
        || die "python3 -m venv failed; on Debian/Ubuntu install the venv module: apt-get install python3-venv"
    fi
    "$FORGE_VENV/bin/python" -m pip --version >/dev/null 2>&1 \
      || die "pip is missing in $FORGE_VENV; install python3-pip (or python3-venv with ensurepip) and delete $FORGE_VENV"
  fi
  say "installing torch==$FORGE_TORCH_VERSION into $FORGE_VENV (about 5 GB)"
  "$FORGE_VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q \
      "torch==$FORGE_TORCH_VERSION" numpy \
    || die "pip could not install torch==$FORGE_TORCH_VERSION (see the pip output above)"
  installed="$(torch_version)"
  [[ "${installed%%+*}" == "$FORGE_TORCH_VERSION" ]] \
    || die "after install, the virtualenv reports torch '${installed:-none}', not $FORGE_TORCH_VERSION"
  say "torch $installed installed"
fi

# 2. transformers, which the Hugging Face export test (tests/hf_export.py) loads exports with.
# torch is named too, so pip keeps the version tch needs.
transformers_version() { "$FORGE_VENV/bin/python" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || true; }
have="$(transformers_version)"
if [[ "$have" == "$FORGE_TRANSFORMERS_VERSION" ]]; then
  say "transformers $have already in $FORGE_VENV"
else
  if [[ -n "$have" ]]; then
    say "the virtualenv has transformers $have; installing $FORGE_TRANSFORMERS_VERSION, the version the export test is checked with"
  else
    say "installing transformers==$FORGE_TRANSFORMERS_VERSION into $FORGE_VENV (about 60 MB)"
  fi
  "$FORGE_VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q \
      "transformers==$FORGE_TRANSFORMERS_VERSION" "torch==$FORGE_TORCH_VERSION" \
    || die "pip could not install transformers==$FORGE_TRANSFORMERS_VERSION (see the pip output above)"
  have="$(transformers_version)"
  [[ "$have" == "$FORGE_TRANSFORMERS_VERSION" ]] \
    || die "after install, the virtualenv reports transformers '${have:-none}', not $FORGE_TRANSFORMERS_VERSION"
  say "transformers $have installed"
fi

# 3. pyarrow, which writes the Parquet files of the corpus tests.
pyarrow_version() { "$FORGE_VENV/bin/python" -c 'import pyarrow; print(pyarrow.__version__)' 2>/dev/null || true; }
have="$(pyarrow_version)"
if [[ "$have" == "$FORGE_PYARROW_VERSION" ]]; then
  say "pyarrow $have already in $FORGE_VENV"
else
  say "installing pyarrow==$FORGE_PYARROW_VERSION into $FORGE_VENV (about 45 MB)"
  "$FORGE_VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q \
      "pyarrow==$FORGE_PYARROW_VERSION" \
    || die "pip could not install pyarrow==$FORGE_PYARROW_VERSION (see the pip output above)"
  have="$(pyarrow_version)"
  [[ "$have" == "$FORGE_PYARROW_VERSION" ]] \
    || die "after install, the virtualenv reports pyarrow '${have:-none}', not $FORGE_PYARROW_VERSION"
  say "pyarrow $have installed"
fi

# 4. Chromium, the headless browser the dashboard test loads `forge-coordinator serve --http` in
# (the distribution's package; installed when missing and this runs as root with apt).
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null \
    || command -v google-chrome >/dev/null; then
  say "chromium already installed"
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  say "installing chromium (the dashboard test's browser) with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
    || die "apt-get could not install chromium, which the dashboard test needs"
else
  say "no chromium: the dashboard test needs it; install it (Debian: apt-get install chromium)"
fi

# NCCL (the `nccl` build feature) is loaded at run time as libnccl.so; the torch wheel ships only
# libnccl.so.2. A link in torch's lib folder (on the binaries' RUNPATH) lets it be found.
site=$("$FORGE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [[ -e "$site/nvidia/nccl/lib/libnccl.so.2" && ! -e "$site/torch/lib/libnccl.so" ]]; then
  ln -s ../../nvidia/nccl/lib/libnccl.so.2 "$site/torch/lib/libnccl.so"
fi

[[ "$profile" == none ]] && exit 0

# 5. Build. cargo skips what is up to date.
command -v cargo >/dev/null || die "cargo not found; install Rust (https://rustup.rs) and re-run"
flags=(--workspace --bins)
[[ "$profile" == release ]] && flags+=(--release)
dir=target/$([[ "$profile" == release ]] && echo release || echo debug)
# A first build (and, for --dev, the test build after it) takes about 1.6 GiB; a full disk part
# way through shows up as a compiler crash, so say it plainly before starting.
if [[ ! -e "$dir/forge-node" ]]; then
  free=$(free_kb target)
  (( free >= 2 * 1024 * 1024 )) \
    || die "only $((free / 1024)) MiB free under $FORGE_ROOT/target; a first build needs about 2 GiB. Free some space and run this again"
fi
say "building ($profile)"
cargo build "${flags[@]}"

# 4. The binaries must start without LD_LIBRARY_PATH (rpath to the virtualenv's libtorch).
env -u LD_LIBRARY_PATH "$dir/forge-node" --version >/dev/null \
  || die "$dir/forge-node does not start; see the loader error above"
say "ready: $dir/forge-node, $dir/forge-coordinator"
