"""The GPT trains the 2025-01-26 record's model: its shapes at the record's train and
validation lengths, its eval head, our attention agreeing with the record's
FlexAttention path (--kernels off) at every window setting, and a few training steps
with our ops agreeing with the same steps through the record's implementations."""
import pytest
import torch

from kernels import reference
from speedrun.gpt import train
from speedrun.gpt.model import EOT, GPT, GPTConfig
from tests.test_gpt import final_parameters, metrics, run_train, tiny_model


@pytest.mark.parametrize("attention", ["ours", "flex"])
def test_record_preset_shapes_run_through_the_model_on_meta(attention):
    # The record trains on 48Ki-token sequences and validates on 256Ki-token ones; the
    # rotary table must cover both (a 64Ki table raised a shape error at validation).
    cfg, _ = train.parse_args(["--preset", "record"])
    assert (cfg.seq_len, cfg.val_seq_len) == (48 * 1024, 4 * 64 * 1024)
    with torch.device("meta"):
        model = GPT(GPTConfig(max_seq_len=max(cfg.seq_len, cfg.val_seq_len)),
                    {"attention": attention, "mlp": "ours", "head": "ours"})
        for length, training in ((cfg.seq_len, True), (cfg.val_seq_len, False)):
            model.train(training)
            tokens = torch.zeros(length, dtype=torch.int32)
            loss = model(tokens, tokens.long(), train.window_blocks(0, cfg.steps, cfg.window_max))
            assert loss.shape == () and loss.device.type == "meta"


def test_a_sequence_longer_than_the_rotary_table_says_so():
    model = tiny_model({"attention": "ours", "mlp": "torch", "head": "torch"})
    tokens = torch.zeros(model.config.max_seq_len + 128, dtype=torch.int32)
    with pytest.raises(ValueError, match="longer than the rotary table"):
        model(tokens, tokens.long(), 1)


@pytest.mark.parametrize("head", ["ours", "torch"])
def test_validation_uses_the_bf16_head_and_training_the_fp8_head(head):
    torch.manual_seed(3)
    tokens = torch.randint(0, 50257, (257,))
    inputs, targets = tokens[:-1].int(), tokens[1:].long()
    model = tiny_model({"attention": "ours", "mlp": "torch", "head": head})
    x = torch.randn(256, 64).bfloat16()
    c = model.config
    bf16 = reference.linear_softcap_cross_entropy(x, model.lm_head.detach(), targets, fp8=False,
                                                  cap=c.softcap, kind="sigmoid", scale=c.softcap_scale)
    fp8 = reference.linear_softcap_cross_entropy(x, model.lm_head.detach(), targets, fp8=True, x_scale=c.fp8_x_scale,
                                                 w_scale=c.fp8_w_scale, grad_scale=c.fp8_grad_scale,
                                                 cap=c.softcap, kind="sigmoid", scale=c.softcap_scale)
    assert abs(bf16.item() - fp8.item()) > 1e-4  # the two heads are distinguishable here
    with torch.no_grad():
        model.eval()
        assert abs(model.head_loss(x, targets).item() - bf16.item()) < 1e-5  # fp32 loss of identical bf16 logits
        model.train()
        assert abs(model.head_loss(x, targets).item() - fp8.item()) < 1e-5
        model.eval()
        assert torch.isfinite(model(inputs, targets, 1))


def record_tokens(length, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50000, (length + 1,), generator=gen)
    tokens[torch.randperm(length, generator=gen)[:length // 150]] = EOT  # documents of ~150 tokens
    return tokens[:-1].int(), tokens[1:].long()


def test_auto_and_off_attention_agree_at_every_window_setting():
    # Our kernel (reference backend on CPU tensors, as --kernels auto picks) against the
    # record's FlexAttention path (--kernels off; eagerly its BlockMask's own pairs through
    # SDPA), same weights and pairs.  Activations are bf16 (the op takes half types), and the
    # two attentions round their outputs to bf16 after different fp32/bf16 arithmetic: 2**-8
    # per element, averaging to far less in the mean loss; 2e-3 relative leaves a margin.
    # T = 1920 = 15 blocks: every one of the schedule's 14 long / short settings binds.
    inputs, targets = record_tokens(1920, 5)
    ours = tiny_model({"attention": "ours", "mlp": "torch", "head": "torch"}).eval()
    off = tiny_model({"attention": "flex", "mlp": "torch", "head": "torch"}).eval()
    with torch.no_grad():
        for blocks in range(1, 15):
            a, b = ours(inputs, targets, blocks), off(inputs, targets, blocks)
            assert abs(a.item() - b.item()) < 2e-3 * abs(b.item()), blocks


def test_auto_and_the_records_implementations_train_alike(tmp_path):
    # Four optimizer steps of the tiny model, same seed and tokens, with --kernels auto (our
    # ops; on CPU tensors the reference backend) and with the record's implementations.  On a
    # CPU FlexAttention has no backward, so the record's side keeps our attention, as the
    # GPU session's CPU dry run does; the attention pair is the test above.
    common = ("--steps", "4", "--val-every", "0", "--val-tokens", "256", "--save-every", "4")
    auto = run_train(tmp_path, *common, "--kernels", "auto", name="auto")
    off = run_train(tmp_path, *common, "--kernels", "attention=ours,mlp=torch,head=torch,newton_schulz=torch",
                    name="off")
    ours, record = ([m["train_loss"] for m in metrics(run) if m["event"] == "step"] for run in (auto, off))
    assert len(ours) == len(record) == 4
    # At equal weights (step 1) the paths differ only in fp32 summation order and in which
    # bf16 values round the other way: 3e-7 of the loss measured, 1e-5 bounds it.  After that
    # the weights differ as far as the updates do (the MLPs agree bit for bit; the heads and
    # Newton-Schulz round differently): Adam's by bf16 rounding of their gradients, Muon's by
    # more, because Newton-Schulz in bf16 amplifies rounding (the two paths' updates differ
    # by 2-3%, measured on these steps' momenta).  So the loss's fall
    # L_1 - L_k may differ by ~3% of itself: 2^-5.  Measured: 0.16% of it.  Another seed or
    # a 10% higher head lr on one side exceeds this 2-3x; a 10% higher Muon lr, at 2.3% of
    # the fall, does not: four steps of bf16 Muon cannot resolve it.
    for step, (a, b) in enumerate(zip(ours, record), start=1):
        assert abs(a - b) <= 1e-5 * b + 2 ** -5 * (record[0] - b), (step, ours, record)
    # Each path's bf16 Newton-Schulz sits up to 7% from the exact (fp64) iteration on these
    # momenta, so the two can differ by twice that, and the zero-initialized projections are
    # nothing but such updates (measured up to 6.3%): 0.15 relative for Muon's matrices.
    # Adam's first updates are near lr * sign(gradient), so an element whose gradient is near
    # zero may move opposite ways on the two paths (measured up to 0.7% of a tensor's norm):
    # 2e-2 for the head, embeddings and scalars.
    expected, actual = final_parameters(off), final_parameters(auto)
    assert expected.keys() == actual.keys()
    for key in expected:
        a, b = actual[key].float(), expected[key].float()
        muon = key.startswith("blocks.") and b.ndim >= 2
        error = ((a - b).norm() / b.norm()).item()
        assert error <= (0.15 if muon else 2e-2), (key, error)


def test_the_record_heads_cpu_matmul_gives_torchs_scaled_mm_values():
    # On a CPU the record's head widens its FP8 operands to fp32 (torch's CPU _scaled_mm is a
    # naive loop, minutes per step).  fp32 holds every e4m3 x e4m3 / e5m2 x e4m3 product
    # exactly, so the two differ only in the order of the fp32 sums over K = 96 (a few ulp of
    # fp32, far under bf16's 2^-8 output rounding): the bf16 outputs may differ by one bf16
    # ulp where the sum lands near a rounding boundary, and the fp32 one to 1e-5 relative.
    from speedrun.gpt.baseline import _scaled_mm
    torch.manual_seed(5)
    x8 = (torch.randn(37, 96) * 4).to(torch.float8_e4m3fn)
    g8 = (torch.randn(37, 96) * 4).to(torch.float8_e5m2)
    w8 = (torch.randn(53, 96) * 4).to(torch.float8_e4m3fn)
    sa, sb = torch.tensor(0.37), torch.tensor(1.9)
    for a in (x8, g8):
        for out_dtype, rtol in ((torch.bfloat16, 2 ** -7), (torch.float32, 1e-5)):
            ours = _scaled_mm(a, w8.T, out_dtype=out_dtype, scale_a=sa, scale_b=sb, use_fast_accum=False)
            torchs = torch._scaled_mm(a, w8.T, out_dtype=out_dtype, scale_a=sa, scale_b=sb, use_fast_accum=False)
            assert ours.dtype == torchs.dtype == out_dtype
            torch.testing.assert_close(ours.float(), torchs.float(), rtol=rtol, atol=1e-3)
