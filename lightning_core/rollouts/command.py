"""An agent that is any program: one process per rollout, told everything through its environment.

``rollouts.command`` names the program and its arguments (its own virtualenv's Python, ``node``, a
binary). The runner starts it in the rollout's worker process group, so a timeout or Ctrl-C stops
it and whatever it started, exactly like a Python agent. What it gets:

- standard input: the task as one line of JSON (also in ``ARCLIGHT_TASK``);
- the model: ``OPENAI_BASE_URL`` / ``ARCLIGHT_BASE_URL`` (the rollout's gateway URL), ``OPENAI_API_KEY`` (the
  agent token: it opens the gateway's model routes and none of its admin routes, whose token is not inherited),
  ``ARCLIGHT_MODEL``, ``ARCLIGHT_TEMPERATURE``;
- tracing, in OpenTelemetry's own variables, so an unchanged OTel SDK in any language exports to the
  collector with the rollout's context: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and ``..._TRACES_ENDPOINT``),
  ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``, ``OTEL_EXPORTER_OTLP_HEADERS`` (the collector token),
  ``OTEL_RESOURCE_ATTRIBUTES`` (``arclight.run_id``, ``arclight.epoch``, ``arclight.rollout_id``,
  ``arclight.task_id``, ``arclight.attempt`` and the prompt versions), ``OTEL_SERVICE_NAME`` and
  ``TRACEPARENT`` (the runner's ``rollout`` span, for agents that continue the trace);
- the rest of the rollout: ``ARCLIGHT_RUN_ID``, ``ARCLIGHT_EPOCH``, ``ARCLIGHT_ROLLOUT_ID``,
  ``ARCLIGHT_TASK_ID``, ``ARCLIGHT_ATTEMPT``, ``ARCLIGHT_GROUP_ID``, ``ARCLIGHT_SAMPLE_INDEX`` (set by the runner),
  ``ARCLIGHT_MODE``, ``ARCLIGHT_RESOURCES`` (JSON),
  ``ARCLIGHT_COLLECTOR_URL`` / ``ARCLIGHT_COLLECTOR_TOKEN`` (for ``lightning_core.tracing.init_tracing``).

It ends with exit status 0 (succeeded) or anything else (the agent failed: the error carries the status
and the end of its standard error). Its reward is either a span it exported (``arclight.reward.value``),
or its last line of standard output: a number, or a JSON object with ``"reward"``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

ERROR_TAIL_CHARS = 2000


class CommandFailed(Exception):
    """The agent's program exited with a non-zero status (or could not start); the message says which and why."""


@dataclass(frozen=True)
class CommandResult:
    """What a finished agent program gave back: its reward from standard output (None: none printed)."""

    reward: float | None
    stdout_tail: str
    stderr_tail: str


def resolve_command(command: Sequence[str], *, base: Path) -> tuple[str, ...]:
    """Return ``command`` with its program made absolute: a path with a slash is taken from ``base``, a bare
    name from ``PATH``; the error names the program and where it was looked for."""
    if not command or not str(command[0]).strip():
        raise ValueError("rollouts.command is empty: give the program and its arguments, e.g. ['.venv-agents/bin/python', 'agent.py']")
    program = str(command[0])
    if os.sep in program or (os.altsep and os.altsep in program):
        path = Path(program).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ValueError(f"rollouts.command: the program {program!r} is not an executable file at {path} "
                             "(relative paths are taken from rollouts.command_cwd, by default the project folder)")
        found = str(path)
    else:
        found = shutil.which(program)
        if found is None:
            raise ValueError(f"rollouts.command: the program {program!r} is not on PATH; give its path "
                             "(relative paths are taken from rollouts.command_cwd, by default the project folder)")
    return (found, *(str(a) for a in command[1:]))


def resource_attributes_env(attributes: Mapping[str, Any]) -> str:
    """``OTEL_RESOURCE_ATTRIBUTES``: ``key=value`` pairs joined by commas, values percent-encoded as the spec says."""
    return ",".join(f"{key}={quote(str(value), safe='')}" for key, value in attributes.items() if value is not None)


ADMIN_TOKEN_VARIABLES = ("ARCLIGHT_GATEWAY_TOKEN", "ARCLIGHT_GATEWAY_ADMIN_TOKEN")


def command_environment(
    *, base_url: str, api_key: str, model: str, temperature: float, mode: str, task: Mapping[str, Any],
    resources: Mapping[str, Any], context: Mapping[str, str], collector_url: str, collector_token: str | None,
    resource: Mapping[str, Any], traceparent: str | None, extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one rollout's agent program: this process's, then the rollout's, then ``extra`` (the
    config's ``rollouts.command_env``, which may override any of them)."""
    collector = collector_url.rstrip("/")
    env = dict(os.environ)
    # a variable of the parent's environment that would send spans elsewhere or cut them is not inherited, nor the
    # gateway's admin token: an agent holds the agent token (api_key), which opens the model routes only
    for key in [k for k in env if k.startswith("OTEL_") or k in ADMIN_TOKEN_VARIABLES]:
        del env[key]
    env.update({
        "OPENAI_BASE_URL": base_url, "ARCLIGHT_BASE_URL": base_url,
        "OPENAI_API_KEY": api_key, "ARCLIGHT_API_KEY": api_key,
        "ARCLIGHT_MODEL": model, "ARCLIGHT_TEMPERATURE": repr(float(temperature)), "ARCLIGHT_MODE": mode,
        "ARCLIGHT_TASK": json.dumps(dict(task)), "ARCLIGHT_RESOURCES": json.dumps(dict(resources)),
        **context,
        "ARCLIGHT_COLLECTOR_URL": collector,
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector}/v1/traces",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_SERVICE_NAME": "arclight-agent",
        "OTEL_RESOURCE_ATTRIBUTES": resource_attributes_env(resource),
        "PYTHONUNBUFFERED": "1",
    })
    if collector_token:
        env["ARCLIGHT_COLLECTOR_TOKEN"] = collector_token
        env["OTEL_EXPORTER_OTLP_HEADERS"] = f"authorization={quote('Bearer ' + collector_token, safe='')}"
    if traceparent:
        env["TRACEPARENT"] = traceparent
    env.update({str(k): str(v) for k, v in (extra or {}).items()})
    return env


def run_command(command: Sequence[str], *, task: Mapping[str, Any], env: Mapping[str, str], cwd: Path) -> CommandResult:
    """Run the agent program to its end (the caller's process group bounds it); return its reward, or raise
    ``CommandFailed`` with the exit status and the end of its standard error."""
    try:
        done = subprocess.run(list(command), input=json.dumps(dict(task)) + "\n", capture_output=True, text=True,
                              env=dict(env), cwd=str(cwd), errors="replace")
    except OSError as exc:
        raise CommandFailed(f"the agent program {command[0]!r} could not start: {exc}") from exc
    stdout_tail, stderr_tail = done.stdout[-ERROR_TAIL_CHARS:], done.stderr[-ERROR_TAIL_CHARS:]
    if done.returncode != 0:
        how = f"was killed by signal {-done.returncode}" if done.returncode < 0 else f"exited with status {done.returncode}"
        raise CommandFailed(f"the agent program {Path(command[0]).name} {how}; the end of its standard error:\n"
                            f"{stderr_tail.strip() or '(empty)'}")
    return CommandResult(reward=reward_from_stdout(done.stdout), stdout_tail=stdout_tail, stderr_tail=stderr_tail)


def reward_from_stdout(stdout: str) -> float | None:
    """The reward on the program's last non-empty line of output: a number, or a JSON object's ``"reward"``;
    None when that line is neither (the agent then gives its reward as a span, or has none)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except ValueError:
        return None
    if isinstance(value, dict):
        value = value.get("reward")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)
