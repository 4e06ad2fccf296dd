"""Benchmark: MAGIC's cost as a multiple of one training run, and its agreement with retraining.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``): a 784-32-10 tanh network trained by Adam
(``influence.models.training.train``) on ``--train`` images for ``--epochs`` epochs; MAGIC scores
``--queries`` test images against every training image. Prints the seconds of the training run and
of MAGIC (and their ratio, per query), then the Pearson correlation between MAGIC's predicted change
of each query's loss and the change measured by retraining without random removal sets of
``--removed`` examples (same seed and data order), in one run.
Run: ``.venv/bin/python bench/magic_cost.py [--train 1000 --queries 8 --epochs 2 --sets 20 --removed 10]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import add_json_option, write  # noqa: E402
from solver_lds import mnist  # noqa: E402

from influence.methods.magic import TrainingRecipe, magic_scores  # noqa: E402
from influence.models.training import train  # noqa: E402
from influence.task import ClassificationTask  # noqa: E402


def rows(dataset) -> list[dict]:
    x, y = dataset.tensors
    return [{"inputs": x[i], "label": y[i]} for i in range(len(y))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sets", type=int, default=20)
    parser.add_argument("--removed", type=int, default=10)
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train_set, query_set = mnist(args.train, args.queries, "fashion")
    train_rows, query_rows = rows(train_set), rows(query_set)
    torch.manual_seed(0)
    initial = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
    recipe = dict(epochs=args.epochs, batch_size=50, learning_rate=1e-3, seed=0, optimizer="adam", l2=1e-4)
    task = ClassificationTask()

    def trained(exclude=None) -> nn.Module:
        model = copy.deepcopy(initial)
        train(model, task, train_rows, exclude=exclude, **recipe)
        return model

    def losses(model: nn.Module) -> torch.Tensor:
        x, y = query_set.tensors
        with torch.no_grad():
            return nn.functional.cross_entropy(model(x), y, reduction="none")

    began = time.perf_counter()
    model = trained()
    train_seconds = time.perf_counter() - began
    began = time.perf_counter()
    scores = magic_scores(task, model, train_rows, query_rows,
                          training=TrainingRecipe(initial_state=copy.deepcopy(initial.state_dict()), **recipe))
    magic_seconds = time.perf_counter() - began
    began = time.perf_counter()
    one_by_one = magic_scores(task, model, train_rows, query_rows, query_batch=1,
                              training=TrainingRecipe(initial_state=copy.deepcopy(initial.state_dict()), **recipe))
    unbatched_seconds = time.perf_counter() - began
    steps = args.epochs * -(-args.train // recipe["batch_size"])
    print(f"training: {steps} Adam steps in {train_seconds:.2f} s; MAGIC for {args.queries} queries: {magic_seconds:.2f} s "
          f"= {magic_seconds / train_seconds:.1f} training runs ({magic_seconds / train_seconds / args.queries:.2f} per query)")
    difference = float((scores - one_by_one).abs().max() / one_by_one.abs().max())
    print(f"queries carried back one by one: {unbatched_seconds:.2f} s ({unbatched_seconds / magic_seconds:.2f}x the batched "
          f"time; largest relative difference {difference:.1e})")
    base, generator = losses(model), torch.Generator().manual_seed(1)
    predicted, actual = [], []
    for _ in range(args.sets):
        removed = torch.randperm(args.train, generator=generator)[: args.removed].tolist()
        actual.append(losses(trained(removed)) - base)
        predicted.append(scores[:, removed].sum(dim=1))
    pearson = float(torch.corrcoef(torch.stack([torch.cat(predicted), torch.cat(actual)]))[0, 1])
    print(f"removing {args.removed} of {args.train} examples ({100 * args.removed / args.train:.1f}%), {args.sets} sets: "
          f"Pearson of predicted and retrained loss changes {pearson:.3f}")
    runs = magic_seconds / train_seconds
    write(args.json, {"train": args.train, "queries": args.queries, "epochs": args.epochs, "steps": steps,
                      "train_seconds": train_seconds, "magic_seconds": magic_seconds, "training_runs": runs,
                      "one_by_one_seconds": unbatched_seconds, "batched_speedup": unbatched_seconds / magic_seconds,
                      "largest_relative_difference": difference, "sets": args.sets, "removed": args.removed,
                      "pearson": pearson},
          [{"what": f"MAGIC's cost, {args.queries} queries, a 784-32-10 network trained by Adam on {args.train:,} "
                    f"Fashion-MNIST images ({steps} steps)",
            "figure": f"{magic_seconds:.2f} s against {train_seconds:.2f} s for the training run ({runs:.1f} runs, "
                      f"{runs / args.queries:.2f} per query)"},
           {"what": f"MAGIC's queries carried back together vs one by one ({args.queries} queries)",
            "figure": f"{unbatched_seconds / magic_seconds:.1f}x faster, largest relative difference {difference:.0e}"},
           {"what": f"MAGIC's predicted loss change against retraining without {args.removed} of {args.train:,} "
                    f"examples ({args.sets} removal sets)",
            "figure": f"Pearson {pearson:.3f}"}])


if __name__ == "__main__":
    main()
