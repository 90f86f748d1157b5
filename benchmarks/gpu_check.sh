#!/usr/bin/env bash
# The GPU checks of a device session: the test suite on CUDA (every device-parametrised test runs
# on "cuda" too), then the benchmark suite with --device cuda, one round. Run from the repository
# root on a machine with a GPU:
#
#     bash benchmarks/gpu_check.sh OUT_DIR
#
# Environment: TESTS (default: tests), TEST_WORKERS (6), TEST_TIMEOUT (240 s), BENCH_ONLY
# (train,inference,scaling), BENCH_TIMEOUT (seconds per part, 330). Logs and an archive
# of benchmarks/results/*_cuda.* land in OUT_DIR, the archive refreshed after each part; `python
# benchmarks/report.py` then rewrites the tables and plots from the CSVs.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

# shellcheck disable=SC2086  # TESTS may name several paths
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-6}" \
    ${TESTS:-tests} >"$out/tests.log" 2>&1
echo "tests: exit $?"
tail -n 15 "$out/tests.log"

bench_only=${BENCH_ONLY:-train,inference,scaling}
for part in ${bench_only//,/ }; do
    timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/run_all.py --device cuda --rounds 1 \
        --no-report --only "$part" >>"$out/bench.log" 2>&1
    echo "benchmarks $part: exit $?"
    tar czf "$out/results_cuda.tgz" benchmarks/results/*_cuda.*
done
tail -n 5 "$out/bench.log"
