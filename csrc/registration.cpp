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

}  // namespace speedrun

TORCH_LIBRARY(speedrun_cuda, m) {
  // kind: 0 none, 1 tanh, 2 sigmoid.  Returns (per-row fp32 loss [N], gradient [N, V] or [0]).
  m.def("softcap_ce_forward(Tensor logits, Tensor targets, Tensor grad_scale, float cap, int kind, "
        "float scale, int ignore_index, bool need_grad) -> (Tensor, Tensor)");
  // grad[i, :] *= factor[i] (factor of 1 or N fp32 elements); rows whose factor is 1 are skipped.
  m.def("softcap_ce_scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
}

TORCH_LIBRARY_IMPL(speedrun_cuda, CUDA, m) {
  m.impl("softcap_ce_forward", &speedrun::softcap_ce_forward);
  m.impl("softcap_ce_scale_rows_", &speedrun::softcap_ce_scale_rows_);
}

// A plain Python module, so `import kernels._C` loads the library and runs the
// registrations above; the ops themselves live in torch.ops, not in this module.
static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                        "CUDA kernels of speedrun, registered as torch.ops.speedrun_cuda",
                                        -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
