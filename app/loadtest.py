"""A load test anyone can run against a running RoE Explorer (loopback only).

    python app.py --rate-limit 0 &                       # the app, with the per-user limit off
    python -m app.loadtest --clients 8 --duration 60     # 8 users asking at once, against one by one
    python -m app.loadtest --clients 1,4,8,16 --duration 60 --out loadtest.json
    python -m app.loadtest --probe-during speed --duration 60   # a question during someone's speed measurement
    python -m app.loadtest --probe-during atlas --duration 60   # ... during someone's route atlas
    python -m app.loadtest --over-long 20000                    # how fast an over-long question is refused

Each client is a gradio_client session that asks /answer questions about generated scenes back to back,
each request a different (scene, question) from one fixed pool. First the same pool is answered one by
one by a single client (the baseline); then N clients ask at once for --duration seconds. Reported per
run: latency p50 / p95 / max, answers per second, errors, the throughput against one by one, and a
check that every answer under load equals the answer the same request got alone (text and route).

--probe-during speed|atlas: one client asks a question and measures its speed against every layer (or
builds the route atlas of 48 questions), over and over (background work), while a probe client asks plain
questions; the probe's latency is reported against its latency on an idle app.

On an app decoding through the engine (`python app.py --engine eager`, or "graphs"/"auto" on a GPU) each
run also reports the engine's arenas built and graphs captured per 100 requests, and whether arenas were
built only for the first request of each shape bucket (`arenas_built == shape_buckets`): a server's
steady state reuses its arenas.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")
os.environ.setdefault("no_proxy", "localhost,127.0.0.1")


@dataclass
class Outcome:
    request: int                 # index into the pool
    seconds: float
    answer: str | None = None
    route: list | None = None
    error: str | None = None


@dataclass
class Run:
    clients: int
    duration_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is None]

    def summary(self) -> dict:
        lat = sorted(o.seconds for o in self.ok)
        return {"clients": self.clients, "requests": len(self.outcomes), "answers": len(self.ok),
                "errors": len(self.outcomes) - len(self.ok),
                "answers_per_s": len(self.ok) / self.duration_s if self.duration_s > 0 else 0.0,
                "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
                "latency_max_s": lat[-1] if lat else None,
                "error_examples": sorted({o.error for o in self.outcomes if o.error})[:3]}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    cuts = statistics.quantiles(sorted_values, n=100, method="inclusive")   # the 1st..99th percentiles
    return cuts[int(q) - 1] if 1 <= q <= 99 else sorted_values[0 if q < 1 else -1]


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"error: the load test only runs against this machine (127.0.0.1 / localhost), not {host!r}")


def make_pool(n: int, folder: Path, first_seed: int = 30_000_000) -> list[tuple[str, str]]:
    """n (image file, question) pairs from generated scenes outside the training seeds."""
    from app.examples import scene_sample

    pool = []
    for k in range(n):
        seed, image, qa = scene_sample(first_seed + k)
        path = folder / f"scene-{seed}.png"
        image.save(path)
        pool.append((str(path), qa.question))
    return pool


def ask(client, item: tuple[str, str], system: str) -> tuple[str | None, list | None, str | None]:
    return ask_json(client, item, system)[:3]


def ask_json(client, item: tuple[str, str], system: str) -> tuple[str | None, list | None, str | None, dict]:
    """(answer, route, error, the engine's counts) of one /answer call."""
    from gradio_client import handle_file

    out = json.loads(client.predict(handle_file(item[0]), item[1], "[]", "auto", None, system, api_name="/answer"))
    if "error" in out:
        return None, None, out["error"], {}
    return out["answer"], out["trace"].get("route"), None, out.get("engine") or {}


ENGINE_COUNTS = ("arenas_built", "graphs_captured", "generations", "examples")


def engine_counts(url: str, item: tuple[str, str], system: str) -> dict:
    """The engine's counts now, read from one /answer of a request whose shape is already warm."""
    from gradio_client import Client

    c = Client(url, verbose=False)
    try:
        return ask_json(c, item, system)[3]
    finally:
        c.close()


def engine_summary(before: dict, after: dict, requests: int) -> dict:
    """Arenas built and graphs captured per 100 requests over a run (the counts' difference; the read
    after the run is one more request, of a warm shape)."""
    if not after:
        return {}
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ENGINE_COUNTS}
    n = max(1, requests)
    return {**d, "arenas_built_per_100": 100.0 * d["arenas_built"] / n,
            "graphs_captured_per_100": 100.0 * d["graphs_captured"] / n,
            "arenas_built_total": after.get("arenas_built", 0), "shape_buckets": after.get("shape_buckets", 0),
            "one_arena_per_bucket": after.get("arenas_built", 0) == after.get("shape_buckets", 0)}


def client_loop(client, pool, start: int, go: threading.Barrier, stop_at: list, outcomes: list,
                lock: threading.Lock, system: str) -> None:
    k = start
    go.wait()                                  # every client connected: start together
    while time.perf_counter() < stop_at[0]:
        idx = k % len(pool)
        t0 = time.perf_counter()
        try:
            answer, route, error = ask(client, pool[idx], system)
        except Exception as e:  # noqa: BLE001  (a failed call is an error of the run, not of the test)
            answer, route, error = None, None, f"{type(e).__name__}: {e}"
        with lock:
            outcomes.append(Outcome(idx, time.perf_counter() - t0, answer, route, error))
        k += 1


def connect(url: str, n: int) -> list:
    """n gradio_client sessions, connected in parallel (connecting is not part of what is measured)."""
    from gradio_client import Client

    clients = [None] * n

    def one(c):
        clients[c] = Client(url, verbose=False)
    threads = [threading.Thread(target=one, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients


def run_clients(url: str, pool, clients: int, duration: float, system: str = "roe") -> Run:
    """`clients` sessions asking back to back for `duration` s (each client's first request starts
    together with the others'); client c starts at pool item c * len(pool) / clients. Answers still
    running at the end are waited for and counted, over the time they took."""
    sessions = connect(url, clients)
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    go = threading.Barrier(clients + 1)
    stop_at = [float("inf")]
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(sessions[c], pool, c * len(pool) // clients, go, stop_at, outcomes, lock,
                                      system)) for c in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    go.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for s in sessions:
        s.close()
    return Run(clients, elapsed, outcomes)


def lone_answers(url: str, pool, indices, system: str, known: dict) -> dict:
    """The answer (text, route) of each pool item asked alone, one at a time (cached in `known`)."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    for idx in sorted(set(indices) - set(known)):
        answer, route, error = ask(client, pool[idx], system)
        known[idx] = (answer, route, error)
    return known


def mismatches(run: Run, lone: dict) -> list[dict]:
    bad = []
    for o in run.ok:
        answer, route, _ = lone[o.request]
        if (o.answer, o.route) != (answer, route):
            bad.append({"request": o.request, "under_load": o.answer, "alone": answer})
    return bad


def load_test(url: str, clients: list[int], duration: float, pool_size: int = 32, system: str = "roe",
              verbose: bool = True) -> dict:
    check_loopback(url)
    say = print if verbose else (lambda *a, **k: None)
    with tempfile.TemporaryDirectory(prefix="roe_loadtest_") as tmp:
        pool = make_pool(pool_size, Path(tmp))
        say(f"one by one: 1 client, {duration:.0f} s ...")
        base = run_clients(url, pool, 1, duration, system)
        lone = {o.request: (o.answer, o.route, o.error) for o in base.outcomes}
        base_rate = base.summary()["answers_per_s"]
        results = {"url": url, "system": system, "duration_s": duration, "pool": pool_size,
                   "one_by_one": base.summary(), "runs": []}
        say(json.dumps(base.summary()))
        for n in clients:
            say(f"{n} client(s) at once, {duration:.0f} s ...")
            before = engine_counts(url, pool[0], system)
            run = run_clients(url, pool, n, duration, system)
            after = engine_counts(url, pool[0], system)
            lone_answers(url, pool, [o.request for o in run.ok], system, lone)
            s = run.summary()
            s["engine"] = engine_summary(before, after, len(run.outcomes))
            s["throughput_vs_one_by_one"] = s["answers_per_s"] / base_rate if base_rate else None
            bad = mismatches(run, lone)
            s["differ_from_alone"] = len(bad)
            s["differ_examples"] = bad[:3]
            results["runs"].append(s)
            say(json.dumps(s))
    return results


def probe_during(url: str, duration: float, what: str = "speed", system: str = "roe", verbose: bool = True) -> dict:
    """A probe's plain-question latency on an idle app, then while another session runs background work
    over and over: what="speed" (/ask, then /speed: the turn timed against every layer) or "atlas" (/atlas
    on 48 scene questions)."""
    from gradio_client import Client, handle_file

    check_loopback(url)
    say = print if verbose else (lambda *a, **k: None)
    with tempfile.TemporaryDirectory(prefix="roe_loadtest_") as tmp:
        pool = make_pool(8, Path(tmp))
        idle = run_clients(url, pool, 1, duration / 2, system)
        stop = threading.Event()
        measured = []

        def measurer():
            c = Client(url, verbose=False)
            k = 0
            while not stop.is_set():
                t0 = time.perf_counter()
                if what == "atlas":
                    c.predict("scenes", 48, None, api_name="/atlas")
                else:
                    image, question = pool[(k + 4) % len(pool)]
                    c.predict(handle_file(image), question, api_name="/ask")
                    t0 = time.perf_counter()
                    c.predict(True, api_name="/speed")
                measured.append(time.perf_counter() - t0)
                k += 1
        bg = threading.Thread(target=measurer, daemon=True)
        bg.start()
        time.sleep(2.0)
        busy = run_clients(url, pool, 1, duration / 2, system)
        stop.set()
        bg.join(120)
        lone = {o.request: (o.answer, o.route, o.error) for o in idle.outcomes}
        lone_answers(url, pool, [o.request for o in busy.ok], system, lone)
        bad = mismatches(busy, lone)
    i, b = idle.summary(), busy.summary()
    out = {"background": what, "idle": i, "during": b, "background_runs_finished": len(measured),
           "differ_from_alone": len(bad), "differ_examples": bad[:3],
           "p50_ratio": b["latency_p50_s"] / i["latency_p50_s"] if i["latency_p50_s"] else None,
           "p95_ratio_to_idle_p50": b["latency_p95_s"] / i["latency_p50_s"] if i["latency_p50_s"] else None,
           "max_ratio_to_idle_p50": b["latency_max_s"] / i["latency_p50_s"] if i["latency_p50_s"] else None}
    say(json.dumps(out))
    return out


def over_long(url: str, chars: int = 20_000, repeats: int = 5, verbose: bool = True) -> dict:
    """How fast a question of `chars` characters is refused (seconds at the client, per call), and the
    message; the app refuses it before any model work."""
    from gradio_client import Client, handle_file

    check_loopback(url)
    client = Client(url, verbose=False)
    with tempfile.TemporaryDirectory(prefix="roe_loadtest_") as tmp:
        image, _ = make_pool(1, Path(tmp))[0]
        question = ("how many " * (chars // 9 + 1))[:chars]
        seconds, message = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = json.loads(client.predict(handle_file(image), question, "[]", "auto", None, "roe",
                                            api_name="/answer"))
            seconds.append(time.perf_counter() - t0)
            message = out.get("error")
    client.close()
    result = {"chars": chars, "seconds": seconds, "max_s": max(seconds), "refused": message is not None,
              "message": message}
    if verbose:
        print(json.dumps(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:7860/", help="the running app (loopback only)")
    p.add_argument("--clients", default="8", help="number of simultaneous clients, or a list: 1,4,8,16")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per run (default 30)")
    p.add_argument("--pool", type=int, default=32, help="distinct (scene, question) requests (default 32)")
    p.add_argument("--system", default="roe", help="the system asked (default roe)")
    p.add_argument("--probe-during", choices=["speed", "atlas"], default=None,
                   help="instead: a plain question's latency during another user's speed measurements (or atlas runs)")
    p.add_argument("--over-long", type=int, default=None, metavar="CHARS",
                   help="instead: time how fast a question of CHARS characters is refused (5 calls)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.over_long:
        results = over_long(args.url, args.over_long)
    elif args.probe_during:
        results = probe_during(args.url, args.duration, args.probe_during, args.system)
    else:
        results = load_test(args.url, [int(x) for x in args.clients.split(",")], args.duration, args.pool,
                            args.system)
        print("\n| clients | answers/s | vs one by one | p50 s | p95 s | max s | errors | differ from alone | "
              "arenas built /100 req | graphs captured /100 req |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        b = results["one_by_one"]
        print(f"| 1 (one by one) | {b['answers_per_s']:.2f} | 1.00 | {b['latency_p50_s']:.2f} | "
              f"{b['latency_p95_s']:.2f} | {b['latency_max_s']:.2f} | {b['errors']} | - | - | - |")
        for r in results["runs"]:
            e = r.get("engine") or {}
            per = (lambda k: f"{e[k]:.1f}" if k in e else "- (eager loop)")
            print(f"| {r['clients']} | {r['answers_per_s']:.2f} | {r['throughput_vs_one_by_one']:.2f} | "
                  f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['latency_max_s']:.2f} | {r['errors']} | "
                  f"{r['differ_from_alone']} | {per('arenas_built_per_100')} | {per('graphs_captured_per_100')} |")
        e = results["runs"][-1].get("engine") if results["runs"] else None
        if e:
            print(f"\nengine: {e['arenas_built_total']} arenas built in all for {e['shape_buckets']} shape buckets"
                  f" ({'one per bucket: no churn' if e['one_arena_per_bucket'] else 'some rebuilt'})")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    failed = (results.get("runs", []) and any(r["errors"] or r["differ_from_alone"] for r in results["runs"])
              or results.get("differ_from_alone"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
