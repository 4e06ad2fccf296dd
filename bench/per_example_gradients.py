"""Benchmark: per-example gradients with torch.func (ours) vs a loop of torch.autograd.grad.

Same model (the pipeline's TextClassifier), same examples, same parameters; prints both times,
their ratio and the largest difference. Run: ``.venv/bin/python bench/per_example_gradients.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from recording import add_json_option, write

from influence.gradients.layout import select_parameters
from influence.gradients.per_example import gradient_matrix
from influence.models.text import TextClassifier
from influence.task import ClassificationTask


def loop_gradients(task, model, tokens, labels, names):
    params = dict(model.named_parameters())
    rows = []
    for i in range(tokens.shape[0]):
        loss = task.train_loss(model, {"tokens": tokens[i : i + 1], "label": labels[i : i + 1]}).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=6000)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--params", default="encoder,head")
    add_json_option(parser, __file__)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TextClassifier(args.vocab, embed_dim=32, hidden_dim=32)
    tokens = torch.randint(2, args.vocab, (args.examples, args.length))
    labels = torch.randint(0, 2, (args.examples,))
    data = torch.utils.data.TensorDataset(tokens, labels)
    task = ClassificationTask()
    names = select_parameters(model, args.params.split(","))

    # warm up both paths (torch.func builds its transforms on first use)
    gradient_matrix(task, model, torch.utils.data.Subset(data, range(8)), names, batch_size=8)
    loop_gradients(task, model, tokens[:8], labels[:8], names)
    start = time.perf_counter()
    ours = gradient_matrix(task, model, data, names, batch_size=256)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = loop_gradients(task, model, tokens, labels, names)
    loop_seconds = time.perf_counter() - start

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"work: {args.examples} examples x {ours.shape[1]} parameters ({args.params})")
    print(f"torch.func (ours): {ours_seconds:.3f} s   autograd loop: {loop_seconds:.3f} s")
    print(f"speed-up ratio (loop / ours): {loop_seconds / ours_seconds:.1f}x")
    difference = (ours - reference).abs().max().item()
    print(f"max abs difference: {difference:.2e}")
    write(args.json, {"examples": args.examples, "parameters": ours.shape[1], "ours_seconds": ours_seconds,
                      "loop_seconds": loop_seconds, "speedup": loop_seconds / ours_seconds, "max_abs_difference": difference},
          [{"what": f"per-example gradients, torch.func vs a loop of autograd.grad ({args.examples:,} examples x "
                    f"{ours.shape[1]:,} parameters)",
            "figure": f"{ours_seconds:.3f} s vs {loop_seconds:.3f} s ({loop_seconds / ours_seconds:.1f}x)"}])


if __name__ == "__main__":
    main()
