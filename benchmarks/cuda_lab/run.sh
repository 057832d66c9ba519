#!/usr/bin/env bash
# trmath CUDA lab: builds the lab once per knob setting (in parallel), runs each build in turn,
# and summarises. See benchmarks/cuda_lab/README.md.
#
#   bash benchmarks/cuda_lab/run.sh OUTDIR          (NCU=1 to add Nsight Compute reports)
#
# Env: NCU=1, LAB_ARGS="--n 256 --v 151936" (passed to every run), LAB_BUILD (build folder,
# default /tmp/trmath_cuda_lab), ARCH (default 90), VARIANTS (space-separated subset).
set -u
OUT=${1:?usage: run.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
B=${LAB_BUILD:-/tmp/trmath_cuda_lab}
mkdir -p "$B"
ARCH=${ARCH:-90}
LAB_ARGS=${LAB_ARGS:-}
T0=$(date +%s)

# name -> extra nvcc flags
declare -A FLAGS=(
  [base]=""
  [sync]="-DTRMATH_CUDA_ASYNC=0"
  [as16]="-DTRMATH_CUDA_ASYNC16=4"
  [as2]="-DTRMATH_CUDA_ASYNC=2"
  [as3]="-DTRMATH_CUDA_ASYNC=3"
  [as5]="-DTRMATH_CUDA_ASYNC=5"
  [as3mb4]="-DTRMATH_CUDA_ASYNC=3 -DTRMATH_CUDA_SPAN_MINBLOCKS=4"
  [nolean]="-DTRMATH_CUDA_FIRST_LEAN=0"
  [sync_nolean]="-DTRMATH_CUDA_ASYNC=0 -DTRMATH_CUDA_FIRST_LEAN=0"
  [mb2]="-DTRMATH_CUDA_SPAN_MINBLOCKS=2"
  [orig]="-DTRMATH_LAB_SRC=\"orig/cpp/src/cuda_exact.cu\""
  [pf2]="-DTRMATH_CUDA_ASYNC=0 -DTRMATH_CUDA_PREFETCH=2"
  [pf3]="-DTRMATH_CUDA_ASYNC=0 -DTRMATH_CUDA_PREFETCH=3"
  [mb4]="-DTRMATH_CUDA_SPAN_MINBLOCKS=4"
  [pf2mb4]="-DTRMATH_CUDA_ASYNC=0 -DTRMATH_CUDA_PREFETCH=2 -DTRMATH_CUDA_SPAN_MINBLOCKS=4"
  [pf2mb2]="-DTRMATH_CUDA_ASYNC=0 -DTRMATH_CUDA_PREFETCH=2 -DTRMATH_CUDA_SPAN_MINBLOCKS=2"
  [span16k]="-DTRMATH_CUDA_SPAN=16384"
  [span64k]="-DTRMATH_CUDA_SPAN=65536"
  [noterms]="-DTRMATH_CUDA_LAB_NOTERMS"
  [noterms_pf2]="-DTRMATH_CUDA_LAB_NOTERMS -DTRMATH_CUDA_ASYNC=0 -DTRMATH_CUDA_PREFETCH=2"
  [noterms_sync]="-DTRMATH_CUDA_LAB_NOTERMS -DTRMATH_CUDA_ASYNC=0"
)
ORDER=(base sync as16 as2 as3 as5 as3mb4 nolean sync_nolean orig pf2 pf3 mb4 pf2mb4 mb2 pf2mb2 span16k span64k noterms noterms_sync noterms_pf2)
if [ -n "${VARIANTS:-}" ]; then read -r -a ORDER <<<"$VARIANTS"; fi
# Variants whose results must equal base's bit for bit (same reduction tree, all terms).
SAME="base sync as16 as2 as3 as5 as3mb4 nolean sync_nolean pf2 pf3 mb4 pf2mb4 mb2 pf2mb2"

NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "run.sh: nvcc not found" >&2; exit 1; }
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null) $(git diff --quiet cpp/src/cuda_exact.cu 2>/dev/null || echo '(cuda_exact.cu modified)')" | tee "$OUT/info.txt"
"$NVCC" --version | tail -1 | tee -a "$OUT/info.txt"
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,memory.total --format=csv,noheader 2>/dev/null | tee -a "$OUT/info.txt"

# ---- build, in parallel
echo "== building ${ORDER[*]} (sm_$ARCH)"
declare -A PID
for v in "${ORDER[@]}"; do
  [ -n "${FLAGS[$v]+x}" ] || { echo "unknown variant $v" >&2; continue; }
  if [ "$v" = orig ] && [ ! -f benchmarks/cuda_lab/orig/cpp/src/cuda_exact.cu ]; then
    echo "orig: no benchmarks/cuda_lab/orig/cpp (git archive <commit> cpp | tar -x -C benchmarks/cuda_lab/orig)"; continue
  fi
  # shellcheck disable=SC2086
  "$NVCC" -std=c++17 --expt-relaxed-constexpr -O3 -Icpp/include -Icpp/src \
    -gencode arch=compute_$ARCH,code=sm_$ARCH -Xptxas -v ${FLAGS[$v]} \
    benchmarks/cuda_lab/lab.cu -o "$B/lab_$v" >"$OUT/$v.ptxas.txt" 2>&1 &
  PID[$v]=$!
done
BUILT=()
for v in "${ORDER[@]}"; do
  [ -n "${PID[$v]+x}" ] || continue
  if wait "${PID[$v]}"; then BUILT+=("$v"); else echo "build of $v FAILED (see $OUT/$v.ptxas.txt)"; tail -5 "$OUT/$v.ptxas.txt"; fi
done
echo "== built ${BUILT[*]} in $(( $(date +%s) - T0 )) s"

# ---- registers and spills of the span kernels, per variant (from ptxas -v)
python3 - "$OUT" "${BUILT[@]}" >"$OUT/ptxas_summary.txt" <<'EOF'
import re, shutil, subprocess, sys
out, variants = sys.argv[1], sys.argv[2:]
want = re.compile(r"(pair_span_kernel|single_span_kernel|pair_full_span_kernel|read_once_kernel)<(float|bf16s)")
filt = shutil.which("cu++filt") or shutil.which("c++filt")
print("stack/spill_*: the entry's own (bytes); [callee ...]: spills of a non-inlined callee in it")
for v in variants:
    info, cur, pend = {}, None, None
    for line in open(f"{out}/{v}.ptxas.txt", errors="replace"):
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur, pend = m.group(1), None
            info[cur] = {"callee": ""}
            continue
        if cur is None: continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            pend = m.group(1); continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            if pend == cur: info[cur].update(stack=m.group(1), st=m.group(2), ld=m.group(3))
            elif m.group(2) != "0" or m.group(3) != "0":
                info[cur]["callee"] += f" [callee {re.sub(r'.*_cu_[0-9a-f]+', '', pend)[:24]}: st={m.group(2)} ld={m.group(3)}]"
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m: info[cur]["regs"] = m.group(1)
    names = list(info)
    dm = names
    if filt:
        dm = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    for raw, d in sorted(zip(names, dm), key=lambda x: x[1]):
        d = re.sub(r"trmath::cuda::(\(anonymous namespace\)::|lab::|common::)?", "", d).replace("void ", "").split("(")[0]
        if not want.search(d): continue
        i = info[raw]
        print(f"{v:12s} {d:36s} regs={i.get('regs')} stack={i.get('stack')} spill_st={i.get('st')} spill_ld={i.get('ld')}{i['callee']}")
EOF
cat "$OUT/ptxas_summary.txt"

# ---- run, one build at a time
CSV="$OUT/lab.csv"
: >"$CSV"
for v in "${BUILT[@]}"; do
  echo "== run $v"
  # shellcheck disable=SC2086
  timeout 120 "$B/lab_$v" "$v" $LAB_ARGS 2>&1 | tee -a "$CSV"
done

# ---- Nsight Compute: pair_span_kernel<float, kl>, the first launch after the warm-up
if [ "${NCU:-0}" = "1" ] && command -v ncu >/dev/null; then
  for v in ${NCU_VARIANTS:-base}; do
    [ -x "$B/lab_$v" ] || continue
    echo "== ncu $v"
    # shellcheck disable=SC2086
    timeout 150 ncu --clock-control none -k regex:pair_span_kernel --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section SchedulerStats \
      "$B/lab_$v" "$v" --only kl:f32 --iters 1 $LAB_ARGS >"$OUT/ncu_$v.txt" 2>&1
    echo "ncu $v rc=$? -> $OUT/ncu_$v.txt"
  done
elif [ "${NCU:-0}" = "1" ]; then
  echo "== ncu not found; skipped"
fi

# ---- summary
python3 - "$CSV" "$SAME" <<'EOF' | tee "$OUT/summary.txt"
import sys
path, same = sys.argv[1], sys.argv[2].split()
times, checks, cols, variants, attrs = {}, {}, [], [], []
for line in open(path):
    f = line.strip().split(",")
    if not f or f[0].startswith("#"): continue
    if f[0] == "attr":
        attrs.append(f[1:]); continue
    if f[0] == "check" and len(f) >= 5:
        checks.setdefault((f[2], f[3]), {})[f[1]] = ",".join(f[4:])
    elif len(f) == 6:
        try: us, pct = float(f[3]), float(f[5])
        except ValueError: continue
        c = f"{f[1]}:{f[2]}"
        if c not in cols: cols.append(c)
        if f[0] not in variants: variants.append(f[0])
        times[(f[0], c)] = (us, pct)
if not variants:
    print("no results"); sys.exit(0)
w = max(len(c) for c in cols)
print("us (median); pct of copy bandwidth in brackets")
print(f"{'':{w}s} " + " ".join(f"{v:>16s}" for v in variants))
for c in cols:
    row = []
    for v in variants:
        t = times.get((v, c))
        row.append(f"{t[0]:9.1f} ({t[1]:4.0f}%)" if t else f"{'-':>16s}")
    print(f"{c:{w}s} " + " ".join(f"{x:>16s}" for x in row))
print("registers, local bytes, resident blocks/SM (cudaFuncGetAttributes, occupancy API):")
for a in attrs:
    if len(a) == 5 and ("pair_span" in a[1] or "single_span" in a[1]):
        print(f"  {a[0]:12s} {a[1]:32s} regs={a[2]} local={a[3]} blocks/SM={a[4]}")
bad = []
for key, byv in sorted(checks.items()):
    vals = {v: byv[v] for v in same if v in byv}
    if len(set(vals.values())) > 1:
        bad.append(f"{key[0]}:{key[1]} " + " | ".join(f"{v}={x}" for v, x in vals.items()))
have = [v for v in same if any(v in byv for byv in checks.values())]
if bad:
    print(f"CHECKSUMS DIFFER among {' '.join(have)}:")
    for b in bad: print("  " + b)
else:
    print(f"checksums agree bitwise among {' '.join(have)} ({len(checks)} op/dtype pairs)")
for v in ("orig", "span16k", "span64k", "noterms", "noterms_sync", "noterms_pf2"):
    if any(v in byv for byv in checks.values()):
        print(f"({v}: results not expected to equal base's" + ("; only *_span timings mean anything)" if "noterms" in v else ")"))
EOF
echo "== done in $(( $(date +%s) - T0 )) s; outputs in $OUT"
