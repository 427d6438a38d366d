"""The Great Expectations gate of each ingest run.

Arrow compute checks every row (see :mod:`pipeline.checks`); Great Expectations then gates the
run as a *batch*, on two frames, so its cost does not grow with the row count:

* ``request_logs.batch`` — one row of run metrics: the row count lies in
  ``[min_rows, max_rows]`` and the quarantined share is at most ``max_quarantine_share``
  (the share is checked only from ``share_gate_min_rows`` rows up);
* ``request_logs.rows`` — a seeded, stratified sample of the run's valid rows (at most
  ``ge_sample_rows``): schema and types, non-null, well-formed ids, unique request ids, value
  ranges and the median request duration.

The JSON result of both is stored beside the lake partition by :mod:`pipeline.ingest`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.config import IngestSettings
from pipeline.schemas import ID_COLUMNS, ID_PATTERN, REQUEST_LOG, RESOURCE_COLUMNS

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
log = logging.getLogger(__name__)


@dataclass
class GateResult:
    success: bool
    failed: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # suite name -> GE result JSON


@functools.lru_cache(maxsize=1)
def _context():
    import great_expectations as gx

    for name in ("great_expectations", "great_expectations.data_context.types.base"):  # they chat at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # progress bars are cosmetic; never fail the gate over them
        log.debug("could not turn off Great Expectations progress bars", exc_info=True)
    source = context.data_sources.add_pandas("warmcast")
    return context, source


def warm_up() -> None:
    """Import Great Expectations and build its context now (a fixed cost of a few seconds)."""
    _context()


def _batch_expectations(settings: IngestSettings, rows_in: int) -> list:
    import great_expectations.expectations as gxe

    out = [gxe.ExpectColumnValuesToBeBetween(column="rows_in", min_value=settings.min_rows, max_value=settings.max_rows)]
    if rows_in >= settings.share_gate_min_rows:
        out.append(gxe.ExpectColumnValuesToBeBetween(column="quarantine_share", min_value=0.0, max_value=settings.max_quarantine_share))
    return out


def _row_expectations(settings: IngestSettings) -> list:
    import great_expectations.expectations as gxe

    limits = {
        "duration_s": settings.max_duration_s,
        "cpu_cores": settings.max_cpu_cores,
        "memory_mb": settings.max_memory_mb,
        "gpus": settings.max_gpus,
    }
    out = [gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(REQUEST_LOG.names))]
    for name in REQUEST_LOG.names:
        out.append(gxe.ExpectColumnValuesToNotBeNull(column=name))
    for name in ID_COLUMNS:
        out.append(gxe.ExpectColumnValuesToBeOfType(column=name, type_="str"))
        out.append(gxe.ExpectColumnValuesToMatchRegex(column=name, regex=ID_PATTERN))
    out.append(gxe.ExpectColumnValuesToBeUnique(column="request_id"))
    out.append(gxe.ExpectColumnValuesToBeOfType(column="ts", type_="Timestamp"))
    for name in RESOURCE_COLUMNS:
        out.append(gxe.ExpectColumnValuesToBeOfType(column=name, type_="float64"))
        out.append(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=0.0, max_value=limits[name]))
    out.append(gxe.ExpectColumnMedianToBeBetween(column="duration_s", min_value=0.0, max_value=settings.median_duration_max_s))
    return out


def _run_suite(name: str, frame: pd.DataFrame, expectations: list) -> tuple[bool, list[str], dict]:
    import great_expectations as gx

    context, source = _context()
    suite = gx.ExpectationSuite(name=name, expectations=expectations)
    asset = source.add_dataframe_asset(f"{name}-{len(source.assets)}")
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite)
    failed = []
    for r in result.results:
        if not r.success:
            cfg = r.expectation_config
            column = cfg.kwargs.get("column")
            observed = (r.result or {}).get("observed_value")
            detail = f" (observed {observed!r})" if observed is not None else ""
            failed.append(f"{name}: {cfg.type}{f'[{column}]' if column else ''}{detail}")
    return bool(result.success), failed, result.to_json_dict()


def validate_run(sample: pd.DataFrame, rows_in: int, rows_quarantined: int, settings: IngestSettings) -> GateResult:
    """Gate one ingest run; ``sample`` holds valid rows (REQUEST_LOG columns, pandas types)."""
    share = rows_quarantined / rows_in if rows_in else 0.0
    metrics = pd.DataFrame({"rows_in": [rows_in], "rows_quarantined": [rows_quarantined], "quarantine_share": [share]})
    gate = GateResult(success=True)
    ok, failed, res = _run_suite("request_logs.batch", metrics, _batch_expectations(settings, rows_in))
    gate.results["request_logs.batch"] = res
    gate.success &= ok
    gate.failed += failed
    if len(sample):
        ok, failed, res = _run_suite("request_logs.rows", sample, _row_expectations(settings))
        gate.results["request_logs.rows"] = res
        gate.success &= ok
        gate.failed += failed
    return gate
