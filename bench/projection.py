"""Benchmark: the sparse Johnson-Lindenstrauss projection against the Gaussian one, on real gradients.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``): a 784-``--hidden``-10 ReLU network trained by Adam
for one epoch on ``--train`` images; per-example gradients of all its parameters for the ``--train``
training images and ``--queries`` test images are projected to ``--dim`` numbers by
:class:`~influence.gradients.projection.RandomProjector` with ``kind="gaussian"`` (its ``[P, k]``
matrix is regenerated block by block for every batch once it exceeds the block cache, as it does
above 16,384 parameters at ``k = 4,096``) and ``kind="sjlt"``, in one run. Prints the seconds per
batch of ``--batch`` gradients of each (and their ratio), and for each the relative error of the
projected query-train gradient products against the exact ones and the Pearson correlation of the
projected scores with the exact scores.
Run: ``.venv/bin/python bench/projection.py [--train 256 --queries 8 --hidden 512 --dim 4096 --batch 64]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import add_json_option, write  # noqa: E402
from solver_lds import mnist  # noqa: E402

from influence.gradients.layout import select_parameters  # noqa: E402
from influence.gradients.per_example import gradient_matrix  # noqa: E402
from influence.gradients.projection import RandomProjector  # noqa: E402
from influence.models.training import train  # noqa: E402
from influence.task import ClassificationTask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=256)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train_set, query_set = mnist(args.train, args.queries, "fashion")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    task = ClassificationTask()
    x, y = train_set.tensors
    train(model, task, [{"inputs": x[i], "label": y[i]} for i in range(len(y))], epochs=1, batch_size=32,
          learning_rate=1e-3, seed=0, optimizer="adam")
    names = select_parameters(model, "all")
    g_train = gradient_matrix(task, model, train_set, names, batch_size=args.batch)  # [n, P]
    g_query = gradient_matrix(task, model, query_set, names, batch_size=args.batch)  # [m, P]
    p = g_train.shape[1]
    exact = g_query @ g_train.T  # [m, n]
    scale = g_query.norm(dim=1)[:, None] * g_train.norm(dim=1)[None, :]
    print(f"{p:,} parameters, k = {args.dim:,}, {args.train} training and {args.queries} query gradients, "
          f"batches of {args.batch}")
    seconds, errors, pearsons = {}, {}, {}
    for kind in ("gaussian", "sjlt"):
        projector = RandomProjector(p, args.dim, seed=0, kind=kind)
        began = time.perf_counter()
        projected = [projector.project(block) for block in g_train.split(args.batch)]
        seconds[kind] = (time.perf_counter() - began) / len(projected)
        z, q = torch.cat(projected), projector.project(g_query)
        estimate = q @ z.T
        error = float(((estimate - exact) / scale).abs().mean())
        pearson = float(torch.corrcoef(torch.stack([estimate.flatten(), exact.flatten()]))[0, 1])
        errors[kind], pearsons[kind] = error, pearson
        print(f"{kind:>9}: {seconds[kind]:.3f} s per batch; mean |error| of a product / (|q| |z|) {error:.4f}; "
              f"Pearson with the exact products {pearson:.4f}")
    ratio = seconds["gaussian"] / seconds["sjlt"]
    print(f"sparse projection {ratio:.1f}x faster per batch")
    write(args.json, {"parameters": p, "dim": args.dim, "train": args.train, "queries": args.queries, "batch": args.batch,
                      "seconds_per_batch": seconds, "mean_relative_error": errors, "pearson": pearsons, "speedup": ratio},
          [{"what": f"sparse Johnson-Lindenstrauss vs Gaussian projection, {p:,} parameters of a Fashion-MNIST network "
                    f"to {args.dim:,}, batches of {args.batch} gradients",
            "figure": f"{seconds['sjlt']:.2f} s vs {seconds['gaussian']:.2f} s per batch ({ratio:.1f}x); mean error of a "
                      f"product {errors['sjlt']:.4f} vs {errors['gaussian']:.4f} of |q| |z|, Pearson {pearsons['sjlt']:.4f} "
                      f"vs {pearsons['gaussian']:.4f}"}])


if __name__ == "__main__":
    main()
