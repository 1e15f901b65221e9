"""Step-by-step profiler shared by the GPT and CIFAR trainers (their --profile flag).

Every step: the time of each phase ("data", "forward", "backward", "grad_comm", "optimizer",
any name) and of the whole step, and GPU telemetry from NVML (clocks, power, temperature,
utilization, clock-throttle reasons).  Over a short window of steps: a torch.profiler trace,
reduced to time per op family (attention, MLP, head/CE, Newton-Schulz, norms/elementwise,
communication, other).  The model tags its regions with `label(name)` so kernels can be
attributed to the family that launched them.

Files in out_dir, written by rank 0 only: steps.jsonl (one line appended after every step),
trace.json (when the window closes), summary.md and step_breakdown.png (at finish()).

With profiling off, step(), phase() and label() return one shared no-op context manager: no
CUDA events, no synchronize, no record_function.

    prof = Profiler(run_dir / "profile", enabled=cfg.profile, device=device, trace_window=(10, 13))
    for step in range(steps):
        with prof.step(step):
            with prof.phase("data"):
                x, y = loader.next_batch()
            with prof.phase("forward"):
                loss = model(x, y)       # the model wraps regions in `with label("mlp"):` etc.
            ...
    summary = prof.finish()              # {} when disabled
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType

from speedrun.runlog import write_atomically

# The one object every disabled step()/phase() and every inactive label() returns.
_NO_OP = contextlib.nullcontext()

ATTENTION, MLP, HEAD_CE, NEWTON_SCHULZ, NORM_ELEMENTWISE, COMMUNICATION, OTHER = (
    "attention", "MLP", "head/CE", "Newton-Schulz", "norms/elementwise", "communication", "other")
FAMILIES = (ATTENTION, MLP, HEAD_CE, NEWTON_SCHULZ, NORM_ELEMENTWISE, COMMUNICATION, OTHER)

# The label() names the models use, and their family.  Other label names go through the
# kernel-name patterns; a label matching none is skipped in favour of an enclosing one.
LABEL_FAMILIES = {"attention": ATTENTION, "mlp": MLP, "head_ce": HEAD_CE, "newton_schulz": NEWTON_SCHULZ,
                  "norm": NORM_ELEMENTWISE, "communication": COMMUNICATION}

# Name patterns for kernels no label encloses (e.g. launched from inside torch.compile, which
# drops record_function).  First match wins: an NCCL kernel is communication whatever else
# its name says.  "norm" but not "normal" (random init).
_NAME_PATTERNS = (
    (COMMUNICATION, re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter", re.IGNORECASE)),
    (ATTENTION, re.compile(r"flash|attn|attention|flex|sdpa|fmha", re.IGNORECASE)),
    (HEAD_CE, re.compile(r"softcap|cross_?entropy", re.IGNORECASE)),
    (NEWTON_SCHULZ, re.compile(r"newton|schulz|(?<![a-z])ns\d*_", re.IGNORECASE)),
    (NORM_ELEMENTWISE, re.compile(r"norm(?!al\b|al_)|elementwise|vectorized", re.IGNORECASE)),
)

# NVML clock-event ("throttle") reason bits: the same values under both API names.
_GPU_IDLE = 0x1
_THROTTLE_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                     0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                     0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
                     0x100: "display_clock_setting"}

_BETWEEN_PHASES = "(between phases)"  # step time no phase covered
_TOP_KERNELS = 5


class _TraceWindow:
    """Whether a Profiler's torch.profiler window is open: the one flag label() reads."""

    def __init__(self):
        self.active = False
        # Names label() tagged while open: attribution counts only these as labels, not the
        # phase and ProfilerStep regions that are record_functions too.
        self.labels: set[str] = set()


_trace = _TraceWindow()


def label(name: str):
    """Context manager tagging a model region for kernel attribution ("attention", "mlp", ...).

    A torch.profiler.record_function while a trace window is open, else the shared no-op, so
    models call it unconditionally.  Inside torch.compile it is always the no-op: Dynamo
    drops record_function anyway, and checking is_compiling() first keeps Dynamo from reading
    (and guarding on) the window flag, which would recompile the model when the window opens.
    """
    if torch.compiler.is_compiling() or not _trace.active:
        return _NO_OP
    _trace.labels.add(name)
    return torch.profiler.record_function(name)


def kernel_family(name: str, default: str | None = OTHER) -> str | None:
    """The op family a kernel (or op) name suggests, or `default` when no pattern matches."""
    for family, pattern in _NAME_PATTERNS:
        if pattern.search(name):
            return family
    return default


class Profiler:
    """Per-step phase times and telemetry, and a kernel trace over `trace_window` (steps
    start..end-1).  Only rank 0 profiles: other ranks get a no-op profiler, as with RunLog."""

    def __init__(self, out_dir: str | Path, *, enabled: bool, device: str | torch.device,
                 trace_window: tuple[int, int], rank: int = 0):
        start, end = trace_window
        if not 0 <= start < end:
            raise ValueError(f"trace_window must be (start, end) with 0 <= start < end, got {trace_window}")
        self.enabled = enabled and rank == 0
        self.out_dir = Path(out_dir)
        self.device = torch.device(device)
        self.trace_window = (start, end)
        self._records: list[dict] = []  # one per profiled step, as written to steps.jsonl
        self._phases: list[tuple] | None = None  # (name, begin mark, end mark) of the step in progress
        self._torch_profiler = None  # while the window is open
        self._traced_steps: list[int] = []
        self._trace_done = False
        self._families: dict | None = None  # the trace reduced by family, once the window closed
        self._family_time = ""  # what _families measures: device kernel time or CPU op self time
        self._summary: dict | None = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._clock = _CudaClock(self.device) if self.device.type == "cuda" else _CpuClock()
        self._telemetry = _Telemetry(self.device)
        # Line-buffered append: every finished step is on disk, whatever happens after.
        self._steps_file = open(self.out_dir / "steps.jsonl", "a", buffering=1)

    def __enter__(self) -> Profiler:
        return self

    def __exit__(self, *exc_info) -> None:
        self.finish()

    def step(self, step: int):
        """Context manager around one training step."""
        return self._profiled_step(step) if self.enabled else _NO_OP

    def phase(self, name: str):
        """Context manager around one phase of the step; a phase repeated in a step (gradient
        accumulation) adds up."""
        return self._timed_phase(name) if self.enabled else _NO_OP

    @contextlib.contextmanager
    def _profiled_step(self, step: int):
        start, end = self.trace_window
        if start <= step < end and self._torch_profiler is None and not self._trace_done:
            self._open_trace()
        traced = self._torch_profiler is not None
        self._phases = []
        # ProfilerStep#N is the name trace viewers use to split a trace into steps.
        with torch.profiler.record_function(f"ProfilerStep#{step}") if traced else _NO_OP:
            begin = self._clock.mark()
            yield
            finish = self._clock.mark()
        # Read NVML before synchronizing, while the GPU is still working through the step:
        # after the synchronize it would be idle and report idle clocks.
        telemetry = self._telemetry.read()
        self._clock.synchronize()
        phases_ms: dict[str, float] = collections.defaultdict(float)
        for name, phase_begin, phase_end in self._phases:
            phases_ms[name] += self._clock.elapsed_ms(phase_begin, phase_end)
        self._phases = None
        record = {"step": step, "phases_ms": {name: round(ms, 4) for name, ms in phases_ms.items()},
                  "total_ms": round(self._clock.elapsed_ms(begin, finish), 4), "traced": traced,
                  "telemetry": telemetry}
        self._records.append(record)
        self._steps_file.write(json.dumps(record) + "\n")
        if traced:
            self._traced_steps.append(step)
            if step >= end - 1:
                self._close_trace()

    @contextlib.contextmanager
    def _timed_phase(self, name: str):
        if self._phases is None:
            raise RuntimeError(f"profiler phase {name!r} outside a profiler step()")
        with torch.profiler.record_function(name) if _trace.active else _NO_OP:
            begin = self._clock.mark()
            yield
            self._phases.append((name, begin, self._clock.mark()))

    def _open_trace(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._torch_profiler = torch.profiler.profile(activities=activities)
        self._torch_profiler.start()
        _trace.labels.clear()
        _trace.active = True

    def _close_trace(self) -> None:
        profiler, self._torch_profiler = self._torch_profiler, None
        profiler.stop()
        _trace.active = False
        self._trace_done = True
        write_atomically(self.out_dir / "trace.json", lambda path: profiler.export_chrome_trace(str(path)))
        self._family_time, self._families = _time_by_family(profiler.events(), _trace.labels,
                                                            len(self._traced_steps))

    def finish(self) -> dict:
        """Close the trace if a short run left it open, write summary.md and
        step_breakdown.png, and return the summary ({} when disabled).  Safe to call twice."""
        if not self.enabled:
            return {}
        if self._summary is None:
            if self._torch_profiler is not None:
                self._close_trace()
            self._steps_file.close()
            self._summary = self._summarize()
            write_atomically(self.out_dir / "summary.md",
                              lambda path: path.write_text(self._markdown(self._summary)))
            write_atomically(self.out_dir / "step_breakdown.png", self._plot)
        return self._summary

    # ---- the summary ------------------------------------------------------------------

    def _stats_records(self) -> list[dict]:
        """The steps the statistics cover: those outside the trace window, which torch.profiler
        slows down, unless it covered every step."""
        untraced = [record for record in self._records if not record["traced"]]
        return untraced or self._records

    def _phase_names(self) -> list[str]:
        """Every phase seen, in the order the steps first ran them."""
        return list(dict.fromkeys(name for record in self._records for name in record["phases_ms"]))

    def _summarize(self) -> dict:
        records = self._stats_records()
        step_total = sum(record["total_ms"] for record in records)
        phases = {}
        for name in [*self._phase_names(), _BETWEEN_PHASES] if records else []:
            values = [_phase_ms(record, name) for record in records]
            phases[name] = {**_stats(values), "share": sum(values) / step_total if step_total else 0.0}
        return {
            "steps_profiled": len(self._records),
            "stats_steps": [record["step"] for record in records],
            "phases": phases,
            "step_ms": _stats([record["total_ms"] for record in records]) if records else {},
            "telemetry": _telemetry_summary(self._telemetry.reason, [r["telemetry"] for r in self._records]),
            "trace_steps": self._traced_steps,
            "families": self._families,
            "family_time": self._family_time,
        }

    def _markdown(self, summary: dict) -> str:
        start, end = self.trace_window
        lines = ["# Step profile", ""]
        if not summary["steps_profiled"]:
            return "\n".join([*lines, "No steps were profiled.", ""])
        stats_steps = summary["stats_steps"]
        left_out = ("" if len(stats_steps) == summary["steps_profiled"] else
                    ", leaving out the traced ones, which torch.profiler slows down")
        lines += [f"{summary['steps_profiled']} steps profiled on {self.device}; phase statistics over "
                  f"{len(stats_steps)} steps{left_out}. The mean counts warm-up and compile steps; the "
                  "median barely moves with them.", "",
                  "## Phases", "",
                  "| phase | mean ms | median ms | p90 ms | share of step |", "|---|---:|---:|---:|---:|"]
        for name, stat in summary["phases"].items():
            lines.append(f"| {name} | {stat['mean_ms']:.3f} | {stat['median_ms']:.3f} | {stat['p90_ms']:.3f} "
                         f"| {100 * stat['share']:.1f}% |")
        step = summary["step_ms"]
        lines.append(f"| **step** | {step['mean_ms']:.3f} | {step['median_ms']:.3f} | {step['p90_ms']:.3f} | 100% |")

        lines += ["", "## GPU telemetry", ""]
        telemetry = summary["telemetry"]
        if not telemetry["available"]:
            lines.append(f"Telemetry unavailable: {telemetry['reason']}.")
        else:
            lines += ["| | min | median | max |", "|---|---:|---:|---:|"]
            for key, caption in (("sm_clock_mhz", "SM clock (MHz)"), ("memory_clock_mhz", "memory clock (MHz)"),
                                 ("power_w", "power (W)"), ("temperature_c", "temperature (C)"),
                                 ("gpu_util_pct", "GPU utilization (%)")):
                if telemetry[key]:
                    lines.append(f"| {caption} | {telemetry[key]['min']:g} | {telemetry[key]['median']:g} "
                                 f"| {telemetry[key]['max']:g} |")
            lines += ["", telemetry["note"]]

        lines += ["", "## Kernels by family", ""]
        families = summary["families"]
        if families is None:
            lines.append(f"No trace: the run did not reach the trace window (steps {start} to {end - 1}).")
            return "\n".join(lines) + "\n"
        lines += [f"Traced: {_step_range(summary['trace_steps'])}. Time per traced step, from "
                  f"{summary['family_time']}.", "",
                  "| family | ms/step | share |", "|---|---:|---:|"]
        for family, entry in families.items():
            lines.append(f"| {family} | {entry['ms_per_step']:.3f} | {100 * entry['share']:.1f}% |")
        for family, entry in families.items():
            if entry["top"]:
                lines += ["", f"### {family}", "", "| kernel | ms/step | calls/step |", "|---|---:|---:|"]
                lines += [f"| `{_shorten(kernel['name'])}` | {kernel['ms_per_step']:.3f} "
                          f"| {kernel['calls_per_step']:g} |" for kernel in entry["top"]]
        return "\n".join(lines) + "\n"

    def _plot(self, path: Path) -> None:
        # Figure without pyplot: renders with Agg and leaves the process's backend alone.
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12, 4.5), layout="constrained")
        steps_ax, families_ax = fig.subplots(1, 2, width_ratios=[3, 1])
        records = self._records
        steps = [record["step"] for record in records]
        bottom = [0.0] * len(records)
        for name in [*self._phase_names(), _BETWEEN_PHASES]:
            heights = [_phase_ms(record, name) for record in records]
            steps_ax.bar(steps, heights, bottom=bottom, label=name)
            bottom = [b + h for b, h in zip(bottom, heights)]
        if self._traced_steps:
            steps_ax.axvspan(self._traced_steps[0] - 0.5, self._traced_steps[-1] + 0.5, color="grey",
                             alpha=0.15, label="traced")
        totals = [record["total_ms"] for record in records]
        title = "time per step by phase"
        if totals and max(totals) > 3 * statistics.median(totals):
            # Warm-up and compile steps would flatten every other bar.
            steps_ax.set_ylim(0, 3 * statistics.median(totals))
            title += " (axis cut at 3x the median step)"
        steps_ax.set(title=title, xlabel="step", ylabel="ms")
        steps_ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4)
        if self._families is None:
            families_ax.text(0.5, 0.5, "no trace", ha="center", va="center")
            families_ax.set_axis_off()
        else:
            families_ax.barh(list(self._families), [100 * entry["share"] for entry in self._families.values()])
            families_ax.invert_yaxis()  # first family on top, as in summary.md
            families_ax.set(title=f"traced time by family\n({self._family_time})", xlabel="%")
        fig.savefig(path, format="png", dpi=100)


# ---- timing ------------------------------------------------------------------------------

class _CpuClock:
    def mark(self) -> float:
        return time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_ms(self, begin: float, end: float) -> float:
        return 1000 * (end - begin)


class _CudaClock:
    """CUDA events on the device's current stream, read only after the step's synchronize."""

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def elapsed_ms(self, begin: torch.cuda.Event, end: torch.cuda.Event) -> float:
        return begin.elapsed_time(end)


# ---- telemetry ---------------------------------------------------------------------------

class _Telemetry:
    """NVML readings of the profiled GPU; when there are none, `reason` says why."""

    def __init__(self, device: torch.device):
        self.reason: str | None = None
        self._handle = None
        if device.type != "cuda":
            self.reason = f"no GPU (device {device})"
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py (pynvml) is not installed"
            return
        self._nvml = pynvml
        # The newer name first; drivers before 535 only have the "throttle" one.
        self._clock_reasons = (getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
                               or pynvml.nvmlDeviceGetCurrentClocksThrottleReasons)
        try:
            pynvml.nvmlInit()
            self._handle = self._device_handle(device)
        except pynvml.NVMLError as error:
            self.reason = f"NVML error: {error}"

    def _device_handle(self, device: torch.device):
        """NVML numbers every GPU; torch numbers only those CUDA_VISIBLE_DEVICES lists."""
        nvml = self._nvml
        index = device.index if device.index is not None else torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if not visible:
            return nvml.nvmlDeviceGetHandleByIndex(index)
        entry = visible.split(",")[index].strip()
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        # A UUID entry, which CUDA accepts abbreviated: match it as a prefix.
        for nvml_index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            if (uuid.decode() if isinstance(uuid, bytes) else uuid).startswith(entry):
                return handle
        raise nvml.NVMLError(nvml.NVML_ERROR_NOT_FOUND)

    def read(self) -> dict | None:
        """This instant's readings; a field the GPU does not report is None."""
        if self._handle is None:
            return None
        nvml = self._nvml
        power_mw = self._query(nvml.nvmlDeviceGetPowerUsage)
        utilization = self._query(nvml.nvmlDeviceGetUtilizationRates)
        return {"sm_clock_mhz": self._query(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
                "memory_clock_mhz": self._query(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_MEM),
                "power_w": None if power_mw is None else power_mw / 1000,
                "temperature_c": self._query(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
                "gpu_util_pct": None if utilization is None else utilization.gpu,
                "throttle_reasons": self._query(self._clock_reasons)}

    def _query(self, function: Callable, *args):
        try:
            return function(self._handle, *args)
        except self._nvml.NVMLError:
            return None


def _telemetry_summary(reason: str | None, samples: list[dict | None]) -> dict:
    """Min/median/max per reading, and a sentence on clock drops and throttle reasons."""
    samples = [sample for sample in samples if sample is not None]
    if reason is not None or not samples:
        return {"available": False, "reason": reason or "no steps profiled"}
    summary: dict = {"available": True}
    for key in ("sm_clock_mhz", "memory_clock_mhz", "power_w", "temperature_c", "gpu_util_pct"):
        values = [sample[key] for sample in samples if sample[key] is not None]
        summary[key] = ({"min": min(values), "median": statistics.median(values), "max": max(values)}
                        if values else None)
    reasons = collections.Counter(name for sample in samples for bit, name in _THROTTLE_REASONS.items()
                                  if bit != _GPU_IDLE and (sample["throttle_reasons"] or 0) & bit)
    summary["throttle_reasons"] = dict(reasons)
    # A GPU found idle (waiting on the CPU, or compiling) clocks down by design: not a throttle.
    busy = [sample for sample in samples if not (sample["throttle_reasons"] or 0) & _GPU_IDLE]
    clocks = [sample["sm_clock_mhz"] for sample in busy if sample["sm_clock_mhz"] is not None]
    notes = []
    if clocks and min(clocks) < 0.95 * max(clocks):
        dropped = sum(clock < 0.95 * max(clocks) for clock in clocks)
        notes.append(f"The SM clock dropped to {min(clocks)} MHz, {100 * (1 - min(clocks) / max(clocks)):.0f}% "
                     f"below the highest seen ({max(clocks)} MHz), in {dropped} of {len(clocks)} busy steps.")
    if reasons:
        listed = ", ".join(f"{name} ({count} steps)" for name, count in reasons.most_common())
        notes.append(f"Clock-limiting reasons were reported: {listed}.")
    summary["note"] = " ".join(notes) or ("Clocks held within 5% of the highest seen and no throttle reason "
                                          "other than idle was reported.")
    return summary


# ---- the trace, by family ----------------------------------------------------------------

def _time_by_family(events, labels: set[str], traced_steps: int) -> tuple[str, dict]:
    """What is measured, and per family its time and top kernels per traced step.

    Device kernels when the trace has any, attributed through the CPU op that launched them;
    on a CPU-only run, each CPU op's self time (excluding its children, so nothing counts
    twice), attributed the same way.
    """
    forward_ops = {}  # (thread, sequence_nr) -> the forward op an autograd node was made by
    for event in events:
        if event.sequence_nr >= 0 and not event.fwd_thread:
            forward_ops.setdefault((event.thread, event.sequence_nr), event)

    kernels = [event for event in events if event.device_type != DeviceType.CPU
               and not event.is_user_annotation and event.activity_type != "gpu_user_annotation"]
    timed = []  # (name, family, µs)
    if kernels:
        time_source = "device kernel time"
        # A kernel's linked correlation id is the id of the CPU op (or record_function) that launched it.
        launchers = {event.id: event for event in events
                     if event.device_type == DeviceType.CPU and event.linked_correlation_id == 0}
        for kernel in kernels:
            launcher = launchers.get(kernel.linked_correlation_id)
            timed.append((kernel.name, _attribute(kernel.name, launcher, labels, forward_ops),
                          kernel.time_range.elapsed_us()))
    else:
        time_source = "CPU op self time"  # no device kernels in the trace
        for op in events:
            if op.device_type == DeviceType.CPU and not op.is_user_annotation and not op.is_async:
                timed.append((op.name, _attribute(op.name, op, labels, forward_ops), op.self_cpu_time_total))

    per_family: dict[str, dict[str, list]] = {family: {} for family in FAMILIES}
    for name, family, us in timed:
        kernel = per_family[family].setdefault(name, [0.0, 0])
        kernel[0] += us
        kernel[1] += 1
    total_us = sum(us for _, _, us in timed)
    steps = max(traced_steps, 1)
    table = {}
    for family, kernels_by_name in per_family.items():
        family_us = sum(us for us, _ in kernels_by_name.values())
        top = sorted(kernels_by_name.items(), key=lambda item: -item[1][0])[:_TOP_KERNELS]
        table[family] = {"ms_per_step": family_us / 1000 / steps, "share": family_us / total_us if total_us else 0.0,
                         "top": [{"name": name, "ms_per_step": us / 1000 / steps, "calls_per_step": calls / steps}
                                 for name, (us, calls) in top]}
    return time_source, table


def _attribute(name: str, launcher, labels: set[str], forward_ops: dict) -> str:
    """The family of the nearest label() region above the launching op; else the one the
    kernel's name suggests; else the one the launching op's name suggests (custom ops such as
    kernels::softcap_ce name their family)."""
    return (_enclosing_label_family(launcher, labels, forward_ops) or kernel_family(name, default=None)
            or kernel_family(launcher.name if launcher is not None else ""))


def _enclosing_label_family(op, labels: set[str], forward_ops: dict) -> str | None:
    """Walk up the op's parents to the nearest label with a family.

    Backward ops run outside the model's label regions (on the autograd engine's thread on a
    GPU), so at an autograd node the walk continues from the forward op that created it: the
    node carries that op's thread (fwd_thread) and sequence number.
    """
    while op is not None:
        if op.is_user_annotation and op.name in labels:
            family = LABEL_FAMILIES.get(op.name) or kernel_family(op.name, default=None)
            if family is not None:
                return family
        forward_op = forward_ops.get((op.fwd_thread, op.sequence_nr)) if op.fwd_thread else None
        op = forward_op if forward_op is not None else op.cpu_parent
    return None


# ---- helpers -----------------------------------------------------------------------------

def _phase_ms(record: dict, name: str) -> float:
    if name == _BETWEEN_PHASES:
        return max(record["total_ms"] - sum(record["phases_ms"].values()), 0.0)
    return record["phases_ms"].get(name, 0.0)


def _stats(values: list[float]) -> dict:
    p90 = statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]
    return {"mean_ms": statistics.fmean(values), "median_ms": statistics.median(values), "p90_ms": p90}


def _step_range(steps: list[int]) -> str:
    return f"steps {steps[0]} to {steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"


def _shorten(name: str, limit: int = 100) -> str:
    """Kernel names from C++ templates run to thousands of characters."""
    name = name.replace("|", "\\|")
    return name if len(name) <= limit else name[:limit - 3] + "..."
