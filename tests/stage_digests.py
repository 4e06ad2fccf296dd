"""Digests of a workspace's stage outputs: the numbers a refactoring must leave bit-identical.

``python -m tests.stage_digests PROJECT`` prints them as JSON. Tensors are hashed by their bytes,
dtypes and shapes (not the safetensors header); JSON outputs by their canonical form (sorted keys),
so a change of file layout alone does not count, a change of any number does. Timings, paths and
MLflow ids are not outputs and are not hashed.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

# stage -> files (globs under artifacts/<stage>/) whose content is the stage's result
HASHED = {
    "features": ("*.safetensors", "vocab.json", "*_ids.json"),
    "pretrain": ("model.safetensors",),
    "finetune": ("*/model.safetensors",),
    "influence": ("*.safetensors",),
    "multistage": ("*.safetensors",),
    "tracin_we": ("*.safetensors", "*_words.json"),
    "tracin_last": ("*.safetensors",),
    "grad_cos": ("*.safetensors",),
    "magic": ("*.safetensors",),
    "multistage_magic": ("*.safetensors",),
    "deletion": ("deletion.json",),
    "pretrain_deletion": ("deletion.json",),
    "lds": ("lds.json",),
    "mislabel": ("mislabel.json",),
}


def file_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, bytes) or of a JSON file's canonical form."""
    digest = hashlib.sha256()
    if path.suffix == ".safetensors":
        for name, tensor in sorted(load_file(str(path)).items()):
            flat = tensor.contiguous().reshape(-1)
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(flat.view(-1).numpy().tobytes() if flat.numel() else b"")
    else:
        digest.update(json.dumps(json.loads(path.read_text()), sort_keys=True).encode())
    return digest.hexdigest()


def stage_digests(root: Path) -> dict[str, str]:
    """``{"<stage>/<file>": sha256}`` of every hashed output present under ``root/artifacts``."""
    found = {}
    for stage, patterns in HASHED.items():
        folder = root / "artifacts" / stage
        for pattern in patterns:
            for path in sorted(folder.glob(pattern)):
                found[str(path.relative_to(root / "artifacts"))] = file_digest(path)
    return found


if __name__ == "__main__":
    print(json.dumps(stage_digests(Path(sys.argv[1])), indent=1, sort_keys=True))
