#!/usr/bin/env bash
# Fresh machine -> a complete valuation of the embedded corpus, then how to open the UIs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deployments/setup.sh
.venv/bin/dataworth run
