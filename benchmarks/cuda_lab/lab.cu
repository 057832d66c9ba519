// trmath CUDA lab: times the forward kernels of cpp/src/cuda_exact.cu, built into this
// translation unit so that its compile-time knobs (TRMATH_CUDA_PREFETCH, _SPAN_MINBLOCKS, _SPAN,
// _LAB_NOTERMS) apply, next to a device copy and a plain read-once kernel on the same data.
//
//   lab VARIANT [--n N] [--v V] [--iters K] [--warmup K] [--only OP:DTYPE]
//
// Output (stdout): '#' comment lines, then CSV lines
//   VARIANT,op,dtype,us,GBps,pct_copy    (GBps = input bytes read / time; copy: 2 * bytes / time)
//   check,VARIANT,op,dtype,sum,o0,o1,o2   (outputs of the last timed call, %.17g)
//   attr,VARIANT,kernel,regs,local_bytes,blocks_per_sm
// --only kl:f32 runs that measurement alone (no copy, no read-once): for profilers.
#ifdef TRMATH_LAB_SRC  // another copy of the kernels (e.g. an older commit's), for an A/B
#include TRMATH_LAB_SRC
#else
#include "../../cpp/src/cuda_exact.cu"
#endif
#ifndef TRMATH_CUDA_PREFETCH  // a copy that predates the knobs: its fixed values
#define TRMATH_CUDA_PREFETCH 1
#endif
#ifndef TRMATH_CUDA_SPAN_MINBLOCKS
#define TRMATH_CUDA_SPAN_MINBLOCKS 3
#endif

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define LAB_CK(x)                                                                          \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, \
                   __LINE__, #x);                                                          \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

#define LAB_STR2(x) #x
#define LAB_STR(x) LAB_STR2(x)

namespace trmath {
namespace cuda {
namespace lab {

using namespace common;

// ---- deterministic data: z ~ 2 N(0,1), w = z + 0.3 N(0,1), from a hash of the element index ----
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
__device__ __forceinline__ float gauss(uint64_t h) {
  const float u1 = (float(h >> 40) + 0.5f) * (1.0f / 16777216.0f);  // (0, 1)
  const float u2 = float(h & 0xffffffu) * (1.0f / 16777216.0f);     // [0, 1)
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795865f * u2);
}
__device__ __forceinline__ void store_el(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_el(bf16s* p, float v) {
  *reinterpret_cast<uint16_t*>(p) = to_bf16(v);
}
template <class In>
__global__ void fill_kernel(In* z, In* w, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float zf = 2.0f * gauss(mix64(2 * uint64_t(i)));
    const float wf = zf + 0.3f * gauss(mix64(2 * uint64_t(i) + 1));
    store_el(z + i, zf);
    store_el(w + i, wf);
  }
}

// ---- a plain read-once kernel, laid out as the span kernels are (one block per (row, span),
// grid-stride over a grid of 8 blocks per SM, 16-byte loads): each block sums its slice of z and
// w in float. kU tiles per thread are requested before any is summed.
template <class In, int kU>
__global__ void __launch_bounds__(kThreads) read_once_kernel(const In* z, const In* w, int64_t N, int64_t V,
                                                            float* out) {
  using T = Tile<In>;
  using Raw = typename T::Raw;
  constexpr int E = T::E;
  const int64_t ns = nspans(V);
  __shared__ float red[32];
  for (int64_t wk = blockIdx.x; wk < N * ns; wk += gridDim.x) {
    const int64_t r = wk / ns, i0 = (wk % ns) * kSpan, n = min(kSpan, V - i0);
    const In* zr = z + r * V + i0;
    const In* wr = w + r * V + i0;
    const int64_t nt = (n + E - 1) / E;
    float acc = 0.0f;
    for (int64_t t = threadIdx.x; t < nt; t += int64_t(kU) * blockDim.x) {
      Raw a[kU], b[kU];
#pragma unroll
      for (int k = 0; k < kU; ++k) {
        const int64_t tk = t + int64_t(k) * blockDim.x, i = tk * E;
        if (tk < nt) {
          const bool full = i + E <= n && aligned16(zr) && aligned16(wr);
          a[k] = full ? T::vec(zr + i) : T::gather(zr + i, 1, n - i);
          b[k] = full ? T::vec(wr + i) : T::gather(wr + i, 1, n - i);
        }
      }
#pragma unroll
      for (int k = 0; k < kU; ++k) {
        if (t + int64_t(k) * blockDim.x < nt) {
          float zs[E], ws[E];
          T::unpack(a[k], zs);
          T::unpack(b[k], ws);
#pragma unroll
          for (int e = 0; e < E; ++e) {
            acc += zs[e] > -INFINITY ? zs[e] : 0.0f;
            acc += ws[e] > -INFINITY ? ws[e] : 0.0f;
          }
        }
      }
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.0f;
      for (int j = 0; j < int(blockDim.x >> 5); ++j) s += red[j];
      out[wk] = s;
    }
    __syncthreads();
  }
}

// ---- timing ----------------------------------------------------------------------------------
int g_warmup = 3, g_iters = 20;

// Keeps the GPU busy (~0.1 ms) while the host queues the timed work behind it, so the host's
// launch overhead (the entry points' scratch allocation, launch checks) stays out of the timing.
__global__ void spin_kernel(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

template <class F>
double time_us(F&& f) {
  for (int i = 0; i < g_warmup; ++i) f();
  LAB_CK(cudaGetLastError());
  LAB_CK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  LAB_CK(cudaEventCreate(&a));
  LAB_CK(cudaEventCreate(&b));
  std::vector<float> ts;
  for (int i = 0; i < g_iters; ++i) {
    spin_kernel<<<1, 1>>>(200000);
    LAB_CK(cudaEventRecord(a, 0));
    f();
    LAB_CK(cudaGetLastError());
    LAB_CK(cudaEventRecord(b, 0));
    LAB_CK(cudaEventSynchronize(b));
    float ms = 0.0f;
    LAB_CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  LAB_CK(cudaEventDestroy(a));
  LAB_CK(cudaEventDestroy(b));
  std::sort(ts.begin(), ts.end());
  const size_t m = ts.size();
  const double med = m % 2 ? ts[m / 2] : 0.5 * (double(ts[m / 2 - 1]) + double(ts[m / 2]));
  return med * 1e3;
}

const char* g_variant = "unnamed";
double g_copy_gbps = 0.0;

void report(const char* op, const char* dt, double us, double bytes) {
  const double gbps = bytes / (us * 1e-6) / 1e9;
  std::printf("%s,%s,%s,%.2f,%.1f,%.1f\n", g_variant, op, dt, us, gbps,
              g_copy_gbps > 0 ? 100.0 * gbps / g_copy_gbps : 0.0);
  std::fflush(stdout);
}

template <class T>
void check_line(const char* op, const char* dt, const T* dev, int64_t n) {
  std::vector<T> h(static_cast<size_t>(n));
  LAB_CK(cudaMemcpy(h.data(), dev, size_t(n) * sizeof(T), cudaMemcpyDeviceToHost));
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += double(h[size_t(i)]);
  std::printf("check,%s,%s,%s,%.17g", g_variant, op, dt, s);
  for (int64_t i = 0; i < 3; ++i) std::printf(",%.17g", i < n ? double(h[size_t(i)]) : 0.0);
  std::printf("\n");
  std::fflush(stdout);
}

void status_warn(const char* op, const char* dt, const int* dev, int64_t n) {
  std::vector<int> h(static_cast<size_t>(n));
  LAB_CK(cudaMemcpy(h.data(), dev, size_t(n) * sizeof(int), cudaMemcpyDeviceToHost));
  int64_t bad = 0;
  for (int v : h) bad += v != 0;
  if (bad) std::printf("# %s %s: %lld rows with nonzero status\n", op, dt, (long long)bad);
}

template <class K>
void attr_line(const char* name, K kernel) {
  cudaFuncAttributes fa;
  LAB_CK(cudaFuncGetAttributes(&fa, kernel));
  int blocks = 0;
  LAB_CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  std::printf("attr,%s,%s,%d,%zu,%d\n", g_variant, name, fa.numRegs, fa.localSizeBytes, blocks);
}

View make_view(const void* p, DType dt, int64_t N, int64_t V) {
  View v;
  v.data = static_cast<const char*>(p);
  v.dtype = dt;
  v.ndim = 2;
  v.shape[0] = N;
  v.shape[1] = V;
  v.strides[0] = V;
  v.strides[1] = 1;
  return v;
}

bool wanted(const char* only, const char* op, const char* dt) {
  if (!only) return true;
  std::string s = std::string(op) + ":" + dt;
  return s == only;
}

template <class In>
void run_dtype(const char* dt, DType dtype, int64_t N, int64_t V, const char* only) {
  if (only && !std::strstr(only, (std::string(":") + dt).c_str())) return;
  const int64_t n = N * V, ns = nspans(V);
  const double in1 = double(n) * sizeof(In), in2 = 2.0 * in1;
  In *z = nullptr, *w = nullptr;
  LAB_CK(cudaMalloc(&z, size_t(n) * sizeof(In)));
  LAB_CK(cudaMalloc(&w, size_t(n) * sizeof(In)));
  fill_kernel<In><<<4096, 256>>>(z, w, n);
  LAB_CK(cudaGetLastError());
  LAB_CK(cudaDeviceSynchronize());
  float* out = nullptr;
  double* stats = nullptr;
  int* status = nullptr;
  double* rec = nullptr;
  float* ro = nullptr;
  LAB_CK(cudaMalloc(&out, size_t(N) * sizeof(float)));
  LAB_CK(cudaMalloc(&stats, size_t(N) * kPairStats * sizeof(double)));
  LAB_CK(cudaMalloc(&status, size_t(N) * sizeof(int)));
  LAB_CK(cudaMalloc(&rec, size_t(N * ns) * kPairRec * sizeof(double)));
  LAB_CK(cudaMalloc(&ro, size_t(N * ns) * sizeof(float)));
  const View vz = make_view(z, dtype, N, V), vw = make_view(w, dtype, N, V);

  // whole entry points, as the bindings call them
  const struct { const char* name; PairOp op; } pops[] = {{"kl", PairOp::kl}, {"tv", PairOp::tv}, {"js", PairOp::js}};
  auto pair_args = [&](PairOp op) {
    PairFwd a;
    a.z = vz;
    a.w = vw;
    a.T = 1.0;
    a.op = op;
    a.out = out;
    a.stats = stats;
    a.status = status;
    return a;
  };
  for (const auto& po : pops) {
    if (!wanted(only, po.name, dt)) continue;
    PairFwd a = pair_args(po.op);
    const double us = time_us([&] { pair_forward(a, 0); });
    report(po.name, dt, us, in2);
    check_line(po.name, dt, out, N);
    status_warn(po.name, dt, status, N);
    // the same without statistics (a forward no backward follows: TV sums its value alone)
    a.stats = nullptr;
    const std::string vname = std::string(po.name) + "_value";
    const double usv = time_us([&] { pair_forward(a, 0); });
    report(vname.c_str(), dt, usv, in2);
    check_line(vname.c_str(), dt, out, N);
  }
  const struct { const char* name; SingleOp op; } sops[] = {{"lse", SingleOp::lse}, {"entropy", SingleOp::entropy}};
  for (const auto& so : sops) {
    if (!wanted(only, so.name, dt)) continue;
    SingleFwd a;
    a.z = vz;
    a.T = 1.0;
    a.op = so.op;
    a.out0 = out;
    a.stats = stats;
    a.status = status;
    const double us = time_us([&] { single_forward(a, 0); });
    report(so.name, dt, us, in1);
    check_line(so.name, dt, out, N);
    status_warn(so.name, dt, status, N);
  }

  // each kernel of the pair entry points timed apart (events between the launches; the sum is
  // a little above the entry point's time): where a divergence's time goes
  if (wanted(only, "split", dt) || !only) {
    double* buf = nullptr;
    const int64_t nbuf = N * ns * kPairRec + N * kStateLen + N * ns * kFullRec;
    LAB_CK(cudaMalloc(&buf, size_t(nbuf) * sizeof(double)));
    double* prec = buf;
    double* state = prec + N * ns * kPairRec;
    double* frec = state + N * kStateLen;
    const int gs = grid_for(N * ns, 8), g = grid_for(N, 4);
    for (const auto& po : pops) {
      PairFwd a = pair_args(po.op);
      auto launch = [&](int k) {
        if (po.op == PairOp::kl) {
          if (k == 0) pair_span_kernel<In, kKL><<<gs, kThreads>>>(a, prec);
          if (k == 1) pair_fwd_kernel<In, 0, 0><<<g, kThreads>>>(a, prec, state, frec);
          if (k == 2) pair_full_span_kernel<In, kKL><<<gs, kThreads>>>(a, state, frec);
          if (k == 3) pair_fwd_kernel<In, 0, 1><<<g, kThreads>>>(a, prec, state, frec);
        } else if (po.op == PairOp::tv) {
          if (k == 0) pair_span_kernel<In, kCentre><<<gs, kThreads>>>(a, prec);
          if (k == 1) pair_fwd_kernel<In, 1, 0><<<g, kThreads>>>(a, prec, state, frec);
          if (k == 2) pair_full_span_kernel<In, kTV><<<gs, kThreads>>>(a, state, frec);
          if (k == 3) pair_fwd_kernel<In, 1, 1><<<g, kThreads>>>(a, prec, state, frec);
        } else {
          if (k == 0) pair_span_kernel<In, kCentre><<<gs, kThreads>>>(a, prec);
          if (k == 1) pair_fwd_kernel<In, 2, 0><<<g, kThreads>>>(a, prec, state, frec);
          if (k == 2) pair_full_span_kernel<In, kJS><<<gs, kThreads>>>(a, state, frec);
          if (k == 3) pair_fwd_kernel<In, 2, 1><<<g, kThreads>>>(a, prec, state, frec);
        }
      };
      cudaEvent_t ev[5];
      for (auto& e : ev) LAB_CK(cudaEventCreate(&e));
      std::vector<float> ts[4];
      for (int i = 0; i < g_warmup + g_iters; ++i) {
        spin_kernel<<<1, 1>>>(200000);
        LAB_CK(cudaEventRecord(ev[0], 0));
        for (int k = 0; k < 4; ++k) {
          launch(k);
          LAB_CK(cudaEventRecord(ev[k + 1], 0));
        }
        LAB_CK(cudaEventSynchronize(ev[4]));
        if (i < g_warmup) continue;
        for (int k = 0; k < 4; ++k) {
          float ms = 0.0f;
          LAB_CK(cudaEventElapsedTime(&ms, ev[k], ev[k + 1]));
          ts[k].push_back(ms);
        }
      }
      // rows sent to the full pass (phase 0 left them unfinished)
      std::vector<double> hs(size_t(N * kStateLen));
      LAB_CK(cudaMemcpy(hs.data(), state, hs.size() * sizeof(double), cudaMemcpyDeviceToHost));
      int64_t open = 0;
      for (int64_t r = 0; r < N; ++r) open += hs[size_t(r * kStateLen + 9)] == 0.0;
      std::printf("split,%s,%s,%s", g_variant, po.name, dt);
      for (int k = 0; k < 4; ++k) {
        std::sort(ts[k].begin(), ts[k].end());
        std::printf(",%.2f", 1e3 * double(ts[k][ts[k].size() / 2]));
      }
      std::printf(",rows_second_pass=%lld\n", (long long)open);
      std::fflush(stdout);
      for (auto& e : ev) LAB_CK(cudaEventDestroy(e));
    }
    LAB_CK(cudaFree(buf));
  }

  // the first-pass span kernels alone, launched as pair_forward / single_forward launch them
  // (the rows kernels after them are left out; with LAB_NOTERMS only these rows mean anything)
  {
    PairFwd a;
    a.z = vz;
    a.w = vw;
    a.T = 1.0;
    a.out = out;
    a.stats = stats;
    a.status = status;
    const int gs = grid_for(N * ns, 8);
    if (wanted(only, "kl_span", dt)) {
      a.op = PairOp::kl;
      const double us = time_us([&] { pair_span_kernel<In, kKL><<<gs, kThreads>>>(a, rec); });
      report("kl_span", dt, us, in2);
      check_line("kl_span", dt, rec, N * ns * kPairRec);
    }
    if (wanted(only, "centre_span", dt)) {
      a.op = PairOp::tv;
      const double us = time_us([&] { pair_span_kernel<In, kCentre><<<gs, kThreads>>>(a, rec); });
      report("centre_span", dt, us, in2);
      check_line("centre_span", dt, rec, N * ns * kPairRec);
    }
    if (wanted(only, "lse_span", dt)) {
      SingleFwd s;
      s.z = vz;
      s.T = 1.0;
      s.op = SingleOp::lse;
      s.out0 = out;
      s.stats = stats;
      s.status = status;
      const double us = time_us([&] { single_span_kernel<In, false><<<gs, kThreads>>>(s, rec); });
      report("lse_span", dt, us, in1);
      check_line("lse_span", dt, rec, N * ns * kSingleRec);
    }
  }

  if (!only) {
    const int gs = grid_for(N * ns, 8);
    double us = time_us([&] { read_once_kernel<In, 1><<<gs, kThreads>>>(z, w, N, V, ro); });
    report("readonce1", dt, us, in2);
    us = time_us([&] { read_once_kernel<In, 4><<<gs, kThreads>>>(z, w, N, V, ro); });
    report("readonce4", dt, us, in2);
    // one block per (row, span), no grid cap: what the hardware scheduler does with plain blocks
    const int gfull = int(std::min<int64_t>(N * ns, int64_t(1) << 30));
    us = time_us([&] { read_once_kernel<In, 4><<<gfull, kThreads>>>(z, w, N, V, ro); });
    report("readonce4_fullgrid", dt, us, in2);
  }

  LAB_CK(cudaFree(z));
  LAB_CK(cudaFree(w));
  LAB_CK(cudaFree(out));
  LAB_CK(cudaFree(stats));
  LAB_CK(cudaFree(status));
  LAB_CK(cudaFree(rec));
  LAB_CK(cudaFree(ro));
}

int run(int argc, char** argv) {
  int64_t N = 256, V = 151936;
  const char* only = nullptr;
  int64_t copy_mib = 1024;
  for (int i = 1; i < argc; ++i) {
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value after %s\n", argv[i]);
        std::exit(1);
      }
      return argv[++i];
    };
    if (!std::strcmp(argv[i], "--n")) N = std::atoll(next());
    else if (!std::strcmp(argv[i], "--v")) V = std::atoll(next());
    else if (!std::strcmp(argv[i], "--iters")) g_iters = std::atoi(next());
    else if (!std::strcmp(argv[i], "--warmup")) g_warmup = std::atoi(next());
    else if (!std::strcmp(argv[i], "--only")) only = next();
    else if (!std::strcmp(argv[i], "--copy-mib")) copy_mib = std::atoll(next());
    else if (argv[i][0] == '-') {
      std::fprintf(stderr,
                   "usage: %s VARIANT [--n N] [--v V] [--iters K] [--warmup K] [--only OP:DTYPE] [--copy-mib M]\n"
                   "  OP: kl tv js lse entropy kl_span centre_span lse_span; DTYPE: f32 bf16\n",
                   argv[0]);
      return 1;
    } else g_variant = argv[i];
  }
  if (N < 1 || V < 1 || g_iters < 1 || g_warmup < 0) {
    std::fprintf(stderr, "bad sizes\n");
    return 1;
  }
  int dev = 0;
  LAB_CK(cudaGetDevice(&dev));
  cudaDeviceProp p;
  LAB_CK(cudaGetDeviceProperties(&p, dev));
  std::printf("# variant=%s device=%s sm_%d%d SMs=%d N=%lld V=%lld warmup=%d iters=%d\n", g_variant, p.name, p.major,
              p.minor, p.multiProcessorCount, (long long)N, (long long)V, g_warmup, g_iters);
  std::printf("# knobs: PREFETCH=%d SPAN_MINBLOCKS=%d SPAN=%lld NOTERMS=%s\n", int(TRMATH_CUDA_PREFETCH),
              int(TRMATH_CUDA_SPAN_MINBLOCKS), (long long)kSpan,
#ifdef TRMATH_CUDA_LAB_NOTERMS
              "yes (results wrong; only *_span timings mean anything)"
#else
              "no"
#endif
  );
  std::fflush(stdout);

  if (!only) {
    attr_line("pair_span_kernel<f32:kl>", pair_span_kernel<float, kKL>);
    attr_line("pair_span_kernel<bf16:kl>", pair_span_kernel<bf16s, kKL>);
    attr_line("pair_span_kernel<f32:centre>", pair_span_kernel<float, kCentre>);
    attr_line("pair_span_kernel<bf16:centre>", pair_span_kernel<bf16s, kCentre>);
    attr_line("pair_full_span_kernel<f32:tv>", pair_full_span_kernel<float, kTV>);
    attr_line("pair_full_span_kernel<f32:js>", pair_full_span_kernel<float, kJS>);
    attr_line("single_span_kernel<f32:lse>", single_span_kernel<float, false>);
    attr_line("single_span_kernel<bf16:lse>", single_span_kernel<bf16s, false>);
    attr_line("read_once_kernel<f32:4>", read_once_kernel<float, 4>);

    // copy bandwidth: a device-to-device copy of copy_mib MiB, read + written
    const size_t bytes = size_t(copy_mib) << 20;
    void *src = nullptr, *dst = nullptr;
    LAB_CK(cudaMalloc(&src, bytes));
    LAB_CK(cudaMalloc(&dst, bytes));
    LAB_CK(cudaMemset(src, 1, bytes));
    const double us = time_us([&] { LAB_CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, 0)); });
    g_copy_gbps = 2.0 * double(bytes) / (us * 1e-6) / 1e9;
    report("copy", "u8", us, 2.0 * double(bytes));
    LAB_CK(cudaFree(src));
    LAB_CK(cudaFree(dst));
  }

  run_dtype<float>("f32", DType::f32, N, V, only);
  run_dtype<bf16s>("bf16", DType::bf16, N, V, only);
  LAB_CK(cudaDeviceSynchronize());
  return 0;
}

}  // namespace lab
}  // namespace cuda
}  // namespace trmath

int main(int argc, char** argv) {
  try {
    return trmath::cuda::lab::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lab: %s\n", e.what());
    return 2;
  }
}
