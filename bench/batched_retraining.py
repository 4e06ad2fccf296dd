"""Benchmark: counterfactual retrainings trained together (ours) vs one after another (baseline).

The same ``R`` retrainings of the pipeline's classifier (its default finetuning size: 5,100 examples
of 32 tokens, vocabulary 5,000, embedding 32, 32 channels, batches of 128, Adam, L2 1e-4), each
without a different seeded 1% of the examples and keeping the full run's data order, are run
- one after another, ``train(exclude=...)`` each (what the evidence stages did), and
- ``--group`` at a time with ``train_without`` (one vmapped step per batch for the whole group),
both with the same torch threads, in this one run. Prints both wall times, the speed-up, and the
largest difference between the two results' weights (floating-point rounding only).
Run: ``.venv/bin/python bench/batched_retraining.py [--retrainings 16 --group 16]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch
from recording import add_json_option, write

from influence.data.datasets import TextClassificationDataset
from influence.models.batched_training import train_without
from influence.models.text import TextClassifier
from influence.models.training import train
from influence.task import ClassificationTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--retrainings", type=int, default=16)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--examples", type=int, default=5100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_json_option(parser, __file__)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    vocab, length = 5000, 32
    tokens = torch.randint(2, vocab, (args.examples, length), generator=g)
    labels = (tokens[:, :4].sum(1) % 2).long()
    data = TextClassificationDataset(tokens, labels, [f"x{i}" for i in range(args.examples)])
    removals = [torch.randperm(args.examples, generator=g)[: args.examples // 100].tolist() for _ in range(args.retrainings)]
    torch.manual_seed(0)
    model = TextClassifier(vocab, embed_dim=32, hidden_dim=32)
    options = {"epochs": args.epochs, "batch_size": 128, "learning_rate": 0.01, "seed": 0, "l2": 1e-4}
    task = ClassificationTask()

    began = time.perf_counter()
    sequential = []
    for removed in removals:
        copied = copy.deepcopy(model)
        train(copied, task, data, exclude=removed, **options)
        sequential.append(copied.state_dict())
    baseline = time.perf_counter() - began

    began = time.perf_counter()
    batched = train_without(model, task, data, removals, group_size=args.group, **options)
    ours = time.perf_counter() - began

    difference = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30))
                     for a, b in zip(batched.states, sequential) for k in b)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"{args.retrainings} retrainings of {args.examples} examples x {args.epochs} epochs, 1% removed each")
    print(f"one after another: {baseline:.1f} s ({baseline / args.retrainings:.2f} s each)")
    print(f"{args.group} at a time (train_without): {ours:.1f} s ({ours / args.retrainings:.2f} s each)")
    print(f"speed-up: {baseline / ours:.2f}x; largest relative weight difference: {difference:.1e}")
    write(args.json, {"retrainings": args.retrainings, "group": args.group, "examples": args.examples, "epochs": args.epochs,
                      "torch_threads": torch.get_num_threads(), "sequential_seconds": baseline, "batched_seconds": ours,
                      "speedup": baseline / ours, "largest_relative_difference": difference},
          [{"what": f"{args.retrainings} retrainings x {args.epochs} epochs of the pipeline's classifier, {args.group} "
                    f"trained together (train_without) vs one after another",
            "figure": f"{ours:.1f} s vs {baseline:.1f} s ({baseline / ours:.2f}x), largest relative weight "
                      f"difference {difference:.0e}"}])


if __name__ == "__main__":
    main()
