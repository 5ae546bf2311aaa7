#!/usr/bin/env bash
# Set up .venv-agents: the real agent frameworks (AutoGen, CrewAI, their OpenTelemetry
# instrumentations) that tests/framework_agents/ runs as `rollouts.command` agents. They live in
# their own virtualenv because they do not install beside the project's deps (issue 44).
#   envs/agents/requirements.txt  the pinned top-level set
#   envs/agents/constraints.txt   pip freeze of the resolved set (reproducible installs)
# Re-running is a no-op while .venv-agents/.arclight-stamp matches the two files' hash.
# Environment: PYTHON (default python3), ARCLIGHT_AGENTS_VENV (default .venv-agents).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${ARCLIGHT_AGENTS_VENV:-.venv-agents}
REQ=envs/agents/requirements.txt
CON=envs/agents/constraints.txt
stamp() { sha256sum "$REQ" "$CON" | sha256sum | cut -c1-16; }
# one line per step with its time; pip's output goes to .arclight/logs/setup.log (scripts/steps.sh)
STEP_TAG=setup-agents
source scripts/steps.sh

install_agents() {
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off --upgrade pip
  "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -r "$REQ" -c "$CON"
  "$VENV/bin/python" -m pip check
  stamp > "$VENV/.arclight-stamp"
}

if [ "$(cat "$VENV/.arclight-stamp" 2>/dev/null)" = "$(stamp)" ] && [ -x "$VENV/bin/python" ]; then
  say "$VENV is up to date"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV" "$PY" -m venv "$VENV"
  printf '*\n' > "$VENV/.gitignore"  # as Python 3.13's venv does: git status stays clean
fi
step "installing the agent frameworks into $VENV" install_agents
