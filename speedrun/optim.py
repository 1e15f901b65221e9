"""The GPT record's optimizers (DESIGN.md §3): Muon on the blocks' matrices, Adam on the rest,
their schedules, and the gradient averaging that precedes every step.

Muon (per parameter p with gradient g, as in the 2025-01 modded-nanogpt record):

    buf = momentum * buf + (1 - momentum) * g
    u   = (1 - momentum) * g + momentum * buf     (Nesterov; plain momentum: u = buf)
    p  -= lr * max(1, rows / cols) ** 0.5 * newton_schulz(u)

where rows, cols = p.shape[-2:] and any leading dims of p are a batch of matrices, each
orthogonalized on its own.  Unlike the record, which calls Newton-Schulz once per matrix,
this Muon keeps one param group per distinct shape and orthogonalizes each group's
updates as one stacked tensor in one call, so the batched kernel sees every matrix of a
shape at once.  With a process group of several ranks each rank orthogonalizes a
contiguous share of every stack and the shares are all-gathered.

Schedules (the record's): the learning rate is constant, then decays linearly over the
last `cooldown_frac` of the steps to `final` times its initial value; Muon's momentum
rises linearly from 0.85 to 0.95 over the first 300 steps.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

import kernels

NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _distributed_rank_and_world(process_group) -> tuple[int, int]:
    """(rank, world size) in process_group, or (0, 1) when torch.distributed is not in use."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _stack_padded(tensors: list[torch.Tensor], length: int, like: torch.Tensor) -> torch.Tensor:
    """[length, *like.shape]: the tensors stacked, then zero matrices up to `length`.

    Zero padding keeps every rank's share the same shape (a collective needs that);
    Newton-Schulz maps a zero matrix to zero, so the padding costs compute but no care."""
    if len(tensors) == length:
        return torch.stack(tensors)
    stack = like.new_zeros(length, *like.shape)
    if tensors:
        torch.stack(tensors, out=stack[:len(tensors)])
    return stack


class Muon(torch.optim.Optimizer):
    """Muon with one param group per parameter shape and one orthogonalization per group.

    Args:
        params: an iterable of tensors with at least 2 dims (param-group dicts are not
            accepted: the groups are built here, one per distinct shape, in order of first
            appearance).  Dims before the last two are a batch of separate matrices.
        lr, momentum: per group (in `param_groups`, so schedules may set them); each group
            also records `initial_lr` for `apply_schedule`.
        nesterov: use the Nesterov update source instead of the momentum buffer itself.
        ns_steps, coefficients: Newton-Schulz steps and (a, b, c), per-step triples or a
            schedule name ("ns5", "polar_express") for the default `orthogonalize`,
            `kernels.newton_schulz`.
        orthogonalize: callable(stack [k, *shape]) -> same shape, replacing
            `kernels.newton_schulz` (it then ignores ns_steps/coefficients).  Called once
            per shape group per step.
        process_group: the group whose ranks share the orthogonalization (None: the
            default group).  Gradients must already be averaged across ranks before
            `step` (see `average_gradients`); every rank then keeps the momentum buffers of
            all parameters, so the optimizer state is identical on every rank.

    Parameters whose .grad is None are skipped; which ones those are must be the same on
    every rank, since the shares are cut from the list of parameters with gradients.
    """

    def __init__(self, params, *, lr: float = 0.05, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, coefficients=NS5_COEFFICIENTS, orthogonalize=None, process_group=None):
        params = list(params)
        if any(isinstance(p, dict) for p in params):
            raise TypeError("Muon builds its own param groups (one per shape): pass tensors, not dicts")
        by_shape: dict[torch.Size, list[torch.Tensor]] = {}
        for p in params:
            by_shape.setdefault(p.shape, []).append(p)
        groups = [{"params": same_shape, "initial_lr": lr} for same_shape in by_shape.values()]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, coefficients=coefficients)
        super().__init__(groups, defaults)
        self.orthogonalize = orthogonalize
        self.process_group = process_group

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, but a group must hold matrices of one shape: step stacks them."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if any(p.ndim < 2 for p in params):
            raise ValueError("Muon only takes parameters with at least 2 dims (matrices, or stacks of them)")
        if len({p.shape for p in params}) > 1:
            raise ValueError(f"a Muon param group must hold parameters of one shape, got "
                             f"{sorted({tuple(p.shape) for p in params})}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = _distributed_rank_and_world(self.process_group)
        # Launch every group's orthogonalization (and gather) before applying any update, so
        # one group's all-gather overlaps the next group's Newton-Schulz.
        pending = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                pending.append((group, params, *self._launch_updates(group, params, rank, world_size)))
        for group, params, updates, work in pending:
            if work is not None:
                work.wait()
            rows, cols = params[0].shape[-2:]
            step_size = group["lr"] * max(1.0, rows / cols) ** 0.5
            updates = updates[:len(params)].to(params[0].dtype)  # drop the last rank's padding
            torch._foreach_add_(params, list(updates.unbind(0)), alpha=-step_size)
        return loss

    def _launch_updates(self, group: dict, params: list[torch.Tensor], rank: int, world_size: int):
        """(stacked orthogonalized updates [>= len(params), *shape], the gather's handle or None)."""
        grads = [p.grad for p in params]
        buffers = [self._momentum_buffer(p) for p in params]
        momentum = group["momentum"]
        torch._foreach_lerp_(buffers, grads, 1 - momentum)  # buf = m*buf + (1-m)*g, every parameter

        # This rank's share: a contiguous chunk of ceil(n / world_size) parameters.
        share_size = -(-len(params) // world_size)
        first = min(rank * share_size, len(params))
        last = min(first + share_size, len(params))
        if group["nesterov"] and last > first:
            sources = torch._foreach_lerp(grads[first:last], buffers[first:last], momentum)
        else:
            sources = buffers[first:last]
        orthogonal = self._orthogonalize(group, _stack_padded(sources, share_size, params[0]))
        if world_size == 1:
            return orthogonal, None
        gathered = orthogonal.new_empty(world_size * share_size, *orthogonal.shape[1:])
        work = dist.all_gather_single(gathered, orthogonal.contiguous(), group=self.process_group, async_op=True)
        return gathered, work

    def _orthogonalize(self, group: dict, stack: torch.Tensor) -> torch.Tensor:
        if self.orthogonalize is not None:
            return self.orthogonalize(stack)
        return kernels.newton_schulz(stack, steps=group["ns_steps"], coefficients=group["coefficients"])

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        return state["momentum_buffer"]


# ---- Adam ------------------------------------------------------------------------------

def adam_groups(head_params, embed_params, scalar_params, *, head_lr: float = 0.008, embed_lr: float = 0.6,
                scalar_lr: float = 0.04) -> list[dict]:
    """The record's Adam param groups: the LM head, the embeddings, the scalars."""
    return [{"params": list(head_params), "lr": head_lr},
            {"params": list(embed_params), "lr": embed_lr},
            {"params": list(scalar_params), "lr": scalar_lr}]


def make_adam(groups) -> torch.optim.Adam:
    """The record's Adam (betas 0.8/0.95, eps 1e-10), fused when every parameter is on CUDA.

    Each group's starting lr is kept as `initial_lr`, the value `apply_schedule` scales."""
    groups = list(groups)
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    adam = torch.optim.Adam(groups, betas=(0.8, 0.95), eps=1e-10, fused=True if on_cuda else None)
    for group in adam.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return adam


# ---- schedules --------------------------------------------------------------------------

def lr_multiplier(step: int, total_steps: int, cooldown_frac: float = 0.4, final: float = 0.1) -> float:
    """1.0, then linear over the last cooldown_frac of the steps down to `final` at total_steps."""
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    if not 0 <= cooldown_frac <= 1:
        raise ValueError(f"cooldown_frac must be in [0, 1], got {cooldown_frac}")
    progress = step / total_steps
    if progress < 1 - cooldown_frac:
        return 1.0
    remaining = (1 - progress) / cooldown_frac if cooldown_frac > 0 else 0.0  # 1 at cooldown start, 0 at end
    return remaining + (1 - remaining) * final


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Linear from `start` at step 0 to `end` at warmup_steps, then `end`."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    fraction = step / warmup_steps
    return (1 - fraction) * start + fraction * end


def apply_schedule(optimizers, step: int, total_steps: int, *, cooldown_frac: float = 0.4, final: float = 0.1,
                   momentum_warmup: int = 300, momentum_start: float = 0.85, momentum_end: float = 0.95) -> None:
    """Set every group's lr to initial_lr * lr_multiplier(step), and Muon's momentum, for this step.

    The optimizers must come from `Muon` or `make_adam`, which record each group's
    `initial_lr` (it also travels in their state_dict, so a resumed run schedules alike)."""
    multiplier = lr_multiplier(step, total_steps, cooldown_frac, final)
    momentum = muon_momentum(step, momentum_warmup, momentum_start, momentum_end)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if isinstance(optimizer, Muon):
                group["momentum"] = momentum


# ---- data-parallel gradients ------------------------------------------------------------

def average_gradients(params, process_group=None) -> None:
    """Replace each .grad by its mean over the ranks of process_group; a no-op alone.

    Gradients are coalesced into one flat buffer per (device, dtype), so the whole model
    costs one all-reduce per dtype rather than one per parameter.  Sum then divide: gloo
    has no ReduceOp.AVG.  Parameters without .grad are skipped (the same on every rank)."""
    _, world_size = _distributed_rank_and_world(process_group)
    if world_size == 1:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            by_kind[(p.grad.device, p.grad.dtype)].append(p.grad)
    pending = []
    for grads in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        pending.append((grads, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group,
                                                     async_op=True)))
    for grads, flat, work in pending:
        work.wait()
        flat.div_(world_size)
        pieces = flat.split([g.numel() for g in grads])
        torch._foreach_copy_(grads, [piece.view_as(g) for piece, g in zip(pieces, grads)])
