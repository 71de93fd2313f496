"""A child process that materializes assets for a shard range, so a test can kill or race it.

    python -m tests.reliability_worker ASSET[,ASSET...] FIRST_SHARD LAST_SHARD SHARD [SHARD...]

The SHARDs are every partition, in order. Settings and the state folder come from DATAWORTH_SETTINGS
and DATAWORTH_HOME, as in a real run; the Dagster instance is ephemeral. Exit status 0 on success.
"""

import sys

import dagster as dg

from pipelines.automation import RANGE_END, RANGE_START
from pipelines.definitions import valuation_job


def main(argv: list[str]) -> int:
    assets, first, last, *shards = argv
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", shards)
    result = valuation_job().execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey(a) for a in assets.split(",")],
        tags={RANGE_START: first, RANGE_END: last},
        raise_on_error=False,
    )
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
