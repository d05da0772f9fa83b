"""numba's loops on 512-bit vectors where the processor has AVX-512.

LLVM, which compiles numba's loops, tunes Intel processors with AVX-512 to
prefer 256-bit vectors (its ``prefer-256-bit`` tuning: 512-bit instructions
once slowed a whole core's clock). The rounding loops do a few instructions
per value and run from the caches, so the wider vectors pay: on a 2-core Xeon
with VNNI, one thread over 65536 values took 0.175 ns a value on 256-bit
vectors and 0.116 on 512-bit ones (ad hoc), and MobileNetV2 went from 0.92x
to 0.96x float32 at 8 bits exact and from 0.88x to 0.90x at 16 bits fast
(``bench/results/throughput-cpu-avx512-vnni.md``).
"""

from __future__ import annotations

import llvmlite.binding as llvm
from numba.core import config

WIDE = ",-prefer-256-bit"  # appended to the processor's own features


def prefer_wide_vectors() -> bool:
    """Let numba compile for 512-bit vectors where the processor has AVX-512; whether it now does.

    Changes numba's settings in this process only, never the environment, so
    a job started from here on another machine (a SLURM node) compiles for
    its own processor. Takes effect when it runs before numba compiles its
    first function (the loop modules call it on import); a user's own
    ``NUMBA_CPU_FEATURES`` is left as it is.
    """
    if config.CPU_FEATURES is not None:
        return config.CPU_FEATURES.endswith(WIDE)
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot read this processor's features: numba's defaults
        return False
    if not features.get("avx512f"):
        return False
    config.CPU_FEATURES = features.flatten() + WIDE
    return True
