"""Blocking asset checks: every table's pandera schema, on the rows the step just wrote.

Each asset declares `schema_spec(name)` and returns `schema_result(...)` with its materialization;
the check runs in the asset's own step (one process spawn, not two) and, being blocking, a failure
stops every downstream asset of the run. A graph-backed asset yields them from its last op, whose
outputs `check_outputs` names.
"""

import dagster as dg
import polars as pl

from resources.delta import DeltaStore
from resources.schemas import validate


def schema_spec(table: str, asset: str | None = None) -> dg.AssetCheckSpec:
    """The check of `table`, attached to `asset` (the asset of the same name by default)."""
    return dg.AssetCheckSpec(
        f"{table}_schema", asset=asset or table, blocking=True, description=f"pandera schema of the {table} Delta table"
    )


def schema_result(
    delta: DeltaStore, table: str, where: dict[str, str | list[str]] | None = None
) -> dg.AssetCheckResult:
    """Re-read what was written (rows matching `where`) and validate it against the table's schema."""
    frame: pl.DataFrame = delta.read(table, where=where)
    failures = validate(table, frame)
    return dg.AssetCheckResult(
        check_name=f"{table}_schema",
        passed=not failures,
        metadata={
            "rows_checked": frame.height,
            "failures": dg.MetadataValue.md("\n".join(f"- {f}" for f in failures) or "none"),
        },
    )


def check_outputs(asset: str, checks: list[dg.AssetCheckSpec]) -> list[str]:
    """The output names a graph-backed `asset`'s last op gives the results of `checks` (Dagster's naming)."""
    return [f"{asset}_{check.name}" for check in checks]
