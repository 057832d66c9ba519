#!/usr/bin/env bash
# Build the extension with the CUDA kernels and run the GPU tests and the GPU benchmark.
# For a machine with an NVIDIA GPU, nvcc, CMake, ninja, pybind11 and torch (CUDA build); not part
# of .ci/run, which has no GPU (it only compiles the CUDA sources). Usage:
#   bash .ci/gpu.sh [OUTDIR]     (architectures: TRMATH_CUDA_ARCHS, default "90-real";
#                                 PREBUILT=DIR links the objects .ci/gpu_prebuild.sh made instead
#                                 of building;
#                                 NCU=1 adds an Nsight Compute profile of the kl span kernel;
#                                 BENCH_ARGS are passed to benchmarks/bench_cuda.py; BENCH=0
#                                 skips the benchmark, BUILT=1 the build)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
bld=build-gpu
start=$(date +%s)
if [ -n "${PREBUILT:-}" ]; then
  bash "$PREBUILT/link.sh" > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  echo "link: $(( $(date +%s) - start )) s"
  BUILT=1
else
  cmake -S . -B "$bld" -G Ninja -DTRMATH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${TRMATH_CUDA_ARCHS:-90-real}" \
    -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $py)" > "$out/cmake.log"
  if [ "${BUILT:-0}" != 1 ]; then
    ninja -C "$bld" > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
  fi
  echo "build: $(( $(date +%s) - start )) s"
  cp "$bld"/_core*.so trmath/
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$py -c "import trmath, trmath._backend as b; print('kernels:', b.has_cuda(), b.cuda_device_name())"
set +e
$py -m pytest tests/test_cuda.py tests/test_cuda_project.py -q --maxfail=30 -n ${PYTEST_WORKERS:-12} -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -25
rc_t=${PIPESTATUS[0]}
rc_b=0
if [ "${BENCH:-1}" != 0 ]; then
  $py benchmarks/bench_cuda.py --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -60
  rc_b=${PIPESTATUS[0]}
fi
if [ -n "${NCU:-}" ] && command -v ncu >/dev/null; then
  # Nsight Compute on the first-pass span kernel of float32 kl at N=256, V=151936 (NCU=1).
  ncu --clock-control none --kernel-name regex:pair_span_kernel --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section InstructionStats \
    $py -c "import torch, trmath
z = 2 * torch.randn(256, 151936, device='cuda'); w = z + 0.3 * torch.randn_like(z)
for _ in range(4): trmath.kl(z, w, validate=False)
torch.cuda.synchronize()" > "$out/ncu.txt" 2>&1
  tail -80 "$out/ncu.txt"
fi
echo "tests rc=$rc_t bench rc=$rc_b"
exit $(( rc_t || rc_b ))
