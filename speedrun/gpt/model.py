"""The GPT of the 2025-01-26 NanoGPT speedrun record (3.28 FineWeb val loss, 8xH100).

Read top to bottom: config, the three kinds of layer (attention, MLP, block), the model.
The facts of the recipe are in DESIGN.md §3; each is stated again where it is used.
The model takes one packed sequence of tokens (documents separated by token 50256) and
returns the mean loss of predicting the next token.

Op families run through `kernels` (ours) or the record's own code (speedrun/gpt/
baseline.py), chosen per family by the trainer's `--kernels` (speedrun/ablation.py):

  attention  ours: kernels.sliding_window_attention (document ids; the window in whole
                   128-token key blocks as the record's BlockMask, or, with
                   attention_window="exact", an exact token window)
             flex: FlexAttention with the record's BlockMask (window in whole 128-token blocks;
                   without torch.compile a dense mask read off that BlockMask, see baseline.py)
  mlp        ours: kernels.relu2_mlp       torch: F.linear / relu^2 / F.linear
             ours-fp8: kernels.relu2_mlp_fp8 in training (the first product in e4m3 with
                   amax/448 per-tensor scales, as the current modded-nanogpt record's FP8
                   MLP forward), kernels.relu2_mlp in eval (validation stays bf16)
  head       ours: kernels.linear_softcap_cross_entropy
             torch: torch._scaled_mm FP8 head, then 30*sigmoid(z/7.5) and F.cross_entropy
(Newton-Schulz belongs to the optimizer: speedrun/optim.py.)
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from speedrun.gpt import baseline
from speedrun.profiler import label

EOT = 50256  # GPT-2's <|endoftext|>: every document starts after one
ATTENTION_WINDOWS = ("blocks", "exact")
FAMILIES = {  # family -> (ours, the record's, other choices)
    "attention": ("ours", "flex"),
    "mlp": ("ours", "torch", "ours-fp8"),
    "head": ("ours", "torch"),
}


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50257
    num_layers: int = 12
    model_dim: int = 768
    num_heads: int = 6
    head_dim: int = 128
    mlp_dim: int = 3072
    # One character per layer: L long window, S short window (half), - no attention.
    # The record: long in layers 0, 4, 11, short elsewhere, and layer 7 has no attention.
    windows: str = "LSSSLSS-SSSL"
    value_embeds: int = 3  # tables added to v in the first and the last this-many layers
    attention_scale: float = 0.12
    # "blocks": the record's windows, whole 128-token key blocks (long = window_blocks
    # blocks, short = window_blocks // 2, at least 1); "exact": exact token windows of
    # window_blocks * 128 and half that (our kernel only; flex is always the record's).
    attention_window: str = "blocks"
    # Rotary table length: the longest sequence the model will see (the record's is its
    # validation length, 4 * 64Ki; the trainer sets max(seq_len, val_seq_len)).
    max_seq_len: int = 4 * 64 * 1024
    softcap: float = 30.0  # logits 30*sigmoid(z/7.5)
    softcap_scale: float = 7.5
    fp8_head: bool = True
    fp8_x_scale: float = 2.0
    fp8_w_scale: float = 2.0 ** 9
    fp8_grad_scale: float = 2.0 ** 19

    @property
    def padded_vocab(self) -> int:
        """The head's rows: vocab rounded up to a multiple of 128 (50257 -> 50304)."""
        return -(-self.vocab_size // 128) * 128

    def validate(self) -> None:
        if len(self.windows) != self.num_layers or set(self.windows) - set("LS-"):
            raise ValueError(f"windows must have one of L/S/- per layer ({self.num_layers}), got {self.windows!r}")
        if self.num_layers % 2:
            raise ValueError("num_layers must be even: the U-net pairs layer i with layer num_layers-1-i")
        if not 0 <= self.value_embeds <= self.num_layers // 2:
            raise ValueError(f"value_embeds must be in [0, num_layers/2], got {self.value_embeds}")
        if self.head_dim % 4:
            raise ValueError("head_dim must be a multiple of 4 (rotary on half the dims, in pairs)")
        if self.attention_window not in ATTENTION_WINDOWS:
            raise ValueError(f"attention_window must be one of {ATTENTION_WINDOWS}, got {self.attention_window!r}")


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without weights: on embeddings, before each sublayer, at the end, and on q, k."""
    with label("norm"):
        return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """RoPE on half of the head dims: 32 frequencies (1/1024)**linspace(0, 1) for D = 128,
    the other half of the dims passes through unrotated.  One table of max_seq_len rows,
    shared by every attention layer (the record keeps a copy per layer: same values)."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        freqs = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        freqs = torch.cat([freqs, freqs.new_zeros(head_dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, H, D]
        if x.size(1) > self.cos.size(0):
            raise ValueError(f"a sequence of {x.size(1)} tokens is longer than the rotary table "
                             f"({self.cos.size(0)} rows): raise GPTConfig.max_seq_len")
        cos = self.cos[None, : x.size(1), None, :]
        sin = self.sin[None, : x.size(1), None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, rotary: Rotary):
        super().__init__()
        self.config = config
        inner = config.num_heads * config.head_dim
        # Merged QKV weight [3, inner, dim], uniform with the std of 0.5/sqrt(dim); Muon
        # orthogonalizes q, k and v separately (the leading 3 is a batch).
        bound = 3 ** 0.5 * 0.5 * config.model_dim ** -0.5
        self.qkv_w = nn.Parameter(torch.empty(3, inner, config.model_dim).uniform_(-bound, bound))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # v = l0*v + l1*value_embed
        self.rotary = rotary
        self.proj = nn.Parameter(torch.zeros(config.model_dim, inner))  # zero-init output projection

    def forward(self, x, value_embed, window, kernel_choice):
        B, T = x.size(0), x.size(1)
        H, D = self.config.num_heads, self.config.head_dim
        qkv = F.linear(x, self.qkv_w.flatten(end_dim=1).type_as(x)).view(B, T, 3 * H, D)
        q, k, v = qkv.chunk(3, dim=-2)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        v = self.lambdas[0] * v if value_embed is None else self.lambdas[0] * v + self.lambdas[1] * value_embed.view_as(v)
        with label("attention"):
            if kernel_choice == "flex":
                y = baseline.flex_sliding_window_attention(q, k, v, window.block_mask, self.config.attention_scale)
            else:
                y = kernels.sliding_window_attention(q, k, v, window=window.tokens, doc_ids=window.doc_ids,
                                                     scale=self.config.attention_scale,
                                                     block_size=window.block_size)
        return F.linear(y.reshape(B, T, H * D), self.proj.type_as(y))


class MLP(nn.Module):
    """dim -> 3072 -> dim with ReLU^2; the output projection starts at zero."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        bound = 3 ** 0.5 * 0.5 * config.model_dim ** -0.5
        self.fc = nn.Parameter(torch.empty(config.mlp_dim, config.model_dim).uniform_(-bound, bound))
        self.proj = nn.Parameter(torch.zeros(config.model_dim, config.mlp_dim))

    def forward(self, x, kernel_choice):
        with label("mlp"):
            w_fc, w_proj = self.fc.type_as(x), self.proj.type_as(x)
            if kernel_choice == "torch":
                return F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)
            if kernel_choice == "ours-fp8" and self.training:
                return kernels.relu2_mlp_fp8(x, w_fc, w_proj)
            return kernels.relu2_mlp(x, w_fc, w_proj)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, rotary: Rotary | None):
        super().__init__()
        self.attn = Attention(config, rotary) if rotary is not None else None
        self.mlp = MLP(config)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # input = l0*x + l1*x0

    def forward(self, x, x0, value_embed, window, kernel_choice):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(rms_norm(x), value_embed, window, kernel_choice["attention"])
        return x + self.mlp(rms_norm(x), kernel_choice["mlp"])


@dataclasses.dataclass
class Window:
    """What one attention layer needs to mask: the window in tokens, its granularity
    (block_size: None = exact tokens) and document ids (ours), or the record's BlockMask (flex)."""
    tokens: int
    doc_ids: torch.Tensor | None = None
    block_mask: object = None
    block_size: int | None = None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, kernel_choice: dict[str, str] | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.kernel_choice = dict(kernel_choice or {family: choices[0] for family, choices in FAMILIES.items()})
        self.embed = nn.Embedding(config.vocab_size, config.model_dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.model_dim)
                                          for _ in range(config.value_embeds))
        rotary = Rotary(config.head_dim, config.max_seq_len)
        self.blocks = nn.ModuleList(Block(config, rotary if w != "-" else None) for w in config.windows)
        # U-net: the outputs of the first half are added, with learned weights, into the
        # second half in reverse order.
        self.skip_weights = nn.Parameter(torch.ones(config.num_layers // 2))
        # Untied head, zero-initialized, fp32 master weight (cast to FP8 per step).
        self.lm_head = nn.Parameter(torch.zeros(config.padded_vocab, config.model_dim))
        # Embeddings live in bf16, as in the record.
        for table in [self.embed, *self.value_embeds]:
            table.to(torch.bfloat16)

    def layer_value_embed_index(self, layer: int) -> int | None:
        """Tables 0..n-1 feed layers 0..n-1 and again the last n layers, in the same order."""
        n, last = self.config.value_embeds, self.config.num_layers
        if layer < n:
            return layer
        if layer >= last - n:
            return layer - (last - n)
        return None

    def windows(self, input_seq: torch.Tensor, window_blocks: int) -> dict[str, Window]:
        """Long and short attention masks for this sequence.

        The record's (and flex's): long = window_blocks key blocks of 128 tokens, short =
        window_blocks // 2 blocks, at least the query's own block.  attention_window="exact":
        windows of exactly window_blocks * 128 tokens and half that."""
        docs = (input_seq == EOT).cumsum(0)
        block = baseline.FLEX_BLOCK
        long_tokens = window_blocks * block
        if self.kernel_choice["attention"] == "flex":
            long_bm, short_bm = baseline.record_block_masks(docs, window_blocks)
            return {"L": Window(long_tokens, block_mask=long_bm), "S": Window(long_tokens // 2, block_mask=short_bm)}
        doc_ids = docs.to(torch.int32)[None]
        if self.config.attention_window == "exact":
            return {"L": Window(long_tokens, doc_ids), "S": Window(long_tokens // 2, doc_ids)}
        short_tokens = max(1, window_blocks // 2) * block
        return {"L": Window(long_tokens, doc_ids, block_size=block), "S": Window(short_tokens, doc_ids, block_size=block)}

    def forward(self, input_seq: torch.Tensor, target_seq: torch.Tensor, window_blocks: int) -> torch.Tensor:
        """input_seq [T] int32 tokens, target_seq [T] int64 -> mean next-token loss (fp32).

        window_blocks: the long attention window in 128-token blocks (the trainer grows it
        from 1 to 14 blocks, 128 to 1792 tokens, over training)."""
        windows = self.windows(input_seq, window_blocks)
        value_embeds = [table(input_seq)[None] for table in self.value_embeds]
        x = x0 = rms_norm(self.embed(input_seq)[None])
        half = self.config.num_layers // 2
        skips = []
        for layer, block in enumerate(self.blocks):
            if layer >= half:
                x = x + self.skip_weights[layer - half] * skips.pop()
            ve_index = self.layer_value_embed_index(layer)
            x = block(x, x0, None if ve_index is None else value_embeds[ve_index],
                      windows.get(self.config.windows[layer]), self.kernel_choice)
            if layer < half:
                skips.append(x)
        x = rms_norm(x)[0]
        return self.head_loss(x, target_seq)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean capped cross-entropy of the head's logits.  As the record, the FP8 head runs in
        training only: in eval mode (validation) the logits are x @ lm_head^T in bf16."""
        c = self.config
        fp8 = c.fp8_head and self.training
        with label("head_ce"):
            if self.kernel_choice["head"] == "torch":
                return baseline.record_head_loss(x, self.lm_head, targets, fp8=fp8, x_scale=c.fp8_x_scale,
                                                 w_scale=c.fp8_w_scale, grad_scale=c.fp8_grad_scale,
                                                 cap=c.softcap, scale=c.softcap_scale)
            return kernels.linear_softcap_cross_entropy(
                x, self.lm_head if fp8 else self.lm_head.type_as(x), targets, fp8=fp8,
                x_scale=c.fp8_x_scale, w_scale=c.fp8_w_scale, grad_scale=c.fp8_grad_scale,
                cap=c.softcap, kind="sigmoid", scale=c.softcap_scale)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The record's optimizer split: Muon on the blocks' matrices, Adam on the rest."""
        hidden = [p for p in self.blocks.parameters() if p.ndim >= 2]
        embeddings = [self.embed.weight, *(t.weight for t in self.value_embeds)]
        scalars = [p for p in self.parameters() if p.ndim < 2]
        return {"muon": hidden, "head": [self.lm_head], "embed": embeddings, "scalar": scalars}
