#!/usr/bin/env bash
# One GPU session: CUDA, transport, parity and replica tests, then G1 and SCALE. Runs
# where torch+CUDA are preinstalled; batchferry is put on PYTHONPATH through a link
# tree (no install), with pure-Python extras from build/device-site when carried there.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/out}; mkdir -p "$out"
tree=$(mktemp -d); mkdir "$tree/batchferry"
for f in batchferry/*; do ln -s "$PWD/$f" "$tree/batchferry/"; done
for pair in server:server client:client benchmarks:benchmarks; do ln -s "$PWD/${pair%%:*}" "$tree/batchferry/${pair##*:}"; done
site="$PWD/build/device-site"
export PYTHONSAFEPATH=1 PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}:$site" PYTHONUNBUFFERED=1 BATCHFERRY_BENCH_DATA=/tmp/bfdata
df -h /dev/shm | tail -1 | tee "$out/shm.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, grpc, google.protobuf as p; print('torch', torch.__version__, 'grpc', grpc.__version__, 'protobuf', p.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -p no:cacheprovider -q -rs tests/test_cuda.py tests/test_transports.py tests/test_parity.py tests/test_replicas.py 2>&1 | tee "$out/cuda_tests.txt" | tail -15
timeout 200 python3 -c "from batchferry.benchmarks.gpu import main; from pathlib import Path; main(out=Path('$out'))" 2>&1 | tee "$out/g1.txt" | tail -12
if [ "${SCALE:-1}" = 1 ]; then
  timeout 200 python3 -c "from batchferry.benchmarks.replicas import main; from pathlib import Path; main(reps=1, num_workers=12, replicas=3, out=Path('$out'))" 2>&1 | tee "$out/scale.txt" | tail -6
fi
ls /dev/shm | grep -c batchferry || true
