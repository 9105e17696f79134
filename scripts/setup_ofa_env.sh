#!/usr/bin/env bash
# Create the isolated OFA environment used by the `ofa` captioner backend.
#
# Why a separate venv: OFA (the paper's captioner) is not in transformers; the maintained
# implementation is ModelScope's `modelscope.models.multi_modal.ofa`, which needs
# transformers 4.x while the main project runs transformers 5. The main venv's `ofa`
# backend starts alip/captioners/ofa_worker.py with this venv's python and talks to it
# over stdin/stdout, so the two transformers versions never meet in one process.
#
# Usage:  bash scripts/setup_ofa_env.sh [VENV_DIR]      (default: <repo>/.ofa-venv)
# Idempotent: if the venv already has the pinned versions it returns at once.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${ALIP_OFA_VENV:-$REPO/.ofa-venv}}"
PYTHON="${PYTHON:-python3.11}"

# Pins verified together (see alip/captioners/ofa.py). torch matches the main venv.
PINS=(
  "torch==2.14.1"
  "transformers==4.46.3"
  "tokenizers==0.20.3"
  "modelscope==1.40.2"
  "addict==2.4.0"
  "huggingface-hub==0.36.2"
  "safetensors==0.8.0"
  "pillow==13.0.0"
  "numpy==2.4.6"
  "packaging==26.4"
  "pyyaml==6.0.4"
)
STAMP="$VENV/.alip-ofa-env"
WANT="$(printf '%s\n' "${PINS[@]}")"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "OFA env up to date: $VENV"
  exit 0
fi

echo "Creating OFA env in $VENV (takes a few minutes the first time)"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
# Smoke-check: the worker's imports must work (no fairseq needed for captioning).
"$VENV/bin/python" "$REPO/alip/captioners/ofa_worker.py" --check
printf '%s' "$WANT" > "$STAMP"
echo "OFA env ready: $VENV"
