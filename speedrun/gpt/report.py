"""A GPT run's summary.md and training.png, built from its metrics.jsonl alone, so a finished
run and one stopped by Ctrl-C are summarized the same way, from what was logged."""
from __future__ import annotations

import json
from pathlib import Path

from speedrun.runlog import write_atomically


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short by an interrupt is skipped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def step_times(steps: list[dict], timing_warmup: int) -> dict[int, float]:
    """ms per timed step, from the cumulative train_time_ms of consecutive step records.  The
    clock restarts from 0 for step timing_warmup + 1; a step whose predecessor was not logged
    in this run (the first after --resume) has no time of its own."""
    cumulative = {record["step"]: record["train_time_ms"] for record in steps}
    times = {}
    for step, total in cumulative.items():
        if step == timing_warmup + 1:
            times[step] = total
        elif step > timing_warmup + 1 and step - 1 in cumulative:
            times[step] = total - cumulative[step - 1]
    return times


def write_summary(run_dir: Path, *, preset: str, timing_warmup: int, device: str,
                  peak_memory_gib: float | None = None, stopped_by: str | None = None) -> tuple[Path, Path]:
    """Write run_dir/summary.md and run_dir/training.png (each atomically); return their paths.

    stopped_by: None for a finished run, else what ended it early ("Ctrl-C", or an
    exception's one-line description)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    start = next(record for record in records if record["event"] == "start")
    cfg, env = start["config"], start["environment"]
    steps = [record for record in records if record["event"] == "step"]
    vals = [record for record in records if record["event"] == "val"]
    losses = [record for record in steps if "train_loss" in record]
    entropy_rate = vals[0]["entropy_rate"] if vals else None
    last_step = steps[-1]["step"] if steps else 0
    timed = last_step - timing_warmup
    mean_ms = steps[-1]["train_time_ms"] / timed if steps and timed > 0 else None

    status = "finished" if stopped_by is None else f"stopped by {stopped_by} after step {last_step}"
    lines = [f"# GPT speedrun: {preset} preset, {last_step}/{cfg['steps']} steps, {status}", "",
             f"- command: `{env['command']}`",
             f"- device: {device}",
             f"- kernels: {start['kernels']}",
             f"- steps: {last_step} of {cfg['steps']}, {cfg['batch_tokens']:,} tokens each"]
    if vals:
        final, best = vals[-1], min(vals, key=lambda record: record["val_loss"])
        if entropy_rate is None:
            floor = "corpus entropy rate: unknown (FineWeb data: only the synthetic corpus has a known one)"
        else:
            floor = (f"corpus entropy rate {entropy_rate:.4f} nats/token (the val loss's floor): gap "
                     f"{final['val_loss'] - entropy_rate:.4f} final, {best['val_loss'] - entropy_rate:.4f} best")
        lines += [f"- val loss: final {final['val_loss']:.4f} (step {final['step']}), best {best['val_loss']:.4f} "
                  f"(step {best['step']}); {floor}"]
    else:
        lines += ["- val loss: no validation ran"]
    if losses:
        lines += [f"- final train loss: {losses[-1]['train_loss']:.4f} (step {losses[-1]['step']}, mean over the "
                  f"last {cfg['log_every']} step(s))"]
    if mean_ms is not None:
        lines += [f"- mean step time: {mean_ms:.2f} ms/step, {cfg['batch_tokens'] / mean_ms * 1000:,.0f} tokens/s "
                  f"(steps {timing_warmup + 1}..{last_step}; the first {timing_warmup}, compilation and warm-up, "
                  f"are not timed)",
                  f"- train time: {steps[-1]['train_time_ms'] / 1000:.1f} s (timed steps, without validation); "
                  f"wall time {records[-1]['time'] - start['time']:.1f} s from start to the last record"]
    if peak_memory_gib is not None:
        lines += [f"- peak GPU memory: {peak_memory_gib:.1f} GiB"]
    outputs = [run_dir / name for name in ("log.txt", "metrics.jsonl", "training.png", "profile/summary.md")]
    outputs += sorted((run_dir / "checkpoints").glob("*.pt"))
    summary, plot = run_dir / "summary.md", run_dir / "training.png"
    write_atomically(plot, lambda path: _plot(path, steps, vals, losses, entropy_rate, timing_warmup,
                                              cfg["batch_tokens"], mean_ms))
    lines += ["", "Outputs:", ""] + [f"- `{path}`" for path in outputs if path.exists()]
    write_atomically(summary, lambda path: path.write_text("\n".join(lines) + "\n"))
    return summary, plot


def _plot(path: Path, steps: list[dict], vals: list[dict], losses: list[dict], entropy_rate: float | None,
          timing_warmup: int, batch_tokens: int, mean_ms: float | None) -> None:
    # Figure without pyplot: renders with Agg and leaves the process's backend alone.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    loss_ax, time_ax = fig.subplots(1, 2)
    loss_ax.plot([r["step"] for r in losses], [r["train_loss"] for r in losses], label="train loss")
    loss_ax.plot([r["step"] for r in vals], [r["val_loss"] for r in vals], "o-", label="val loss")
    if entropy_rate is not None:
        loss_ax.axhline(entropy_rate, color="grey", linestyle="--", label=f"corpus entropy rate {entropy_rate:.3f}")
    loss_ax.set(title="loss", xlabel="step", ylabel="nats/token")
    loss_ax.legend()

    times = step_times(steps, timing_warmup)
    if times:
        time_ax.plot(list(times), list(times.values()), label="ms/step")
        time_ax.axhline(mean_ms, color="grey", linestyle="--", label=f"mean {mean_ms:.1f} ms/step")
        time_ax.legend()

        def throughput(ms):  # tokens/s <-> ms/step: the same map both ways
            return batch_tokens * 1000 / ms.clip(min=1e-9)

        time_ax.secondary_yaxis("right", functions=(throughput, throughput)).set_ylabel("tokens/s")
    else:
        time_ax.text(0.5, 0.5, "no timed steps", ha="center", va="center", transform=time_ax.transAxes)
    time_ax.set(title=f"step time (timed steps: from step {timing_warmup + 1})", xlabel="step", ylabel="ms")
    fig.savefig(path, format="png", dpi=100)
