"""Combining the dense and keyword rankings into one (pure functions).

- RRF (the default): ``score = sum over the rankings a chunk is in of 1 / (k + rank)``
  with ``k = 60``; it needs no score calibration, which is why it is the default.
- Weighted: each ranking's scores min-max normalised to [0, 1] over its candidates,
  then ``w * dense + (1 - w) * keyword`` (a chunk missing from a ranking gets 0 there).
- Dense or keyword only: that ranking's own score.

Ties break on the chunk id, so a ranking is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from ledgerlens.retrieval.v1 import retrieval_pb2
from ledgerlens.services.retrieval.model import Hit

__all__ = ["Fused", "fuse"]


class Fused(NamedTuple):
    chunk_id: str
    score: float
    dense: float | None
    keyword: float | None


def _normalised(hits: Sequence[Hit]) -> dict[str, float]:
    if not hits:
        return {}
    scores = [h.score for h in hits]
    low, high = min(scores), max(scores)
    span = high - low
    return {h.chunk_id: (1.0 if span == 0 else (h.score - low) / span) for h in hits}


def fuse(
    dense: Sequence[Hit],
    keyword: Sequence[Hit],
    mode: int,
    *,
    rrf_k: int = 60,
    dense_weight: float = 0.5,
) -> list[Fused]:
    """All candidates of both rankings, fused, best first."""
    dense_scores = dict(dense)
    keyword_scores = dict(keyword)
    scored: dict[str, float]
    if mode == retrieval_pb2.FUSION_MODE_DENSE:
        scored = dense_scores
    elif mode == retrieval_pb2.FUSION_MODE_KEYWORD:
        scored = keyword_scores
    elif mode == retrieval_pb2.FUSION_MODE_WEIGHTED:
        d, k = _normalised(dense), _normalised(keyword)
        scored = {
            cid: dense_weight * d.get(cid, 0.0) + (1 - dense_weight) * k.get(cid, 0.0)
            for cid in dict.fromkeys([*dense_scores, *keyword_scores])
        }
    else:
        scored = {}
        for ranking in (dense, keyword):
            for rank, (cid, _score) in enumerate(ranking, start=rrf_k + 1):
                scored[cid] = scored.get(cid, 0.0) + 1.0 / rank
    ordered = sorted(scored.items(), key=lambda item: (-item[1], item[0]))
    return [
        Fused(cid, score, dense_scores.get(cid), keyword_scores.get(cid)) for cid, score in ordered
    ]
