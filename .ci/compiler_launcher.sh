#!/usr/bin/env bash
# usage: .ci/compiler_launcher.sh COMPILER ARGS...   (.ci/run's CMAKE_CXX_COMPILER_LAUNCHER)
#        .ci/compiler_launcher.sh SCCACHE-OPTION    (e.g. --show-stats, --stop-server)
#
# sccache (TRMATH_CI_SCCACHE) on COMPILER ARGS, with the directory of pip's isolated build
# environment replaced by a fixed symbolic link to it. pip makes a new environment under a new
# random name (.../pip-build-env-XXXXXXXX) for every build: the README's install and the
# integrations' `pip wheel .` compile the same sources against the same pybind11 headers, but
# the headers' path, which is in the compiler's arguments and in the preprocessed source (both
# of which sccache hashes), differed, so every object that includes them (the Python bindings,
# about 200 CPU-s at -O3) was compiled twice. The link is $SCCACHE_DIR/build-env; it is replaced
# by a rename, so the parallel compiles of one build never see it missing, and the two builds
# never run at the same time.
set -euo pipefail
link="${SCCACHE_DIR:?}/build-env"
args=()
for a in "$@"; do
  case $a in
    *pip-build-env-*)
      pre=${a%%pip-build-env-*}    # the flag, if glued (-I, -isystem), and the parent directory
      rest=${a#*pip-build-env-}
      name=${rest%%/*}
      flag=${pre%%/*}
      env="${pre#"$flag"}pip-build-env-$name"
      if [ "$(readlink "$link" 2>/dev/null || true)" != "$env" ]; then
        mkdir -p "$(dirname "$link")"
        ln -s "$env" "$link.$$"
        mv -T "$link.$$" "$link"
      fi
      a="$flag$link${rest#"$name"}"
      ;;
  esac
  args+=("$a")
done
exec "${TRMATH_CI_SCCACHE:?}" "${args[@]}"
