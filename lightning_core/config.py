"""One config model for a training project, loaded from one YAML file, overridable per key.

``load_config("examples/calc/config.yaml", overrides=["collector.port=4319"])`` returns an
``ArclightConfig``. Unknown keys and wrong types raise ``ConfigError`` naming the key and the
file. Relative paths in the file are resolved against the file's own directory.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(ValueError):
    """A config file or override that does not fit the model; the message names key and file."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LakeConfig(Section):
    """Where spans, triplets and the DuckDB catalog live."""

    path: Path = Field(Path(".arclight/lake"), description="Root folder of the Parquet lake.")
    catalog: Path | None = Field(None, description="DuckDB catalog file; default <path>/catalog.duckdb.")
    duckdb_memory_limit: str = Field("4GB", description="DuckDB memory_limit for pipeline queries.")
    duckdb_threads: int = Field(2, ge=1, description="DuckDB worker threads.")

    @property
    def catalog_path(self) -> Path:
        """Return the catalog file path (explicit, or inside the lake)."""
        return self.catalog or self.path / "catalog.duckdb"


class CollectorConfig(Section):
    """The OTLP/HTTP collector that writes spans to the lake."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback needs a token.")
    port: int = Field(4318, ge=0, le=65535, description="Port of /v1/traces (0 picks a free one).")
    token: str | None = Field(None, description="Bearer token; default $ARCLIGHT_COLLECTOR_TOKEN.")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest accepted body, after gunzip.")
    flush_interval_ms: int = Field(20, ge=0, description="Group-commit window: requests arriving within it share one file.")
    compact_min_files: int = Field(16, ge=2, description="Compact a partition once it has this many files...")
    compact_idle_s: float = Field(10.0, ge=0, description="...and has received nothing for this long.")
    endpoint: str | None = Field(None, description="URL of a running collector to attach to instead of starting one.")

    @property
    def url(self) -> str:
        """Return the base URL agents export to."""
        return self.endpoint or f"http://{_connect_host(self.host)}:{self.port}"


class GatewayConfig(Section):
    """The OpenAI-compatible gateway in front of vLLM."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback needs a token.")
    port: int = Field(8400, ge=0, le=65535, description="Port of the gateway.")
    token: str | None = Field(None, description="Bearer token; default $ARCLIGHT_GATEWAY_TOKEN.")
    endpoint: str | None = Field(None, description="URL of a running gateway to attach to.")

    @property
    def url(self) -> str:
        """Return the gateway's base URL."""
        return self.endpoint or f"http://{_connect_host(self.host)}:{self.port}"


class TrackingConfig(Section):
    """MLflow tracking."""

    mlflow_uri: str | None = Field(None, description="Tracking URI; default sqlite:///<project dir>/mlflow.db.")
    experiment: str | None = Field(None, description="Experiment name; default the project name.")


class PolicyConfig(Section):
    """One trainable policy: the agents whose calls train it, and its adapter."""

    name: str = Field("default", description="Policy name; adapters are served as <name>-v<version>.")
    agent_match: str | None = Field(None, description="Regex (search semantics) on the owning agent's name; None = all agents.")

    @field_validator("name")
    @classmethod
    def _name_is_a_partition_value(cls, value: str) -> str:
        if not RUN_ID_PATTERN.match(value):
            raise ValueError(f"policy name {value!r} must use only letters, digits, '.', '_' and '-'")
        return value


class ArclightConfig(Section):
    """A training project: what to run, where data goes, and how each stage behaves."""

    name: str = Field("arclight", description="Project name (MLflow experiment, Prefect tags).")
    run_name: str = Field("default", description="Run id: partitions the lake; letters, digits, '.', '_', '-'.")
    project_dir: Path = Field(Path("."), description="Base for relative paths; default the config file's folder.")
    lake: LakeConfig = Field(default_factory=LakeConfig)
    collector: CollectorConfig = Field(default_factory=CollectorConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    policies: list[PolicyConfig] = Field(default_factory=lambda: [PolicyConfig()], description="Trainable policies.")

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_partition_value(cls, value: str) -> str:
        if not RUN_ID_PATTERN.match(value):
            raise ValueError(
                f"run_name {value!r} must start with a letter or digit and use only letters, "
                "digits, '.', '_' and '-' (it names a lake partition)"
            )
        return value

    def resolved(self) -> "ArclightConfig":
        """Return a copy whose relative paths are absolute, based on ``project_dir``."""
        base = self.project_dir.resolve()
        data = self.model_copy(deep=True)
        data.project_dir = base
        data.lake.path = _absolute(base, data.lake.path)
        if data.lake.catalog is not None:
            data.lake.catalog = _absolute(base, data.lake.catalog)
        return data

    @property
    def mlflow_uri(self) -> str:
        """Return the MLflow tracking URI (SQLite in the project directory by default)."""
        return self.tracking.mlflow_uri or f"sqlite:///{self.project_dir.resolve() / 'mlflow.db'}"


def load_config(path: str | os.PathLike[str] | None = None, *, overrides: list[str] | None = None) -> ArclightConfig:
    """Load a project config from YAML (or defaults when ``path`` is None) and apply overrides.

    Overrides are ``dotted.key=value`` strings; values are parsed as YAML scalars.
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of settings at the top level, found {type(loaded).__name__}")
        data = loaded
        data.setdefault("project_dir", str(file.resolve().parent))
    for override in overrides or []:
        _apply_override(data, override, source)
    try:
        config = ArclightConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    if path is not None and not Path(config.project_dir).is_absolute():
        config.project_dir = Path(path).resolve().parent / config.project_dir
    return config.resolved()


def _apply_override(data: dict[str, Any], override: str, source: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. collector.port=4319")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} in {source} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = _known_keys(err["loc"][:-1])
            hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (known keys: {', '.join(sorted(known))})"
            lines.append(f"{source}: unknown key {key!r}{suggestion}")
        else:
            lines.append(f"{source}: key {key!r}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = ArclightConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _absolute(base: Path, path: Path) -> Path:
    path = Path(os.path.expanduser(path))
    return path if path.is_absolute() else (base / path).resolve()


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
