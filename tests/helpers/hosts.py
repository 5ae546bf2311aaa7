"""Separate hosts on one machine, for tests of the loop across machines (issue 53).

Each host is a Linux network namespace with one address on a private switch (a bridge inside a namespace of its
own, so no host can reach this machine's own network, nor this machine reach them), and a mount namespace of its
own in which ``/tmp`` and ``/mnt`` are private tmpfs disks: a file one host writes there, no other host (and not
the test) can read. Everything else of the file system stays visible, as software installed on every machine: the
repository and its virtualenvs.

    with Hosts(["store", "serve"]) as hosts:
        server = hosts["store"].start(["python", "-m", "http.server", "8000"], log="store-http")
        hosts["serve"].sh(f"curl http://{hosts['store'].address}:8000/")

Processes are started with ``nsenter`` into the host's namespaces and stopped, with the namespaces, when the block
ends. Needs root (``Hosts.missing()`` says what is lacking, for a test to skip with).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PRIVATE = ("/tmp", "/mnt")  # each host's own disks
REPO = Path(__file__).resolve().parents[2]  # the repository and its virtualenvs: software installed on every host
SUBNET = "10.77.{}.{}"


def _private_disks(name: str) -> str:
    """The shell commands that give a host its own ``/tmp`` and ``/mnt``. A repository cloned under one of them (CI
    in /tmp) stays visible there: it is held open (fd 3) before the tmpfs hides it, and bound back at its path."""
    mounts = [f"mount -t tmpfs -o size=8g {name}-{p.strip('/')} {p}" for p in PRIVATE]
    if any(REPO.is_relative_to(p) for p in PRIVATE):
        repo = shlex.quote(str(REPO))
        return " && ".join([f"exec 3<{repo}", *mounts, f"mkdir -p {repo}",
                            f"mount --no-canonicalize --bind /proc/$$/fd/3 {repo}", "exec 3<&-"])
    return " && ".join(mounts)


def missing() -> str | None:
    """Why hosts cannot be made here (a line for pytest.skip), or None."""
    if os.geteuid() != 0:
        return "hosts are network and mount namespaces: the test needs root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"hosts need `{tool}` (iproute2 / util-linux)"
    probe = f"arcprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


@dataclass
class Host:
    """One host: its name, address, namespaces, and the processes started on it."""

    name: str
    address: str
    netns: str
    logs: Path
    holder: subprocess.Popen | None = None  # keeps the mount namespace alive; processes join it with nsenter
    processes: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--net", "--", *argv]

    def start(self, argv: list[str], *, log: str, env: dict[str, str] | None = None,
              cwd: str | None = None) -> subprocess.Popen:
        """Start ``argv`` on this host in a session of its own, logging to ``<logs>/<host>-<log>.log``."""
        path = self.logs / f"{self.name}-{log}.log"
        with open(path, "ab") as out:
            process = subprocess.Popen(self.argv(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        process.log_path = path
        self.processes.append(process)
        return process

    def sh(self, command: str, *, timeout_s: float = 60, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command on this host and wait for it."""
        done = subprocess.run(self.argv(["bash", "-c", command]), capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
        if check and done.returncode != 0:
            raise RuntimeError(f"on {self.name}: {command!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def pids(self) -> list[int]:
        """Every process that runs on this host (in its network namespace)."""
        done = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def kill_all(self) -> int:
        """The machine dies: SIGKILL every process on this host but the one that holds its namespaces (the harness's,
        so that the host can still be looked at and removed); return how many were killed."""
        killed = 0
        for pid in self.pids():
            if self.holder is not None and pid == self.holder.pid:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        return killed

    def bytes_sent(self) -> int:
        """Bytes this host has sent to the others (its interface's counter)."""
        return int(self.sh("cat /sys/class/net/eth0/statistics/tx_bytes").stdout)

    def link(self, up: bool) -> None:
        """Take this host's network link down (a cut cable) or up again."""
        _ip("link", "set", "eth0", "up" if up else "down", netns=self.netns)

    def stop(self, process: subprocess.Popen, *, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        """Stop a process started here, with its whole session."""
        if process.poll() is None:
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            except ProcessLookupError:
                pass


class Hosts:
    """Hosts named ``names`` on one private switch, made when the ``with`` block starts and removed when it ends."""

    def __init__(self, names: list[str], *, logs: Path):
        self.tag = uuid.uuid4().hex[:5]
        self.net = int(self.tag, 16) % 200 + 20
        self.switch = f"arc{self.tag}-switch"
        self.logs = Path(logs)
        self.hosts = {name: Host(name, SUBNET.format(self.net, i + 1), f"arc{self.tag}-{name}", self.logs)
                      for i, name in enumerate(names)}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __enter__(self) -> "Hosts":
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            _ip("netns", "add", self.switch)
            _ip("link", "add", "br0", "type", "bridge", netns=self.switch)
            _ip("link", "set", "br0", "up", netns=self.switch)
            for i, host in enumerate(self.hosts.values()):
                _ip("netns", "add", host.netns)
                inside, port = f"a{self.tag}{i}", f"b{self.tag}{i}"
                _ip("link", "add", inside, "type", "veth", "peer", "name", port)
                _ip("link", "set", inside, "netns", host.netns, "name", "eth0")
                _ip("link", "set", port, "netns", self.switch)
                _ip("link", "set", port, "master", "br0", netns=self.switch)
                _ip("link", "set", port, "up", netns=self.switch)
                _ip("addr", "add", f"{host.address}/24", "dev", "eth0", netns=host.netns)
                _ip("link", "set", "eth0", "up", netns=host.netns)
                _ip("link", "set", "lo", "up", netns=host.netns)
                mounts = _private_disks(host.name)
                host.holder = subprocess.Popen(
                    ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--propagation", "private", "--",
                     "bash", "-c", f"{mounts} && echo ready && exec sleep infinity"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
                ready = host.holder.stdout.readline().strip()
                if ready != "ready":
                    raise RuntimeError(f"host {host.name} did not start: {host.holder.stderr.read()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        # a second Ctrl-C (or a wrapper's forwarded SIGINT) must not cut the cleanup short and leave hosts behind
        masked = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, masked) if threading.current_thread() is threading.main_thread() else None
        try:
            self._remove()
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _remove(self) -> None:
        # every host's processes are told to stop at once and stop side by side, within one 10 s wait (one after
        # another, each of eight hosts' Ray nodes, vLLM and servers took its own shutdown, and its own 10 s if stuck)
        started = time.monotonic()
        running = [p for host in self.hosts.values() for p in reversed(host.processes) if p.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        for host in self.hosts.values():
            if host.holder is not None:
                host.stop(host.holder, sig=signal.SIGKILL)
            for pid in host.pids():  # whatever is left in the host (a server's own children in sessions of their own)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for netns in [*(h.netns for h in self.hosts.values()), self.switch]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        print(f"hosts {', '.join(self.hosts)}: stopped and removed in {time.monotonic() - started:.1f} s")
