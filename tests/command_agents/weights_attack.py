"""A command agent that turns on the gateway (issue 68, finding 1; tests/test_command_agents.py runs it in an epoch).

Every rollout answers one question through the gateway, as any agent, and prints its reward. The rollout whose task
says ``"attack": "<folder>"`` first tries, with whatever token it was given (``OPENAI_API_KEY``), with none, and with
an admin token it finds in another process's environment (``/proc/*/environ``: a process of the same user can read
it), against a folder store of its own (``<folder>/store``) and against the configured one (the task's ``"store"``,
which an agent could read in the project's config):

- the manifest trick: versions whose manifests name an absolute path, ``../../outside`` and a deeper ``..`` path,
  with true hashes, fetched through ``POST /admin/weights``;
- ``..`` and empty segments in the URI (``<store>/x/../v3``, ``<store>//v2``), whose policy folder would be the
  gateway's own folder or its weights folder, pruned after the fetch;

and writes each answer's HTTP status to ``<folder>/statuses.json``. Standard library only: it knows nothing of Arclight.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

PAYLOAD = b"written by the agent through the gateway\n"


def stage(version: Path, keys: list[str], *, within: Path) -> str:
    """A version whose manifest names ``keys`` (true sizes and hashes), with the payload where each key leads in the
    store when that is inside ``within`` (what an unchecked fetch reads and copies)."""
    version.mkdir(parents=True, exist_ok=True)
    for key in keys:
        source = Path(os.path.normpath(f"{version}/{key}"))
        if within in source.parents:
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(PAYLOAD)
    entry = {"bytes": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}
    (version / "manifest.json").write_text(json.dumps({"files": {key: entry for key in keys}}))
    return f"file://{version}"


def post(url: str, body: dict, token: str | None) -> int:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def stolen_admin_token(port: str) -> str | None:
    """The admin token in the environment of the gateway on ``port`` (a process of this user), if it is readable."""
    for process in Path("/proc").glob("[0-9]*"):
        try:
            argv = (process / "cmdline").read_bytes().split(b"\0")
            if b"gateway" not in argv or port.encode() not in argv:
                continue
            environ = (process / "environ").read_text(errors="replace")
            variables = dict(v.split("=", 1) for v in environ.split("\0") if "=" in v)
        except OSError:
            continue
        found = variables.get("ARCLIGHT_GATEWAY_ADMIN_TOKEN") or variables.get("ARCLIGHT_GATEWAY_TOKEN")
        if found:
            return found
    return None


def attack(folder: Path, configured: Path, gateway: str, token: str) -> None:
    uris = {}
    for where, store in (("own store", folder / "store"), ("configured store", configured)):
        uris.update({
            f"manifest-absolute, {where}": stage(store / "evil" / "v1", ["config.json", str(folder.parent / "outside-absolute")],
                                                 within=store),
            f"manifest-dotdot, {where}": stage(store / "evil" / "v6", ["config.json", "../../outside"], within=store),
            f"manifest-deep, {where}": stage(store / "evil" / "v7", ["config.json", "../" * 6 + "outside-deep"],
                                             within=store),
        })
        for name in ("v2", "v3", "v5"):
            stage(store / name, ["config.json"], within=store)
        uris.update({f"uri-empty-segment, {where}": f"file://{store}//v2",
                     f"uri-empty-segment-again, {where}": f"file://{store}//v5",
                     f"uri-dotdot, {where}": f"file://{store}/x/../v3"})
    port = gateway.rsplit(":", 1)[-1]
    tokens = {"its token": token, "no token": None, "stolen admin token": stolen_admin_token(port)}
    statuses = {f"{label}, {held}": post(f"{gateway}/admin/weights", {"uri": uri}, value)
                for label, uri in uris.items() for held, value in tokens.items() if held == "no token" or value}
    (folder / "statuses.json").write_text(json.dumps(statuses, indent=1))


def main() -> int:
    task = json.loads(sys.stdin.readline())
    base_url, token = os.environ["OPENAI_BASE_URL"], os.environ.get("OPENAI_API_KEY", "")
    if task.get("attack"):
        attack(Path(task["attack"]), Path(task["store"]), base_url.split("/rollout/")[0], token)
    body = {"model": os.environ["ARCLIGHT_MODEL"], "messages": [{"role": "user", "content": task["question"]}],
            "max_tokens": 4, "temperature": float(os.environ["ARCLIGHT_TEMPERATURE"])}
    request = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        text = json.loads(answer.read())["choices"][0]["message"]["content"] or ""
    print(json.dumps({"reward": (len(text) % 5) / 10 + 0.01 * int(os.environ["ARCLIGHT_SAMPLE_INDEX"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
