"""Does the policy rl_training learns rank better than BM25? Measured on LoCoMo.

Each turn becomes a memory. The questions are split (fixed seed): a feedback
share is "asked" and rated the way a user would (evidence turns +1, the top
non-evidence results in view -0.3); the rest are never shown to training. The
real ``rl_training`` handler learns from the feedback (holding out its own share
of it), then both question sets are ranked by plain BM25 and by the published
policy over the same candidates, as ``POST /v1/memories/search`` with
``rerank`` does.

    python deploy/bench_rl_training.py [--epochs 40] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import locomo_bench as bench

from app.db import session_scope
from app.models import MemoryFeedback, Policy
from app.store import rerank_hits, search_memories
from tasks import rl_training

K = 10
FEEDBACK_SHARE = 0.6
NEGATIVE_REWARD = -0.3
NEGATIVES_PER_QUESTION = 3


def _give_feedback(
    account_id: str, questions: list[bench.Question], memory_ids: dict[str, str]
) -> int:
    by_memory = {m: dia for dia, m in memory_ids.items()}
    rows = 0
    with session_scope() as session:
        for question in questions:
            for dia in sorted(question.evidence):
                session.add(
                    MemoryFeedback(
                        account_id=account_id,
                        memory_id=memory_ids[dia],
                        query=question.text,
                        reward=1.0,
                    )
                )
                rows += 1
            hits = search_memories(session, account_id, question.text, limit=K)
            wrong = [m.id for m, _ in hits[:K] if by_memory.get(m.id) not in question.evidence]
            for memory_id in wrong[:NEGATIVES_PER_QUESTION]:
                session.add(
                    MemoryFeedback(
                        account_id=account_id,
                        memory_id=memory_id,
                        query=question.text,
                        reward=NEGATIVE_REWARD,
                    )
                )
                rows += 1
    return rows


def _rank(
    account_id: str, questions: list[bench.Question], policy: Policy | None, candidates: int
) -> dict[str, float]:
    recalls, reciprocal = [], []
    with session_scope() as session:
        for question in questions:
            hits = search_memories(
                session, account_id, question.text, limit=K, candidates=candidates
            )
            ranked = (
                [m for m, _h in hits]
                if policy is None
                else [m for m, _h, _s in rerank_hits(policy, question.text, hits)]
            )
            turns = [bench.dia_ids(m) for m in ranked]
            top = {d for ids in turns[:K] for d in ids}
            recalls.append(len(question.evidence & top) / len(question.evidence))
            first = next((i for i, ids in enumerate(turns) if question.evidence & set(ids)), None)
            reciprocal.append(0.0 if first is None else 1.0 / (first + 1))
    n = len(recalls) or 1
    return {"recall@10": sum(recalls) / n, "mrr": sum(reciprocal) / n}


def _fmt(before: dict[str, Any], after: dict[str, Any]) -> str:
    return (
        f"recall@10 {before['recall@10']:.4f} -> {after['recall@10']:.4f} "
        f"({after['recall@10'] - before['recall@10']:+.4f})   "
        f"MRR {before['mrr']:.4f} -> {after['mrr']:.4f} ({after['mrr'] - before['mrr']:+.4f})"
    )


def _run(path: Any, seed: int, parameters: dict[str, Any]) -> dict[str, Any]:
    conversation = bench.load_conversation(path)
    account_id = bench.make_account(f"bench-{conversation.name}-{seed}")
    _collection_id, memory_ids = bench.import_conversation(account_id, conversation)
    questions = list(conversation.questions)
    random.Random(seed).shuffle(questions)
    cut = round(FEEDBACK_SHARE * len(questions))
    asked, unseen = questions[:cut], questions[cut:]
    rows = _give_feedback(account_id, asked, memory_ids)
    started = time.perf_counter()
    result = bench.run_handler(
        rl_training.run, "rl_training", account_id, {**parameters, "seed": seed}
    )
    seconds = time.perf_counter() - started
    with session_scope() as session:
        policy = session.get(Policy, result["policy_id"])
        assert policy is not None
        session.expunge(policy)
    curve = result["training"]
    print(
        f"\n{conversation.name} seed {seed}: {len(conversation.turns)} memories, {rows} "
        f"feedback rows on {len(asked)} questions; {result['train_queries']} train / "
        f"{result['heldout_queries']} held-out queries; {seconds:.1f} s; "
        f"mean reward {curve['first']:.4f} -> {curve['last']:.4f}"
    )
    held = result["heldout"]
    print(f"  handler's held-out split  {_fmt(held['untrained'], held['trained'])}")
    plain = _rank(account_id, unseen, None, result["candidates"])
    reranked = _rank(account_id, unseen, policy, result["candidates"])
    print(f"  {len(unseen):>3} never-rated questions {_fmt(plain, reranked)}")
    return {
        "held": (held["untrained"], held["trained"]),
        "unseen": (plain, reranked),
    }


def _mean(figures: list[dict[str, Any]]) -> dict[str, float]:
    return {key: sum(f[key] for f in figures) / len(figures) for key in ("recall@10", "mrr")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=rl_training.DEFAULT_EPOCHS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--learning-rate", type=float, default=rl_training.DEFAULT_LEARNING_RATE)
    args = parser.parse_args()
    bench.fresh_database()
    parameters = {"epochs": args.epochs, "learning_rate": args.learning_rate}
    print(
        f"rl_training {parameters}, seeds {args.seeds} (question split and training); "
        "baseline = plain BM25 order over the same candidates"
    )
    runs = [_run(path, seed, parameters) for seed in args.seeds for path in bench.corpus_files()]
    print(f"\nmean over {len(runs)} runs:")
    for key, label in (("held", "handler's held-out split"), ("unseen", "never-rated questions")):
        before = _mean([r[key][0] for r in runs])
        after = _mean([r[key][1] for r in runs])
        print(f"  {label:<25} {_fmt(before, after)}")


if __name__ == "__main__":
    main()
