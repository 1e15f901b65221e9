"""speedrun.optim: Muon against a per-matrix loop of the record's formula, one orthogonalization
per shape group, the distributed split over 2 gloo ranks, gradient averaging, the Adam
settings, the schedules and the state_dict round trip.  CPU only.
"""
import copy
import io
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels import reference
from speedrun import distributed, optim

# A mix of shapes: 3 of one (so 2 ranks get uneven shares), a batched [3, 16, 16] (3 separate
# matrices), a tall one (scaled by sqrt(rows/cols)) and a single wide one (the second rank's
# share of it is padding only).
SHAPES = [(12, 20), (12, 20), (40, 12), (12, 20), (3, 16, 16), (8, 24)]
LR = 0.05
# Updates are Newton-Schulz outputs in bf16, entries at most about 1, so one bf16 ulp is
# at most 2^-8.  Two computations of the same update that round differently (batched vs
# per-matrix matmuls, lerp vs multiply-add for the momentum) may differ by an ulp or two
# per entry: allow 2^-7 per step, i.e. lr * 2^-7 in the parameters.  (On this CPU they
# agree to fp32 rounding; a momentum off by 0.01 already moves them by about 2^-4.)
UPDATE_ATOL = 2.0 ** -7


def make_params(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in SHAPES]


def gradients(step, seed=100):
    """Deterministic per-step gradients, the same in every process."""
    generator = torch.Generator().manual_seed(seed + step)
    return [torch.randn(shape, generator=generator) for shape in SHAPES]


def run_muon(params, steps, first_step=0, optimizer=None, **muon_kwargs):
    optimizer = optimizer or optim.Muon(params, lr=LR, momentum=0.9, **muon_kwargs)
    for step in range(first_step, first_step + steps):
        for p, g in zip(params, gradients(step)):
            p.grad = g
        optimizer.step()
    return optimizer


def record_muon(params, steps, *, nesterov):
    """The record's Muon written out per parameter and per matrix, with the reference NS."""
    momentum = 0.9
    buffers = [torch.zeros_like(p) for p in params]
    with torch.no_grad():
        for step in range(steps):
            for p, g, buf in zip(params, gradients(step), buffers):
                buf.mul_(momentum).add_((1 - momentum) * g)
                source = (1 - momentum) * g + momentum * buf if nesterov else buf
                rows, cols = p.shape[-2:]
                matrices = source.reshape(-1, rows, cols)
                orthogonal = torch.stack([reference.newton_schulz(m) for m in matrices]).reshape(p.shape)
                p.sub_(LR * max(1, rows / cols) ** 0.5 * orthogonal.float())


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_the_record_per_matrix(nesterov):
    ours, record = make_params(), make_params()
    optimizer = optim.Muon(ours, lr=LR, momentum=0.9, nesterov=nesterov)
    assert [tuple(g["params"][0].shape) for g in optimizer.param_groups] == [(12, 20), (40, 12), (3, 16, 16), (8, 24)]
    for step in range(3):
        for p, g in zip(ours, gradients(step)):
            p.grad = g
        optimizer.step()
    record_muon(record, 3, nesterov=nesterov)
    start = make_params()
    for p, q, p0 in zip(ours, record, start):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=0, atol=3 * LR * UPDATE_ATOL)


def test_orthogonalize_is_called_once_per_shape_group_per_step():
    calls = []

    def counting_newton_schulz(stack):
        calls.append(tuple(stack.shape))
        return reference.newton_schulz(stack)

    run_muon(make_params(), steps=2, orthogonalize=counting_newton_schulz)
    per_step = [(3, 12, 20), (1, 40, 12), (1, 3, 16, 16), (1, 8, 24)]
    assert calls == per_step * 2


def test_gradients_are_left_untouched_and_missing_gradients_skipped():
    params = make_params()
    before = [p.detach().clone() for p in params]
    grads = gradients(0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    params[2].grad = None  # the only (40, 12): its group is skipped
    optim.Muon(params, lr=LR).step()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads) if p.grad is not None)
    assert torch.equal(params[2], before[2])
    assert not torch.equal(params[0], before[0])


def test_rejects_vectors_and_mixed_shape_groups():
    with pytest.raises(ValueError, match="at least 2 dims"):
        optim.Muon([torch.nn.Parameter(torch.zeros(4))])
    optimizer = optim.Muon(make_params()[:1])
    with pytest.raises(ValueError, match="one shape"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, 3)),
                                              torch.nn.Parameter(torch.zeros(3, 2))]})
    with pytest.raises(TypeError, match="tensors, not dicts"):
        optim.Muon([{"params": make_params()}])


def test_state_dict_round_trip():
    uninterrupted = make_params()
    run_muon(uninterrupted, steps=3)

    params = make_params()
    saved = io.BytesIO()
    torch.save(run_muon(params, steps=2).state_dict(), saved)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer = optim.Muon(resumed, lr=LR, momentum=0.9)
    optimizer.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
    run_muon(resumed, steps=1, first_step=2, optimizer=optimizer)
    for p, q in zip(resumed, uninterrupted):
        assert torch.equal(p, q)


# ---- two gloo ranks ----------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(worker, *args):
    """Run worker(rank, *args) in 2 processes joined by a gloo process group."""
    mp.spawn(_join_gloo_and_run, args=(free_port(), worker, args), nprocs=2)


def _join_gloo_and_run(rank, port, worker, args):
    torch.set_num_threads(1)  # two processes on a small CPU: no oversubscription
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    clean = False
    try:
        worker(rank, *args)
        clean = True
    finally:
        distributed.teardown(clean=clean)


def _muon_worker(rank, out_dir):
    stacks = []

    def recording_newton_schulz(stack):
        stacks.append(tuple(stack.shape))
        return reference.newton_schulz(stack)

    params = make_params()
    optimizer = run_muon(params, steps=3, orthogonalize=recording_newton_schulz)
    torch.save({"params": [p.detach() for p in params], "state": optimizer.state_dict(), "stacks": stacks},
               os.path.join(out_dir, f"muon{rank}.pt"))


def test_two_ranks_match_one_process(tmp_path):
    spawn_gloo(_muon_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"muon{r}.pt") for r in range(2)]
    alone = make_params()
    run_muon(alone, steps=3, orthogonalize=reference.newton_schulz)

    # Each rank orthogonalized its half of every stack, padded to ceil(n / 2): 2 of the
    # three (12, 20), 1 of every single parameter (rank 1's single ones are padding).
    assert ranks[0]["stacks"] == ranks[1]["stacks"] == [(2, 12, 20), (1, 40, 12), (1, 3, 16, 16), (1, 8, 24)] * 3
    # Every rank applied every update and holds every momentum buffer: identical state.
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p0, p1)
    state0, state1 = ranks[0]["state"]["state"], ranks[1]["state"]["state"]
    assert state0.keys() == state1.keys() == set(range(len(SHAPES)))
    assert all(torch.equal(state0[i]["momentum_buffer"], state1[i]["momentum_buffer"]) for i in state0)
    for p, q in zip(ranks[0]["params"], alone):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=3 * LR * UPDATE_ATOL)


def _average_worker(rank, out_dir):
    generator = torch.Generator().manual_seed(rank)
    params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7)),
              torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(2))]
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    params[0].grad = torch.randn(3, 5, generator=generator).t()  # any strides
    sent = [p.grad.clone() for p in params[:3]]
    optim.average_gradients(params)
    torch.save({"sent": sent, "averaged": [p.grad for p in params[:3]], "missing": params[3].grad},
               os.path.join(out_dir, f"avg{rank}.pt"))


def test_average_gradients_is_the_mean_over_ranks(tmp_path):
    spawn_gloo(_average_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"avg{r}.pt") for r in range(2)]
    for i in range(3):
        mean = (ranks[0]["sent"][i].double() + ranks[1]["sent"][i].double()) / 2
        for r in range(2):
            got = ranks[r]["averaged"][i]
            assert got.dtype == ranks[r]["sent"][i].dtype
            # fp32 sums are exact to rounding; the bf16 one rounds the sum, then the quotient
            torch.testing.assert_close(got.double(), mean, rtol=2.0 ** -7, atol=0)
    assert ranks[0]["missing"] is None and ranks[1]["missing"] is None


def test_average_gradients_is_a_no_op_alone():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.arange(3.0)
    optim.average_gradients([p])
    assert torch.equal(p.grad, torch.arange(3.0))


# ---- Adam and the schedules -----------------------------------------------------------

def test_adam_is_the_records():
    head, embed, scalar = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5, 3)), \
        torch.nn.Parameter(torch.zeros(2))
    adam = optim.make_adam(optim.adam_groups([head], [embed], [scalar]))
    assert [(g["params"], g["lr"], g["initial_lr"]) for g in adam.param_groups] == [
        ([head], 0.008, 0.008), ([embed], 0.6, 0.6), ([scalar], 0.04, 0.04)]
    assert adam.defaults["betas"] == (0.8, 0.95) and adam.defaults["eps"] == 1e-10
    assert not adam.defaults["fused"]  # CPU tensors


def test_lr_multiplier():
    total = 1000
    assert optim.lr_multiplier(0, total) == 1.0
    assert optim.lr_multiplier(599, total) == 1.0
    assert optim.lr_multiplier(600, total) == pytest.approx(1.0)      # cooldown starts at 60%
    assert optim.lr_multiplier(800, total) == pytest.approx(0.55)     # halfway down to 0.1
    assert optim.lr_multiplier(total, total) == pytest.approx(0.1)
    assert optim.lr_multiplier(total, total, cooldown_frac=0.0, final=0.2) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        optim.lr_multiplier(total + 1, total)


def test_muon_momentum():
    assert optim.muon_momentum(0) == pytest.approx(0.85)
    assert optim.muon_momentum(150) == pytest.approx(0.90)
    assert optim.muon_momentum(300) == pytest.approx(0.95)
    assert optim.muon_momentum(1000) == pytest.approx(0.95)


def test_apply_schedule_scales_initial_lrs_and_sets_muon_momentum():
    muon = optim.Muon(make_params(), lr=LR)
    adam = optim.make_adam(optim.adam_groups([torch.nn.Parameter(torch.zeros(3, 2))], [], []))
    for step in (800, 900):  # applied twice: scales the initial lr, never the current one
        optim.apply_schedule([adam, muon], step, 1000, momentum_warmup=300)
    assert all(g["lr"] == pytest.approx(LR * 0.325) and g["momentum"] == 0.95 for g in muon.param_groups)
    assert adam.param_groups[0]["lr"] == pytest.approx(0.008 * 0.325)
    assert "momentum" not in adam.param_groups[0]
    reloaded = optim.Muon(make_params(), lr=1.0)
    reloaded.load_state_dict(copy.deepcopy(muon.state_dict()))
    assert reloaded.param_groups[0]["initial_lr"] == LR
