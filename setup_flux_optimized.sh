#!/usr/bin/env bash
# Provision this machine into ./.venv (idempotent, no sudo), then optionally run something in it.
#
#   ./setup_flux_optimized.sh            set up only
#   ./setup_flux_optimized.sh serve ...  set up, then start the HTTP service (extra args go to `serve`)
#   ./setup_flux_optimized.sh test ...   set up with the test tools, then lint (ruff) and run the test suite
#
# On a CUDA machine (nvidia-smi lists a GPU) it installs the CUDA build of torch and the GPU extras
# (the FlashAttention 3 kernel) and finishes with `doctor`; elsewhere a CPU build of torch.
# Environment: PYTHON (interpreter, default python3), FLUX_FORCE_CPU=1 (CPU setup on a GPU machine),
# TORCH_CUDA_INDEX (wheel index for the CUDA build, default the PyTorch cu130 index), FLUX_PRECOMPILE=1
# (GPU: compile every reachable shape at the end of setup and leave the bundle serve loads).
set -euo pipefail
cd "$(dirname "$0")"

TORCH_CPU_VERSION=2.13.0
TORCH_CUDA_VERSION=2.11.0
TORCH_CUDA_INDEX=${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu130}
PYTHON=${PYTHON:-python3}
VENV=.venv
MODE=${1:-setup}
[ $# -gt 0 ] && shift

step() { echo; echo "==> $*"; }
fail() { echo; echo "setup_flux_optimized.sh: FAILED at step: $CURRENT_STEP" >&2; exit 1; }
trap fail ERR
CURRENT_STEP="start"

case "$MODE" in setup|serve|test) ;; *) echo "usage: $0 [setup|serve|test] [args...]" >&2; exit 2;; esac

CURRENT_STEP="check Python (3.11 or newer)"
step "$CURRENT_STEP"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required, found " + sys.version.split()[0])'

CURRENT_STEP="create the virtual environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  step "$CURRENT_STEP"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if [ "${FLUX_FORCE_CPU:-0}" != "1" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  TARGET=cuda
else
  TARGET=cpu
fi
echo "target: $TARGET"

CURRENT_STEP="install torch ($TARGET build)"
have_torch=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [ "$TARGET" = cuda ]; then
  if [[ "$have_torch" != "$TORCH_CUDA_VERSION"* ]] || ! "$PY" -c 'import torch; assert torch.version.cuda' 2>/dev/null; then
    step "$CURRENT_STEP: torch==$TORCH_CUDA_VERSION from $TORCH_CUDA_INDEX"
    "${PIP[@]}" "torch==$TORCH_CUDA_VERSION" --index-url "$TORCH_CUDA_INDEX" --extra-index-url https://pypi.org/simple
  fi
else
  if [[ "$have_torch" != "$TORCH_CPU_VERSION"* ]]; then
    # The CPU wheel index first (a few hundred MB, not GBs of CUDA), when it can be reached at all:
    # an unreachable index costs pip five retries per package before it falls back.
    cpu_index=()
    if "$PY" -c 'import socket; socket.getaddrinfo("download.pytorch.org", 443)' 2>/dev/null; then
      cpu_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
    step "$CURRENT_STEP: torch==$TORCH_CPU_VERSION ${cpu_index[*]:+from the PyTorch CPU index}"
    "${PIP[@]}" "torch==$TORCH_CPU_VERSION" "${cpu_index[@]}"
  fi
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU visible:", torch.cuda.is_available())'

requirements=(requirements.txt)
[ "$TARGET" = cuda ] && requirements+=(requirements-gpu.txt)
[ "$MODE" = test ] && requirements+=(requirements-dev.txt)
CURRENT_STEP="install ${requirements[*]}"
stamp="$VENV/.installed-$(cat "${requirements[@]}" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  step "$CURRENT_STEP"
  "${PIP[@]}" $(printf -- '-r %s ' "${requirements[@]}")
  touch "$stamp"
else
  echo "requirements already installed (${requirements[*]})"
fi

if [ "$TARGET" = cuda ]; then
  CURRENT_STEP="final check: doctor"
  step "$CURRENT_STEP"
  "$PY" flux_kontext_optimized.py doctor
  if [ "${FLUX_PRECOMPILE:-0}" = "1" ]; then
    # Minutes: every shape a request can reach, compiled once; serve then loads the bundle at start.
    CURRENT_STEP="precompile (FLUX_PRECOMPILE=1)"
    step "$CURRENT_STEP"
    "$PY" flux_kontext_optimized.py precompile
  fi
fi

case "$MODE" in
  setup) step "done: activate with 'source $VENV/bin/activate'";;
  serve) CURRENT_STEP="serve"; step "starting the service (Ctrl-C stops it)"; trap - ERR; exec "$PY" flux_kontext_optimized.py serve "$@";;
  test)
    CURRENT_STEP="lint (ruff check, ruff format --check)"; step "$CURRENT_STEP"
    "$PY" -m ruff check --quiet . && "$PY" -m ruff format --check --quiet .
    CURRENT_STEP="tests"; step "running the test suite"; trap - ERR; exec "$PY" -m pytest "$@";;
esac
