"""Benchmark: the attribution index's streamed top-k (``RepresentationStore.top_k``) from 10^4 to 10^6 rows.

Synthetic stores of ``n`` random rows ``[n, D]`` (float32 storage, ``--shard-size`` rows a shard; written
block by block, never the whole matrix in memory) are built once each in a temporary folder; then, for
each ``n``, a fresh child process loads the store and times ``store.top_k(queries [m, D], k)`` (best of 2
after one warm-up call, page cache warm) and reads its peak resident memory (``ru_maxrss``) after the
queries, and the increase over a baseline taken right after imports and loading. Prints per size the
seconds, rows/second and memory, then the ratios 10^6 rows / 10^4 rows of time (linear: ~100) and of
peak memory (target: within 1.5). For the largest size the child then times ``top_k`` again, in turn with
the same FLOPs as a bare in-memory matmul (``queries @ rows.T`` with ``rows [shard_size, D]``,
``n / shard_size`` times, no disk, no top-k), and prints the index's GFLOP/s (``2 m n D / seconds``) as a
fraction of the matmul's (target: >= 0.6). Children are started through a small intermediate python, as
Linux carries ``ru_maxrss`` over fork + exec. Times are wall times: other work on the machine skews them
(the load average is printed). 10^6 x 512 float32 rows take 2 GB on disk: ``--dir`` picks where the
temporary stores go; each store is deleted once measured.
Run: ``.venv/bin/python bench/index_scaling.py`` (``--quick`` for 10^4 and 10^5 rows, or ``--sizes 10000,100000``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from recording import add_json_option, write

from influence.index.store import RepresentationStore

HOP = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def peak_mib() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def best_of(*fns, repeats: int = 2) -> list[float]:
    """Seconds of the fastest of ``repeats`` calls of each of ``fns`` after one warm-up call, run in turn
    (so that other work on the machine slows them alike)."""
    for fn in fns:
        fn()
    times = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            began = time.perf_counter()
            fn()
            times[i] = min(times[i], time.perf_counter() - began)
    return times


def build(directory: Path, n: int, dim: int, shard_size: int) -> float:
    """Write a store of ``n`` random rows ``[n, dim]`` in blocks of ``shard_size`` rows; returns its seconds."""
    g = torch.Generator().manual_seed(n)
    blocks = (torch.randn(min(shard_size, n - start), dim, generator=g) for start in range(0, n, shard_size))
    began = time.perf_counter()
    store = RepresentationStore(directory)
    store.open({"n_rows": n, "shard_size": shard_size, "storage_dtype": "float32"})
    store.write(blocks)
    return time.perf_counter() - began


def child(args: argparse.Namespace) -> None:
    """Measure one store (in a fresh process) and print one JSON line of results."""
    torch.set_num_threads(os.cpu_count() or 1)
    store = RepresentationStore(args.child).load()
    n, dim, size = store.n_rows, store.dim, int(store.manifest["shard_size"])
    queries = torch.randn(args.queries, dim, generator=torch.Generator().manual_seed(1))  # [m, D]
    baseline = peak_mib()
    (seconds,) = best_of(lambda: store.top_k(queries, args.k))
    out = {"n": n, "seconds": seconds, "peak": peak_mib(), "baseline": baseline}
    if args.matmul:
        rows = torch.randn(size, dim, generator=torch.Generator().manual_seed(2))  # [shard_size, D], in memory
        full, rest = divmod(n, size)

        def matmuls() -> None:
            for _ in range(full):
                queries @ rows.T  # [m, shard_size]
            if rest:
                queries @ rows[:rest].T

        # measured again, alternating with the bare matmul (after the memory reading: ``rows`` is 1 shard)
        out["paired_seconds"], out["matmul_seconds"] = best_of(lambda: store.top_k(queries, args.k), matmuls)
    print(json.dumps(out))


def measure(path: Path, args: argparse.Namespace, matmul: bool) -> dict:
    """Run :func:`child` on the store at ``path`` in a new interpreter; its results."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(path),
               "--queries", str(args.queries), "--k", str(args.k)] + (["--matmul"] if matmul else [])
    # Linux carries a process's ru_maxrss over fork + exec: a direct child would start at this process's
    # peak (torch + the blocks written). A small python in between gives the child its own.
    done = subprocess.run([sys.executable, "-c", HOP, *command], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the child process for {path} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated numbers of rows")
    parser.add_argument("--quick", action="store_true", help="sizes 10^4 and 10^5 only")
    parser.add_argument("--dim", type=int, default=512, help="row width D")
    parser.add_argument("--shard-size", type=int, default=8192)
    parser.add_argument("--queries", type=int, default=100, help="query rows m")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--dir", default=None, help="where the temporary stores go (default: the system's temp folder)")
    add_json_option(parser, __file__)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    sizes = sorted({10_000, 100_000} if args.quick else {int(s) for s in args.sizes.split(",")})
    # each store is deleted once measured, so the largest (+ safetensors headers and a margin) must fit
    needed = sizes[-1] * args.dim * 4 * 1.02 + 64 * 2**20
    where = Path(args.dir or tempfile.gettempdir())
    if not where.is_dir():
        raise SystemExit(f"--dir {where} is not an existing folder")
    free = shutil.disk_usage(where).free
    if free < needed:
        raise SystemExit(f"not enough disk space in {where}: the store of {sizes[-1]:,} x {args.dim} float32 rows needs "
                         f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free; choose another folder with --dir")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.2f} (other work running skews the times)")
    print(f"D = {args.dim}, float32 storage, {args.shard_size} rows a shard, m = {args.queries} queries, k = {args.k}; "
          f"stores in {where}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="index_scaling-", dir=args.dir) as tmp:
        for n in sizes:
            path = Path(tmp) / f"store_{n}"
            built = build(path, n, args.dim, args.shard_size)
            r = results[n] = measure(path, args, matmul=n == sizes[-1])
            shutil.rmtree(path)
            print(f"n = {n:>9,}: top_k {r['seconds']:8.3f} s, {n / r['seconds']:>12,.0f} rows/s, "
                  f"peak {r['peak']:7.1f} MiB, increase {r['peak'] - r['baseline']:6.1f} MiB "
                  f"(built in {built:.1f} s, {n * args.dim * 4 / 2**20 / built:.0f} MiB/s)")

    small, large = results[sizes[0]], results[sizes[-1]]
    if len(sizes) > 1:
        print(f"time ratio {sizes[-1]:,} / {sizes[0]:,} rows: {large['seconds'] / small['seconds']:.1f} "
              f"(rows x{sizes[-1] / sizes[0]:.0f}; linear growth gives ~{sizes[-1] / sizes[0]:.0f})")
        print(f"peak memory ratio: {large['peak'] / small['peak']:.2f} (target <= 1.5); increase "
              f"{small['peak'] - small['baseline']:.1f} -> {large['peak'] - large['baseline']:.1f} MiB")
    flops = 2 * args.queries * sizes[-1] * args.dim
    ours, bare = flops / large["paired_seconds"] / 1e9, flops / large["matmul_seconds"] / 1e9
    print(f"n = {sizes[-1]:,}, measured in turn: top_k {large['paired_seconds']:.3f} s = {ours:.1f} GFLOP/s, bare matmul "
          f"of the same shapes {large['matmul_seconds']:.3f} s = {bare:.1f} GFLOP/s: fraction {ours / bare:.2f} (target >= 0.6)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    times = ", ".join(f"{n:,} rows {results[n]['seconds']:.3f} s" for n in sizes)
    peaks = ", ".join(f"{results[n]['peak']:.1f}" for n in sizes)
    write(args.json, {"dim": args.dim, "shard_size": args.shard_size, "queries": args.queries, "k": args.k,
                      "sizes": {str(n): results[n] for n in sizes}, "gflops": ours, "matmul_gflops": bare,
                      "load_average_end": os.getloadavg()[0]},
          [{"what": f"attribution index, streamed top-{args.k} of {args.queries} queries over rows of {args.dim} float32 "
                    f"numbers",
            "figure": times + (f" ({large['seconds'] / small['seconds']:.0f}x the time for "
                               f"{sizes[-1] / sizes[0]:.0f}x the rows)" if len(sizes) > 1 else "")},
           {"what": "attribution index, peak resident memory of the query process", "figure": f"{peaks} MiB"},
           {"what": f"attribution index at {sizes[-1]:,} rows against a bare in-memory matmul of the same shapes",
            "figure": f"{ours:.1f} vs {bare:.1f} GFLOP/s ({ours / bare:.2f} of the machine's rate)"}])


if __name__ == "__main__":
    main()
