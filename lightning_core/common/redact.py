"""Secrets hidden from what we log or record: a command line (``--set gateway.token=…``, ``--token …``) and a config.

A setting is secret when a part of its name is a token, a secret, a password, a key or credentials
(``gateway.token``, ``AWS_SECRET_ACCESS_KEY``, ``serving.env.HF_TOKEN``, ``api_key``), and every value under a
``*storage_options`` mapping is (``lake.storage_options`` holds S3 keys and endpoints alike). Their values become
``***``; the names stay, so that a log still says what was set.

A command hands a flow its ``--set`` overrides with the secrets hidden (``held_back``), since Prefect keeps a flow run's
parameters in its database and shows them in its UI, and the flow takes the values back in the same process
(``given_back``).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from typing import Any, Iterator, Sequence

import yaml

from lightning_core.config import ConfigError

HIDDEN = "***"
SECRET_ANYWHERE = {"secret", "password", "passwd", "credential", "credentials"}
SECRET_LAST = {"token", "key", "apikey", "authorization", *SECRET_ANYWHERE}


def is_secret(name: str) -> bool:
    """Whether a setting, option or variable of this name holds a secret (``collector.token``, ``--api-key``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID``, ``lake.storage_options``); ``max_tokens``,
    ``pipeline.missing_token_ids`` and ``critic.api_key_env`` (a variable's name) do not."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    return bool(words) and (bool(SECRET_ANYWHERE & set(words)) or words[-1] in SECRET_LAST or words[-2:] == ["key", "id"]
                            or any(p.endswith("storage_options") for p in name.lower().split(".")))


def redacted(value: Any, *, name: str = "") -> Any:
    """``value`` (a config, or any part of one) with the value of every secret setting in it replaced by ``***``."""
    if is_secret(name) and value not in (None, "", {}, []):
        return HIDDEN
    if isinstance(value, dict):
        return {k: redacted(v, name=str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):  # arguments (serving.extra_args, rollouts.command): --api-key KEY
            return redacted_argv(value)
        return [redacted(v) for v in value]
    return value


def _setting(text: str) -> str:
    """A ``--set KEY=VALUE`` argument with a secret's value hidden, inside a mapping value too."""
    key, sep, raw = text.partition("=")
    if not sep:
        return text
    if is_secret(key):
        return f"{key}={HIDDEN}"
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return text
    if isinstance(value, (dict, list)) and redacted(value) != value:
        return f"{key}={json.dumps(redacted(value))}"
    return text


def redacted_argv(argv: Sequence[str]) -> list[str]:
    """A command line with the values of secret settings (``--set gateway.token=…``) and secret options
    (``--token …``, ``--api-key=…``) replaced by ``***``."""
    out: list[str] = []
    expect = None  # what the argument after an option is: "secret" (--token), "setting" (--set) or None
    for arg in map(str, argv):
        option, sep, _ = arg.partition("=")
        if expect == "secret":
            out.append(HIDDEN)
        elif expect == "setting":
            out.append(_setting(arg))
        elif option == "--set" and sep:
            out.append("--set=" + _setting(arg[len("--set="):]))
        elif arg.startswith("--") and sep and is_secret(option):
            out.append(f"{option}={HIDDEN}")
        else:
            out.append(arg)
        if expect is not None or not arg.startswith("--") or sep:
            expect = None
        else:
            expect = "setting" if arg == "--set" else "secret" if is_secret(arg) else None
    return out


def redacted_overrides(overrides: Sequence[str]) -> list[str]:
    """``KEY=VALUE`` overrides (``--set``) with the values of secret settings replaced by ``***``."""
    return [_setting(str(override)) for override in overrides]


_held: dict[tuple[str, ...], list[str]] = {}  # the overrides a flow is given (secrets hidden) -> the ones meant
_held_lock = threading.Lock()


@contextlib.contextmanager
def held_back(overrides: Sequence[str]) -> Iterator[list[str]]:
    """For the block, ``overrides`` with every secret's value as ``***``: what a command passes a flow as its
    parameters. The flow, which runs in this process, gets the values back with ``given_back``. They stay in memory,
    not in the environment, which every process the run starts would inherit, a user's agent command too."""
    meant = [str(override) for override in overrides]
    shown = redacted_overrides(meant)
    with _held_lock:
        _held[tuple(shown)] = meant
    try:
        yield shown
    finally:
        with _held_lock:
            if _held.get(tuple(shown)) is meant:
                del _held[tuple(shown)]


def given_back(overrides: Sequence[str] | None) -> list[str]:
    """The overrides a flow run was given, with the secret values ``held_back`` kept out of its parameters. A hidden
    value that no command of this process holds (a run Prefect started again from its parameters) is refused."""
    shown = [str(override) for override in overrides or []]
    with _held_lock:
        meant = _held.get(tuple(shown))
    if meant is not None:
        return list(meant)
    hidden = [o.partition("=")[0] for o in shown if HIDDEN in o.partition("=")[2]]
    if hidden:
        raise ConfigError(f"{', '.join(hidden)}: this flow run was given the value of a secret as {HIDDEN}, as a command "
                          "passes it to keep it out of Prefect's records, and this process does not hold the value: "
                          "give the secret in the config file or in the environment (ARCLIGHT_GATEWAY_TOKEN, "
                          "ARCLIGHT_COLLECTOR_TOKEN, AWS_*), or run the command again")
    return shown
