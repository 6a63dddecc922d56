"""The per-tick host work of batching: the shared renderer's bookkeeping and the runtime's input path.

`SharedRenderer._gather` holds a batch open until every recently active session has asked. It used to
rebuild the set of active sessions and compare it with the pending ones on every wake-up (each
session's request wakes it): N wake-ups × N sessions per batch. Now the sessions to wait for are listed
once per batch and each drops out as it asks. This times both bookkeeping schemes for one batch of N
sessions asking one after another (Python only, no waiting; the renderer's lock is held throughout,
so this is time every session's request waits behind).

Second table: a graphed tick's input stage (`pcavs.runtime._Inputs`) against the number of rows, on this
machine's CPU with the 224² generator's bank shapes. Before: five uploads into separate static tensors,
then the identity gathers (29 `index_select`, one per bank tensor) outside the graph. Now: the rows
packed into one pinned byte buffer and one copy; the gathers are inside the captured generator graph,
so they are device work, not host work, and are not in the "now" column. On the CPU a gather is the
copy itself (a GPU launches it in microseconds), so the "before" column is the CPU's full cost of it;
the device check's generator stage prints the GPU's host ms per tick (`host_ms`).

    python bench/gather.py [--sessions 8 64 256] [--rows 1 8 32 128 256] [--runs 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stage import print_table  # noqa: E402


class Handle:
    def __init__(self, t: float) -> None:
        self.last_submit = t


def rebuild_each_wake(handles: set, now: float, recent_s: float) -> None:
    """The former scheme: on each of the N wake-ups, rebuild the active set and compare."""
    pending: dict = {}
    for h in handles:
        pending[h] = True
        active = {x for x in handles if x.last_submit is not None and now - x.last_submit < recent_s}
        if active <= pending.keys():
            break


def list_once(handles: set, now: float, recent_s: float) -> None:
    """The current scheme: list the awaited sessions once, each discards itself as it asks."""
    awaited = {x for x in handles if x.last_submit is not None and now - x.last_submit < recent_s}
    for h in handles:
        awaited.discard(h)
        if not awaited:
            break


def tick_inputs(rows_list: list[int], runs: int) -> list[dict]:
    """Median ms of a tick's input stage, before (uploads + gathers outside the graph) and now."""
    import numpy as np
    import torch

    from pcavs.networks.generator import ModulatedGenerator
    from pcavs.runtime import IdentityBank, RowBatch, _Inputs

    torch.set_num_threads(1)  # the 2-core box is shared: no OpenMP spinning in the timings
    gen = ModulatedGenerator(size=224)
    bank = IdentityBank(gen, torch.device("cpu"), torch.float32)
    bank.reserve(max(rows_list))
    rng = np.random.default_rng(0)
    out = []
    for n in rows_list:
        rows = RowBatch(rng.integers(0, max(rows_list), n).astype(np.int64),
                        rng.uniform(0, 1, (n, 1, 80, 20)).astype(np.float32),
                        rng.normal(0, 1, (n, 12)).astype(np.float32), np.ones(n, np.float32), np.zeros(n, bool))
        static = {"slots": torch.zeros(n, dtype=torch.int64), "mels": torch.zeros(n, 1, 80, 20),
                  "poses": torch.zeros(n, 12), "mouth": torch.zeros(n, 1),
                  "terms": [torch.zeros(n, t.shape[1]) for t in bank.terms],
                  "start": torch.zeros(n, *bank.starts.shape[1:]),
                  "noise": [torch.zeros(n, *x.shape[1:]) for x in bank.noise]}

        def before() -> None:
            static["slots"].copy_(torch.from_numpy(rows.slots))
            static["mels"].copy_(torch.from_numpy(rows.mels))
            static["poses"].copy_(torch.from_numpy(rows.poses))
            static["mouth"].copy_(torch.from_numpy(rows.mouth_weights.reshape(-1, 1)))
            for src, dst in zip(bank.terms, static["terms"]):
                torch.index_select(src, 0, static["slots"], out=dst)
            torch.index_select(bank.starts, 0, static["slots"], out=static["start"])
            for src, dst in zip(bank.noise, static["noise"]):
                torch.index_select(src, 0, static["slots"], out=dst)

        inputs = _Inputs(n, torch.device("cpu"))

        def now() -> None:
            inputs.pack(rows)
            inputs.upload()

        row: dict = {"rows": n}
        for name, fn in (("before_ms", before), ("now_ms", now)):
            with torch.inference_mode():
                fn()
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            row[name] = round(statistics.median(times), 3)
        row["packed_kb"] = round(inputs.nbytes / 1024, 1)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 32, 128, 256],
                    help="rows per tick for the input-stage table (none: skip it)")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for n in args.sessions:
        now = time.monotonic()
        handles = {Handle(now) for _ in range(n)}
        out = {"sessions": n}
        for name, fn in (("rebuild_each_wake_ms", rebuild_each_wake), ("list_once_ms", list_once)):
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                fn(handles, now, 0.5)
                times.append((time.perf_counter() - t0) * 1e3)
            out[name] = round(statistics.median(times), 3)
        rows.append(out)
    print_table("gather bookkeeping per batch (median)", rows, ["sessions", "rebuild_each_wake_ms", "list_once_ms"])
    if args.rows:
        print_table("graphed tick input stage, host ms (CPU, 224² bank shapes, median)",
                    tick_inputs(args.rows, args.runs),
                    ["rows", "before_ms", "now_ms", "packed_kb"])


if __name__ == "__main__":
    main()
