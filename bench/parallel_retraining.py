"""Benchmark: case-deletion retrainings in parallel threads (ours) vs one after another (baseline).

The same ``R`` retrainings of the pipeline's classifier (the default finetuning size: 5,100
examples of 32 tokens, vocabulary 5,000, 5 epochs of Adam, embedding updated), each without a
different seeded 1% of the examples, are run
- one after another with torch's default intra-op threads (what ``dvc repro`` does), and
- ``--workers`` at a time in a thread pool, each with ``cpu_count // workers`` intra-op threads
  (what the Prefect ``retrainings`` subflow does).
Prints both wall times, their ratio, and checks that both give the same final weights.
Run: ``.venv/bin/python bench/parallel_retraining.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from recording import add_json_option, write

from influence.data.datasets import TextClassificationDataset
from influence.models.text import TextClassifier
from influence.models.training import train
from influence.task import ClassificationTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--retrainings", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--examples", type=int, default=5100)
    parser.add_argument("--epochs", type=int, default=5)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    vocab, length = 5000, 32
    tokens = torch.randint(2, vocab, (args.examples, length), generator=g)
    labels = (tokens[:, :4].sum(1) % 2).long()
    data = TextClassificationDataset(tokens, labels, [f"x{i}" for i in range(args.examples)])
    removals = [torch.randperm(args.examples, generator=g)[: args.examples // 100].tolist() for _ in range(args.retrainings)]

    def retrain(removed: list[int]) -> torch.Tensor:
        keep = sorted(set(range(args.examples)) - set(removed))
        torch.manual_seed(0)
        model = TextClassifier(vocab, embed_dim=32, hidden_dim=32)
        train(model, ClassificationTask(), data.subset(keep), epochs=args.epochs, batch_size=64, learning_rate=0.01,
              seed=0, l2=1e-4)
        return model.head.weight.detach().clone()

    began = time.perf_counter()
    sequential = [retrain(r) for r in removals]
    baseline = time.perf_counter() - began

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        parallel = list(pool.map(retrain, removals))
    ours = time.perf_counter() - began
    torch.set_num_threads(previous)

    same = all(torch.equal(a, b) for a, b in zip(sequential, parallel))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{args.retrainings} retrainings of {args.examples} examples x {args.epochs} epochs")
    print(f"one after another (default threads): {baseline:.1f} s ({baseline / args.retrainings:.2f} s each)")
    print(f"{args.workers} workers x {max(1, (os.cpu_count() or 1) // args.workers)} thread(s): {ours:.1f} s")
    print(f"speed-up: {baseline / ours:.2f}x; identical weights: {same}")
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    write(args.json, {"retrainings": args.retrainings, "examples": args.examples, "epochs": args.epochs,
                      "workers": args.workers, "threads_per_worker": threads, "sequential_seconds": baseline,
                      "parallel_seconds": ours, "speedup": baseline / ours, "identical_weights": same},
          [{"what": f"{args.retrainings} retrainings of {args.examples:,} examples x {args.epochs} epochs, {args.workers} "
                    f"threads of {threads} core(s) each vs one after another",
            "figure": f"{ours:.1f} s vs {baseline:.1f} s ({baseline / ours:.1f}x), identical weights: {same}"}])


if __name__ == "__main__":
    main()
