"""A child process that materializes assets for a shard range and kills itself with SIGKILL right after the
first Delta commit of `influence_scores` to `influence_scores` or `valuation_provenance`: the moment between
the two commits of a valuation.

    python -m tests.reliability_kill_worker ASSET[,ASSET...] FIRST_SHARD LAST_SHARD SHARD [SHARD...]
"""

import os
import signal
import sys

from resources.delta import DeltaStore
from tests.reliability_worker import main

VALUATION_TABLES = ("influence_scores", "valuation_provenance")


def die_after_the_first_valuation_commit() -> None:
    write = DeltaStore.write

    def write_then_die(self, name, *args, **kwargs):
        version = write(self, name, *args, **kwargs)
        if name in VALUATION_TABLES:
            os.kill(os.getpid(), signal.SIGKILL)
        return version

    DeltaStore.write = write_then_die


if __name__ == "__main__":
    die_after_the_first_valuation_commit()
    sys.exit(main(sys.argv[1:]))
