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
