"""The ``report`` stage: ``report/index.html`` + ``report/report.md`` + PNG figures, from artifacts only.

Its input is ``evaluate`` (whose fingerprint already covers curate, influence and everything upstream);
it also reads ``influence/cluster_scores.parquet`` and ``curate/cluster_decisions.parquet`` when they
exist. ``influencespace report RUN_DIR`` runs the same :func:`~influencespace.report.build.build_report`.
"""

from __future__ import annotations

import logging

from influencespace.report.build import build_report
from influencespace.stages import Stage, StageContext, StageResult

log = logging.getLogger(__name__)


class ReportStage(Stage):
    name = "report"
    inputs = ("evaluate",)
    section = None

    def run(self, ctx: StageContext) -> StageResult:
        files = build_report(ctx.config.run_dir, ctx.stage_dir, summary_uri=ctx.input_path("evaluate", "summary"))
        prefix = ctx.stage_dir.rstrip("/") + "/"
        outputs = {key: uri.removeprefix(prefix) for key, uri in files.items()}
        log.info("report: %s", files["index"])
        return StageResult(counts={"figures": len(files) - 2}, outputs=outputs, extra={"index": files["index"]})
