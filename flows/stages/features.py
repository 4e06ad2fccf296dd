"""The ``features`` stage: the pretraining sample, the family's tokenizer, every split encoded, the queries."""

from __future__ import annotations

import random

import torch

from flows.experiment.experiment import Experiment
from flows.experiment.workspace import StageResult
from flows.stages.entry import stage
from flows.versioning.data_version import verify_datasets


@stage("features")
def run(x: Experiment, result: StageResult) -> None:
    """Sample the pretraining sentences, build the family's tokenizer, encode every split, pick the queries."""
    from influence.data.prepare import read_table
    from influence.models.checkpoints import save_state
    from influence.models.family import check_encoded

    verify_datasets(x.ws.root, x.ws.prepared, names=("pretrain", "finetune"))
    d, rng = x.settings.data, random.Random(x.settings.seed)
    pretrain_rows = read_table(x.dataset_path("pretrain"))
    if len(pretrain_rows) > d.pretrain_sentences:
        pretrain_rows = sorted(rng.sample(pretrain_rows, d.pretrain_sentences), key=lambda r: r["id"])
    finetune_rows = read_table(x.dataset_path("finetune"))
    splits = {s: [r for r in finetune_rows if r["split"] == s] for s in ("train", "validation", "test")}
    if d.finetune_train_examples and len(splits["train"]) > d.finetune_train_examples:
        splits["train"] = sorted(rng.sample(splits["train"], d.finetune_train_examples), key=lambda r: r["id"])
    queries = sorted(rng.sample(splits["test"], min(x.settings.attribution.queries, len(splits["test"]))), key=lambda r: r["id"])
    family = x.new_family()
    family.fit_tokenizer([r["text"] for r in pretrain_rows] + [r["text"] for r in splits["train"]])
    family.save_tokenizer(x.out_dir())
    x.write_json("family.json", x.family_spec(family))
    names = {int(r["label"]): r.get("label_name") or r["label"] for r in finetune_rows}
    x.write_json("labels.json", {"names": [str(names.get(i, i)) for i in range(max(names) + 1)]})
    for name, rows in {"pretrain": pretrain_rows, **splits, "queries": queries}.items():
        tensors = {"tokens": family.encode([r["text"] for r in rows], d.max_length)}
        check_encoded(family, [r["id"] for r in rows], tensors["tokens"],
                      f"data/prepared/{'pretrain' if name == 'pretrain' else 'finetune'}.csv, the {name} split")
        if name != "pretrain":
            tensors["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        save_state(tensors, x.out_dir() / f"{name}.safetensors")
        x.write_json(f"{name}_ids.json", [r["id"] for r in rows])
        result.metrics[f"{name}_examples"] = float(len(rows))
    if family.vocab_size is not None:
        result.metrics["vocab_size"] = float(family.vocab_size)
    result.outputs = {"features": x.relative(x.out_dir())}
