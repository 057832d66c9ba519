#!/usr/bin/env bash
# Build the C++ core with AddressSanitizer + UndefinedBehaviorSanitizer and run the tests that
# exercise it on odd shapes, strides, dtypes, threads and gradients (the mpmath accuracy sweeps
# add no new code paths and run in the main test step) against that build, plus a standalone
# C++ driver of every entry point with leak detection on.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py=$(command -v python)
"$py" -m pip install -q pybind11 ninja cmake
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTRMATH_SANITIZE=address,undefined \
  -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$py" >/dev/null
cmake --build build/asan -j 2 >/dev/null

# A package tree that holds the sanitized extension (the editable install points elsewhere).
mkdir -p "$stage/pkg"
cp -r trmath "$stage/pkg/"
rm -f "$stage/pkg/trmath/"_core*.so
cp build/asan/_core*.so "$stage/pkg/trmath/"

libasan=$(gcc -print-file-name=libasan.so)
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# Run without the editable install's import hook: no site processing (-S), the staged package
# first on the path, then the environment's packages.
(
  cd "$stage"
  LD_PRELOAD="$libasan" "$py" -S -c "
import sys; sys.path[:0] = ['$stage/pkg', '$root/tests']; sys.path.append('$site')
import trmath, trmath._backend as b
assert trmath.__file__.startswith('$stage'), trmath.__file__
print('sanitized core:', b.isa())
import pytest
sys.exit(pytest.main(['-q', '-x', '-p', 'no:cacheprovider', '--rootdir', '$root', '-c', '$root/pyproject.toml',
                      '-m', 'not slow', '$root/tests/test_exact_backends.py', '$root/tests/test_exact_errors.py',
                      '$root/tests/test_exact_grad.py']))
"
)
echo "sanitized pytest run: OK"

# Leak check of the core on its own (the interpreter's own allocations are out of scope there).
g++ -std=gnu++17 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
  -DTRMATH_ISA=generic -Icpp/include -Icpp/src cpp/tests/core_driver.cpp cpp/src/kernels.cpp \
  cpp/src/threadpool.cpp -o "$stage/core_driver" -lpthread -Wno-psabi
ASAN_OPTIONS=detect_leaks=1 "$stage/core_driver"
echo "sanitized C++ driver (leak check on): OK"
