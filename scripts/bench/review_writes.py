"""Reviews stored per second by concurrent reviewers, on SQLite (a temporary file) and on PostgreSQL.

    python scripts/bench/review_writes.py                    # SQLite + a throwaway PostgreSQL cluster (tests/postgres.py)
    python scripts/bench/review_writes.py --pg-url postgresql+psycopg://user:password@host:5432/db   # an existing server
    python scripts/bench/review_writes.py --backends sqlite --reviews 200

Each of `--threads` writer threads (20) opens its own `ReviewStore` (as separate reviewers' processes would), is
its own reviewer, and submits `--reviews` (50) reviews through `ReviewStore.submit_review`, each to a different
two-answer item: two dimensions scored on both answers, a choice and a comment, i.e. one checked transaction
writing a review row and four score rows. The threads are released together; the rate is all reviews over the
time from release to the last commit. Afterwards the stored count is checked against what was written. With
`--pg-url` the run adds a session and reviewers named `bench-<random>` to that database and leaves them there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import sqlalchemy

from finetune.review.schema import Dimension, NewAnswer, NewItem, ReviewInput, SessionSettings
from finetune.review.store import ReviewStore

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from postgres import throwaway_postgres  # noqa: E402

JOIN_TIMEOUT = 600  # seconds for all writers together


def bench(db: str, threads: int, reviews: int) -> dict:
    """Write `threads` x `reviews` reviews at once into the store at `db`; the rate, latencies and a count check."""
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    setup = ReviewStore.open(db)
    setup.create_session(
        SessionSettings(name=tag, dimensions=[Dimension(name="accuracy"), Dimension(name="fluency")], consent=True)
    )
    answers = [NewAnswer(text="A ding is a cauldron.", model="sft"), NewAnswer(text="A ding is a bell.", model="dpo")]
    items = setup.add_items(tag, [NewItem(prompt=f"What is bronze no. {i}?", answers=answers) for i in range(reviews)])
    for n in range(threads):
        setup.add_reviewer(f"{tag}-w{n}")
    barrier = threading.Barrier(threads + 1, timeout=120)
    latencies: list[float] = []
    errors: list[str] = []
    done = threading.Lock()

    def write(n: int) -> None:
        mine: list[float] = []
        try:
            own = ReviewStore.open(db)
        except Exception as err:
            errors.append(f"writer {n}: {type(err).__name__}: {err}")
            barrier.abort()  # the others stop waiting for this one
            return
        try:
            barrier.wait()
            for k, item in enumerate(items):
                review = ReviewInput(
                    scores={"A": {"accuracy": 1 + (n + k) % 5, "fluency": 4}, "B": {"accuracy": 2, "fluency": 3}},
                    choice="A",
                    comment=f"writer {n}, review {k}",
                )
                start = time.perf_counter()
                own.submit_review(item.id, f"{tag}-w{n}", review)
                mine.append(time.perf_counter() - start)
        except Exception as err:  # counted and reported; the other writers go on
            errors.append(f"writer {n}: {type(err).__name__}: {err}")
        finally:
            own.close()
            with done:
                latencies.extend(mine)

    workers = [threading.Thread(target=write, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a writer that could not open says why in `errors`
        barrier.wait()
    start = time.perf_counter()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    seconds = time.perf_counter() - start
    if any(worker.is_alive() for worker in workers):
        errors.append(f"writers still running after {JOIN_TIMEOUT} s")
    stored = setup.count_reviews(tag)
    setup.close()
    latencies.sort()
    return {
        "threads": threads,
        "reviews_per_thread": reviews,
        "reviews": stored,
        "expected": threads * reviews,
        "seconds": round(seconds, 3),
        "reviews_per_s": round(stored / seconds, 1),
        "latency_ms": {
            "p50": round(1000 * statistics.median(latencies), 1) if latencies else None,
            "p95": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
            "max": round(1000 * latencies[-1], 1) if latencies else None,
        },
        "errors": errors[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=20, help="concurrent writers, one reviewer each")
    parser.add_argument("--reviews", type=int, default=50, help="reviews each writer submits")
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--pg-url", default=None, help="an existing PostgreSQL server instead of a throwaway cluster")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "review_writes.json")
    args = parser.parse_args()
    results = []
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wenmai-bench-review-")))
        for backend in args.backends.split(","):
            if backend == "sqlite":
                db = str(folder / "review.db")
            elif backend == "postgres":
                db = args.pg_url or stack.enter_context(throwaway_postgres())
            else:
                parser.error(f"--backends: unknown backend {backend!r}; choose sqlite, postgres")
            measured = bench(db, args.threads, args.reviews)
            result = {"backend": backend, "database": _describe(backend, db, args.pg_url is not None)} | measured
            results.append(result)
            print(json.dumps(result), flush=True)
    print()
    print("| backend | database | threads x reviews | stored | seconds | reviews/s | p50 ms | p95 ms | max ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        ms = r["latency_ms"]
        print(
            f"| {r['backend']} | {r['database']} | {r['threads']} x {r['reviews_per_thread']} | {r['reviews']} | "
            f"{r['seconds']} | {r['reviews_per_s']:,.0f} | {ms['p50']} | {ms['p95']} | {ms['max']} |"
        )
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "sqlalchemy": sqlalchemy.__version__},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(args.out)
    print(f"\nwrote {args.out}")
    if any(r["errors"] or r["reviews"] != r["expected"] for r in results):
        sys.exit("some reviews were not stored; see `errors` above")


def _describe(backend: str, db: str, given: bool) -> str:
    if backend == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}, WAL, a temporary file"
    engine = sqlalchemy.create_engine(db)
    try:
        with engine.connect() as connection:
            version = connection.exec_driver_sql("SHOW server_version").scalar().split()[0]
    finally:
        engine.dispose()
    return f"PostgreSQL {version}, " + ("--pg-url" if given else "throwaway cluster, fsync off")


if __name__ == "__main__":
    main()
