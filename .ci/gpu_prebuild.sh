#!/usr/bin/env bash
# Compile, on a machine with nvcc and no GPU, everything of the CUDA build that does not depend on
# the Python version (the kernels for every instruction set, the CUDA sources, the thread pool),
# so that a GPU machine with another Python only compiles the bindings and links (about 15 s on
# 16 cores instead of several minutes): its device time then goes to the tests and benchmarks.
#   bash .ci/gpu_prebuild.sh DIR      (TRMATH_CUDA_ARCHS, default "90-real")
# then, on the GPU machine, from the repository root with DIR copied along:
#   PREBUILT=DIR bash .ci/gpu.sh [OUTDIR]
# The objects are built without link-time optimisation (its bytecode is tied to the compiler
# version); the CPU kernels are compiled as in the wheel, so the GPU tests compare against the
# same CPU results.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash .ci/gpu_prebuild.sh DIR}
py=${PYTHON:-python3}
bld=build-gpu-objects
cmake -S . -B "$bld" -G Ninja -DTRMATH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${TRMATH_CUDA_ARCHS:-90-real}" \
  -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $py)" > /dev/null
targets=$(ninja -C "$bld" -t targets all | cut -d: -f1 | grep -E '\.o$' |
          grep -E 'trmath_kern_|cuda_(exact|topk|project)\.cu\.o|(threadpool|dispatch)\.cpp\.o')
mkdir -p "$out/obj"
# the kernels and CUDA sources in one (parallel) ninja call; the module's own sources carry -flto in
# their flags, so the thread pool and dispatch are compiled by hand without it
ninja -C "$bld" $(echo "$targets" | grep -v -E '(threadpool|dispatch)\.cpp\.o') > /dev/null
for t in $targets; do
  case "$t" in
    *threadpool.cpp.o|*dispatch.cpp.o)
      (cd "$bld" && eval "$(ninja -t commands "$t" | tail -1 | sed 's/-flto=auto//; s/-fno-fat-lto-objects//')") ;;
  esac
  # unique names: the kernels are compiled once per instruction set
  name=$(echo "$t" | sed 's|CMakeFiles/||; s|\.dir/cpp/src/|_|; s|/|_|g')
  cp "$bld/$t" "$out/obj/$name"
done
# The defines the bindings are compiled with (which instruction sets were built, CUDA on).
ninja -C "$bld" -t commands CMakeFiles/_core.dir/cpp/src/module.cpp.o | tail -1 |
  grep -o -- '-DTRMATH_[A-Z0-9_]*=[0-9]*' | sort -u | tr '\n' ' ' > "$out/defines.txt"
cat > "$out/link.sh" <<'LINK'
#!/usr/bin/env bash
# Compile the Python-facing sources against this machine's python3 and link them with the
# prebuilt objects beside this script into trmath/_core<suffix> (run from the repository root).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
cuda=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
inc=$cuda/targets/x86_64-linux/include
[ -d "$inc" ] || inc=$cuda/include
pyinc=$($py -c "import sysconfig; print(sysconfig.get_paths()['include'])")
pbinc=$($py -c "import pybind11; print(pybind11.get_include())")
suffix=$($py -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
defs="$(cat "$here/defines.txt") -D_core_EXPORTS"
tmp=$(mktemp -d)
ls cpp/src/module.cpp cpp/src/bind_*.cpp cpp/src/bufpool.cpp | xargs -P "$(nproc)" -I{} sh -c \
  "c++ $defs -Icpp/include -Icpp/src -isystem $pyinc -isystem $pbinc -isystem $inc -O2 -DNDEBUG -std=gnu++17 \
   -fPIC -fvisibility=hidden -fno-math-errno -ffp-contract=fast -fno-trapping-math -w -c {} -o $tmp/\$(basename {}).o"
c++ -shared -o "trmath/_core$suffix" "$tmp"/*.o "$here"/obj/*.o "$(find "$cuda" -name libcudart_static.a | head -1)" \
  -ldl -lrt -lpthread
rm -rf "$tmp"
echo "linked trmath/_core$suffix"
LINK
chmod +x "$out/link.sh"
echo "prebuilt objects in $out ($(ls "$out/obj" | wc -l) files, $(du -sh "$out" | cut -f1)); defines: $(cat "$out/defines.txt")"
