"""Does consolidation keep what search needs? Measured on LoCoMo conversations.

Each turn becomes a memory ("Speaker: text", importance 0.5, its session's date,
``dia_id`` in metadata). For every question the recall@10 of its evidence turns
is measured, then the real ``consolidation`` handler runs (the scheduled run's
defaults unless ``--threshold`` is given), and recall is measured again; a
consolidated memory retrieves the turns of all its sources.

    python deploy/bench_consolidation.py                   # the defaults
    python deploy/bench_consolidation.py --threshold 0.5 0.6 0.7
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import locomo_bench as bench
from sqlalchemy import func, select

from app.db import session_scope
from app.models import Memory
from tasks import consolidation

K = 10


def _live(collection_id: str) -> tuple[int, int]:
    with session_scope() as session:
        count, size = session.execute(
            select(func.count(), func.coalesce(func.sum(func.length(Memory.content)), 0)).where(
                Memory.collection_id == collection_id, Memory.deleted_at.is_(None)
            )
        ).one()
    return int(count), int(size)


def _measure(conversation: bench.Conversation, parameters: dict[str, Any]) -> dict[str, Any]:
    account_id = bench.make_account(f"bench-{conversation.name}")
    collection_id, _ = bench.import_conversation(account_id, conversation)
    memories_before, chars_before = _live(collection_id)
    with session_scope() as session:
        recall_before = bench.recall_at_k(
            session, account_id, collection_id, conversation.questions, K
        )
    started = time.perf_counter()
    result = bench.run_handler(consolidation.run, "consolidation", account_id, parameters)
    seconds = time.perf_counter() - started
    memories_after, chars_after = _live(collection_id)
    with session_scope() as session:
        recall_after = bench.recall_at_k(
            session, account_id, collection_id, conversation.questions, K
        )
    return {
        "memories": (memories_before, memories_after),
        "chars": (chars_before, chars_after),
        "bytes": (result["bytes_before"], result["bytes_after"]),
        "groups": result["groups"],
        "recall": (recall_before[0], recall_after[0]),
        "turn_recall": (recall_before[1], recall_after[1]),
        "questions": len(conversation.questions),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threshold",
        type=float,
        nargs="*",
        default=[],
        help="similarity thresholds to try (default: the handler's default only)",
    )
    args = parser.parse_args()
    bench.fresh_database()
    conversations = [bench.load_conversation(path) for path in bench.corpus_files()]
    settings: list[dict[str, Any]] = [{}] + [{"similarity_threshold": t} for t in args.threshold]
    print(f"corpus: {', '.join(c.name for c in conversations)}; recall@{K}; ")
    print(
        f"default similarity_threshold={consolidation.DEFAULT_SIMILARITY_THRESHOLD}, "
        f"older_than_days={consolidation.DEFAULT_OLDER_THAN_DAYS}, "
        f"max_group_size={consolidation.DEFAULT_MAX_GROUP_SIZE}"
    )
    header = (
        f"{'conversation':>12} {'threshold':>9} {'memories':>13} {'groups':>6} "
        f"{'merged bytes':>15} {'live chars':>15} {'recall@10 hits':>15} {'delta':>7} "
        f"{'recall@10 turns':>15} {'delta':>7} {'sec':>5}"
    )
    print(header)
    for parameters in settings:
        threshold = parameters.get(
            "similarity_threshold", consolidation.DEFAULT_SIMILARITY_THRESHOLD
        )
        for conversation in conversations:
            m = _measure(conversation, parameters)
            mb, ma = m["memories"]
            cb, ca = m["chars"]
            bb, ba = m["bytes"]
            rb, ra = m["recall"]
            tb, ta = m["turn_recall"]
            print(
                f"{conversation.name:>12} {threshold:>9.2f} {mb:>6}->{ma:<6} {m['groups']:>6} "
                f"{bb:>7}->{ba:<7} {cb:>7}->{ca:<7} {rb:>7.4f}->{ra:<7.4f} {ra - rb:>+7.4f} "
                f"{tb:>7.4f}->{ta:<7.4f} {ta - tb:>+7.4f} {m['seconds']:>5.1f}"
            )


if __name__ == "__main__":
    main()
