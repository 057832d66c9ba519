# Sourced by .ci/run, .ci/sanitize.sh and .ci/sanitized_pytest.sh: the flags of every
# AddressSanitizer + UndefinedBehaviorSanitizer object. The generic instruction set; -O1 (an
# instrumented -O3 build of the kernels takes far longer); -g1, line tables only (the reports
# keep file:line, without variable tracking's compile time); -fPIC, because the same objects go
# into the C++ driver and the sanitized Python extension.
san=(-std=gnu++17 -O1 -g1 -fPIC -fsanitize=address,undefined -fno-sanitize-recover=all
     -fno-omit-frame-pointer -DTRMATH_ISA=generic -Icpp/include -Icpp/src -Wno-psabi)
