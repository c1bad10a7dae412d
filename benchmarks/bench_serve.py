"""Latency of `gmner serve` under a bounded local load: a server on 127.0.0.1 started here, N requests, C at a time.

Run: python benchmarks/bench_serve.py MODEL [--requests 200] [--concurrency 8] [--images DIR] [--cache DIR].
Each request is a JSON /predict of a sample-like tweet with an image (base64) taken in turn from ``--images``
(default: the sample's images, data/sample/images); prints p50 / p95 / max latency, requests/s and the error
count (any status but 200, or a connection failure). The server is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

TEXTS = ["hiking near Quebec today", "great interview with Bennett on the show", "RT @ nba : Jordan visits Phoenix",
         "the PlayStation trailer looks amazing # breaking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no healthy server at {url} after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=Path, default=Path("data/sample/images"))
    parser.add_argument("--cache", type=Path, default=None, help="vision cache (default: a fresh temporary one)")
    args = parser.parse_args()

    images = [base64.b64encode(p.read_bytes()).decode() for p in sorted(args.images.glob("*"))[:50]]
    if not images:
        raise SystemExit(f"no images in {args.images}")
    bodies = [{"text": TEXTS[i % len(TEXTS)], "image": images[i % len(images)]} for i in range(args.requests)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        cache = args.cache or Path(scratch) / "cache"
        server = subprocess.Popen([sys.executable, "-m", "gmner.cli", "serve", args.model, "--port", str(port),
                                   "--cache", str(cache)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_healthy(url, server)
            with httpx.Client(base_url=url, timeout=120,
                              limits=httpx.Limits(max_connections=args.concurrency)) as client:

                def one(body: dict) -> tuple[float, bool]:
                    start = time.perf_counter()
                    try:
                        ok = client.post("/predict", json=body).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    return time.perf_counter() - start, ok

                start = time.perf_counter()
                with ThreadPoolExecutor(args.concurrency) as pool:
                    results = list(pool.map(one, bodies))
                wall = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(timeout=30)
    latencies = sorted(t for t, _ in results)
    errors = sum(not ok for _, ok in results)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    print(f"{args.requests} requests, {args.concurrency} concurrent, {len(images)} distinct images: "
          f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
          f"max {latencies[-1] * 1000:.0f} ms, {args.requests / wall:.1f} requests/s, {errors} errors")


if __name__ == "__main__":
    main()
