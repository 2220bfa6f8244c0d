"""rl_training: learn a retrieval-ranking policy from the account's feedback.

The environment: every query the account rated results for (``MemoryFeedback``
grouped by query) is an episode. It offers the query's top ``candidates`` BM25
hits over the account's live memories, the very set search reranks; the policy
ranks them; the reward is the discounted gain of the feedback rewards in the top
``RANK_DEPTH`` of that ranking (DCG over the ideal DCG of the rated memories).

The policy: a linear score over :data:`app.search.RANKING_FEATURES`, turned into
a Plackett-Luce distribution over rankings (a softmax picks each place from the
memories left). It starts as plain BM25 order and is trained with REINFORCE:
several sampled rankings per query, each scored against a leave-one-out
baseline of the others, Adam steps on the policy-gradient estimate.

Queries are split into train and held-out by ``holdout_fraction`` and ``seed``;
the result compares held-out recall@10 and MRR of plain BM25 order and of the
trained policy over the same candidates search would rerank. Each epoch ends in
a checkpoint (weights, optimiser, random state, curve): a redelivered task
resumes at the epoch it reached, and a cancel stops there without publishing.
The policy's id is derived from the job id, so it is published once.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import IndexEntry, Job, Memory, MemoryFeedback, Policy, utcnow
from app.search import RANKING_FEATURES, bm25, policy_order, ranking_features
from app.store import feedback_shortfall, memory_candidate
from tasks.context import JobCancelled, JobContext, JobFailed, JobSuperseded

DEFAULT_EPOCHS = 40
DEFAULT_LEARNING_RATE = 0.05
DEFAULT_SEED = 0
DEFAULT_HOLDOUT_FRACTION = 0.2
DEFAULT_CANDIDATES = 50

# The ranking the reward and the metrics look at: what a search page shows.
RANK_DEPTH = 10
# Rankings sampled per query and epoch; their mean is each one's baseline.
SAMPLES_PER_QUERY = 8
# Queries per optimiser step.
BATCH_QUERIES = 16
# Pulls the weights back toward plain BM25 so a small feedback log cannot
# drive the policy far from it.
L2_TO_START = 1e-3
# The starting policy ranks by BM25 alone; this weight keeps its samples close
# to BM25 order while leaving room to explore (on LoCoMo, 4 generalised better
# than 1 or 2: less drift away from a strong baseline on a small feedback log).
START_BM25_WEIGHT = 4.0
# The newest feedback rows read; older ones are superseded by then anyway.
MAX_FEEDBACK_ROWS = 100_000
ADAM_BETAS = (0.9, 0.999)


@dataclass
class _Episode:
    query: str
    ids: list[str]
    features: np.ndarray  # (candidates, features)
    rewards: np.ndarray  # feedback reward of each candidate, 0 when unrated
    ideal: float  # DCG of the best possible ranking, to scale rewards per query
    relevant: frozenset[str]  # rated memories with a positive reward, offered or not


def _derived_id(prefix: str, *parts: object) -> str:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()
    return f"{prefix}_{digest[:24]}"


_DISCOUNT = 1.0 / np.log2(np.arange(RANK_DEPTH) + 2.0)


def _ideal_dcg(rewards: np.ndarray) -> float:
    gains = np.sort(rewards[rewards > 0])[::-1][:RANK_DEPTH]
    return float((gains * _DISCOUNT[: len(gains)]).sum()) or 1.0


def _feedback(session: Session, account_id: str) -> dict[str, dict[str, float]]:
    """Mean reward per query and memory; feedback on a merged memory counts for its merge."""
    rows = session.execute(
        select(MemoryFeedback.query, MemoryFeedback.memory_id, MemoryFeedback.reward)
        .where(MemoryFeedback.account_id == account_id)
        .order_by(MemoryFeedback.created_at.desc(), MemoryFeedback.id.desc())
        .limit(MAX_FEEDBACK_ROWS)
    ).all()
    memory_ids = sorted({row.memory_id for row in rows})
    live: dict[str, str] = {}
    for start in range(0, len(memory_ids), 500):
        for memory_id, deleted_at, merged_into in session.execute(
            select(Memory.id, Memory.deleted_at, Memory.consolidated_into).where(
                Memory.account_id == account_id, Memory.id.in_(memory_ids[start : start + 500])
            )
        ):
            if deleted_at is None:
                live[memory_id] = memory_id
            elif merged_into is not None:
                live[memory_id] = merged_into
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        target = live.get(row.memory_id)
        query = row.query.strip()
        if target is not None and query:
            sums[query][target].append(row.reward)
    return {q: {m: sum(r) / len(r) for m, r in rated.items()} for q, rated in sums.items()}


class _Environment:
    """The account's index, loaded once, and the episodes built from it."""

    def __init__(self, session: Session, account_id: str, candidates: int) -> None:
        self.session = session
        self.account_id = account_id
        self.candidates = candidates
        self.entries = session.execute(
            select(IndexEntry.memory_id, IndexEntry.terms, IndexEntry.vector)
            .join(Memory, Memory.id == IndexEntry.memory_id)
            .where(IndexEntry.account_id == account_id, Memory.deleted_at.is_(None))
        ).all()

    def episode(self, query: str, rated: dict[str, float]) -> _Episode:
        """The query's BM25 candidates, as search would offer them to the policy.

        Rated memories BM25 does not offer stay out: search could never show
        them, and training on them taught features that do not carry over (on
        LoCoMo, held-out recall@10 fell by 0.01-0.02 with them in). They still
        count as relevant in the metrics, as misses.
        """
        hits = bm25(query, self.entries, limit=self.candidates)
        wanted = [h.memory_id for h in hits]
        memories = {
            m.id: m
            for m in self.session.scalars(
                select(Memory).where(Memory.id.in_(wanted), Memory.deleted_at.is_(None))
            )
        }
        ranks = {h.memory_id: (rank, h) for rank, h in enumerate(hits)}
        candidates = []
        for memory_id in wanted:
            if memory_id in memories:
                rank, hit = ranks.get(memory_id, (None, None))
                candidates.append(memory_candidate(memories[memory_id], hit, rank))
        ids = [c.memory_id for c in candidates]
        # Ratings down come from what the rater saw at the top. Counting the
        # unrated rest as neutral (0) would make anything unseen look better than
        # what was seen, and teach the policy to bury BM25's best; so after a
        # rating down the unrated count as no better than the worst rated.
        floor = min(0.0, min(rated.values(), default=0.0))
        rewards = np.array([rated.get(i, floor) for i in ids], dtype=np.float64)
        return _Episode(
            query=query,
            ids=ids,
            features=ranking_features(query, candidates),
            rewards=rewards,
            ideal=_ideal_dcg(np.array([r for r in rated.values()], dtype=np.float64)),
            relevant=frozenset(m for m, r in rated.items() if r > 0),
        )


def _policy_gradient(
    episode: _Episode, weights: np.ndarray, rng: np.random.Generator
) -> tuple[float, np.ndarray]:
    """REINFORCE on one query: mean reward of the sampled rankings, and the gradient."""
    x = episode.features
    n = len(x)
    if n == 0:
        return 0.0, np.zeros_like(weights)
    depth = min(RANK_DEPTH, n)
    scores = x @ weights
    # Sorting Gumbel-perturbed scores samples a Plackett-Luce ranking.
    perturbed = scores + rng.gumbel(size=(SAMPLES_PER_QUERY, n))
    rankings = np.argsort(-perturbed, axis=1, kind="stable")[:, :depth]
    remaining = np.ones((SAMPLES_PER_QUERY, n), dtype=bool)
    rows = np.arange(SAMPLES_PER_QUERY)
    grad_log_p = np.zeros((SAMPLES_PER_QUERY, x.shape[1]))
    for place in range(depth):
        logits = np.where(remaining, scores, -np.inf)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        chosen = rankings[:, place]
        # d log softmax(chosen) / dw = x_chosen - E_p[x] over what was left.
        grad_log_p += x[chosen] - p @ x
        remaining[rows, chosen] = False
    returns = (episode.rewards[rankings] * _DISCOUNT[:depth]).sum(axis=1) / episode.ideal
    baseline = (returns.sum() - returns) / (SAMPLES_PER_QUERY - 1)
    advantage = returns - baseline
    return float(returns.mean()), (advantage[:, None] * grad_log_p).mean(axis=0)


def _ranking_metrics(episodes: list[_Episode], weights: np.ndarray | None) -> dict[str, Any]:
    """Mean recall@10 and MRR of the rated-relevant memories; None weights: BM25 order."""
    recalls, reciprocal = [], []
    for ep in episodes:
        if not ep.relevant:
            continue
        order = (
            list(range(len(ep.ids))) if weights is None else policy_order(ep.features, weights)[0]
        )
        ranked = [ep.ids[i] for i in order]
        recalls.append(len(ep.relevant.intersection(ranked[:RANK_DEPTH])) / len(ep.relevant))
        first = next((pos for pos, m in enumerate(ranked) if m in ep.relevant), None)
        reciprocal.append(0.0 if first is None else 1.0 / (first + 1))
    n = len(recalls)
    return {
        f"recall@{RANK_DEPTH}": round(sum(recalls) / n, 6) if n else None,
        "mrr": round(sum(reciprocal) / n, 6) if n else None,
        "queries": n,
    }


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    # The 128-bit integers go as strings: JSON readers elsewhere need not hold them.
    state = rng.bit_generator.state
    return {
        "bit_generator": state["bit_generator"],
        "state": {k: str(v) for k, v in state["state"].items()},
        "has_uint32": state["has_uint32"],
        "uinteger": state["uinteger"],
    }


def _restore_rng(saved: dict[str, Any]) -> np.random.Generator:
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        **saved,
        "state": {k: int(v) for k, v in saved["state"].items()},
    }
    return rng


def _publish(
    ctx: JobContext, session: Session, weights: np.ndarray, summary: dict[str, Any]
) -> Policy:
    """Store the policy as the account's next version, once, if the job still runs."""
    policy_id = _derived_id("pol", ctx.job_id)
    existing = session.get(Policy, policy_id)
    if existing is not None:
        return existing  # published by an attempt that died before completing
    # Lock the job row, so a cancel either lands before (nothing is published)
    # or waits until the policy is in.
    job = session.execute(
        select(Job.status, Job.attempts).where(Job.id == ctx.job_id).with_for_update()
    ).one()
    if job.status != "running":
        raise JobCancelled(ctx.job_id)
    if job.attempts != ctx.attempt:
        raise JobSuperseded(ctx.job_id)
    latest = session.scalar(
        select(func.max(Policy.version)).where(Policy.account_id == ctx.account_id)
    )
    policy = Policy(
        id=policy_id,
        account_id=ctx.account_id,
        job_id=ctx.job_id,
        version=(latest or 0) + 1,
        algorithm="reinforce",
        features={
            "names": list(RANKING_FEATURES),
            "standardized": "per query",
            "candidates": summary["candidates"],
            "rank_depth": RANK_DEPTH,
        },
        weights={name: float(w) for name, w in zip(RANKING_FEATURES, weights, strict=True)},
        metrics=summary,
        created_at=utcnow(),
    )
    session.add(policy)
    session.commit()
    return policy


def run(ctx: JobContext, session: Session) -> dict[str, Any]:
    params = ctx.parameters
    epochs: int = params.get("epochs", DEFAULT_EPOCHS)
    learning_rate: float = params.get("learning_rate", DEFAULT_LEARNING_RATE)
    seed: int = params.get("seed", DEFAULT_SEED)
    holdout_fraction: float = params.get("holdout_fraction", DEFAULT_HOLDOUT_FRACTION)
    candidates: int = params.get("candidates", DEFAULT_CANDIDATES)

    ctx.stage = "feedback"
    shortfall = feedback_shortfall(session, ctx.account_id)
    feedback = _feedback(session, ctx.account_id)
    session.commit()
    if shortfall is not None:
        raise JobFailed("not_enough_feedback", shortfall)
    queries = sorted(feedback)
    if len(queries) < 2:
        raise JobFailed(
            "not_enough_feedback",
            "rl_training needs feedback on memories that still exist for at least two queries.",
            queries=len(queries),
        )
    # The split has a generator of its own, so it is the same however far
    # training got before a redelivery.
    shuffled = np.random.default_rng(seed).permutation(len(queries))
    held_count = min(len(queries) - 1, max(1, round(holdout_fraction * len(queries))))
    held = {queries[i] for i in shuffled[:held_count]}
    ctx.stats.update(queries=len(queries), train_queries=len(queries) - held_count)

    ctx.stage = "environment"
    env = _Environment(session, ctx.account_id, candidates)
    session.commit()
    train: list[_Episode] = []
    evaluate: list[_Episode] = []
    for done, query in enumerate(queries):
        (evaluate if query in held else train).append(env.episode(query, feedback[query]))
        session.commit()
        ctx.progress(10.0 * (done + 1) / len(queries), "building episodes")
        ctx.checkpoint()
    del env

    start = np.zeros(len(RANKING_FEATURES))
    start[RANKING_FEATURES.index("bm25")] = START_BM25_WEIGHT
    saved = ctx.saved
    if saved.get("epoch"):
        weights = np.array(saved["weights"])
        moment1, moment2 = np.array(saved["adam_m"]), np.array(saved["adam_v"])
        steps: int = saved["adam_t"]
        rng = _restore_rng(saved["rng"])
        curve: list[float] = list(saved["curve"])
        first_epoch: int = saved["epoch"]
    else:
        weights, steps = start.copy(), 0
        moment1, moment2 = np.zeros_like(start), np.zeros_like(start)
        rng = np.random.default_rng([seed, 1])
        curve, first_epoch = [], 0
    ctx.stats["resumed_from_epoch"] = first_epoch

    ctx.stage = "training"
    beta1, beta2 = ADAM_BETAS
    for epoch in range(first_epoch, epochs):
        rewards = []
        order = rng.permutation(len(train))
        for batch_start in range(0, len(order), BATCH_QUERIES):
            grad = np.zeros_like(weights)
            batch = order[batch_start : batch_start + BATCH_QUERIES]
            for index in batch:
                reward, episode_grad = _policy_gradient(train[index], weights, rng)
                rewards.append(reward)
                grad += episode_grad
            # Adam, ascending the expected reward.
            steps += 1
            ascent = grad / len(batch) - L2_TO_START * (weights - start)
            moment1 = beta1 * moment1 + (1 - beta1) * ascent
            moment2 = beta2 * moment2 + (1 - beta2) * ascent**2
            m_hat = moment1 / (1 - beta1**steps)
            v_hat = moment2 / (1 - beta2**steps)
            weights = weights + learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
        curve.append(round(float(np.mean(rewards)) if rewards else 0.0, 6))
        ctx.progress(10.0 + 88.0 * (epoch + 1) / epochs, f"epoch {epoch + 1} of {epochs}")
        # Where a cancel stops the run, and what a redelivered attempt resumes from.
        ctx.checkpoint(
            {
                "epoch": epoch + 1,
                "weights": weights.tolist(),
                "adam_m": moment1.tolist(),
                "adam_v": moment2.tolist(),
                "adam_t": steps,
                "rng": _rng_state(rng),
                "curve": curve,
            }
        )
        # Counted once saved: a cancelled run reports the epochs it kept.
        ctx.stats["epochs_done"] = epoch + 1

    ctx.stage = "publish"
    summary: dict[str, Any] = {
        "algorithm": "reinforce",
        "epochs": epochs,
        "learning_rate": learning_rate,
        "seed": seed,
        "holdout_fraction": holdout_fraction,
        "candidates": candidates,
        "train_queries": len(train),
        "heldout_queries": len(evaluate),
        "training": {
            "mean_reward_per_epoch": curve,
            "first": curve[0] if curve else None,
            "last": curve[-1] if curve else None,
            "best": max(curve) if curve else None,
        },
        "heldout": {
            "untrained": _ranking_metrics(evaluate, None),
            "trained": _ranking_metrics(evaluate, weights),
        },
    }
    policy = _publish(ctx, session, weights, summary)
    ctx.progress(100.0, "published")
    return {
        "policy_id": policy.id,
        "version": policy.version,
        **policy.metrics,
        "weights": policy.weights,
        "resumed_from_epoch": first_epoch,
    }
