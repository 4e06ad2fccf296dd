"""The values of a workspace's stage outputs, compared with a stored reference within stated tolerances.

Floating point rounds differently on other CPUs (their matrix kernels, AVX-512 or AMX or neither), so a stored
reference is compared by values, not bytes: what must hold on any machine is the same integers (token ids, the
examples each split holds), scores that agree (correlation and largest difference), the same top examples where
the reference's ranking is not a near tie, the same case-deletion verdicts where the interval does not end near
zero, and LDS and AUC within a small distance. Bit-for-bit equality stays where it is a real invariant: a rerun on
the same machine (``tests/test_dvc_repro.py``), a resume after a kill (``tests/test_kills.py``, with
``tests/stage_digests.py``).

``python -m tests.stage_values PROJECT OUT`` writes a workspace's values as a reference (``OUT.safetensors`` and
``OUT.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SCORE_STAGES = ("influence", "multistage", "tracin_we", "tracin_last", "grad_cos", "magic", "multistage_magic")
TOP = 3  # top examples compared per query and side
# tolerances, relative to the reference's largest absolute value (scores, weights) or absolute (the rest)
SCORE_CORRELATION, SCORE_RTOL = 0.999, 1e-3
WEIGHT_RTOL = 1e-3
DELTA_ATOL = 1e-4  # a case-deletion mean change (a loss difference); a verdict whose interval ends nearer zero may flip
LDS_ATOL, AUC_ATOL = 0.05, 0.02


def stage_values(root: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, numbers)`` of a workspace: the encoded splits, the models' weights, every score matrix; the ids,
    the case-deletion checks, the LDS and the mislabel AUC."""
    artifacts, tensors, numbers = root / "artifacts", {}, {}
    for path in sorted((artifacts / "features").glob("*.safetensors")):
        for name, value in load_file(str(path)).items():
            tensors[f"features/{path.stem}/{name}"] = value
    for path in sorted((artifacts / "features").glob("*_ids.json")):
        numbers[f"features/{path.stem}"] = json.loads(path.read_text())
    for path in [artifacts / "pretrain" / "model.safetensors", *sorted((artifacts / "finetune").glob("*/model.safetensors"))]:
        for name, value in load_file(str(path)).items():
            tensors[f"{path.parent.relative_to(artifacts)}/{name}"] = value
    for stage in SCORE_STAGES:
        for path in sorted((artifacts / stage).glob("*.safetensors")):
            tensors[f"{stage}/{path.stem}"] = load_file(str(path))["scores"]
    for stage in ("deletion", "pretrain_deletion"):
        path = artifacts / stage / "deletion.json"
        if path.is_file():
            numbers[stage] = [{k: c[k] for k in ("method", "kind", "k", "mode", "difference", "interval_low", "interval_high",
                                                 "passed") if k in c} for c in json.loads(path.read_text())]
    if (artifacts / "lds" / "lds.json").is_file():
        found = json.loads((artifacts / "lds" / "lds.json").read_text())["methods"]
        numbers["lds"] = {m: {k: v for k, v in values.items() if k.startswith("lds")} for m, values in found.items()}
    if (artifacts / "mislabel" / "mislabel.json").is_file():
        numbers["mislabel"] = {"auc": json.loads((artifacts / "mislabel" / "mislabel.json").read_text())["curve"]["auc"]}
    return tensors, numbers


def _close(a: float, b: float, atol: float) -> bool:
    return abs(a - b) <= atol


def compare(found: tuple[dict, dict], reference: tuple[dict, dict]) -> list[str]:
    """What differs between two :func:`stage_values` beyond the tolerances (empty: they agree)."""
    (tensors, numbers), (ref_tensors, ref_numbers) = found, reference
    problems = []
    if sorted(tensors) != sorted(ref_tensors):
        problems.append(f"tensors {sorted(set(tensors) ^ set(ref_tensors))} are in one workspace only")
    for name in sorted(set(tensors) & set(ref_tensors)):
        a, b = tensors[name], ref_tensors[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: {tuple(a.shape)} {a.dtype}, reference {tuple(b.shape)} {b.dtype}")
        elif not a.is_floating_point():
            if not torch.equal(a, b):
                problems.append(f"{name}: other integers")
        else:
            a, b = a.double(), b.double()
            scale = float(b.abs().max()) or 1.0
            worst = float((a - b).abs().max()) / scale
            if name.split("/")[0] in SCORE_STAGES:
                problems += _scores(name, a, b, worst)
            elif worst > WEIGHT_RTOL:
                problems.append(f"{name}: differs by {worst:.2e} of its largest value (tolerance {WEIGHT_RTOL})")
    for name in sorted(set(numbers) | set(ref_numbers)):
        a, b = numbers.get(name), ref_numbers.get(name)
        if name.startswith("features/") and a != b:
            problems.append(f"{name}: other ids")
        elif name in ("deletion", "pretrain_deletion"):
            problems += _checks(name, a or [], b or [])
        elif name == "lds":
            for method, values in (b or {}).items():
                for key, value in values.items():
                    got = (a or {}).get(method, {}).get(key)
                    if got is None or not _close(got, value, LDS_ATOL):
                        problems.append(f"lds {method}.{key}: {got}, reference {value:.4f} (tolerance {LDS_ATOL})")
        elif name == "mislabel" and not _close((a or {}).get("auc", -1), b["auc"], AUC_ATOL):
            problems.append(f"mislabel auc: {(a or {}).get('auc')}, reference {b['auc']:.4f} (tolerance {AUC_ATOL})")
    return problems


def _scores(name: str, a: torch.Tensor, b: torch.Tensor, worst: float) -> list[str]:
    problems = []
    centred = (a - a.mean()).flatten(), (b - b.mean()).flatten()
    correlation = float(centred[0] @ centred[1] / (centred[0].norm() * centred[1].norm()).clamp_min(1e-300))
    if correlation < SCORE_CORRELATION or worst > SCORE_RTOL:
        problems.append(f"{name}: correlation {correlation:.6f} (at least {SCORE_CORRELATION}), largest difference "
                        f"{worst:.2e} of the largest score (at most {SCORE_RTOL})")
    margin = SCORE_RTOL * float(b.abs().max())
    for q in range(b.shape[0]):
        for sign in (1, -1):  # proponents, opponents
            order = (sign * b[q]).argsort(descending=True)
            gap = float(sign * (b[q, order[TOP - 1]] - b[q, order[TOP]])) if b.shape[1] > TOP else float("inf")
            mine = set((sign * a[q]).topk(TOP).indices.tolist())
            if gap > 2 * margin and mine != set(order[:TOP].tolist()):
                problems.append(f"{name}: query {q}'s top {TOP} {'proponents' if sign > 0 else 'opponents'} differ")
    return problems


def _checks(name: str, found: list[dict], reference: list[dict]) -> list[str]:
    problems = []
    keyed = {(c["method"], c["kind"], c["k"], c.get("mode")): c for c in found}
    for c in reference:
        mine = keyed.get((c["method"], c["kind"], c["k"], c.get("mode")))
        what = f"{name} {c['method']} {c['kind']} k={c['k']} {c.get('mode') or ''}".rstrip()
        if mine is None:
            problems.append(f"{what}: missing")
            continue
        for key in ("difference", "interval_low", "interval_high"):
            if not _close(mine[key], c[key], DELTA_ATOL):
                problems.append(f"{what}: {key} {mine[key]:.6f}, reference {c[key]:.6f} (tolerance {DELTA_ATOL})")
        near = min(abs(c["interval_low"]), abs(c["interval_high"])) <= DELTA_ATOL
        if mine["passed"] != c["passed"] and not near:
            problems.append(f"{what}: passed {mine['passed']}, reference {c['passed']}")
    return problems


def save(values: tuple[dict, dict], stem: Path) -> None:
    """Write ``values`` as the reference ``<stem>.safetensors`` and ``<stem>.json``."""
    tensors, numbers = values
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(numbers, indent=1, sort_keys=True) + "\n")


def load(stem: Path) -> tuple[dict, dict]:
    """The reference :func:`save` wrote."""
    return load_file(str(stem.with_suffix(".safetensors"))), json.loads(stem.with_suffix(".json").read_text())


if __name__ == "__main__":
    save(stage_values(Path(sys.argv[1])), Path(sys.argv[2]))
