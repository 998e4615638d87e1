// Host stand-in for the WMMA API (<mma.h>) as csrc/*.cu uses it: 16x16x16 tiles of fp16 or
// bf16 operands with an fp32 accumulator.
//
// Emulated: the arithmetic as fp32 FMAs (d[i][j] = c[i][j] + sum_k a[i][k] b[k][j], k in
// order; fp16/bf16 products are exact in fp32), the pointer alignment (32 bytes) and
// leading-dimension (16 bytes) rules of load/store_matrix_sync, and the opacity of the
// accumulator: each lane owns 8 of the 256 elements, a 2 x 4 block (rows 2 (l % 8) + {0, 1},
// columns 4 (l / 8) + {0..3}; not NVIDIA's layout), so code that reads a fragment other than
// element-wise or through store_matrix_sync gives wrong results, and a lane reading back a
// stored tile mostly reads other lanes' stores (a missing __syncwarp is a real race).
// Operand fragments hold the whole tile in every lane.
// NOT emulated: the real fragment layouts, the tensor cores' own rounding/accumulation
// order inside one mma (results can differ from hardware in the last fp32 bits), and the
// requirement that all 32 lanes call each *_sync function together.
#pragma once
#include <type_traits>

#include "cuda_bf16.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment;

template <class Use, class T, class Layout>
struct fragment<Use, 16, 16, 16, T, Layout> {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>,
                "emulated WMMA operands are fp16 or bf16 (no tf32 / int)");
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>,
                "an operand fragment needs a layout");
  static constexpr int num_elements = 256;
  T x[256];  // x[r * 16 + c]: row r, column c of the logical tile
};
template <>
struct fragment<accumulator, 16, 16, 16, float, void> {
  static constexpr int num_elements = 8;
  float x[8];  // x[e]: row 2 (lane % 8) + e % 2, column 4 (lane / 8) + e / 2 of the tile
};
using acc_frag = fragment<accumulator, 16, 16, 16, float, void>;

inline int lane() { return static_cast<int>(threadIdx.x % 32); }
inline int acc_row(int e) { return 2 * (lane() % 8) + e % 2; }
inline int acc_col(int e) { return 4 * (lane() / 8) + e / 2; }

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, T v) {
  for (auto& e : f.x) e = v;
}
inline void fill_fragment(acc_frag& f, float v) {
  for (auto& e : f.x) e = v;
}

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0)
    emu::fault(cudaErrorMisalignedAddress,
               "wmma::load_matrix_sync: pointer not 32-byte aligned or ldm not 16-byte multiple");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = row ? p[r * ldm + c] : p[r + c * ldm];
}

template <class TA, class LA, class TB, class LB>
inline void mma_sync(acc_frag& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b, const acc_frag& c) {
  static_assert(std::is_same_v<TA, TB>, "operand types must match");
  for (int e = 0; e < acc_frag::num_elements; ++e) {
    const int i = acc_row(e), j = acc_col(e);
    float s = c.x[e];
    for (int k = 0; k < 16; ++k)
      s = std::fma(emu::to_float(a.x[i * 16 + k]), emu::to_float(b.x[k * 16 + j]), s);
    d.x[e] = s;
  }
}

inline void store_matrix_sync(float* p, const acc_frag& f, unsigned ldm, layout_t layout) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(float)) % 16 != 0)
    emu::fault(cudaErrorMisalignedAddress,
               "wmma::store_matrix_sync: pointer not 32-byte aligned or ldm not 16-byte multiple");
  for (int e = 0; e < acc_frag::num_elements; ++e) {
    const int r = acc_row(e), c = acc_col(e);
    p[layout == mem_row_major ? r * ldm + c : r + c * ldm] = f.x[e];
  }
}
}  // namespace wmma
}  // namespace nvcuda
