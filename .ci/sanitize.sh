#!/usr/bin/env bash
# The sanitizer checks of .ci/run on their own: the C++ core (generic instruction set) compiled
# with AddressSanitizer + UndefinedBehaviorSanitizer (.ci/sanitizer_flags.sh), a standalone C++
# driver of every entry point with leak detection on, then the kernel tests against a sanitized
# Python extension (.ci/sanitized_pytest.sh). Needs g++ and the environment's python with trmath's
# test requirements installed. About 10 minutes on 2 cores, most of it compiling the exact
# reductions' drivers (kernels_fwd.cpp, kernels_bwd.cpp), in two chains of about equal length.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/sanitizer_flags.sh
drv=$(mktemp -d)
trap 'rm -rf "$drv"' EXIT
python -c "import pybind11" 2>/dev/null || python -m pip install -q pybind11
(san_objects "$drv" cpp/src/kernels_fwd cpp/src/estimator_kernels cpp/src/project_kernels &&
  san_bindings "$drv" bind_estimators bind_project) &
pid=$!
san_objects "$drv" cpp/src/kernels_bwd cpp/tests/core_driver cpp/src/threadpool
san_bindings "$drv" module bind_exact bind_coarse dispatch bufpool
wait "$pid"
san_driver "$drv"
echo "sanitized C++ driver (leak check on): OK"
bash .ci/sanitized_pytest.sh "$drv"
