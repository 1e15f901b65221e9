"""The CIFAR trainer on CPU: the record's shapes and parameter count, the whitening layer,
FilterMuon against a transcription of the record's per-parameter step, TTA, the Student-t
arithmetic against closed forms and table values, and smoke runs of the CLI."""
import json
import math

import pytest
import torch

import kernels
from kernels import reference
from speedrun import ablation
from speedrun.cifar import data, train
from speedrun.cifar.model import BatchNorm, CifarNet

RECORD_FILTER_SHAPES = [(64, 24, 3, 3), (64, 64, 3, 3), (256, 64, 3, 3), (256, 256, 3, 3), (256, 256, 3, 3),
                        (256, 256, 3, 3)]


# ---- the model ------------------------------------------------------------------------

def test_full_size_shapes_dtypes_and_parameter_count():
    model = CifarNet()  # the record: widths 64/256/256, fp16 except BatchNorm
    assert sum(p.numel() for p in model.parameters()) == 1_972_792  # "about 1.97M"
    assert [tuple(p.shape) for p in model.filters()] == RECORD_FILTER_SHAPES
    assert sum(p.numel() for p in model.filters()) == 1_967_616
    assert not model.whiten.weight.requires_grad and model.whiten.weight.shape == (24, 3, 2, 2)
    for module in model.modules():
        if isinstance(module, BatchNorm):
            assert module.weight.dtype == torch.float32 and not module.weight.requires_grad
            assert module.momentum == pytest.approx(0.4) and module.eps == 1e-12
    assert model.head.weight.dtype == torch.float16 and model.filters()[0].dtype == torch.float16
    whiten_bias, norm_biases, head = model.sgd_groups()
    assert len(norm_biases) == 6 and head[0].shape == (10, 256)
    # Forward at full size (fp32 on a CPU): [N, 3, 32, 32] -> [N, 10].
    model32 = CifarNet(dtype=torch.float32).to(memory_format=torch.channels_last)
    model32.reset()
    assert model32(torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)).shape == (3, 10)


def test_reset_puts_the_identity_in_the_first_filters_and_unit_std_in_the_head():
    torch.manual_seed(0)
    model = CifarNet((8, 16, 16), dtype=torch.float32)
    model.reset()
    for conv in model.filters():
        out_channels, in_channels = conv.shape[:2]
        k = min(out_channels, in_channels)  # the first conv maps 24 channels to 8 here: 8 identity filters
        identity = torch.zeros(k, in_channels, 3, 3)
        identity[range(k), range(k), 1, 1] = 1
        assert torch.equal(conv[:k], identity)
        if out_channels > in_channels:
            assert conv[in_channels:].abs().sum() > 0  # the rest keeps PyTorch's default init
    assert model.head.weight.std().item() == pytest.approx(1.0, rel=1e-5)


def test_whitening_makes_the_patch_covariance_of_the_first_layer_output_close_to_identity():
    images = data.synthetic(300, 10, seed=5)["train"]["images"]
    loader = data.Loader({"images": images, "labels": torch.zeros(300, dtype=torch.long)}, batch_size=10,
                         device="cpu", dtype=torch.float32)
    x = loader.normalize(loader.images)

    def output_covariance(model):
        with torch.no_grad():
            out = torch.nn.functional.conv2d(x, model.whiten.weight)  # the first layer, without its bias
        flat = out.permute(0, 2, 3, 1).reshape(-1, out.size(1)).double()
        return flat.T @ flat / len(flat)

    patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    raw = patches.T @ patches / len(patches)
    eigenvalues = torch.linalg.eigvalsh(raw)
    assert (raw - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5  # far from white to start with
    model = CifarNet((8, 8, 8), dtype=torch.float32)
    for eps, tolerance in ((0.0, 1e-4), (5e-4, 1e-4 + 5e-4 / eigenvalues.min().item())):
        # eps = 0 whitens exactly up to fp32 rounding; eps = 5e-4 shrinks eigenvalue l to l / (l + eps).
        model.init_whiten(x, eps=eps)
        covariance = output_covariance(model)
        top = covariance[:12, :12]
        assert (top - torch.eye(12, dtype=torch.float64)).abs().max() < tolerance
        # The last 12 filters are the negations: the full covariance is [[C, -C], [-C, C]].
        assert torch.allclose(covariance[12:, 12:], top) and torch.allclose(covariance[:12, 12:], -top)


# ---- Muon on the filters ----------------------------------------------------------------

def _record_newton_schulz(G, steps):
    """The record's zeropower_via_newtonschulz5 for one matrix, transcribed."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    X = X / (X.norm() + 1e-7)
    if G.size(0) > G.size(1):
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if G.size(0) > G.size(1) else X


def _record_muon_step(params, buffers, lr, momentum, newton_schulz=_record_newton_schulz):
    """The record's Muon.step for Nesterov momentum, per parameter, transcribed."""
    for p, buf in zip(params, buffers):
        g = p.grad
        buf.mul_(momentum).add_(g)
        g = g.add(buf, alpha=momentum)
        p.data.mul_(len(p.data) ** 0.5 / p.data.norm())
        p.data.add_(newton_schulz(g.reshape(len(g), -1), 3).view(g.shape), alpha=-lr)


def _float64_newton_schulz(G, steps):
    return reference.newton_schulz(G.double(), steps=steps, dtype=torch.float64).to(G.dtype)


def _filters(seed):
    generator = torch.Generator().manual_seed(seed)
    # Awkward shapes: wide and tall (40 > 3*9) updates, several of one shape.
    shapes = [(12, 24, 3, 3), (40, 3, 3, 3), (20, 12, 3, 3), (20, 20, 3, 3), (20, 20, 3, 3)]
    return [torch.randn(s, generator=generator) for s in shapes]


def _three_muon_steps(orthogonalize=None, newton_schulz=_record_newton_schulz):
    """(filters, momentum buffers) after 3 steps of FilterMuon(orthogonalize), or of the record's
    transcribed step (with `newton_schulz`) when orthogonalize is None."""
    params = [torch.nn.Parameter(w) for w in _filters(0)]
    if orthogonalize is not None:
        muon = train.FilterMuon(params, lr=0.24, momentum=0.6, ns_steps=3, orthogonalize=orthogonalize)
    buffers = [torch.zeros_like(p) for p in params]
    for step in range(3):
        for p, g in zip(params, _filters(100 + step)):
            p.grad = g
        if orthogonalize is None:
            _record_muon_step(params, buffers, 0.24, 0.6, newton_schulz)
        else:
            muon.step()
    if orthogonalize is not None:
        buffers = [muon.state[p]["momentum_buffer"] for p in params]
    return [p.detach() for p in params], buffers


def test_filter_muon_on_the_records_path_is_bit_identical_to_the_records_step():
    ours, our_buffers = _three_muon_steps("torch")
    record, record_buffers = _three_muon_steps()
    for p, r, b, rb in zip(ours, record, our_buffers, record_buffers):
        assert torch.equal(p, r) and torch.equal(b, rb)


@pytest.mark.parametrize("orthogonalize", ["ours", "grouped"])
def test_filter_muon_batched_is_as_accurate_as_the_records_per_filter_loop(orthogonalize):
    truth, _ = _three_muon_steps(newton_schulz=_float64_newton_schulz)
    record, record_buffers = _three_muon_steps()
    ours, our_buffers = _three_muon_steps(orthogonalize)
    assert all(torch.equal(b, rb) for b, rb in zip(our_buffers, record_buffers))  # momentum: same ops, same bits
    # The NS runs in bf16 either way: 3 steps leave errors of ~2^-6 of the update elements (lr 0.24).
    # Batching changes only the bf16 rounding (matmul shapes, padding), so ours must be as close
    # to the float64 truth as the record's own loop is, within 1.5x, and under 0.24 * 2^-5.
    our_error = max((p - t).abs().max().item() for p, t in zip(ours, truth))
    record_error = max((r - t).abs().max().item() for r, t in zip(record, truth))
    assert our_error <= 1.5 * record_error and our_error < 0.24 * 2 ** -5, (our_error, record_error)


def test_padding_to_one_stack_gives_each_matrix_its_own_newton_schulz():
    matrices = [w.reshape(len(w), -1) for w in _filters(7)]
    padded = train.orthogonalize_padded(matrices, 3)
    for m, out in zip(matrices, padded):
        expected = kernels.newton_schulz(m, steps=3)
        assert out.shape == m.shape
        # Zero padding is exact in exact arithmetic; in bf16 the matmuls' shapes change their
        # blocking, and the tall (40 x 27) matrix is no longer transposed: a few bf16 ulps of
        # entries <= ~0.5, amplified by up to ~3.4x per step.
        assert (out.float() - expected.float()).abs().max() < 2 ** -5


def test_muon_renormalizes_each_filter_to_frobenius_norm_sqrt_out_channels():
    params = [torch.nn.Parameter(3 * w) for w in _filters(1)]
    for p in params:
        p.grad = torch.randn_like(p)
    train.FilterMuon(params, lr=0.0, momentum=0.6).step()  # lr 0: only the renormalization moves p
    for p in params:
        assert p.norm().item() == pytest.approx(math.sqrt(len(p)), rel=1e-5)


def test_schedule_decays_linearly_to_zero_and_the_whitening_bias_over_its_own_steps():
    model = CifarNet((8, 8, 8), dtype=torch.float32)
    cfg, _ = train.parse_args([])
    sgd, muon = train.make_optimizers(model, cfg, "ours")
    assert [g["lr"] for g in sgd.param_groups] == [0.053, 0.053, 0.67] and muon.param_groups[0]["lr"] == 0.24
    assert sgd.param_groups[2]["weight_decay"] == pytest.approx(2e-6 * 2000 / 0.67)
    assert sgd.defaults["momentum"] == 0.85 and sgd.defaults["nesterov"]
    train.set_learning_rates(sgd, muon, 50, 200, 75)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.053 * (1 - 50 / 75))
    assert sgd.param_groups[2]["lr"] == pytest.approx(0.67 * 0.75) and muon.param_groups[0]["lr"] == pytest.approx(0.18)
    train.set_learning_rates(sgd, muon, 100, 200, 75)
    assert sgd.param_groups[0]["lr"] == 0.0 and muon.param_groups[0]["lr"] == pytest.approx(0.12)


# ---- test-time augmentation ---------------------------------------------------------------

def test_tta_level_2_weights_the_six_views_as_the_record():
    torch.manual_seed(0)
    weight = torch.randn(10, 3 * 32 * 32, dtype=torch.float64)
    model = lambda x: x.flatten(1) @ weight.T  # noqa: E731 - linear, so every view's weight shows
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    up_left = torch.nn.functional.pad(x, (1,) * 4, mode="reflect")[:, :, :32, :32]
    down_right = torch.nn.functional.pad(x, (1,) * 4, mode="reflect")[:, :, 2:, 2:]
    assert torch.equal(up_left[:, :, 1:, 1:], x[:, :, :-1, :-1]) and torch.equal(down_right[:, :, :-1, :-1], x[:, :, 1:, 1:])
    expected = (0.25 * (model(x) + model(x.flip(-1)))
                + 0.125 * (model(up_left) + model(up_left.flip(-1)) + model(down_right) + model(down_right.flip(-1))))
    assert torch.allclose(train.tta_logits(model, x, 2), expected, rtol=1e-12, atol=1e-9)
    assert torch.allclose(train.tta_logits(model, x, 1), 0.5 * (model(x) + model(x.flip(-1))))
    assert torch.equal(train.tta_logits(model, x, 0), model(x))


# ---- Student's t ------------------------------------------------------------------------

@pytest.mark.parametrize("t", [-7.0, -1.3, -0.2, 0.0, 0.4, 1.0, 2.5, 12.0])
def test_t_cdf_matches_the_closed_forms_for_1_2_and_3_degrees_of_freedom(t):
    cauchy = 0.5 + math.atan(t) / math.pi
    two = 0.5 + t / (2 * math.sqrt(2 + t * t))
    three = 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
    for df, expected in ((1, cauchy), (2, two), (3, three)):
        assert train.student_t_cdf(t, df) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("t, df, expected", [(1.812461, 10, 0.95), (2.228139, 10, 0.975), (2.015048, 5, 0.95),
                                             (3.169273, 10, 0.995), (2.860935, 19, 0.995), (1.660234, 100, 0.95),
                                             (1.959964, 1e7, 0.975)])
def test_t_cdf_matches_table_values(t, df, expected):
    assert train.student_t_cdf(t, df) == pytest.approx(expected, abs=2e-6)  # tables give 6-7 digits
    assert train.student_t_cdf(-t, df) == pytest.approx(1 - expected, abs=2e-6)


def test_one_sided_t_test_against_94_percent():
    result = train.t_test_above([0.95, 0.93, 0.96, 0.94], 0.94)
    # mean 0.945, s = sqrt(0.0005 / 3), t = 0.005 / (s / 2) = sqrt(3/5), df 3: p = 1 - F_3(t).
    t = math.sqrt(3 / 5)
    p = 0.5 - (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi
    assert result["mean"] == pytest.approx(0.945) and result["std"] == pytest.approx(math.sqrt(0.0005 / 3))
    assert result["t"] == pytest.approx(t) and result["df"] == 3 and result["p_value"] == pytest.approx(p, abs=1e-12)
    assert train.t_test_above([0.95], 0.94)["p_value"] is None  # one run: no spread, no test
    assert train.t_test_above([0.93, 0.93], 0.94)["p_value"] == 1.0


# ---- the trainer -------------------------------------------------------------------------

TINY = ["--preset", "smoke", "--device", "cpu", "--synthetic-train", "800", "--synthetic-test", "200",
        "--batch-size", "100", "--whiten-images", "400"]


def test_a_smoke_run_trains_above_chance_and_writes_its_results(tmp_path):
    run_dir = tmp_path / "smoke"
    assert train.main([*TINY, "--runs", "1", "--run-dir", str(run_dir)]) == 0  # widths 16,32,32, 4 epochs
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["runs"]) == 1 and "SYNTHETIC" in results["data"]
    run = results["runs"][0]
    assert run["accuracy"] > 0.3, run  # chance is 0.1; this run reaches ~0.7
    assert run["time_s"] > 0 and [e["epoch"] for e in run["epochs"]] == [1, 2, 3, 4]
    assert all(0 <= e["val_acc"] <= 1 for e in run["epochs"])
    assert results["summary"]["accuracy"]["p_value"] is None  # one run: no t-test
    markdown = (run_dir / "summary.md").read_text()
    assert "SYNTHETIC" in markdown and "| 0 |" in markdown
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events == ["start", "run", "summary"]
    log = (run_dir / "log.txt").read_text()
    assert "run 0: tta_acc" in log and "time: mean" in log and "says nothing about CIFAR-10" in log


def test_two_runs_on_the_records_paths_with_the_profiler_report_statistics(tmp_path):
    run_dir = tmp_path / "off"
    assert train.main([*TINY, "--widths", "4,8,8", "--epochs", "1", "--runs", "2", "--kernels", "off", "--profile",
                       "--profile-steps", "2:4", "--no-eval-every-epoch", "--run-dir", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert "newton_schulz=torch (record)" in results["kernels"] and "augment=torch (record)" in results["kernels"]
    assert (run_dir / "profile" / "summary.md").is_file() and (run_dir / "profile" / "steps.jsonl").is_file()
    assert "val_acc" not in results["runs"][0]["epochs"][0]
    accuracies = [run["accuracy"] for run in results["runs"]]
    expected = train.t_test_above(accuracies, 0.94)
    assert results["summary"]["accuracy"] == expected and expected["p_value"] is not None
    assert "t-test, H1 mean > 94.00%" in (run_dir / "summary.md").read_text()


def test_kernels_spec_and_bad_options():
    assert ablation.parse_kernels("newton_schulz=grouped", train.FAMILIES) == {"newton_schulz": "grouped",
                                                                               "augment": "ours"}
    with pytest.raises(ValueError, match="unknown family"):
        ablation.parse_kernels("attention=flex", train.FAMILIES)
    with pytest.raises(ValueError, match="--widths"):
        train.check_config(train.parse_args(["--widths", "8,16"])[0], 50_000)
    with pytest.raises(ValueError, match="--batch-size"):
        train.check_config(train.parse_args(["--batch-size", "60000"])[0], 50_000)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in train.TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in text
    assert "--preset" in text and "{synthetic,cifar10}" in text and "says nothing about CIFAR-10" in text
    assert "(default: 0.24)" in text and "--preset smoke changes: synthetic_train=2000" in text


# ---- on a GPU -------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_compiled_fp16_smoke_run_and_both_newton_schulz_paths_agree(tmp_path):
    for choice in ("ours", "torch"):
        run_dir = tmp_path / choice
        assert train.main(["--preset", "smoke", "--device", "cuda", "--compile-mode", "default", "--runs", "1",
                           "--kernels", f"newton_schulz={choice}", "--run-dir", str(run_dir)]) == 0
        assert json.loads((run_dir / "results.json").read_text())["runs"][0]["accuracy"] > 0.5


@pytest.mark.gpu
def test_gpu_padded_batch_matches_per_filter_newton_schulz_at_the_records_shapes():
    grads = [torch.randn(s, device="cuda", dtype=torch.float16).reshape(s[0], -1) for s in RECORD_FILTER_SHAPES]
    for out, g in zip(train.orthogonalize_padded(grads, 3), train.orthogonalize_per_matrix(grads, 3)):
        assert (out.float() - g.float()).abs().max() < 2 ** -6  # bf16 NS, different kernels' summation orders
