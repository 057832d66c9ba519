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
g++ "${san[@]}" -c cpp/src/kernels.cpp -o "$drv/kernels.o" &
pid=$!
for f in cpp/tests/core_driver cpp/src/project_kernels cpp/src/estimator_kernels cpp/src/threadpool; do
  g++ "${san[@]}" -c "$f.cpp" -o "$drv/$(basename "$f").o"
done
wait "$pid"
g++ -fsanitize=address,undefined "$drv/core_driver.o" "$drv/kernels.o" "$drv/project_kernels.o" \
  "$drv/estimator_kernels.o" "$drv/threadpool.o" -o "$drv/core_driver" -lpthread
# Leak check of the core on its own (the interpreter's own allocations are out of scope in the
# pytest run).
ASAN_OPTIONS=detect_leaks=1 "$drv/core_driver"
echo "sanitized C++ driver (leak check on): OK"
bash .ci/sanitized_pytest.sh "$drv"
