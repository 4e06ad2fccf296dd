"""Turn score matrices into ranked rows: each query's top proponents and opponents."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from influence.exceptions import invalid

COLUMNS = (
    "query_id", "query_text", "query_label", "query_prediction", "source", "method", "mode",
    "kind", "rank", "id", "text", "label", "score",
)


def ranked_rows(
    scores: Tensor,
    query_ids: Sequence[str],
    train_ids: Sequence[str],
    *,
    k: int,
    source: str,
    method: str,
    mode: str,
) -> list[dict]:
    """The top-``k`` proponents (largest scores) and opponents (smallest) of every query.

    Args:
        scores: ``[Q, N]`` scores, positive = proponent.
        query_ids: ``Q`` ids.
        train_ids: ``N`` ids.
        k: rows of each kind per query (capped at ``N``).
        source, method, mode: copied into every row (``"pretraining"``/``"finetuning"``, the method
            name, the embedding mode).

    Returns:
        Rows with keys ``query_id, source, method, mode, kind, rank, id, score``.
    """
    if scores.dim() != 2 or scores.shape != (len(query_ids), len(train_ids)):
        raise invalid("scores.shape", tuple(scores.shape), f"({len(query_ids)}, {len(train_ids)})")
    k = min(k, scores.shape[1])
    rows = []
    for q, query_id in enumerate(query_ids):
        # the k largest and k smallest by a partial selection, without sorting all N scores
        high = scores[q].topk(k, largest=True, sorted=True).indices.tolist()
        low = scores[q].topk(k, largest=False, sorted=True).indices.tolist()
        for kind, picks in (("proponent", high), ("opponent", low)):
            for rank, z in enumerate(picks, start=1):
                rows.append(dict(query_id=query_id, source=source, method=method, mode=mode, kind=kind,
                                 rank=rank, id=train_ids[z], score=float(scores[q, z])))
    return rows


def join_examples(rows: list[dict], examples: Mapping[str, Mapping[str, object]], queries: Mapping[str, Mapping[str, object]]) -> list[dict]:
    """Add text and label of each row's training example and of its query; keep :data:`COLUMNS` order.

    Args:
        rows: from :func:`ranked_rows`.
        examples: ``id -> {"text": ..., "label": ...}`` of training examples (pretraining ones have no label).
        queries: ``id -> {"text", "label", "prediction"}`` of the queries.
    """
    out = []
    for row in rows:
        ex, q = examples.get(row["id"], {}), queries.get(row["query_id"], {})
        full = dict(row, text=ex.get("text", ""), label=ex.get("label", ""), query_text=q.get("text", ""),
                    query_label=q.get("label", ""), query_prediction=q.get("prediction", ""))
        out.append({c: full[c] for c in COLUMNS})
    return out
