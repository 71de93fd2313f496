"""What every asset's Delta commit carries: the Dagster run, the asset's code version, the upstream versions."""

import dagster as dg

from resources.delta import DeltaStore, run_metadata


def commit_metadata(context: dg.AssetExecutionContext, upstream: dict[str, int | None]) -> dict[str, str]:
    """Dagster run id, this asset's code version and the upstream table versions it read."""
    code_version = context.assets_def.code_versions_by_key.get(context.asset_key) or ""
    return run_metadata(context.run_id, code_version, upstream)


def upstream_versions(delta: DeltaStore, *tables: str) -> dict[str, int | None]:
    """The latest version of each table, read once so every later read can be pinned to it."""
    return {t: delta.version(t) for t in tables}
