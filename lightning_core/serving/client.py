"""A small client for the gateway's admin endpoints: rollouts and policy versions.

    gw = GatewayClient("http://127.0.0.1:8400", token=None)
    base_url = gw.register_rollout(rollout_id="r1", run_id="run", epoch=0, task_id="t1")
    ... agent uses OpenAI(base_url=base_url) ...
    gw.forget_rollout("r1")
"""

from __future__ import annotations

from typing import Any

import httpx

from lightning_core.common.http_guard import bearer


class GatewayAdminError(RuntimeError):
    """The gateway refused an admin call; the message carries its reason, ``status`` its HTTP status."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class GatewayClient:
    """Admin calls to a running gateway."""

    def __init__(self, url: str, *, token: str | None = None, timeout_s: float = 30.0):
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=bearer(token), timeout=timeout_s)

    def close(self) -> None:
        """Close the HTTP connections."""
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise GatewayAdminError(f"gateway {method} {path} answered {response.status_code}: {response.text[:2000]}",
                                    status=response.status_code)
        return response.json() if response.content else None

    def register_rollout(
        self, *, rollout_id: str, run_id: str | None = None, epoch: int | None = None, task_id: str | None = None,
        attempt: int | None = None, policy: str | None = None, seed: int | None = None,
    ) -> str:
        """Register a rollout and return the base URL its agent should use (``.../rollout/<id>/v1``)."""
        body = {"rollout_id": rollout_id, "run_id": run_id, "epoch": epoch, "task_id": task_id, "attempt": attempt,
                "policy": policy, "seed": seed}
        return self._call("POST", "/admin/rollouts", json={k: v for k, v in body.items() if v is not None})["base_url"]

    def forget_rollout(self, rollout_id: str) -> int | None:
        """Forget a finished rollout (later calls with its id get 404); return the model-call spans the gateway recorded
        for it since its latest registration, None when it was not registered (or the gateway does not count)."""
        response = self.http.delete(f"/admin/rollouts/{rollout_id}")
        if response.status_code not in (200, 204, 404):
            raise GatewayAdminError(f"gateway DELETE /admin/rollouts/{rollout_id} answered {response.status_code}: "
                                    f"{response.text}", status=response.status_code)
        return response.json().get("recorded_spans") if response.status_code == 200 else None

    def policies(self) -> dict[str, Any]:
        """Return the base model, upstreams and every policy's current and earlier versions."""
        return self._call("GET", "/admin/policies")

    def switch_policy(self, policy: str, *, served_model: str, version: int) -> dict[str, Any]:
        """Make a loaded adapter the current version of ``policy`` (atomic for all later calls)."""
        return self._call("PUT", f"/admin/policies/{policy}", json={"served_model": served_model, "version": version})

    def rollback(self, policy: str) -> dict[str, Any]:
        """Switch ``policy`` back to its previous version."""
        return self._call("POST", f"/admin/policies/{policy}/rollback")

    def fetch_weights(self, uri: str, *, timeout_s: float = 600.0) -> dict[str, Any]:
        """Have the gateway fetch the version published at ``uri`` to its host (for the vLLM beside it); return the
        folder it is in there (``path``), its ``bytes`` and the manifest's ``files``."""
        return self._call("POST", "/admin/weights", json={"uri": uri}, timeout=timeout_s)

    def flush(self) -> bool:
        """Export every span recorded so far to the collector now."""
        return bool(self._call("POST", "/admin/flush")["flushed"])
