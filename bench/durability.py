"""What durable acknowledgements cost on PostgreSQL: the store's writes of a prediction's life
(create, claim, a few log writes, the outcome), timed with the server's commit settings (creates,
claims and outcomes flushed to disk before they return; logs not) against every write unflushed
(``synchronous_commit`` off, which loses the last commits in a crash of the database), in the same
run, on the same database: one client at a time and several at once.

    python bench/durability.py --database postgresql://user:pass@host/db [--predictions 400] [--clients 8]

It writes into that database (in tables of its own making) and leaves the rows there: use a
scratch database.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.protocol import Status  # noqa: E402
from server.store import open_store  # noqa: E402

LOG_WRITES = 4  # a short prediction's log flushes


def one_life(store, timings: list[float]) -> None:
    """A prediction from its create to its outcome, as the server writes it; the create's time kept."""
    pid = secrets.token_hex(13)
    started = time.perf_counter()
    store.insert_prediction(id=pid, version="hidden", input={"prompt": "bench"}, created_at=store.now(),
                            output_token="t")
    timings.append(time.perf_counter() - started)
    run = store.claim_next(f"bench/{pid}", 30.0)
    if run is None:  # another client took it first: its outcome is that client's to write
        return
    for n in range(LOG_WRITES):
        store.update_prediction(run.id, held_by=run.lease, durable=False, logs=f"step {n}\n")
    store.end_run(run.id, Status.SUCCEEDED, held_by=run.lease, webhook_lease=None, webhook_hold_s=0,
                  completed_at=store.now(), output=["out-0.webp"], predict_time=0.1)


def measure(url: str, durable: bool, predictions: int, clients: int) -> tuple[float, float, float]:
    """(predictions a second, create p50 ms, create p99 ms) with ``clients`` threads."""
    store = open_store(url, pool_size=max(2, clients + 1))
    if not durable:  # every connection of the pool, for this run only
        store.pool.close()
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        store.pool = ConnectionPool(url, min_size=1, max_size=max(2, clients + 1), open=True,
                                    kwargs={"autocommit": True, "row_factory": dict_row,
                                            "options": "-c synchronous_commit=off"})
    timings: list[float] = []
    per_client = predictions // clients

    def client():
        for _ in range(per_client):
            one_life(store, timings)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    store.close()
    ordered = sorted(timings)
    return (per_client * clients / elapsed, statistics.median(ordered) * 1000,
            ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", required=True, help="a scratch postgresql:// database")
    parser.add_argument("--predictions", type=int, default=400)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    print(f"{'commits':<34} {'clients':>7} {'predictions/s':>14} {'create p50 ms':>14} {'create p99 ms':>14}")
    results = {}
    for clients in (1, args.clients):
        for durable in (True, False):
            label = "durable (the server's)" if durable else "all unflushed (synchronous_commit off)"
            rate, p50, p99 = measure(args.database, durable, args.predictions, clients)
            results[(clients, durable)] = (rate, p50)
            print(f"{label:<34} {clients:>7} {rate:>14.0f} {p50:>14.2f} {p99:>14.2f}")
    for clients in (1, args.clients):
        (rate_on, p50_on), (rate_off, p50_off) = results[(clients, True)], results[(clients, False)]
        print(f"ratio {clients} client(s): durable commits give {rate_on / rate_off:.2f}x the predictions a second "
              f"and {p50_on / p50_off:.2f}x the create latency of unflushed ones")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
