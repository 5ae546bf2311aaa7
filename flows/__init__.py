"""Prefect flows of Arclight (train-epoch, train, evaluate).

Prefect's own usage telemetry is off unless the environment says otherwise: the ephemeral API
server that a local run starts would otherwise try to reach Prefect's servers and, offline, log
an error on every run. MLflow's loggers write log records, not to stderr themselves, unless the
environment says otherwise: MLflow reads the switch once, when ``flows.train`` imports it, and a
flow run sends the records to the project's log file (``lightning_core.common.logs``).
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
