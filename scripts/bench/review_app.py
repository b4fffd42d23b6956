"""Page latency of the review app with 20 simulated reviewers on loopback (SQLite and PostgreSQL).

    python scripts/bench/review_app.py                       # SQLite file + a throwaway PostgreSQL cluster
    python scripts/bench/review_app.py --reviewers 20 --items 10 --backends sqlite

Each simulated reviewer is an async HTTP client (httpx) with its own signed-in session: it opens the login
page, signs in, then repeats "next item -> item page -> submit scores" until it has reviewed `--items` items
or nothing is left; every request has a timeout and the loop is bounded. The server is the real app under
`wenmai review serve` (uvicorn, one worker) on 127.0.0.1 in its own process; the clients share the machine's two
cores with it. Prints p50/p95/max per page kind and checks that
the store holds every review the clients saw accepted (no score lost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serve_speed import running_app  # noqa: F401 - the tests start the app in-process with it

ROOT = Path(__file__).resolve().parents[2]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ITEM_URL = re.compile(r"/s/([^/]+)/item/(\d+)$")
PASSWORD = "bench-password-123"


@contextmanager
def served_elsewhere(db: str, host: str = "127.0.0.1") -> Iterator[str]:
    """`wenmai review serve` in its own process (as in production: the clients do not share its interpreter)."""
    import subprocess

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    code = f"from finetune.review_app import serve; serve({db!r}, {host!r}, {port})"
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection((host, port), timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the review app did not start: {server.stderr.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.1)
        yield f"http://{host}:{port}"
    finally:
        server.terminate()
        server.wait(30)


def populate(db: str, reviewers: int, items: int, k: int) -> tuple[str, list[str]]:
    """A session of A/B items (K reviewers each) and reviewer accounts; returns (session, pseudonyms)."""
    from finetune.review.accounts import add_user
    from finetune.review.schema import Dimension, NewAnswer, NewItem, SessionSettings
    from finetune.review.store import ReviewStore

    store = ReviewStore.open(db)
    name = "bench"
    store.create_session(
        SessionSettings(
            name=name,
            institution="Bench Museum",
            dimensions=[Dimension(name="accuracy", description="Facts"), Dimension(name="safety")],
            reviewers_per_item=k,
        ),
        [
            NewItem(
                prompt=f"问题 {i}：这件青铜器是什么年代的？",
                answers=[NewAnswer(text=f"回答 {i} A", model="a"), NewAnswer(text=f"回答 {i} B", model="b")],
            )
            for i in range(items)
        ],
    )
    names = [f"reviewer-{i:02d}" for i in range(reviewers)]
    for who in names:
        add_user(store, who, PASSWORD)
    store.close()
    return name, names


async def simulate(base: str, session: str, names: list[str], per_reviewer: int, timeout: float = 30.0) -> dict:
    """Every reviewer signs in and reviews up to `per_reviewer` items at once; returns latencies and counts."""
    import httpx

    latencies: dict[str, list[float]] = {"login": [], "next": [], "item": [], "submit": []}
    accepted: list[tuple[str, int]] = []
    errors: list[str] = []

    async def timed(kind: str, request) -> httpx.Response:
        started = time.perf_counter()
        response = await request
        latencies[kind].append((time.perf_counter() - started) * 1000)
        return response

    async def reviewer(name: str) -> None:
        async with httpx.AsyncClient(base_url=base, timeout=timeout, follow_redirects=False) as client:
            page = await client.get("/login")
            token = CSRF.search(page.text).group(1)
            signed = await timed(
                "login", client.post("/login", data={"pseudonym": name, "password": PASSWORD, "csrf": token})
            )
            if signed.status_code != 303:
                errors.append(f"{name}: sign-in answered {signed.status_code}")
                return
            for _ in range(per_reviewer):
                step = await timed("next", client.get(f"/s/{session}/next"))
                location = step.headers.get("location", "")
                found = ITEM_URL.search(location)
                if step.status_code != 303 or found is None:
                    return  # nothing left for this reviewer
                item_id = int(found.group(2))
                page = await timed("item", client.get(location))
                token = CSRF.search(page.text).group(1)
                form = {
                    "csrf": token,
                    "score.A.accuracy": "4",
                    "score.A.safety": "5",
                    "score.B.accuracy": "2",
                    "score.B.safety": "3",
                    "choice": "A",
                    "comment": f"{name} on {item_id}",
                }
                sent = await timed("submit", client.post(location, data=form))
                if sent.status_code == 303:
                    accepted.append((name, item_id))
                else:
                    errors.append(f"{name}: submit of item {item_id} answered {sent.status_code}")

    started = time.perf_counter()
    await asyncio.gather(*(reviewer(name) for name in names))
    return {"seconds": time.perf_counter() - started, "latencies": latencies, "accepted": accepted, "errors": errors}


def summary(latencies: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for kind, values in latencies.items():
        if values:
            ordered = sorted(values)
            out[kind] = {
                "n": len(values),
                "p50": round(statistics.median(ordered), 1),
                "p95": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 1),
                "max": round(ordered[-1], 1),
            }
    return out


def bench(db: str, label: str, reviewers: int, items: int, per_reviewer: int, k: int) -> dict:
    from finetune.review.store import ReviewStore

    session, names = populate(db, reviewers, items, k)
    with served_elsewhere(db) as base:
        result = asyncio.run(simulate(base, session, names, per_reviewer))
    store = ReviewStore.open(db)
    stored = {(r.reviewer, r.item_id) for r in store.latest_reviews(session)}
    store.close()
    lost = sorted(set(result["accepted"]) - stored)
    return {
        "backend": label,
        "reviewers": reviewers,
        "accepted": len(result["accepted"]),
        "stored": len(stored),
        "lost": len(lost),
        "errors": result["errors"][:10],
        "seconds": round(result["seconds"], 2),
        "pages": summary(result["latencies"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviewers", type=int, default=20)
    parser.add_argument("--items", type=int, default=40, help="Items in the session.")
    parser.add_argument("--per-reviewer", type=int, default=5, help="Items each reviewer reviews at most.")
    parser.add_argument("--k", type=int, default=3, help="Reviewers per item.")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/review_app.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if "sqlite" in args.backends:
            db = str(Path(tmp) / "bench.db")
            results.append(bench(db, "sqlite", args.reviewers, args.items, args.per_reviewer, args.k))
        if "postgres" in args.backends:
            from postgres import throwaway_postgres

            with throwaway_postgres(Path(tmp)) as url:
                results.append(bench(url, "postgres", args.reviewers, args.items, args.per_reviewer, args.k))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
    print("| backend | page | requests | p50 ms | p95 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for result in results:
        for kind, stats in result["pages"].items():
            print(f"| {result['backend']} | {kind} | {stats['n']} | {stats['p50']} | {stats['p95']} | {stats['max']} |")
    for result in results:
        print(f"{result['backend']}: {result['accepted']} reviews accepted, {result['stored']} stored, "
              f"{result['lost']} lost, {len(result['errors'])} errors, {result['seconds']} s")  # fmt: skip
    if any(r["lost"] or r["errors"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
