"""Shared fixtures: real servers started once per session and stopped at the end."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightning_core.catalog import Catalog
from lightning_core.config import ArclightConfig, load_config
from lightning_core.services import Service, free_port, start_collector

REPO = Path(__file__).resolve().parents[1]


def make_config(tmp: Path, *overrides: str) -> ArclightConfig:
    """A config rooted at ``tmp`` with free ports, plus ``overrides``."""
    return load_config(
        None,
        overrides=[f"project_dir={tmp}", f"collector.port={free_port()}", f"gateway.port={free_port()}", *overrides],
    )


@pytest.fixture(scope="session")
def collector_config(tmp_path_factory) -> ArclightConfig:
    """Config of the session's shared collector (its own lake)."""
    cfg = make_config(tmp_path_factory.mktemp("collector"), "collector.compact_idle_s=3600")
    Catalog.from_config(cfg).ensure()
    return cfg


@pytest.fixture(scope="session")
def collector(collector_config) -> Service:
    """A real ``arclight collector`` process for the whole session."""
    service = start_collector(collector_config, timeout_s=60)
    yield service
    service.stop()
