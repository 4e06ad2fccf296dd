"""Benchmark: sparse TracIn-WE (ours) vs dense TracIn over the embedding parameters.

Both compute sum_c lr_c <grad_W l_c(z), grad_W f_c(x)> for the same checkpoints; ours only touches
the embedding rows of each example's words, the baseline materialises full [V, d] per-example
gradients. Prints both times, their ratio and the largest difference.
Run: ``.venv/bin/python bench/tracin_we_sparse.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from recording import add_json_option, write

from influence.data.datasets import TextClassificationDataset
from influence.methods.tracin import tracin_scores
from influence.methods.tracin_we import tracin_we_scores
from influence.models.text import TextClassifier
from influence.task import ClassificationTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=6000)
    parser.add_argument("--checkpoints", type=int, default=3)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TextClassifier(args.vocab, embed_dim=32, hidden_dim=32)
    checkpoints = []
    for c in range(args.checkpoints):
        state = {k: v + 0.01 * c * torch.randn_like(v) for k, v in model.state_dict().items()}
        checkpoints.append((state, 1e-3))

    def data(n, seed):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(2, args.vocab, (n, 24), generator=g)
        return TextClassificationDataset(tokens, torch.randint(0, 2, (n,), generator=g), [f"{seed}-{i}" for i in range(n)])

    train, queries = data(args.train, 1), data(args.queries, 2)
    task = ClassificationTask()
    start = time.perf_counter()
    ours = tracin_we_scores(task, model, train, queries, checkpoints=checkpoints, batch_size=256)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    dense = tracin_scores(task, model, train, queries, checkpoints=checkpoints, params="embedding", batch_size=64)
    dense_seconds = time.perf_counter() - start
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"work: {args.queries} queries x {args.train} train, vocab {args.vocab}, {args.checkpoints} checkpoints")
    print(f"sparse TracIn-WE (ours): {ours_seconds:.3f} s   dense embedding TracIn: {dense_seconds:.3f} s")
    print(f"speed-up ratio (dense / ours): {dense_seconds / ours_seconds:.1f}x")
    difference, scale = (ours - dense).abs().max().item(), dense.abs().max().item()
    print(f"max abs difference: {difference:.2e} (scale {scale:.2e})")
    write(args.json, {"queries": args.queries, "train": args.train, "vocab": args.vocab, "checkpoints": args.checkpoints,
                      "ours_seconds": ours_seconds, "dense_seconds": dense_seconds, "speedup": dense_seconds / ours_seconds,
                      "max_abs_difference": difference, "scale": scale},
          [{"what": f"sparse TracIn-WE vs dense embedding TracIn ({args.queries} queries x {args.train:,} examples, "
                    f"vocabulary {args.vocab:,}, {args.checkpoints} checkpoints)",
            "figure": f"{ours_seconds:.3f} s vs {dense_seconds:.3f} s ({dense_seconds / ours_seconds:.0f}x), "
                      f"largest difference {difference:.0e} of {scale:.0e}"}])


if __name__ == "__main__":
    main()
