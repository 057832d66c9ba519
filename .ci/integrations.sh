#!/usr/bin/env bash
# Trainer integrations: tests/integrations/test_trl.py with TRL and tests/integrations/test_verl.py
# with verl, each in its own virtual environment (.venv-trl, .venv-verl; ignored by git), because
# the two trainers pin different dependency sets. Runs from a clean clone; exits non-zero if
# either suite fails, collects no tests, or skips anything (TRMATH_REQUIRE_INTEGRATIONS=1 turns a
# missing trainer into an import error instead of a skip).
#
# Versions tested: TRL_VERSION (default 1.16.0), VERL_VERSION (default 0.9.1); torch is always
# pinned to 2.13.0 (the CPU build) through a constraints file, so no trainer dependency can pull
# another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
export TRMATH_REQUIRE_INTEGRATIONS=1
export HYPOTHESIS_PROFILE=ci
TRL_VERSION="${TRL_VERSION:-1.16.0}"
VERL_VERSION="${VERL_VERSION:-0.9.1}"
start=$(date +%s)

work="build/integrations"
mkdir -p "$work"
constraints="$work/constraints.txt"
echo "torch==2.13.0" > "$constraints"

# elapsed: seconds since this script started.
elapsed() { echo "$(( $(date +%s) - start )) s"; }

# The trainers' environments (torch and each trainer's dependencies, without trmath) are made
# while trmath's wheel builds in the background: the wheel's compile and pip's downloads and
# unpacking use different resources. trmath goes in once its wheel is there.
echo "== trmath wheel (built once, in its own build directory, in the background)"
rm -rf "$work/wheel"
# The pybind11 that the README install's build (build/<wheel tag>, when .ci/run made it) found,
# from its CMake cache: the wheel's build then compiles the bindings against the same headers at
# the same path, so that a compiler cache (.ci/run's sccache, which hashes that path) reuses
# them. Without it the wheel's isolated build environment finds its own copy of pybind11, under
# a new random path, and every binding compiles again (about 200 CPU-s).
same_pybind11=()
for cache in build/cp*/CMakeCache.txt; do
  [ -f "$cache" ] || continue
  dir=$(sed -n 's/^pybind11_DIR:PATH=//p' "$cache")
  if [ -n "$dir" ] && [ -d "$dir" ]; then
    same_pybind11=(-C "cmake.define.pybind11_DIR=$dir")
    echo "pybind11 of the install's build: $dir"
  fi
  break
done
python3 -m venv "$work/.venv-build"
"$work/.venv-build/bin/python" -m pip install -q -U pip
"$work/.venv-build/bin/python" -m pip wheel -q --no-deps -w "$work/wheel" \
  -C build-dir="$work/cmake" "${same_pybind11[@]}" . > "$work/wheel.log" 2>&1 &
wheel_pid=$!
trap 'kill "$wheel_pid" 2>/dev/null || true' EXIT

# make_venv DIR PACKAGES...: a fresh venv with torch==2.13.0 and PACKAGES. --no-compile: no
# bytecode for the thousands of modules of torch, transformers, ray, ... that the two test files
# never import (what they import is compiled when imported).
make_venv() {
  local dir=$1; shift
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/python" -m pip install -q -U pip
  "$dir/bin/python" -m pip install -q --no-compile -c "$constraints" torch==2.13.0 "$@"
}

echo "== environments: TRL $TRL_VERSION [$(elapsed)]"
make_venv .venv-trl "trl==$TRL_VERSION"
echo "== environments: verl $VERL_VERSION [$(elapsed)]"
# verl's full requirements pull Ray's dashboard, vLLM-side tooling, wandb, ...; its policy-loss
# registry (verl.trainer.ppo.core_algos), ActorConfig and the actor's loss function
# (verl.workers.utils.losses) need only these.
make_venv .venv-verl ray "tensordict>=0.8.0,<=0.10.0,!=0.9.0" omegaconf hydra-core \
  "transformers>=5.5.3,<5.11,!=5.6.0" "numpy>=2" packaging codetiming dill pandas datasets pillow
.venv-verl/bin/python -m pip install -q --no-compile --no-deps "verl==$VERL_VERSION"

echo "== waiting for the trmath wheel [$(elapsed)]"
set +e
wait "$wheel_pid"
wrc=$?
set -e
trap - EXIT
cat "$work/wheel.log"
[ "$wrc" -eq 0 ] || { echo "pip wheel failed (exit $wrc)"; exit 1; }
wheel=$(ls "$work"/wheel/trmath-*.whl)
echo "built $wheel [$(elapsed)]"
if [ -n "${CMAKE_CXX_COMPILER_LAUNCHER:-}" ]; then
  "$CMAKE_CXX_COMPILER_LAUNCHER" --show-stats 2>/dev/null | grep -E "^(Compile requests|Cache hits|Cache misses) " || true
fi

# run_suite DIR TESTFILE: pytest must pass, collect tests and skip none.
run_suite() {
  local dir=$1 test=$2 log
  log=$(mktemp)
  # The venv's pytest script, not `python -m pytest`: -m would put the checkout first on sys.path
  # and import its trmath/ (which has no compiled core) instead of the installed wheel; with
  # --import-mode=importlib (pyproject) pytest itself adds nothing to sys.path.
  set +e
  "$dir/bin/pytest" -rs -p no:cacheprovider "$test" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "FAILED: $test (pytest exit $rc; 5 means no tests were collected)"
    exit 1
  fi
  if grep -q "SKIPPED" "$log"; then
    echo "FAILED: $test skipped tests (see the summary above)"
    exit 1
  fi
  rm -f "$log"
}

echo "== TRL $TRL_VERSION [$(elapsed)]"
.venv-trl/bin/python -m pip install -q -c "$constraints" "${wheel}[test]"
(cd "$work" && ../../.venv-trl/bin/python -c "import trl, transformers, torch, trmath; print('trl', trl.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__, 'trmath', trmath.__file__)")
run_suite .venv-trl tests/integrations/test_trl.py

echo "== verl $VERL_VERSION [$(elapsed)]"
.venv-verl/bin/python -m pip install -q -c "$constraints" "${wheel}[test]"
(cd "$work" && ../../.venv-verl/bin/python -c "import verl, torch, trmath; print('verl', verl.__version__, 'torch', torch.__version__, 'trmath', trmath.__file__)")
run_suite .venv-verl tests/integrations/test_verl.py

echo "integrations finished in $(( $(date +%s) - start )) s"
