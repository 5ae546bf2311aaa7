"""Prefect flows of Arclight (train-epoch, train, evaluate).

Prefect's own usage telemetry is off unless the environment says otherwise: the ephemeral API
server that a local run starts would otherwise try to reach Prefect's servers and, offline, log
an error on every run.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
