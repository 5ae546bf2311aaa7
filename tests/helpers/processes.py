"""Find the servers a run started, and count what the gateway answered: for tests and probes that kill them."""

from __future__ import annotations

import re
from pathlib import Path

import httpx


def pids_matching(pattern: str) -> list[int]:
    """Processes whose command line matches the regular expression ``pattern``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if re.search(pattern, (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")):
                    found.append(int(entry.name))
            except OSError:  # the process ended while we looked
                pass
    return found


def gateway_calls(gateway_url: str) -> float:
    """Model calls the gateway has answered (its Prometheus counter), 0 while it does not answer."""
    try:
        text = httpx.get(f"{gateway_url}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    return sum(float(m) for m in re.findall(r'^arclight_gateway_requests_total\{[^}]*\} (\S+)$', text, re.M))
