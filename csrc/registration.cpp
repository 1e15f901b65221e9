// The extension kernels._C: registers the CUDA ops under the torch.library namespace
// `speedrun_cuda`.  Python reaches them as torch.ops.speedrun_cuda.<name>; the public ops
// in kernels/ wrap them as custom ops with fake implementations and autograd.
//
// One declaration block per kernel family (csrc/<family>.cu defines them).

#include <Python.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace speedrun {

// csrc/softcap_ce.cu
std::tuple<at::Tensor, at::Tensor> softcap_ce_forward(const at::Tensor& logits, const at::Tensor& targets,
                                                      const at::Tensor& grad_scale, double cap, int64_t kind,
                                                      double scale, int64_t ignore_index, bool need_grad);
void softcap_ce_scale_rows_(at::Tensor& grad, const at::Tensor& factor);
std::tuple<at::Tensor, at::Tensor> softcap_ce_forward_e5m2(const at::Tensor& logits, const at::Tensor& targets,
                                                           const at::Tensor& factor, double cap, int64_t kind,
                                                           double scale, int64_t ignore_index, double grad_scale);

// csrc/fp8_head.cu
std::tuple<at::Tensor, at::Tensor> fp8_cast(const at::Tensor& src, double scale, bool e5m2, bool transpose);
at::Tensor fp8_gemm(const at::Tensor& a, const at::Tensor& b, int64_t k, double alpha, bool out_fp32, bool promote);
std::tuple<at::Tensor, at::Tensor> fp8_ce_grad_e5m2(const at::Tensor& logits, const at::Tensor& targets,
                                                    const at::Tensor& row_loss, const at::Tensor& row_factor,
                                                    double cap, int64_t kind, double scale, int64_t ignore_index,
                                                    double grad_scale);
at::Tensor fp8_transpose(const at::Tensor& q, int64_t cols);

}  // namespace speedrun

TORCH_LIBRARY(speedrun_cuda, m) {
  // kind: 0 none, 1 tanh, 2 sigmoid.  Returns (per-row fp32 loss [N], gradient [N, V] or [0]).
  m.def("softcap_ce_forward(Tensor logits, Tensor targets, Tensor grad_scale, float cap, int kind, "
        "float scale, int ignore_index, bool need_grad) -> (Tensor, Tensor)");
  // grad[i, :] *= factor[i] (factor of 1 or N fp32 elements); rows whose factor is 1 are skipped.
  m.def("softcap_ce_scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
  // The fused FP8 head's loss pass: (per-row loss [N], g8 [N, pad16(V)] e5m2), g8 =
  // e5m2(bf16(bf16(d softcap_ce / d logits at row factor `factor`) * grad_scale)); bf16 logits,
  // capped kinds with the fixed reference, V a multiple of 8 (the staged kernel only).
  m.def("softcap_ce_forward_e5m2(Tensor logits, Tensor targets, Tensor factor, float cap, int kind, "
        "float scale, int ignore_index, float grad_scale) -> (Tensor, Tensor)");
  // q = fp8(src * scale) as [R, pad16(C)] (e4m3, or e5m2 if e5m2) and, if transpose, its
  // transpose [C, pad16(R)] (else [0]); rows padded to 16 bytes for TMA, pads unwritten.
  m.def("fp8_cast(Tensor src, float scale, bool e5m2, bool transpose) -> (Tensor, Tensor)");
  // alpha * a[:, :k] @ b[:, :k]^T; a e4m3/e5m2 [M, >=k], b e4m3 [N, >=k] -> bf16 or fp32 [M, N].
  m.def("fp8_gemm(Tensor a, Tensor b, int k, float alpha, bool out_fp32, bool promote) -> Tensor");
  // (g8, g8t): e5m2(grad_scale * d softcap_ce / d logits) from bf16 logits, the per-row loss
  // and the per-row factor (1 or N elements), [N, pad16(V)] and [V, pad16(N)].
  m.def("fp8_ce_grad_e5m2(Tensor logits, Tensor targets, Tensor row_loss, Tensor row_factor, float cap, "
        "int kind, float scale, int ignore_index, float grad_scale) -> (Tensor, Tensor)");
  // qt [cols, pad16(R)]: the transpose of q[:, :cols], q fp8 [R, pad16(>= cols)].
  m.def("fp8_transpose(Tensor q, int cols) -> Tensor");
}

TORCH_LIBRARY_IMPL(speedrun_cuda, CUDA, m) {
  m.impl("softcap_ce_forward", &speedrun::softcap_ce_forward);
  m.impl("softcap_ce_scale_rows_", &speedrun::softcap_ce_scale_rows_);
  m.impl("softcap_ce_forward_e5m2", &speedrun::softcap_ce_forward_e5m2);
  m.impl("fp8_cast", &speedrun::fp8_cast);
  m.impl("fp8_gemm", &speedrun::fp8_gemm);
  m.impl("fp8_ce_grad_e5m2", &speedrun::fp8_ce_grad_e5m2);
  m.impl("fp8_transpose", &speedrun::fp8_transpose);
}

// A plain Python module, so `import kernels._C` loads the library and runs the
// registrations above; the ops themselves live in torch.ops, not in this module.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "CUDA kernels of speedrun, registered as torch.ops.speedrun_cuda",
                                        -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
