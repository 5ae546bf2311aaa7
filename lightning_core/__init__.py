"""Arclight's library: config, span conventions, tracing SDK, collector, lake and catalog,
SQL pipeline, serving, trainer and tracking. Nothing here imports Prefect."""

__version__ = "0.1.0"
