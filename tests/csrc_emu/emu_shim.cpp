// C ABI over the emulated csrc/ launchers (tests/test_csrc_emulated.py loads it with ctypes).
// Same arguments as the functions in csrc/rmtkd_cuda.h, dtype as int (0 fp32, 1 fp16,
// 2 bf16), every pointer to host memory, the stream ignored (the emulation is synchronous).
// Each call returns the launcher's cudaError_t, or the first fault the emulation recorded
// during the call (see emu_last_fault) even where the launcher would not have reported it.
#include <cstdint>

#include "rmtkd_cuda.h"

namespace {
int finish(cudaError_t launcher_status) {
  const int f = emu::fault_code.load();
  return f != 0 ? f : static_cast<int>(launcher_status);
}
}  // namespace

extern "C" {

int emu_covariance_update(const void* x, int dt, int64_t n, int64_t d, int64_t ldx,
                          const float* shift, const uint8_t* mask, float* c, float* colsum,
                          void* stream) {
  emu::reset_faults();
  return finish(rmtkd::covariance_update(x, static_cast<rmtkd::DType>(dt), n, d, ldx, shift, mask,
                                         c, colsum, stream));
}

int emu_covariance_update_split(const void* x, int dt, int64_t n, int64_t d, int64_t ldx,
                                const float* shift, const uint8_t* mask, float* c, float* colsum,
                                int splits, float* workspace, int64_t workspace_floats,
                                void* stream) {
  emu::reset_faults();
  return finish(rmtkd::covariance_update_split(x, static_cast<rmtkd::DType>(dt), n, d, ldx, shift,
                                               mask, c, colsum, splits, workspace,
                                               workspace_floats, stream));
}

int64_t emu_covariance_split_workspace_floats(int64_t d, int splits) {
  return rmtkd::covariance_split_workspace_floats(d, splits);
}

int emu_projected_linear_forward(const void* x, const void* V, const void* W, const void* bias,
                                 void* y, int dt, int64_t m, int64_t in, int64_t out, int64_t k,
                                 void* stream) {
  emu::reset_faults();
  return finish(rmtkd::projected_linear_forward(x, V, W, bias, y, static_cast<rmtkd::DType>(dt), m,
                                                in, out, k, stream));
}

// The emulated device as the launchers see it: multiprocessor count and the opt-in limit of
// dynamic shared memory per block (bytes).
void emu_set_device(int sm_count, int smem_optin_bytes) {
  emu::sm_count = sm_count;
  emu::smem_optin = smem_optin_bytes;
}

// Thread blocks run so far (all launches), and the message of the last call's first fault.
long emu_blocks_run() { return emu::blocks_run; }
const char* emu_last_fault() { return emu::fault_msg; }

}  // extern "C"
