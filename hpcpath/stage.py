"""The driver loop every per-slide stage shares: plan on a worker, fan out, finish.

For each slide a *plan* runs on a worker and returns a small dict (sizes, never pixels).
``expand(slide_id, plan)`` then describes that slide's follow-up work as
:class:`~hpcpath.backends.Unit` s (function, arguments, kind, the earlier units it waits
for); when all of them are done, ``finish(slide_id, outcome)`` is called once, on the
driver, with the summed integer results per kind or the first error.  One slide's failure
never touches the others.  Tiling, dataset building and inference are all this loop with
different units; the backend (Dask, Spark, in-process) decides only where units run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hpcpath.backends import Outcome, Unit, as_backend, expect_slides, one_line

__all__ = ["Outcome", "Unit", "as_backend", "expect_slides", "run_per_slide", "one_line"]


def run_per_slide(
    backend: Any,
    plans: dict[str, tuple[Callable, tuple]],
    expand: Callable[[str, dict], list[Unit]],
    finish: Callable[[str, Outcome], None],
    *,
    stage: str,
    key: str = "",
    label: str = "",
    on_task: Callable[[str, str, int], None] | None = None,
) -> None:
    """Run every slide's plan, its units, then ``finish``, on ``backend`` (a backend, a
    Dask client or a SparkSession: :func:`hpcpath.backends.as_backend`).

    A plan returning ``{"error": msg}`` (a user problem reported as a value, so workers log
    no traceback) or raising fails that slide; so does any unit that raises.  ``stage``
    names the plan tasks (``<stage>-plan``) and, with ``label`` (its output), the run on the
    backend's dashboard.
    """
    as_backend(backend).run(plans, expand, finish, stage=stage, key=key, label=label, on_task=on_task)
