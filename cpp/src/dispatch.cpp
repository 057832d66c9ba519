// trmath: run-time choice of the kernel table for this CPU.
#include <cstdlib>
#include <cstring>

#include "view.hpp"

namespace trmath {
namespace isa_generic { extern const KernelTable table; }
#if defined(TRMATH_HAVE_AVX2)
namespace isa_avx2 { extern const KernelTable table; }
#endif
#if defined(TRMATH_HAVE_AVX512)
namespace isa_avx512 { extern const KernelTable table; }
#endif
#if defined(TRMATH_HAVE_AVX512_BF16)
namespace isa_avx512_bf16 { extern const KernelTable table; }
#endif

const KernelTable& kernels() {
  static const KernelTable* chosen = [] {
    const char* force = std::getenv("TRMATH_ISA");
    // TRMATH_ISA=generic, =avx2 or =avx512 caps the choice (tests compare the builds on one
    // machine).
    bool generic_only = force && std::strcmp(force, "generic") == 0;
    bool avx2_at_most = force && std::strcmp(force, "avx2") == 0;
    bool avx512_at_most = force && std::strcmp(force, "avx512") == 0;
#if defined(TRMATH_HAVE_AVX2)
    __builtin_cpu_init();
#if defined(TRMATH_HAVE_AVX512)
    const bool avx512 = !generic_only && !avx2_at_most && __builtin_cpu_supports("avx2") &&
                        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#if defined(TRMATH_HAVE_AVX512_BF16)
    if (avx512 && !avx512_at_most && __builtin_cpu_supports("avx512bf16"))
      return &isa_avx512_bf16::table;
#endif
    if (avx512) return &isa_avx512::table;
#endif
    if (!generic_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return &isa_avx2::table;
#endif
    (void)generic_only;
    (void)avx2_at_most;
    (void)avx512_at_most;
    return &isa_generic::table;
  }();
  return *chosen;
}

}  // namespace trmath
