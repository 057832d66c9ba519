# Sourced by .ci/background_checks.sh, .ci/sanitize.sh and .ci/sanitized_pytest.sh: the flags of
# every AddressSanitizer + UndefinedBehaviorSanitizer object. The generic instruction set; -O1 (an
# instrumented -O3 build of the kernels takes far longer); -g1, line tables only (the reports
# keep file:line, without variable tracking's compile time); -fPIC, because the same objects go
# into the C++ driver and the sanitized Python extension. UBSan's object-size check is left out:
# it flags an access past the end of an object whose size the compiler can see, which ASan's
# shadow memory already catches (byte-exact, for every object), and it was the costliest UBSan
# check to compile here (the exact reductions' drivers, then one file, at -O1: 254 CPU-s with it
# alone, against 135 for alignment and 177 for pointer-overflow).
san=(-std=gnu++17 -O1 -g1 -fPIC -fsanitize=address,undefined -fno-sanitize=object-size
     -fno-sanitize-recover=all -fno-omit-frame-pointer -DTRMATH_ISA=generic -Icpp/include
     -Icpp/src -Wno-psabi)

# san_objects DIR PATHS...: compile each PATH.cpp (relative to the repository root) to
# DIR/<its base name>.o, one after another.
san_objects() {
  local dir=$1 f
  shift
  for f in "$@"; do
    g++ "${san[@]}" -c "$f.cpp" -o "$dir/$(basename "$f").o"
  done
}

# san_driver DIR: link the C++ driver of every entry point from the objects in DIR and run it
# with leak detection on (the interpreter's own allocations are out of scope in the pytest run).
san_driver() {
  local dir=$1
  local f objs=("$dir/core_driver.o")
  for f in $san_kernel_names; do objs+=("$dir/$f.o"); done
  g++ -fsanitize=address,undefined "${objs[@]}" -o "$dir/core_driver" -lpthread
  ASAN_OPTIONS=detect_leaks=1 "$dir/core_driver"
}

# san_bindings DIR [NAMES...]: the Python bindings NAMES (default: all, $san_binding_names),
# compiled with the same flags (about 20 s each at -O1) for the python on PATH (pybind11 must be
# importable there), to DIR/py_<name>.o.
san_bindings() {
  local dir=$1 f inc names
  shift
  names=${*:-$san_binding_names}
  inc=$(python -c "import pybind11, sysconfig; print('-I' + pybind11.get_include(), '-I' + sysconfig.get_paths()['include'])")
  for f in $names; do
    # shellcheck disable=SC2086  # $inc: two -I flags
    g++ "${san[@]}" $inc -fvisibility=hidden -c "cpp/src/$f.cpp" -o "$dir/py_$f.o"
  done
}
san_binding_names="module bind_exact bind_coarse bind_estimators bind_project dispatch bufpool"
# The kernel objects (cpp/src/<name>.cpp) of the driver and the extension.
san_kernel_names="kernels_fwd kernels_bwd project_kernels estimator_kernels threadpool"

# san_link DIR: the sanitized extension DIR/_core<suffix> from the bindings and kernel objects.
san_link() {
  local dir=$1 f suffix objs=()
  suffix=$(python -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  for f in $san_binding_names; do objs+=("$dir/py_$f.o"); done
  for f in $san_kernel_names; do objs+=("$dir/$f.o"); done
  for f in "${objs[@]}"; do [ -f "$f" ] || { echo "missing $f"; return 1; }; done
  g++ -shared -fsanitize=address,undefined "${objs[@]}" -o "$dir/_core$suffix" -lpthread
}
