"""speedrun kernels: the public op API.

Five op families, each a torch.library custom op (or a composition of them) with a
registered fake implementation and autograd, so models using them trace under
`torch.compile(fullgraph=True)` and capture in CUDA graphs:

  softcap_cross_entropy          fused softcapped cross-entropy, loss and gradient in one pass
  fp8_linear                     per-tensor-scaled FP8 matmul (the LM head)
  linear_softcap_cross_entropy   the LM head and the softcapped loss together
  newton_schulz                  batched Newton-Schulz orthogonalization (Muon)
  relu2_mlp, linear_relu2        the ReLU^2 MLP and its fused first half
  relu2_mlp_fp8                  the same MLP with an e4m3 first product (per-tensor scales)
  sliding_window_attention       causal, windowed, document-masked attention

`set_backend()` / env KERNELS_BACKEND choose the implementation (auto, cuda, triton,
reference); `backends()` says what is built and what each op would run.  The contract
of every op is its plain-PyTorch reference in `kernels.reference`.
"""
from kernels._backend import backends, get_backend, set_backend, use_backend
from kernels.softcap_ce import softcap_cross_entropy
from kernels.fp8_head import fp8_linear, linear_softcap_cross_entropy
from kernels.newton_schulz import newton_schulz
from kernels.relu2_mlp import linear_relu2, relu2_mlp, relu2_mlp_fp8
from kernels.sliding_window_attention import sliding_window_attention

__all__ = [
    "softcap_cross_entropy",
    "fp8_linear",
    "linear_softcap_cross_entropy",
    "newton_schulz",
    "relu2_mlp",
    "relu2_mlp_fp8",
    "linear_relu2",
    "sliding_window_attention",
    "set_backend",
    "get_backend",
    "use_backend",
    "backends",
]
