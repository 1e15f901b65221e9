"""The step profiler on CPU: a tiny labelled model trained for a few steps writes the four
files, attributes its labelled regions (forward and backward) to their families, and says
telemetry is unavailable; disabled, it is one shared no-op that writes nothing and never
starts torch.profiler."""
import json

import pytest
import torch
from torch import nn

from speedrun import profiler
from speedrun.profiler import Profiler, kernel_family, label

STEPS = 8
TRACE_WINDOW = (3, 6)
PHASES = ("data", "forward", "backward", "optimizer")


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(32, 32)
        self.up = nn.Linear(32, 128)
        self.down = nn.Linear(128, 32)

    def forward(self, x):
        with label("attention"):
            x = x + torch.softmax(self.mix(x), dim=-1)
        with label("mlp"):
            x = x + self.down(torch.relu(self.up(x)))
        return x.square().mean()


def train(prof: Profiler, steps: int = STEPS) -> dict:
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        with prof.step(step):
            with prof.phase("data"):
                x = torch.randn(64, 32)
            with prof.phase("forward"):
                loss = model(x)
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return prof.finish()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("profile")
    summary = train(Profiler(out_dir, enabled=True, device="cpu", trace_window=TRACE_WINDOW))
    return out_dir, summary


def test_writes_all_files(run):
    out_dir, _ = run
    for name in ("summary.md", "steps.jsonl", "trace.json", "step_breakdown.png"):
        assert (out_dir / name).is_file(), name
    assert not list(out_dir.glob(".*tmp*")), "a temporary file was left behind"


def test_summary_md_names_phases_and_families(run):
    text = (run[0] / "summary.md").read_text()
    for name in (*PHASES, *profiler.FAMILIES):
        assert name in text, name


def test_steps_jsonl_has_one_line_per_step(run):
    lines = (run[0] / "steps.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["step"] for record in records] == list(range(STEPS))
    for record in records:
        assert set(record["phases_ms"]) == set(PHASES)
        assert record["total_ms"] >= sum(record["phases_ms"].values()) > 0
        assert record["traced"] == (TRACE_WINDOW[0] <= record["step"] < TRACE_WINDOW[1])
        assert record["telemetry"] is None


def test_trace_is_chrome_json(run):
    trace = json.loads((run[0] / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"mlp", "attention", "forward", f"ProfilerStep#{TRACE_WINDOW[0]}"} <= names


def test_png_is_a_png(run):
    assert (run[0] / "step_breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_labelled_regions_are_attributed_forward_and_backward(run):
    _, summary = run
    families = summary["families"]
    assert set(families) == set(profiler.FAMILIES)
    assert families["MLP"]["share"] > 0 and families["attention"]["share"] > 0
    assert sum(entry["share"] for entry in families.values()) == pytest.approx(1.0)
    # Forward matmuls run as addmm; backward ones as mm, reached only through the autograd
    # node's link to the forward op that created it.
    mlp_ops = {kernel["name"] for kernel in families["MLP"]["top"]}
    assert "aten::addmm" in mlp_ops and "aten::mm" in mlp_ops
    assert summary["family_time"] == "CPU op self time"
    assert summary["trace_steps"] == list(range(*TRACE_WINDOW))


def test_phase_statistics_leave_out_traced_steps(run):
    _, summary = run
    assert summary["stats_steps"] == [s for s in range(STEPS) if not TRACE_WINDOW[0] <= s < TRACE_WINDOW[1]]
    assert list(summary["phases"]) == [*PHASES, "(between phases)"]
    for stat in summary["phases"].values():
        assert stat["median_ms"] <= stat["p90_ms"]
    assert sum(stat["share"] for stat in summary["phases"].values()) == pytest.approx(1.0)
    json.dumps(summary)  # trainers log it as JSON


def test_telemetry_unavailable_without_gpu(run):
    out_dir, summary = run
    assert summary["telemetry"] == {"available": False, "reason": "no GPU (device cpu)"}
    assert "Telemetry unavailable: no GPU" in (out_dir / "summary.md").read_text()


def test_finish_twice_returns_the_same_summary(tmp_path):
    prof = Profiler(tmp_path, enabled=True, device="cpu", trace_window=(0, 1))
    first = train(prof, steps=2)
    assert prof.finish() is first


def test_run_shorter_than_window_closes_trace_at_finish(tmp_path):
    summary = train(Profiler(tmp_path, enabled=True, device="cpu", trace_window=(1, 10)), steps=3)
    assert summary["trace_steps"] == [1, 2]
    assert (tmp_path / "trace.json").is_file()
    assert not profiler._trace.active


def test_disabled_is_one_shared_no_op(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("torch.profiler started while profiling is off")

    monkeypatch.setattr(torch.profiler, "profile", must_not_run)
    out_dir = tmp_path / "profile"
    prof = Profiler(out_dir, enabled=False, device="cpu", trace_window=(0, 4))
    no_op = prof.step(0)
    assert prof.phase("forward") is no_op and label("mlp") is no_op and prof.step(1) is no_op
    assert train(prof, steps=5) == {}
    assert not out_dir.exists()


def test_only_rank_zero_profiles(tmp_path):
    prof = Profiler(tmp_path / "rank1", enabled=True, device="cpu", trace_window=(0, 2), rank=1)
    assert train(prof, steps=3) == {}
    assert not (tmp_path / "rank1").exists()


def test_label_is_a_no_op_outside_the_window(tmp_path):
    prof = Profiler(tmp_path, enabled=True, device="cpu", trace_window=(2, 3))
    with prof.step(0):
        assert label("mlp") is label("attention")
    with prof.step(2):
        assert label("mlp") is not label("attention")
    prof.finish()
    assert not profiler._trace.active


def test_label_inside_torch_compile_does_not_recompile_when_window_opens(tmp_path):
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    @torch.compile(backend=counting_backend, fullgraph=True)
    def labelled(x):
        with label("mlp"):
            return torch.relu(x) * 2

    prof = Profiler(tmp_path, enabled=True, device="cpu", trace_window=(1, 2))
    for step in range(3):
        with prof.step(step):
            labelled(torch.ones(4))
    prof.finish()
    assert len(graphs) == 1


def test_phase_outside_step_is_an_error(tmp_path):
    prof = Profiler(tmp_path, enabled=True, device="cpu", trace_window=(0, 1))
    with pytest.raises(RuntimeError, match="outside"):
        with prof.phase("data"):
            pass
    prof.finish()


def test_trace_window_must_be_a_range(tmp_path):
    with pytest.raises(ValueError):
        Profiler(tmp_path, enabled=False, device="cpu", trace_window=(5, 5))


@pytest.mark.parametrize("name, family", [
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("c10d::allreduce_", "communication"),
    ("all_gather_into_tensor_coalesced", "communication"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
    ("_sliding_window_attn_fwd", "attention"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("softcap_ce_cached_kernel<__nv_bfloat16>", "head/CE"),
    ("kernels::softcap_ce", "head/CE"),
    ("aten::cross_entropy_loss", "head/CE"),
    ("newton_schulz_step_kernel", "Newton-Schulz"),
    ("_ns5_iteration_kernel", "Newton-Schulz"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>", "norms/elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "norms/elementwise"),
    ("rms_norm_fwd", "norms/elementwise"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "other"),
    ("columns_transpose_kernel", "other"),  # "ns_" inside a word is not Newton-Schulz
    ("Memcpy HtoD (Pageable -> Device)", "other"),
    ("aten::normal_", "other"),  # random init, not a norm
])
def test_kernel_family_by_name(name, family):
    assert kernel_family(name) == family


def test_kernel_family_default_when_nothing_matches():
    assert kernel_family("gemm", default=None) is None
