"""The rollout's decisions: compare a candidate with production on the same images, with the
ground truth where some exists, and promote only past the guard, recording who did what.

Ground truth comes from ``db.labels.current_labels`` (the monitoring issue's labels table);
until that module exists this deployment has no labels and the comparison says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from db import audit, registry
from db.exceptions import CxrError
from db.prediction_roles import Pair, compare_pairs
from db.session import session_scope
from trainer.training.rollout_stats import compare, guard

log = logging.getLogger(__name__)


def ground_truth(session, image_ids: list[int]) -> dict[int, str]:
    """image id -> its newest ground-truth label (``cxr labels``, the review app)."""
    from db import labels

    return dict(labels.current_labels(session, image_ids))


@dataclass
class Comparison:
    """A candidate against production: the report (``rollout_stats.compare``) and its pairs."""

    candidate: registry.RegisteredModel
    production: registry.RegisteredModel | None
    report: dict[str, Any]
    pairs: list[Pair]


def comparison(session, stage: str, version: int, since: datetime | None = None,
               truth: dict[int, str] | None = None) -> Comparison:
    """Production against ``stage/vVERSION`` on every image both answered; ``truth`` (image
    id -> label) defaults to the labels table's."""
    candidate = registry.get_version(session, stage, version)
    pairs = compare_pairs(session, stage, candidate.id, since)
    if truth is None:
        truth = ground_truth(session, [p.image_id for p in pairs]) if pairs else {}
    report = compare(pairs, stage, truth)
    report["candidate_version"] = candidate.version
    production = registry.get_production(session, stage)
    report["production_version"] = production.version if production else None
    return Comparison(candidate, production, report, pairs)


def promote_guarded(db_url: str, stage: str, version: int, *, force: bool = False,
                    actor: str | None = None, reason: str | None = None,
                    truth: dict[int, str] | None = None) -> tuple[str, Comparison | None]:
    """Promote ``stage/vVERSION`` unless the comparison says it is worse on labelled images
    (``rollout_stats.guard``) and ``force`` is not given; the audit row is written in the same
    transaction. Returns (the promoted version's name, the comparison when there is one)."""
    found: list[Comparison | None] = [None]

    def txn() -> str:
        with session_scope(db_url) as session:
            seen = comparison(session, stage, version, truth=truth)
            found[0] = seen if seen.pairs else None
            refused = guard(seen.report)
            if refused and not force:
                raise PromotionRefused(f"not promoted: {refused}; compare with `cxr models "
                                       f"compare {stage} {version}`, or pass --force")
            before = registry.get_production(session, stage)
            promoted = registry.promote(session, stage, version)
            audit.record(session, "promote", stage=stage, version=promoted.version,
                         detail={"from": before.version if before else None,
                                 "to": promoted.version, "forced": bool(refused and force),
                                 "guard": refused}, actor=actor, reason=reason)
            return promoted.name

    try:
        return registry.with_retries(txn), found[0]
    except PromotionRefused as refused:
        refused.comparison = found[0]
        raise


class PromotionRefused(CxrError):
    """The guard refused a promotion; ``comparison`` is what it saw."""

    comparison: Comparison | None = None


def rollback_audited(db_url: str, stage: str, actor: str | None = None,
                     reason: str | None = None) -> str:
    def txn() -> str:
        with session_scope(db_url) as session:
            before = registry.get_production(session, stage)
            now = registry.rollback(session, stage)
            audit.record(session, "rollback", stage=stage, version=now.version,
                         detail={"from": before.version if before else None,
                                 "to": now.version}, actor=actor, reason=reason)
            return now.name

    return registry.with_retries(txn)


def set_shadow(db_url: str, stage: str, version: int | None, actor: str | None = None,
               reason: str | None = None) -> str:
    """Start shadowing ``stage/vVERSION`` (None: stop), audited; what happened, in words."""
    with session_scope(db_url) as session:
        if version is None:
            previous = registry.clear_shadow(session, stage)
            if previous is None:
                return f"no shadow in stage {stage}"
            audit.record(session, "shadow off", stage=stage, version=previous.version,
                         detail={"from": previous.version}, actor=actor, reason=reason)
            return f"{previous.name} no longer shadows production"
        shadow, previous = registry.set_shadow(session, stage, version)
        audit.record(session, "shadow on", stage=stage, version=shadow.version,
                     detail={"from": previous.version if previous else None,
                             "to": shadow.version}, actor=actor, reason=reason)
        replaced = f" (replacing {previous.name})" if previous else ""
        return (f"{shadow.name} now shadows production{replaced}: workers run it on every "
                "image they classify and store its answers; rows never show them")
