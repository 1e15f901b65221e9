// Fused softcapped cross-entropy: loss and logits gradient in one pass over the logits.
//
// Contract (DESIGN.md §2.1; the spec is kernels/reference.py): for each row i of logits
// z [N, V], s = cap*tanh(z/cap) | cap*sigmoid(z/scale) | z, loss_i = logsumexp(s) -
// s[t_i] in fp32, and the gradient row dz_i = row_scale_i * (softmax(s) - onehot(t_i)) *
// ds/dz, written in the logits' dtype.  row_scale_i is *grad_scale (1/count for a mean,
// 1 for a sum) for a kept row, 0 for an ignored row (exact zeros), NaN for a target
// outside [0, V) (that row's loss is NaN too; the target is never used as an address).
//
// Bytes: the op must read N*V logits and write N*V gradients; everything else is O(N).
// Two kernels move exactly that:
//   cached    one CTA of 1024 threads per row; the row is loaded once with 16-byte
//             streaming loads into registers (raw dtype, kLoads packs per thread),
//             reduced to (max, sum-exp), and the gradient is computed from the
//             registers.  Used when V is a multiple of the pack width, the row start
//             is 16-byte aligned and V <= 1024 * pack * 8 (65536 for 16-bit logits,
//             32768 for fp32).  V = 50304 (the GPT vocab) uses kLoads = 8: 32 registers
//             of cache per thread, so the 64-register budget of a 1024-thread CTA holds.
//   streaming any V and alignment: scalar loads, an online max/sum-exp sweep, then a
//             second sweep that re-reads the row (mostly from L2) for the gradient.
// Special-function cost: s needs exp + reciprocal, softmax one exp; the cached kernel
// evaluates s twice (it caches raw logits to stay in registers), so sigmoid costs
// 6 MUFU ops per element.  See bench/NOTES.md for what is measured and what is next.
//
// For the capped kinds s is bounded, so when the bound keeps exp(s - bound) in fp32's
// normal range (cap <= 40 for tanh, cap <= 80 for sigmoid) the bound is used as the
// softmax reference instead of the row max: one exp per element instead of two in
// the first sweep, and no max reduction.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <tuple>

namespace speedrun {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCachedLoads = 8;

enum CapKind : int64_t { kNone = 0, kTanh = 1, kSigmoid = 2 };

// Conversions written with the hardware's own operations: c10's generic ones compile
// to longer integer sequences that made the register-cached bf16 kernel spill.
// bf16 -> fp32 is a 16-bit shift.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(at::Half x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(at::BFloat16 x) { return __uint_as_float(static_cast<uint32_t>(x.x) << 16); }

// Narrowing stores with the hardware round-to-nearest-even conversions (cvt.rn).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ at::Half from_float<at::Half>(float x) {
  return at::Half(__half_as_ushort(__float2half_rn(x)), at::Half::from_bits());
}
template <>
__device__ __forceinline__ at::BFloat16 from_float<at::BFloat16>(float x) {
  return at::BFloat16(__bfloat16_as_ushort(__float2bfloat16_rn(x)), at::BFloat16::from_bits());
}

struct CapParams {
  int kind;
  float cap;
  float inv_cap;
  float inv_scale;
  bool fixed_reference;  // use `reference` instead of the row max
  float reference;
};

__device__ __forceinline__ float capped(float z, const CapParams& p) {
  if (p.kind == kTanh) {
    // tanh(x) = 1 - 2 / (exp(2x) + 1): exp overflowing to inf gives 1, underflow -1.
    const float e = __expf(2.f * z * p.inv_cap);
    return p.cap * (1.f - 2.f * __frcp_rn(e + 1.f));
  }
  if (p.kind == kSigmoid) {
    return p.cap * __frcp_rn(1.f + __expf(-z * p.inv_scale));
  }
  return z;
}

// ds/dz expressed through s, so no second transcendental is needed.
__device__ __forceinline__ float capped_derivative(float s, const CapParams& p) {
  if (p.kind == kTanh) {
    const float t = s * p.inv_cap;
    return 1.f - t * t;
  }
  if (p.kind == kSigmoid) {
    return s * (1.f - s * p.inv_cap) * p.inv_scale;
  }
  return 1.f;
}

// A running softmax normalizer: sum of exp(s - max) over the values seen.
struct MaxSum {
  float max;
  float sum;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

// Block-wide combine; every thread gets the result.
__device__ MaxSum block_reduce(MaxSum value) {
  __shared__ MaxSum warp_results[kWarps];
  __shared__ MaxSum result;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, value.max, offset),
                 __shfl_xor_sync(0xffffffffu, value.sum, offset)};
    value = combine(value, other);
  }
  if (lane == 0) warp_results[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = warp_results[lane];  // kWarps == 32
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      MaxSum other{__shfl_xor_sync(0xffffffffu, value.max, offset),
                   __shfl_xor_sync(0xffffffffu, value.sum, offset)};
      value = combine(value, other);
    }
    if (lane == 0) result = value;
  }
  __syncthreads();
  return result;
}

// Per-row quantities every thread needs: the target and the gradient's row factor.
struct RowInfo {
  int64_t target;
  bool in_range;
  float grad_factor;
};

__device__ __forceinline__ RowInfo row_info(const int64_t* targets, int64_t row, int64_t n_cols,
                                            int64_t ignore_index, const float* grad_scale) {
  RowInfo info;
  info.target = targets[row];
  const bool kept = info.target != ignore_index;
  info.in_range = info.target >= 0 && info.target < n_cols;
  info.grad_factor = !kept ? 0.f : (info.in_range ? *grad_scale : NAN);
  return info;
}

// Thread 0 writes the row's loss from the reduced normalizer.
template <typename T>
__device__ __forceinline__ void write_loss(const T* row_in, const RowInfo& info, int64_t ignore_index,
                                           float lse, const CapParams& p, float* loss, int64_t row) {
  if (threadIdx.x != 0) return;
  if (info.target == ignore_index) {
    loss[row] = 0.f;
  } else if (!info.in_range) {
    loss[row] = NAN;
  } else {
    loss[row] = lse - capped(to_float(row_in[info.target]), p);
  }
}

__device__ __forceinline__ float gradient(float s, float lse, bool is_target, float factor,
                                          const CapParams& p) {
  const float prob = __expf(s - lse);
  return (prob - (is_target ? 1.f : 0.f)) * capped_derivative(s, p) * factor;
}

// 16 bytes of logits: 8 bf16/fp16 or 4 fp32.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// An empty asm that "modifies" the pack: the compiler must then recompute values derived
// from it instead of keeping the fp32 copies of the first sweep alive (which spilled).
template <typename T>
__device__ __forceinline__ void forget_derived_values(Pack<T>& pack) {
  uint32_t* words = reinterpret_cast<uint32_t*>(&pack);
#pragma unroll
  for (int w = 0; w < 4; ++w) asm volatile("" : "+r"(words[w]));
}

template <typename T>
__device__ __forceinline__ Pack<T> load_streaming(const T* address) {
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(address));
  return *reinterpret_cast<const Pack<T>*>(&raw);
}

template <typename T>
__device__ __forceinline__ void store_streaming(T* address, const Pack<T>& pack) {
  __stcs(reinterpret_cast<uint4*>(address), *reinterpret_cast<const uint4*>(&pack));
}

template <typename T, int kLoads>
__global__ void __launch_bounds__(kThreads, 1)
softcap_ce_cached_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t n_cols,
                         const int64_t* __restrict__ targets, const float* __restrict__ grad_scale,
                         int64_t ignore_index, CapParams p, float* __restrict__ loss,
                         T* __restrict__ grad, bool need_grad) {
  constexpr int kVec = Pack<T>::kSize;
  const int64_t row = blockIdx.x;
  const T* row_in = logits + row * row_stride;
  const int n_packs = static_cast<int>(n_cols / kVec);

  // Issue every load of the row before using any: kLoads 16-byte loads in flight per thread.
  Pack<T> cache[kLoads];
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int pack = i * kThreads + threadIdx.x;
    if (pack < n_packs) cache[i] = load_streaming(row_in + static_cast<int64_t>(pack) * kVec);
  }
  const RowInfo info = row_info(targets, row, n_cols, ignore_index, grad_scale);

  MaxSum local{p.fixed_reference ? p.reference : -INFINITY, 0.f};
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    if (i * kThreads + threadIdx.x < n_packs) {
      float s[kVec];
      float pack_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        s[j] = capped(to_float(cache[i].v[j]), p);
        pack_max = fmaxf(pack_max, s[j]);
      }
      if (!p.fixed_reference && pack_max > local.max) {
        local.sum *= __expf(local.max - pack_max);
        local.max = pack_max;
      }
      if (local.max != -INFINITY) {  // all -inf so far (kind none): every term is 0
#pragma unroll
        for (int j = 0; j < kVec; ++j) local.sum += __expf(s[j] - local.max);
      }
    }
  }
  const MaxSum total = block_reduce(local);
  const float lse = total.max + __logf(total.sum);
  write_loss(row_in, info, ignore_index, lse, p, loss, row);
  if (!need_grad) return;

  T* row_grad = grad + row * n_cols;
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int pack = i * kThreads + threadIdx.x;
    if (pack < n_packs) {
      forget_derived_values(cache[i]);
      Pack<T> out;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float s = capped(to_float(cache[i].v[j]), p);
        const bool is_target = static_cast<int64_t>(pack) * kVec + j == info.target;
        out.v[j] = from_float<T>(gradient(s, lse, is_target, info.grad_factor, p));
      }
      store_streaming(row_grad + static_cast<int64_t>(pack) * kVec, out);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
softcap_ce_streaming_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t n_cols,
                            const int64_t* __restrict__ targets, const float* __restrict__ grad_scale,
                            int64_t ignore_index, CapParams p, float* __restrict__ loss,
                            T* __restrict__ grad, bool need_grad) {
  const int64_t row = blockIdx.x;
  const T* row_in = logits + row * row_stride;
  const RowInfo info = row_info(targets, row, n_cols, ignore_index, grad_scale);

  MaxSum local{p.fixed_reference ? p.reference : -INFINITY, 0.f};
  for (int64_t col = threadIdx.x; col < n_cols; col += kThreads) {
    const float s = capped(to_float(row_in[col]), p);
    if (!p.fixed_reference && s > local.max) {
      local.sum = local.sum * __expf(local.max - s) + 1.f;
      local.max = s;
    } else if (local.max != -INFINITY) {  // all -inf so far (kind none): the term is 0
      local.sum += __expf(s - local.max);
    }
  }
  const MaxSum total = block_reduce(local);
  const float lse = total.max + __logf(total.sum);
  write_loss(row_in, info, ignore_index, lse, p, loss, row);
  if (!need_grad) return;

  T* row_grad = grad + row * n_cols;
  for (int64_t col = threadIdx.x; col < n_cols; col += kThreads) {
    const float s = capped(to_float(row_in[col]), p);
    row_grad[col] = from_float<T>(gradient(s, lse, col == info.target, info.grad_factor, p));
  }
}

// grad[row, :] *= factor[row * factor_stride], skipped on the device when the factor is 1
// (the usual loss.backward() of a mean or sum), so that case costs one tiny launch and no
// pass over the gradient.
template <typename T>
__global__ void scale_rows_kernel(T* __restrict__ grad, int64_t n_cols, const float* __restrict__ factor,
                                  int64_t factor_stride) {
  const int64_t row = blockIdx.x;
  const float f = factor[row * factor_stride];
  if (f == 1.f) return;
  T* row_grad = grad + row * n_cols;
  for (int64_t col = threadIdx.x; col < n_cols; col += blockDim.x) {
    row_grad[col] = from_float<T>(to_float(row_grad[col]) * f);
  }
}

CapParams make_cap_params(double cap, int64_t kind, double scale) {
  CapParams p{};
  p.kind = static_cast<int>(kind);
  p.cap = static_cast<float>(cap);
  p.inv_cap = static_cast<float>(1.0 / cap);
  p.inv_scale = static_cast<float>(1.0 / scale);
  // exp(s - cap) >= exp(-2 cap) (tanh) or exp(-cap) (sigmoid) stays a normal fp32 (> 1e-38)
  // for these bounds, so the bound can replace the row max as the softmax reference.
  p.fixed_reference = (kind == kTanh && cap <= 40.0) || (kind == kSigmoid && cap <= 80.0);
  p.reference = p.fixed_reference ? static_cast<float>(cap) : -INFINITY;
  return p;
}

template <typename T, int kLoads>
void launch_cached(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& grad_scale,
                   int64_t ignore_index, const CapParams& p, at::Tensor& loss, at::Tensor& grad,
                   bool need_grad, cudaStream_t stream) {
  softcap_ce_cached_kernel<T, kLoads><<<logits.size(0), kThreads, 0, stream>>>(
      logits.data_ptr<T>(), logits.stride(0), logits.size(1), targets.data_ptr<int64_t>(),
      grad_scale.data_ptr<float>(), ignore_index, p, loss.data_ptr<float>(),
      need_grad ? grad.data_ptr<T>() : nullptr, need_grad);
}

template <typename T>
void launch(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& grad_scale,
            int64_t ignore_index, const CapParams& p, at::Tensor& loss, at::Tensor& grad, bool need_grad,
            cudaStream_t stream) {
  constexpr int kVec = Pack<T>::kSize;
  const int64_t n_cols = logits.size(1);
  const bool aligned = reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0 &&
                       logits.stride(0) % kVec == 0 && n_cols % kVec == 0;
  const int64_t loads = (n_cols / kVec + kThreads - 1) / kThreads;
  if (aligned && loads <= kMaxCachedLoads) {
    // The exact pack count per thread: registers are the budget, so no rounding up.
    switch (loads) {
      case 0:
      case 1: return launch_cached<T, 1>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 2: return launch_cached<T, 2>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 3: return launch_cached<T, 3>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 4: return launch_cached<T, 4>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 5: return launch_cached<T, 5>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 6: return launch_cached<T, 6>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      case 7: return launch_cached<T, 7>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
      default: return launch_cached<T, 8>(logits, targets, grad_scale, ignore_index, p, loss, grad, need_grad, stream);
    }
  }
  softcap_ce_streaming_kernel<T><<<logits.size(0), kThreads, 0, stream>>>(
      logits.data_ptr<T>(), logits.stride(0), n_cols, targets.data_ptr<int64_t>(),
      grad_scale.data_ptr<float>(), ignore_index, p, loss.data_ptr<float>(),
      need_grad ? grad.data_ptr<T>() : nullptr, need_grad);
}

// Calls body(T{}) for the logits dtypes of the contract; fp64 is not compiled.
template <typename Body>
void dispatch_dtype(at::ScalarType type, const char* op, Body&& body) {
  switch (type) {
    case at::kFloat: return body(float{});
    case at::kHalf: return body(at::Half{});
    case at::kBFloat16: return body(at::BFloat16{});
    default: TORCH_CHECK(false, op, ": logits must be float32, float16 or bfloat16, got ", type);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> softcap_ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                      const at::Tensor& grad_scale, double cap, int64_t kind,
                                                      double scale, int64_t ignore_index, bool need_grad) {
  // The Python wrapper validates arguments with clear messages; these checks guard the
  // raw op against direct misuse, since a wrong shape here would mean a wild access.
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1,
              "softcap_ce_forward: logits must be a 2-D CUDA tensor with unit column stride");
  TORCH_CHECK(targets.is_cuda() && targets.dim() == 1 && targets.size(0) == logits.size(0),
              "softcap_ce_forward: targets must be a CUDA tensor of shape [N]");
  TORCH_CHECK(grad_scale.is_cuda() && grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1,
              "softcap_ce_forward: grad_scale must be a 1-element fp32 CUDA tensor");
  TORCH_CHECK(kind == kNone || kind == kTanh || kind == kSigmoid, "softcap_ce_forward: bad kind ", kind);
  TORCH_CHECK(logits.size(1) > 0, "softcap_ce_forward: V must be positive");
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor targets64 = targets.to(at::kLong).contiguous();
  const at::Tensor scale_value = grad_scale.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor grad = need_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  if (logits.size(0) == 0) return {loss, grad};
  const CapParams p = make_cap_params(cap, kind, scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(logits.scalar_type(), "softcap_ce_forward", [&](auto type_tag) {
    using T = decltype(type_tag);
    launch<T>(logits, targets64, scale_value, ignore_index, p, loss, grad, need_grad, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

void softcap_ce_scale_rows_(at::Tensor& grad, const at::Tensor& factor) {
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.is_contiguous(),
              "softcap_ce_scale_rows_: grad must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(factor.is_cuda() && factor.scalar_type() == at::kFloat &&
                  (factor.numel() == 1 || factor.numel() == grad.size(0)),
              "softcap_ce_scale_rows_: factor must be fp32 with 1 or N elements");
  if (grad.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor f = factor.contiguous();
  const int64_t factor_stride = f.numel() == 1 ? 0 : 1;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(grad.scalar_type(), "softcap_ce_scale_rows_", [&](auto type_tag) {
    using T = decltype(type_tag);
    scale_rows_kernel<T><<<grad.size(0), 256, 0, stream>>>(grad.data_ptr<T>(), grad.size(1), f.data_ptr<float>(),
                                                           factor_stride);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace speedrun
