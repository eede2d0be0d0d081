#!/usr/bin/env bash
# Liger-Kernel's own DPO test suite (test/chunked_loss/test_dpo_loss.py of its sdist) against
# robalign's fused loss, through the stand-in package tests/peer/liger_shim (Liger's DPO interface
# over robalign.FusedLinearDoRALoss). Needs the network once for the sdist (pip download).
#   bash tests/peer/run_liger_suite.sh [pytest args]        (from the repository root)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
VERSION=${LIGER_VERSION:-0.8.5}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: "liger-kernel==$VERSION" -d "$WORK" 2>/dev/null
tar xzf "$WORK"/liger_kernel-"$VERSION".tar.gz -C "$WORK"
cd "$WORK/liger_kernel-$VERSION"
rm -f test/conftest.py             # Liger's GPU fixtures; the DPO tests need none
PYTHONPATH="$ROOT/tests/peer/liger_shim:$PWD" "$PY" -m pytest test/chunked_loss/test_dpo_loss.py -p no:cacheprovider \
    -o addopts="" -q "$@"
