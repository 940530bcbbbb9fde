# Sourced by the other scripts (and by developers: `source scripts/env.sh` before running cargo
# by hand). Points the torch-sys build at the project's virtualenv.
FORGE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FORGE_VENV="${FORGE_VENV:-$FORGE_ROOT/.venv}"
FORGE_TORCH_VERSION="2.11.0"
# Loads `forge-node export --hf` folders in the export test (tests/hf_export.py); works with the
# torch above.
FORGE_TRANSFORMERS_VERSION="5.25.0"
# Writes the Parquet files the corpus tests read (a file as the Hugging Face Hub's tools write it).
FORGE_PYARROW_VERSION="26.0.1"
export VIRTUAL_ENV="$FORGE_VENV"
export PATH="$FORGE_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
