// Host stand-in for <cuda_bf16.h>: bfloat16 as its 16 bits, float -> bf16 rounds to nearest
// even (NaN stays a quiet NaN), bf16 -> float is exact.
#pragma once
#include "cuda_fp16.h"

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

namespace emu {
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
}  // namespace emu
