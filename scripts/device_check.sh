#!/usr/bin/env bash
# One GPU session: CUDA and transport tests, then BYTES (byte stream by stripe count),
# G1, G2 and a two-sided profile of the byte stream. Runs where torch+CUDA are
# preinstalled; batchferry is put on PYTHONPATH through a link tree (no install), with
# pure-Python extras (grpcio-health-checking, py-spy) from build/device-site when carried.
# Each step has its own time limit and writes under $OUT as it goes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}; mkdir -p "$out"
tree=$(mktemp -d); mkdir "$tree/batchferry"
for f in batchferry/*; do ln -s "$PWD/$f" "$tree/batchferry/"; done
for pair in server:server client:client benchmarks:benchmarks; do ln -s "$PWD/${pair%%:*}" "$tree/batchferry/${pair##*:}"; done
site="$PWD/build/device-site"
export PYTHONSAFEPATH=1 PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}:$site" PYTHONUNBUFFERED=1 \
  BATCHFERRY_BENCH_DATA=/tmp/bfdata PATH="$site/bin:$PATH"
log="$out/log.txt"
pre="import os; from pathlib import Path; out = Path(os.environ['OUT_DIR'])"
export OUT_DIR="$out"
{ nproc; df -h /dev/shm | tail -1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, grpc, google.protobuf as p; print('torch', torch.__version__, 'grpc', grpc.__version__, 'protobuf', p.__version__)"
} 2>&1 | tee -a "$log"
# A step whose limit is 0 is skipped (e.g. BYTES_S=0 PROFILE_S=0 for a shorter session).
step() {
  local limit=$1; shift
  [[ $limit == 0 ]] && return 0
  echo "== $*" | tee -a "$log"; timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -9
}
step "${TESTS_S:-120}" python3 -m pytest -p no:cacheprovider -q -rs -x \
  tests/test_cuda.py tests/test_receivers.py tests/test_groups.py tests/test_stripes.py tests/test_transports.py tests/test_stats.py
step "${BYTES_S:-110}" python3 -c "$pre; from batchferry.benchmarks.bytestream import main; main(reps=2, num_workers=8, out=out)"
step "${G1_S:-150}" python3 -c "$pre; from batchferry.benchmarks.gpu import main; main(worker_counts=(8,), out=out)"
step "${G2_S:-110}" python3 -c "$pre; from batchferry.benchmarks.offload import main; main(seconds=8, out=out)"
if [[ ${PROFILE_S:-60} != 0 ]]; then
  timeout "${PROFILE_S:-60}" python3 -m batchferry.cli bench PROFILE --streams 4 --seconds 10 --num-workers 8 --out "$out" \
    > "$out/profile.json" 2>&1
  tail -c 1200 "$out/profile.json"
fi
echo "segments left: $(ls /dev/shm | grep -c batchferry)" | tee -a "$log"
