"""One run's context: what every stage works with, built once per run and handed to each stage and task.

A flow builds it when the run starts (``RunContext.of(config, stack)``): the config, the catalog over the
lake's state tables, the running services and the run id. Stages read ``ctx.catalog`` instead of
rebuilding it from the config at each call, and reach the services through ``ctx.stack`` (the
supervisor replaces a restarted server in that same object, so every stage sees the live one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lightning_core.config import ArclightConfig
from lightning_core.epoch.stack import Stack
from lightning_core.store.catalog import Catalog


@dataclass(frozen=True)
class RunContext:
    """The config, the catalog, the running services (None for work that needs none) and the run."""

    config: ArclightConfig
    catalog: Catalog
    stack: Stack | None = None

    @classmethod
    def of(cls, config: ArclightConfig, stack: Stack | None = None) -> "RunContext":
        """The context of ``config``'s run, over ``stack``'s services."""
        return cls(config=config, catalog=Catalog.from_config(config), stack=stack)

    @property
    def run_id(self) -> str:
        """The training run (evaluations and prompt searches have runs of their own, named after it)."""
        return self.config.run_name

    @property
    def services(self) -> Stack:
        """The running services; an error for a context built without them."""
        if self.stack is None:
            raise ValueError("this stage needs the running services (collector, vLLM, gateway): build the run's context "
                             "with its stack, RunContext.of(config, stack)")
        return self.stack

    def with_config(self, config: ArclightConfig) -> "RunContext":
        """The same run and services with ``config`` (a run's length set from the command line)."""
        return dataclasses.replace(self, config=config)
