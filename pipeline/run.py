"""The pipeline, end to end: profile -> plan -> train and prune -> export -> verify -> report.

Each line of :func:`run` is one stage of ``pipeline.stages`` (typed artifact in, typed artifact
out); ``latprune profile|plan|prune`` are the same run stopped after that stage.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from latprune.pipeline import distributed, gates
from latprune.pipeline.config import RunConfig
from latprune.pipeline.report import build_report, write_report
from latprune.pipeline.stages import (
    dense_stage,
    diagnose_stage,
    evaluate_stage,
    export_stage,
    plan_stage,
    precision_stage,
    prepare,
    profile_stage,
    prune_stage,
    untrained_dense,
    verify_stage,
)

__all__ = ["STOPS", "RunResult", "run"]

STOPS = ("profile", "plan", "prune")  # the stages a run may stop after (their CLI commands)


@dataclasses.dataclass
class RunResult:
    run_dir: Path
    report_path: Path | None  # None when stopped early, and on the ranks other than 0 under torchrun
    report: dict[str, Any] | None
    artifact: Path | None = None  # the last stage's file (table.json, plan.json, arch.json, report.json)
    validation: dict[str, Any] | None = None  # the table's stored prediction error (profile --validate)

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return gates.failed((self.report or {}).get("gates", []))

    @property
    def exit_code(self) -> int:
        """0, or the status of the first failed gate (parity 3, latency 4, accuracy 5)."""
        return gates.exit_code((self.report or {}).get("gates", []))


def run(cfg: RunConfig, stop_after: str | None = None) -> RunResult:
    """``latprune run``: the whole pipeline, or up to ``stop_after`` (one of :data:`STOPS`).
    Raises BadInput (2); failed deployment gates are in the result (``exit_code``)."""
    if stop_after not in (None, *STOPS):
        raise ValueError(f"stop_after must be one of {STOPS}, got {stop_after!r}")
    inp, rd = prepare(cfg, profile_only=stop_after == "profile")
    with rd.removed_on_bad_input():
        # under torchrun every rank trains (data-parallel); rank 0 measures and writes, the others read
        dense = untrained_dense(inp) if stop_after == "profile" else dense_stage(inp, rd)
        table = distributed.main_first(lambda: profile_stage(inp, rd, dense))
        if stop_after == "profile":
            return RunResult(rd.path, None, None, rd / "table.json", table.validation)
        plan = distributed.main_first(lambda: plan_stage(inp, rd, dense, table))
        if stop_after == "plan":
            return RunResult(rd.path, None, None, rd / "plan.json")
        compact = prune_stage(inp, rd, dense, plan)
        if stop_after == "prune" or not distributed.is_main():
            return RunResult(rd.path, None, None, rd / "arch.json")
        exported = export_stage(inp, rd, dense, compact)
        speed = verify_stage(inp, rd, exported, dense, compact)
        side_by_side = precision_stage(inp, rd, exported)
        evaluation = evaluate_stage(inp, rd, dense, compact, exported)
        diagnosis = diagnose_stage(inp, rd, dense, compact, plan, exported)
        report = build_report(inp, rd, dense, compact, table, plan, exported, speed, evaluation, diagnosis,
                              side_by_side)
        path = write_report(rd.path, report)
    return RunResult(rd.path, path, report, path)
