"""Load test of `medtune serve` on loopback: N concurrent clients, a bounded number of requests.

    .venv/bin/python benchmarks/load_test.py --tiny                 # random embedded-size model
    .venv/bin/python benchmarks/load_test.py runs/demo/merged --clients 32 --requests 400
    .venv/bin/python benchmarks/load_test.py --tiny --max-batch-size 1   # micro-batching off

The server runs in this process (uvicorn in a thread, 127.0.0.1 on a free port, never another
host); clients are asyncio tasks over httpx, so client and server share the interpreter and
its cores, which the figures include. Notes are synthetic (``medtune.synth``). Prints p50 / p90 /
p99 latency, throughput, the number of model batches, and error counts by status.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path


def build_tiny_model(directory: Path, notes: list[str], labels: list[str]) -> Path:
    """An embedded-size base (4 layers, hidden 256) with random weights, as a merged model."""
    from medtune.base import BaseSpec, build_base
    from medtune.fsutil import write_json
    from medtune.tasks import Template

    model = build_base(notes, directory / "model", BaseSpec(steps=0), extra_vocab_texts=labels,
                       progress=False)
    write_json(model / "medtune.json", {"kind": "merged", "task": "protocol"})
    write_json(model / "labels.json", {"task": "protocol", "labels": labels})
    Template(task="protocol", kind="plain", labels=labels).save(model)
    return model


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def drive(url: str, notes: list[str], *, clients: int, requests: int, per_request: int,
                max_seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    issued = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            i = issued
            issued += 1
            batch = [notes[(i * per_request + k) % len(notes)] for k in range(per_request)]
            body = {"note": batch[0]} if per_request == 1 else {"notes": batch}
            start = time.perf_counter()
            try:
                response = await http.post("/v1/predict", json=body)
                statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - start) * 1000)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - start
    ok = len(latencies)
    return {
        "requests": sum(statuses.values()), "ok": ok, "seconds": round(seconds, 2),
        "errors": {k: v for k, v in statuses.items() if k != "200"},
        "requests_per_s": round(ok / seconds, 1),
        "notes_per_s": round(ok * per_request / seconds, 1),
        "latency_ms": {"p50": round(percentile(latencies, 50), 1) if ok else None,
                       "p90": round(percentile(latencies, 90), 1) if ok else None,
                       "p99": round(percentile(latencies, 99), 1) if ok else None,
                       "mean": round(statistics.fmean(latencies), 1) if ok else None}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model directory or models:/NAME@alias")
    parser.add_argument("--tiny", action="store_true",
                        help="build a random embedded-size model in a temp dir and use it")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=400, help="total requests (bounded)")
    parser.add_argument("--max-seconds", type=float, default=120, help="stop issuing after this")
    parser.add_argument("--notes-per-request", type=int, default=1)
    parser.add_argument("--batch-window-ms", type=float, default=5)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-concurrency", type=int, default=0,
                        help="server's in-flight limit (0: = clients, so no 429 by design)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if bool(args.model) == args.tiny:
        parser.error("give a model directory or --tiny (not both)")

    from medtune.serve import create_app, serving_in_thread
    from medtune.synth import PROTOCOLS, synth_protocol

    notes = list(synth_protocol(500, seed=7)["text"])
    with tempfile.TemporaryDirectory(prefix="medtune-load-") as tmp:
        model = str(build_tiny_model(Path(tmp), notes, PROTOCOLS)) if args.tiny else args.model
        app = create_app(model, max_batch=max(64, args.notes_per_request),
                         max_concurrency=args.max_concurrency or args.clients,
                         batch_window_ms=args.batch_window_ms,
                         max_batch_size=args.max_batch_size)
        with serving_in_thread(app, ready_timeout=300) as url:
            asyncio.run(drive(url, notes, clients=args.clients, requests=args.clients,
                              per_request=args.notes_per_request, max_seconds=60))  # warm-up
            batches_before = app.state.medtune["batcher"].batches
            result = asyncio.run(drive(url, notes, clients=args.clients,
                                       requests=args.requests,
                                       per_request=args.notes_per_request,
                                       max_seconds=args.max_seconds))
            batches = app.state.medtune["batcher"].batches - batches_before
    result.update({"model": "tiny (random, embedded size)" if args.tiny else args.model,
                   "clients": args.clients, "notes_per_request": args.notes_per_request,
                   "batch_window_ms": args.batch_window_ms,
                   "max_batch_size": args.max_batch_size, "model_batches": batches,
                   "mean_notes_per_batch": round(result["ok"] * args.notes_per_request
                                                 / max(1, batches), 1)})
    lat = result["latency_ms"]
    print(f"{result['ok']}/{result['requests']} ok in {result['seconds']} s, "
          f"{args.clients} clients: {result['requests_per_s']} req/s, "
          f"{result['notes_per_s']} notes/s")
    print(f"latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
          f"mean {lat['mean']}")
    print(f"model batches: {batches} (mean {result['mean_notes_per_batch']} notes/batch); "
          f"errors: {result['errors'] or 'none'}")
    if args.json:
        from medtune.fsutil import write_json

        write_json(args.json, result)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
