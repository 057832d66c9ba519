#!/usr/bin/env bash
# usage: .ci/sanitized_pytest.sh DIR
#
# The tests that drive the C++ core, run against an AddressSanitizer + UndefinedBehaviorSanitizer
# build of it. DIR holds the sanitized kernel objects kernels.o, project_kernels.o,
# estimator_kernels.o and threadpool.o, compiled with the flags of .ci/sanitizer_flags.sh (as
# .ci/background_checks.sh and .ci/sanitize.sh do). Unless DIR already holds the sanitized
# extension DIR/_core.so, this script links it (compiling the Python bindings the same way if
# DIR lacks them); it then runs pytest with the sanitizer runtime preloaded, in two processes
# over two halves of the test files. The extension holds the generic kernels only (the AVX2 and
# AVX-512 builds are the same sources with wider lanes; the other tests run those). Any report
# fails the run: halt_on_error, and the reports go to files (a report on stderr is lost when the
# process aborts under pytest's output capture), which are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
drv=$(cd "$1" && pwd)
py=$(command -v python)
suffix=$("$py" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
. .ci/sanitizer_flags.sh
if [ ! -f "$drv/_core$suffix" ]; then
  "$py" -c "import pybind11" 2>/dev/null || "$py" -m pip install -q pybind11
  [ -f "$drv/py_module.o" ] || san_bindings "$drv"
  san_link "$drv"
fi

# A package tree that holds the sanitized extension (the editable install points elsewhere).
stage="$drv/stage"
rm -rf "$stage"
mkdir -p "$stage/pkg" "$stage/reports"
cp -r trmath "$stage/pkg/"
rm -f "$stage/pkg/trmath/"_core*.so
cp "$drv/_core$suffix" "$stage/pkg/trmath/"

# Only the test cases that reach the compiled core (tests/conftest.py).
export TRMATH_TESTS_CORE_ONLY=1
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:detect_odr_violation=0:log_path=$stage/reports/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$stage/reports/ubsan"
# The sanitizer runtime first, then libstdc++: python itself does not link libstdc++, and an
# ASan runtime preloaded without it cannot resolve the real __cxa_throw, so the first C++
# exception (every invalid-input test throws one) stops the process with "CHECK failed:
# asan_interceptors.cpp ... real___cxa_throw".
preload="$(gcc -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# run_half LOG FILES...: pytest on FILES without the editable install's import hook (no site
# processing, -S), the staged package first on the path, then the environment's packages.
run_half() {
  local log=$1; shift
  (cd "$stage" && LD_PRELOAD="$preload" "$py" -S -c "
import sys; sys.path[:0] = ['$stage/pkg', '$root/tests']; sys.path.append('$site')
import trmath, trmath._backend as b
assert trmath.__file__.startswith('$stage'), trmath.__file__
print('sanitized core:', b.isa(), trmath.__file__)
import pytest
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--rootdir', '$root', '-c', '$root/pyproject.toml',
                      '-m', 'not slow', *sys.argv[1:]]))
" "$@") > "$log" 2>&1
}
t="$root/tests"
run_half "$stage/a.log" "$t/test_exact_grad.py" "$t/test_exact_errors.py" "$t/test_coarse.py" \
  "$t/test_coarse_errors.py" &
pid_a=$!
set +e
run_half "$stage/b.log" "$t/test_exact_backends.py" "$t/test_coarse_topk.py" "$t/test_estimators.py" \
  "$t/test_projections.py" "$t/test_buffer_cache.py" "$t/test_objectives.py"
rc_b=$?
wait "$pid_a"
rc_a=$?
set -e
cat "$stage/a.log" "$stage/b.log"
reports=$(ls "$stage/reports")
if [ -n "$reports" ]; then
  for r in "$stage"/reports/*; do echo "== $r"; cat "$r"; done
  echo "sanitizer reports (above)"
  exit 1
fi
if [ "$rc_a" -ne 0 ] || [ "$rc_b" -ne 0 ]; then
  echo "sanitized pytest failed (exit $rc_a, $rc_b)"
  exit 1
fi
echo "sanitized pytest: ok (no reports)"
