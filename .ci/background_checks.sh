#!/usr/bin/env bash
# usage: .ci/background_checks.sh DIR
#
# The compile-heavy checks of .ci/run. .ci/run starts this script at the lowest CPU priority
# (nice 19) beside its main steps (install, tests, demo, documentation, integrations), so that it
# runs on the CPU time those leave idle (pip's downloads and unpacking, single-threaded builds,
# test collection) instead of after them. In order:
#   1. two chains of compiles at once, of about equal length (about 500 CPU-s each here), so
#      that neither core waits for the other at the end: the AddressSanitizer +
#      UndefinedBehaviorSanitizer objects of the forward drivers of the exact reductions (the
#      longest compile, ~360 CPU-s), the estimators, the projections and two of the Python
#      bindings; and those of the backward drivers (~230 CPU-s), nvcc on the CUDA sources, a
#      syntax check of their bindings, the C++ driver, the thread pool, the other bindings and
#      the ThreadSanitizer stress test;
#   2. the C++ driver of every entry point (leak check on) and the thread-pool stress test;
#   3. once DIR/go exists (.ci/run creates it when it has finished installing into its
#      environment), the kernel tests against the sanitized extension (.ci/sanitized_pytest.sh).
# Objects, logs and reports go to DIR. Stops at the first failure, with a non-zero exit status.
# Each step prints the seconds since CI_START (seconds since the epoch; default: now).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(cd "${1:?usage: .ci/background_checks.sh DIR}" && pwd)
t0=${CI_START:-$(date +%s)}
say() { echo "-- [$(( $(date +%s) - t0 )) s] $*"; }
. .ci/sanitizer_flags.sh

# Started as a session leader (setsid, as .ci/run does): lower the weight of this session's
# scheduler autogroup too, else the session as a whole gets an equal share of the CPU beside
# the others whatever its nice value.
if [ "$(ps -o sid= -p $$ | tr -d ' ')" = "$$" ] && [ -w /proc/self/autogroup ]; then
  echo 19 > /proc/self/autogroup 2>/dev/null || true
fi
say "start (nice $(nice); $(cat /proc/self/autogroup 2>/dev/null || echo "no autogroup"))"
(san_objects "$dir" cpp/src/kernels_fwd cpp/src/estimator_kernels cpp/src/project_kernels &&
  san_bindings "$dir" bind_estimators bind_project) > "$dir/chain.log" 2>&1 &
chain_pid=$!
trap 'kill "$chain_pid" 2>/dev/null || true' EXIT
san_objects "$dir" cpp/src/kernels_bwd

# nvcc, one architecture, sm_80: the sources' only architecture branches are __CUDA_ARCH__ >= 800,
# so sm_90 (also in the CMake build's default list) compiles the same code, and sm_80 has the
# smaller shared-memory limit.
command -v nvcc >/dev/null || { echo "nvcc not found: the CUDA sources cannot be checked"; exit 1; }
for f in cuda_exact cuda_topk cuda_project; do
  nvcc -std=c++17 --expt-relaxed-constexpr -O3 -Icpp/include -Icpp/src \
    -gencode arch=compute_80,code=sm_80 -c "cpp/src/$f.cu" -o "$dir/$f.cu.o"
done
# shellcheck disable=SC2046  # two -I flags
g++ -std=gnu++17 -fsyntax-only -Wall -Wextra -Icpp/include -Icpp/src \
  $(python -c "import pybind11, sysconfig; print('-I' + pybind11.get_include(), '-I' + sysconfig.get_paths()['include'])") \
  cpp/src/bind_cuda.cpp
say "nvcc: ok (cuda_exact, cuda_topk, cuda_project; bind_cuda.cpp syntax)"
san_objects "$dir" cpp/tests/core_driver cpp/src/threadpool
san_bindings "$dir" module bind_exact bind_coarse dispatch bufpool
g++ -std=gnu++17 -O1 -g1 -fsanitize=thread -Icpp/include -Icpp/src cpp/tests/pool_stress.cpp \
  cpp/src/threadpool.cpp -o "$dir/pool_stress" -lpthread
say "sanitizer objects: backward drivers, C++ driver, thread pool, five bindings: ok"

set +e
wait "$chain_pid"
crc=$?
set -e
trap - EXIT
cat "$dir/chain.log"
[ "$crc" -eq 0 ] || { echo "the other chain of sanitizer objects failed (exit $crc)"; exit 1; }
say "sanitizer objects: forward drivers, estimators, projections, two bindings: ok"
san_link "$dir"
say "sanitized Python extension: linked"

say "AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer: C++ driver of every entry point"
san_driver "$dir"
say "ThreadSanitizer: the thread pool under short, sleeping-worker and concurrent jobs"
"$dir/pool_stress"

say "waiting until the environment is no longer being installed into"
while [ ! -e "$dir/go" ]; do sleep 2; done
say "AddressSanitizer + UndefinedBehaviorSanitizer: the kernel tests against a sanitized extension"
bash .ci/sanitized_pytest.sh "$dir"
say "done"
