// trmath: run-time choice of the kernel table for this CPU.
#include <cstdlib>
#include <cstring>

#include "view.hpp"

namespace trmath {
namespace isa_generic { extern const KernelTable table; }
#if defined(TRMATH_HAVE_AVX2)
namespace isa_avx2 { extern const KernelTable table; }
#endif

const KernelTable& kernels() {
  static const KernelTable* chosen = [] {
    const char* force = std::getenv("TRMATH_ISA");
    bool generic_only = force && std::strcmp(force, "generic") == 0;
#if defined(TRMATH_HAVE_AVX2)
    __builtin_cpu_init();
    if (!generic_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return &isa_avx2::table;
#endif
    (void)generic_only;
    return &isa_generic::table;
  }();
  return *chosen;
}

}  // namespace trmath
