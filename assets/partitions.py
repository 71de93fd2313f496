"""The shard partitions of the partitioned assets, and how a range of them runs."""

import dagster as dg

shard_partitions = dg.DynamicPartitionsDefinition(name="shards")
SINGLE_RUN = dg.BackfillPolicy.single_run()  # a range of shards is one step, one model load
