#!/usr/bin/env bash
# The sanitizer checks of .ci/run on their own: the C++ core (generic instruction set) compiled
# with AddressSanitizer + UndefinedBehaviorSanitizer (.ci/sanitizer_flags.sh), a standalone C++
# driver of every entry point with leak detection on, then the kernel tests against a sanitized
# Python extension (.ci/sanitized_pytest.sh). Needs g++ and the environment's python with trmath's
# test requirements installed. About 15 minutes on 2 cores, most of it compiling kernels.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
. .ci/sanitizer_flags.sh
drv=$(mktemp -d)
trap 'rm -rf "$drv"' EXIT
san_objects "$drv" cpp/src/kernels &
pid=$!
san_objects "$drv" cpp/tests/core_driver cpp/src/project_kernels cpp/src/estimator_kernels \
  cpp/src/threadpool
python -c "import pybind11" 2>/dev/null || python -m pip install -q pybind11
san_bindings "$drv"
wait "$pid"
san_driver "$drv"
echo "sanitized C++ driver (leak check on): OK"
bash .ci/sanitized_pytest.sh "$drv"
