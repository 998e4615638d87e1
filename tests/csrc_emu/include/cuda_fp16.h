// Host stand-in for <cuda_fp16.h>: __half is the compiler's IEEE binary16 (_Float16), so
// conversions round to nearest even exactly like __float2half_rn.
#pragma once
#include "cuda_runtime.h"

typedef _Float16 __half;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }

namespace emu {
inline float to_float(float v) { return v; }
inline float to_float(__half v) { return static_cast<float>(v); }
}  // namespace emu
