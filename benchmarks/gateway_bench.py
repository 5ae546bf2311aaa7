"""Gateway under load: its own cost against a zero-cost mock upstream, direct and through the gateway, same run.

    .venv/bin/python benchmarks/gateway_bench.py                         # 1, 16, 64 clients; gateway with 1 and 2 processes
    .venv/bin/python benchmarks/gateway_bench.py --clients 64 --workers 1 2 4 --seconds 8 --rounds 3

Three kinds of process, all real:
- the mock upstream (``--mock raw``, the default): a raw asyncio HTTP/1.1 server that answers every chat call at once with the same
  vLLM-shaped body (prompt token ids, 30 sampled token ids with logprobs, usage), and accepts the
  gateway's OTLP exports at ``/v1/traces`` with an empty 200 (so neither vLLM nor the collector costs
  anything and only the gateway's own work shows); ``--mock asgi`` answers the same from a Starlette app
  under uvicorn, an upstream with a typical Python server's per-request cost;
- the gateway: ``python -m lightning_core gateway --workers N`` in front of it, exactly as ``arclight
  serve`` starts it (span per call, exported over OTLP/HTTP);
- the load: ``--load-procs`` processes of aiohttp clients, each client one connection that sends a
  calc-sized chat request (a registered rollout URL through the gateway, the plain URL direct) as soon
  as the previous answer is in.

For each number of clients, rounds alternate direct and every gateway variant (``--rounds`` times,
``--seconds`` each) and the table reports throughput (requests/s, median over rounds), p50/p99
latency over all rounds' requests, and the CPU time the gateway's processes spent per answered call
(median over rounds; from ``/proc``, so Linux only). Results come as a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.proc_cpu import group_cpu_s  # noqa: E402
from lightning_core.common.services import free_port  # noqa: E402

PROMPT_IDS = list(range(1000, 1190))          # the calc prompt is ~190 tokens
ANSWER_IDS = list(range(2000, 2030))          # and an answer ~10-40
ANSWER = {
    "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "base",
    "prompt_token_ids": PROMPT_IDS,
    "choices": [{
        "index": 0, "finish_reason": "stop", "token_ids": ANSWER_IDS,
        "message": {"role": "assistant", "content": "CALC: 14 * 16 + 10"},
        "logprobs": {"content": [{"token": f"t{i}", "logprob": -0.25, "bytes": None, "top_logprobs": []}
                                 for i in ANSWER_IDS]},
    }],
    "usage": {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": len(ANSWER_IDS), "total_tokens": 220},
}
MESSAGES = [
    {"role": "system", "content": "You are a careful calculator agent. Reply with exactly one line: 'CALC: <expression>' "
                                  "to use the calculator, then 'ANSWER: <number>' once you have the result."},
    {"role": "user", "content": "A crate holds 14 rows of 16 jars and 10 loose jars. How many jars?"},
    {"role": "assistant", "content": "CALC: 14 * 16 + 10"},
    {"role": "user", "content": "RESULT: 234"},
    {"role": "assistant", "content": "ANSWER: 234"},
    {"role": "user", "content": "Nine boxes hold 23 pens each and 7 pens are lost. How many pens are left?"},
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


# ---------------------------------------------------------------- mock upstream (vLLM + OTLP sink)

def run_mock(port: int) -> None:
    """Answer every request of every keep-alive connection at once; chat calls get ``ANSWER``."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    body = json.dumps(ANSWER, separators=(",", ":")).encode()
    chat = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    empty = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
    models = json.dumps({"object": "list", "data": [{"id": "base", "object": "model"}]}).encode()
    listing = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(models), models)

    class Http(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buf = transport, b""

        def data_received(self, data):
            self.buf += data
            while True:
                head_end = self.buf.find(b"\r\n\r\n")
                if head_end < 0:
                    return
                lines = self.buf[:head_end].lower().split(b"\r\n")
                length = next((int(line[15:]) for line in lines[1:] if line.startswith(b"content-length:")), 0)
                if len(self.buf) < head_end + 4 + length:
                    return
                path = lines[0].split(b" ", 2)[1]
                self.buf = self.buf[head_end + 4 + length:]
                if path.endswith(b"/traces"):
                    self.transport.write(empty)
                elif path.endswith(b"/models"):
                    self.transport.write(listing)
                else:
                    self.transport.write(chat)

    async def main():
        server = await asyncio.get_running_loop().create_server(Http, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def run_mock_asgi(port: int) -> None:
    """The same answers from a Starlette app under uvicorn: an upstream with a typical Python server's cost."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    body = json.dumps(ANSWER, separators=(",", ":")).encode()
    models = json.dumps({"object": "list", "data": [{"id": "base", "object": "model"}]}).encode()

    async def chat(request):
        await request.body()
        return Response(body, media_type="application/json")

    async def traces(request):
        await request.body()
        return Response(b"", media_type="application/x-protobuf")

    async def listing(request):
        return Response(models, media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/traces", traces, methods=["POST"]),
                            Route("/v1/models", listing)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------- load generator

def load_proc(urls: list[str], clients: int, seconds: float, start_at: float, out: mp.Queue) -> None:
    """``clients`` connections, each sending the next chat call when the last one is answered."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    import aiohttp

    async def main():
        latencies: list[float] = []
        errors = 0
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.time() < start_at:
                await asyncio.sleep(0.005)
            stop = time.perf_counter() + seconds

            async def client(i: int):
                nonlocal errors
                url = urls[i % len(urls)]
                payload = json.dumps({"model": "calc", "messages": MESSAGES, "max_tokens": 40, "temperature": 1.0}).encode()
                headers = {"content-type": "application/json"}
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    async with session.post(url, data=payload, headers=headers) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            continue
                    latencies.append(time.perf_counter() - t0)

            await asyncio.gather(*(client(i) for i in range(clients)))
        return latencies, errors

    out.put(asyncio.run(main()))


def measure(urls: list[str], clients: int, seconds: float, procs: int) -> dict:
    """Run the load from ``procs`` processes (clients spread over them); return throughput and latencies."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = max(1, min(procs, clients))
    start_at = time.time() + 1.5  # every process connected and waiting
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    ps = [ctx.Process(target=load_proc, args=(urls[sum(shares[:i]):] + urls[:sum(shares[:i])], n, seconds, start_at, out))
          for i, n in enumerate(shares)]
    for p in ps:
        p.start()
    latencies, errors = [], 0
    for _ in ps:
        lat, err = out.get()
        latencies += lat
        errors += err
    for p in ps:
        p.join()
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / seconds, "latencies": latencies}


# ---------------------------------------------------------------- gateway

def start_gateway(upstream: str, workers: int, rollouts: int, log_dir: Path) -> tuple[subprocess.Popen, str, list[str]]:
    """Start ``arclight gateway`` on a free port with ``workers`` processes; register ``rollouts`` rollouts."""
    import httpx

    port = free_port()
    log = open(log_dir / f"gateway-w{workers}.log", "w")
    admin = f"bench-{port}"  # the admin routes take only the token the gateway was started with
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_core", "gateway", "--upstream", upstream, "--collector", upstream,
         "--port", str(port), "--log-level", "warning",
         *(["--workers", str(workers), "--state", str(log_dir / f"gateway-w{workers}.sqlite")] if workers > 1 else [])],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "ARCLIGHT_GATEWAY_ADMIN_TOKEN": admin})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"the gateway did not start: see {log_dir / f'gateway-w{workers}.log'}")
        time.sleep(0.2)
    bases = []
    for i in range(rollouts):
        r = httpx.post(f"{url}/admin/rollouts", json={"rollout_id": f"bench-{i}", "run_id": "bench", "epoch": 0,
                                                     "task_id": f"t{i}", "attempt": 0},
                       headers={"Authorization": f"Bearer {admin}"})
        r.raise_for_status()
        bases.append(r.json()["base_url"] + "/chat/completions")
    return proc, url, bases


def stop(proc: subprocess.Popen) -> None:
    with_group = os.getpgid(proc.pid)
    os.killpg(with_group, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(with_group, signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="gateway process counts to compare")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per path")
    parser.add_argument("--load-procs", type=int, default=2, help="load-generator processes (at most one per client)")
    parser.add_argument("--mock", choices=["raw", "asgi"], default="raw",
                        help="raw: a bare asyncio server (direct is as fast as the load can go); asgi: Starlette under uvicorn")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gateway_bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    mock = mp.get_context("spawn").Process(target=run_mock if args.mock == "raw" else run_mock_asgi, args=(port,), daemon=True)
    mock.start()
    upstream = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.time() + 30
    while True:
        try:
            httpx.get(f"{upstream}/v1/models", timeout=1)
            break
        except httpx.HTTPError:
            if time.time() > deadline:
                raise SystemExit("the mock upstream did not start")
            time.sleep(0.1)
    gateways = {}
    try:
        for w in args.workers:
            gateways[w] = start_gateway(upstream, w, 64, args.out)
        paths = {"direct": [f"{upstream}/v1/chat/completions"]} | {f"gateway x{w}": bases for w, (_, _, bases) in gateways.items()}
        groups = {f"gateway x{w}": os.getpgid(proc.pid) for w, (proc, _, _) in gateways.items()}
        measure(paths["direct"], 4, 1.0, 1)  # warm every path up (connections, imports)
        for name in paths:
            measure(paths[name], 8, 1.0, 1)
        load = [os.getloadavg()[0]]
        results: dict[int, dict[str, list[dict]]] = {}
        for clients in args.clients:
            results[clients] = {name: [] for name in paths}
            for r in range(args.rounds):
                for name, urls in paths.items():
                    cpu_before = group_cpu_s(groups[name]) if name in groups else 0.0
                    res = measure(urls, clients, args.seconds, args.load_procs)
                    # the gateway's processes' CPU per answered call (its exporter thread included): steadier than
                    # throughput on a shared machine, and what sets how many calls a core can forward
                    res["cpu_ms"] = ((group_cpu_s(groups[name]) - cpu_before) * 1e3 / max(res["requests"], 1)
                                     if name in groups else None)
                    results[clients][name].append(res)
                    cpu_text = "" if res["cpu_ms"] is None else f"  gateway CPU {res['cpu_ms']:.3f} ms/call"
                    print(f"clients {clients:3d} round {r} {name:12s} {res['rps']:8.1f} req/s  "
                          f"p50 {percentile(res['latencies'], .5) * 1e3:7.2f} ms  p99 {percentile(res['latencies'], .99) * 1e3:7.2f} ms"
                          f"{cpu_text}  errors {res['errors']}", file=sys.stderr, flush=True)
            load.append(os.getloadavg()[0])
    finally:
        for proc, _, _ in gateways.values():
            stop(proc)
        mock.terminate()

    rows, summary = [], []
    for clients, by_path in results.items():
        direct_rps = statistics.median(r["rps"] for r in by_path["direct"])
        direct_lat = [x for r in by_path["direct"] for x in r["latencies"]]
        for name, rounds in by_path.items():
            lat = [x for r in rounds for x in r["latencies"]]
            rps = statistics.median(r["rps"] for r in rounds)
            p50, p99 = percentile(lat, .5) * 1e3, percentile(lat, .99) * 1e3
            ratio = rps / direct_rps
            cpu = None if rounds[0]["cpu_ms"] is None else statistics.median(r["cpu_ms"] for r in rounds)
            rows.append(f"| {clients} | {name} | {rps:.0f} | {ratio:.2f} | {p50:.2f} | {p99:.2f} | "
                        f"{p99 / (percentile(direct_lat, .99) * 1e3):.2f} | {p50 - percentile(direct_lat, .5) * 1e3:+.2f} | "
                        f"{'' if cpu is None else f'{cpu:.3f}'} | {sum(r['errors'] for r in rounds)} |")
            summary.append({"clients": clients, "path": name, "rps": round(rps, 1), "vs_direct": round(ratio, 3),
                            "p50_ms": round(p50, 3), "p99_ms": round(p99, 3), "gateway_cpu_ms_per_call": None if cpu is None else round(cpu, 4)})
    print("| clients | path | req/s (median of rounds) | vs direct | p50 ms | p99 ms | p99 vs direct | p50 added ms | "
          "gateway CPU ms/call | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nmock upstream: {args.mock}; load (1-min avg) at start and after each client count: "
          f"{', '.join(f'{x:.2f}' for x in load)}; {os.cpu_count()} cores")
    print(json.dumps({"results": summary, "load": load}))


if __name__ == "__main__":
    main()
