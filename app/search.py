"""The search index: how a memory becomes an index entry, and how a query finds it.

An index entry keeps a memory's normalised terms (for BM25 scoring) and a small
hashed term vector (for similarity between memories, used by consolidation and
as a ranking feature). Both are computed here and nowhere else.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VECTOR_DIM = 256
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being
    below between both but by can did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself
    just me more most my myself no nor not now of off on once only or other our ours ourselves
    out over own same she should so some such than that the their theirs them themselves then
    there these they this those through to too under until up very was we were what when where
    which while who whom why will with would you your yours yourself yourselves s t don o re ve
    ll d m also get got like really yeah oh
    """.split()
)


# Words repeat (a few thousand make up most of any text), so the pure per-word
# steps are memoised, bounded so that a worker's memory stays flat.
@lru_cache(maxsize=1 << 15)
def _stem(word: str) -> str:
    # A light suffix stripper: enough that "paintings" meets "painting" and
    # "painted" meets "paint", without a dictionary.
    if word.endswith("'s"):
        word = word[:-2]
    for suffix in (
        "ingly",
        "edly",
        "ings",
        "ing",
        "ies",
        "ied",
        "ers",
        "ed",
        "es",
        "er",
        "ly",
        "s",
    ):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            if suffix in ("ies", "ied"):
                return word[: -len(suffix)] + "y"
            return word[: -len(suffix)]
    return word


def terms(text: str) -> list[str]:
    """The normalised search terms of ``text``, in order."""
    return [_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


@lru_cache(maxsize=1 << 15)
def _bucket(term: str) -> tuple[int, float]:
    digest = hashlib.blake2b(term.encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return value % VECTOR_DIM, (1.0 if (value >> 32) & 1 else -1.0)


def vector(term_list: Sequence[str]) -> np.ndarray:
    """A unit-length hashed bag-of-terms vector (float32, ``VECTOR_DIM`` wide)."""
    vec = np.zeros(VECTOR_DIM, dtype=np.float32)
    for term, count in Counter(term_list).items():
        index, sign = _bucket(term)
        vec[index] += sign * (1.0 + math.log(count))
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm else vec


def vector_bytes(term_list: Sequence[str]) -> bytes:
    return vector(term_list).tobytes()


def vector_from_bytes(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


@dataclass(frozen=True)
class IndexRow:
    """What the index stores for one memory."""

    terms: str
    vector: bytes


def index_row(content: str) -> IndexRow:
    term_list = terms(content)
    return IndexRow(terms=" ".join(term_list), vector=vector_bytes(term_list))


@dataclass(frozen=True)
class Hit:
    memory_id: str
    score: float
    similarity: float


def bm25(
    query: str,
    entries: Iterable[tuple[str, str, bytes]],
    *,
    limit: int,
    k1: float = 1.2,
    b: float = 0.75,
) -> list[Hit]:
    """Rank ``(memory_id, terms, vector)`` entries for ``query`` by BM25.

    Document frequencies come from the entries given, so the ranking is relative
    to the collection being searched. Ties break on the memory id for a stable
    order.
    """
    query_terms = terms(query)
    if not query_terms:
        return []
    query_set = set(query_terms)
    query_vec = vector(query_terms)
    ids: list[str] = []
    tfs: list[Counter[str]] = []
    lengths: list[int] = []
    vectors: list[bytes] = []
    df: Counter[str] = Counter()
    for memory_id, entry_terms, entry_vector in entries:
        words = entry_terms.split()
        tf = Counter(w for w in words if w in query_set)
        ids.append(memory_id)
        tfs.append(tf)
        lengths.append(len(words))
        vectors.append(entry_vector)
        df.update(tf.keys())
    if not ids:
        return []
    n = len(ids)
    avg_len = (sum(lengths) / n) or 1.0
    idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in query_set}
    scored: list[tuple[float, int]] = []
    for i, tf in enumerate(tfs):
        if not tf:
            continue
        norm = k1 * (1 - b + b * lengths[i] / avg_len)
        score = sum(idf[t] * c * (k1 + 1) / (c + norm) for t, c in tf.items())
        scored.append((score, i))
    scored.sort(key=lambda pair: (-pair[0], ids[pair[1]]))
    hits = []
    for score, i in scored[:limit]:
        similarity = float(np.dot(query_vec, vector_from_bytes(vectors[i])))
        hits.append(Hit(memory_id=ids[i], score=round(score, 6), similarity=similarity))
    return hits


# --- re-ranking by a trained policy ------------------------------------------
#
# rl_training learns weights over these features and search applies them; both
# compute the features here so that training and serving rank the same way.

RANKING_FEATURES: tuple[str, ...] = (
    "bm25",
    "bm25_rank",
    "similarity",
    "overlap",
    "recency",
    "importance",
    "usage",
    "length",
)


@dataclass(frozen=True)
class Candidate:
    """One memory offered for a query, with what its ranking features come from."""

    memory_id: str
    content: str
    created_at: float  # POSIX seconds
    importance: float
    access_count: int
    # The BM25 score and 0-based rank; None when BM25 did not offer the memory.
    bm25: float | None = None
    bm25_rank: int | None = None


def ranking_features(query: str, candidates: Sequence[Candidate]) -> np.ndarray:
    """The ``(len(candidates), len(RANKING_FEATURES))`` features of one query.

    Every column is standardised over the query's candidates: what matters is
    how a memory compares with the others offered for the same query, so weights
    learnt on some queries carry over to others whatever their score scale. A
    column that does not vary (say, equal importance everywhere) is all zeros.
    """
    query_terms = terms(query)
    query_set = set(query_terms)
    query_vec = vector(query_terms)
    best = max((c.bm25 for c in candidates if c.bm25 is not None), default=0.0) or 1.0
    raw = np.zeros((len(candidates), len(RANKING_FEATURES)), dtype=np.float64)
    for i, cand in enumerate(candidates):
        memory_terms = terms(cand.content)
        raw[i] = (
            (cand.bm25 or 0.0) / best,
            0.0 if cand.bm25_rank is None else 1.0 / (1 + cand.bm25_rank),
            float(np.dot(query_vec, vector(memory_terms))),
            len(query_set.intersection(memory_terms)) / len(query_set) if query_set else 0.0,
            cand.created_at / 86_400.0,
            cand.importance,
            math.log1p(max(0, cand.access_count)),
            math.log1p(len(memory_terms)),
        )
    if not len(raw):
        return raw
    std = raw.std(axis=0)
    centred = raw - raw.mean(axis=0)
    return np.divide(centred, std, out=np.zeros_like(raw), where=std > 1e-9)


def weight_vector(weights: dict[str, float]) -> np.ndarray:
    """A policy's stored ``{feature: weight}`` in ``RANKING_FEATURES`` order (missing: 0)."""
    return np.array([float(weights.get(name, 0.0)) for name in RANKING_FEATURES])


def policy_order(features: np.ndarray, weights: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Candidate indices best first by ``features @ weights``, and the scores.

    Ties keep the candidates' given (BM25) order.
    """
    scores = features @ weights if len(features) else np.zeros(0)
    return [int(i) for i in np.argsort(-scores, kind="stable")], scores
