"""Dashboard counts over the whole store."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from storage.database import Database
from storage.schema import (
    Chunk,
    Episode,
    Evaluation,
    Image,
    Intervention,
    PolicyVersion,
    Relabel,
    Run,
    Step,
)

COUNTED = {
    "episodes": Episode,
    "steps": Step,
    "chunks": Chunk,
    "images": Image,
    "interventions": Intervention,
    "policy_versions": PolicyVersion,
    "runs": Run,
    "relabels": Relabel,
    "evaluations": Evaluation,
}


def store_stats(db: Database) -> dict[str, Any]:
    """Row counts of every table, human steps, image bytes and episodes by task and outcome, and the backend."""
    with db.read_session() as session:
        count = {
            name: int(session.scalar(sa.select(sa.func.count()).select_from(model)) or 0)
            for name, model in COUNTED.items()
        }
        by_task_outcome = session.execute(
            sa.select(Episode.task, Episode.outcome, sa.func.count(), sa.func.sum(Episode.human_steps))
            .group_by(Episode.task, Episode.outcome)
            .order_by(Episode.task, Episode.outcome)
        ).all()
        image_bytes = session.scalar(sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(Image.data)), 0)))
    by_task: dict[str, dict[str, int]] = {}
    for task, outcome, episodes, _ in by_task_outcome:
        by_task.setdefault(task, {})[outcome] = int(episodes)
    return {
        **count,
        "human_steps": int(sum(row[3] or 0 for row in by_task_outcome)),
        "image_bytes": int(image_bytes or 0),
        "episodes_by_task": by_task,
    }
