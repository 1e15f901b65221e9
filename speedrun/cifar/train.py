"""The CIFAR-10 speedrun trainer: the airbench94_muon recipe (DESIGN.md §3b), N timed runs and their statistics.

    python -m speedrun.cifar --preset smoke                 # tiny widths, synthetic data, CPU ok
    python -m speedrun.cifar --data cifar10 --runs 20       # the record's recipe on CIFAR-10 (GPU)

Reads top to bottom: the configuration and its presets; the optimizers (Muon on the six 3x3
filters, Nesterov SGD on the biases and the head) and the schedule; evaluation with
test-time augmentation; the Student-t statistics; one run; `main`, which builds everything
once and trains `--runs` runs on the same (compiled) model, resetting it before each.

Timing follows the record exactly: CUDA events (host timers on a CPU) around the whitening
initialization, each epoch of training (its augmentation included) and the final TTA
evaluation, summed.  Not timed: loading the data to the device, building and compiling the
model, the warm-up run (random labels, CUDA only: it compiles every graph the timed runs
use), seeding, and the per-epoch evaluation without TTA.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from speedrun import ablation, runlog
from speedrun.cli import ArgumentParser, UsageError
from speedrun.cli import run as run_cli
from speedrun.cifar import data as cifar_data
from speedrun.cifar.model import CifarNet
from speedrun.gpt import baseline
from speedrun.profiler import Profiler, label

# --kernels families: the first choice is ours, the second the record's.
#   newton_schulz: ours = the six filter updates zero-padded to one [6, 256, 2304] stack, ONE
#       kernels.newton_schulz call; torch = the record's loop, one torch.compile'd NS per filter;
#       grouped = one kernels.newton_schulz call per distinct filter shape (4 calls).
#   augment: ours = the random crop as one gather; torch = the record's 25 masked copies.
FAMILIES = {"newton_schulz": ("ours", "torch", "grouped"), "augment": ("ours", "torch")}
TARGET_ACCURACY = 0.94


def option(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class TrainConfig:
    # data
    data: str = option("synthetic", "synthetic: the embedded CIFAR-shaped stand-in, generated offline (its accuracy "
                                    "says nothing about CIFAR-10); cifar10: the real set, downloaded on first use")
    data_dir: str | None = option(None, "cache folder for CIFAR-10 (it goes to <dir>/cifar10/); default "
                                        "$SPEEDRUN_CACHE, else ~/.cache/speedrun")
    synthetic_train: int = option(50_000, "synthetic training images (CIFAR-10 has 50,000)")
    synthetic_test: int = option(10_000, "synthetic test images (CIFAR-10 has 10,000)")
    # runs
    runs: int = option(5, "timed runs; each starts from fresh weights (seed + run index)")
    warmup: bool = option(True, "on CUDA, one untimed run on random labels first, to compile and autotune")
    # recipe
    epochs: int = option(8, "training epochs (the LR decays linearly to 0 over all of their steps)")
    batch_size: int = option(2000, "training batch (the last partial batch of an epoch is dropped)")
    widths: str = option("64,256,256", "channels of the three conv groups")
    whiten_images: int = option(5000, "first training images whose 2x2 patch covariance sets the whitening filters")
    whiten_eps: float = option(5e-4, "added to each eigenvalue before the 1/sqrt scaling of the whitening filters")
    whiten_bias_epochs: int = option(3, "epochs during which the whitening bias trains (its LR decays to 0 over them)")
    bias_lr: float = option(0.053, "SGD learning rate of the whitening and BatchNorm biases")
    head_lr: float = option(0.67, "SGD learning rate of the linear head")
    sgd_momentum: float = option(0.85, "SGD Nesterov momentum")
    weight_decay: float = option(2e-6, "weight decay per training example: each SGD group decays by "
                                       "weight_decay * batch_size / its initial LR (times its LR)")
    muon_lr: float = option(0.24, "Muon learning rate (the six 3x3 conv filters)")
    muon_momentum: float = option(0.6, "Muon momentum: buf = m*buf + g, update from g + m*buf (Nesterov)")
    ns_steps: int = option(3, "Newton-Schulz steps of Muon's orthogonalization")
    label_smoothing: float = option(0.2, "label smoothing of the (summed) cross-entropy")
    flip: bool = option(True, "alternating flip: random mirror in epoch 0, the whole set mirrored every odd epoch")
    translate: int = option(2, "random translation: reflect-pad by this many pixels, crop back at a random offset")
    tta_level: int = option(2, "test-time augmentation: 0 none, 1 mirror, 2 mirror + one-pixel translations")
    eval_every_epoch: bool = option(True, "evaluate (no TTA, untimed) after every epoch, as the record prints")
    # implementation
    kernels: str = option("auto", "implementation per op family: auto (ours), off (the record's), or e.g. "
                                  "newton_schulz=torch; families: "
                                  + ", ".join(f"{f} ({'/'.join(c)})" for f, c in FAMILIES.items()))
    compile: bool = option(True, "torch.compile the model (CUDA only: CPU runs are eager)")
    compile_mode: str = option("max-autotune", "torch.compile mode")
    dtype: str = option("auto", "auto (float16 on CUDA, float32 on CPU), float16, bfloat16, float32; "
                                "BatchNorm always runs in float32")
    device: str = option("auto", "auto (CUDA if available), cuda, cpu")
    seed: int = option(0, "run r draws its weights and augmentations from seed + r; the synthetic set uses seed")
    # outputs
    run_dir: str | None = option(None, "output folder (default runs/cifar-<preset>-<time>); an existing one is "
                                       "refused unless --overwrite")
    overwrite: bool = option(False, "replace an existing --run-dir (its results are lost)")
    profile: bool = option(False, "profile the first timed run: per-step phases, GPU telemetry, a kernel trace "
                                  "(its time then includes the profiler's synchronizations)")
    profile_steps: str = option("10:13", "steps start:end of the first timed run traced when --profile is on")


PRESETS = {
    # The record: airbench94_muon's configuration (on the synthetic set unless --data cifar10).
    "record": {},
    # Tiny widths, 4 epochs on a small synthetic set: 2 runs take a CPU a minute or two and reach
    # ~85% (chance: 10%).  Same recipe otherwise.
    "smoke": dict(synthetic_train=2000, synthetic_test=500, runs=2, epochs=4, batch_size=200, widths="16,32,32",
                  whiten_images=1000, whiten_bias_epochs=2, profile_steps="3:5"),
}


def parse_args(argv=None) -> tuple[TrainConfig, str]:
    parser = ArgumentParser(
        prog="python -m speedrun.cifar",
        description="Train the CIFAR-10 speedrun network (the airbench94_muon recipe) --runs times and report "
                    "each run's TTA accuracy and time, their mean/std, and a one-sided t-test of mean > 94%%. "
                    "A preset sets the defaults; any option overrides.",
        epilog="Defaults shown are the record preset's; --preset smoke changes: "
               + ", ".join(f"{k}={v}" for k, v in PRESETS["smoke"].items()) + ".")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="record",
                        help="record: the record's configuration; smoke: tiny widths (16,32,32), 4 epochs on 2,000 "
                             "synthetic images, 2 runs (a CPU runs it in a minute or two)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{field.metadata['help']} (default: {field.default})")
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            choices = {"data": ("synthetic", "cifar10"), "tta_level": (0, 1, 2),
                       "dtype": ("auto", "float16", "bfloat16", "float32"),
                       "device": ("auto", "cuda", "cpu")}.get(field.name)
            parser.add_argument(flag, type=kind, default=None, choices=choices,
                                help=field.metadata["help"] + ("" if field.default is None else
                                                               f" (default: {field.default})"))
    args = parser.parse_args(argv)
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None and k != "preset"}}
    return TrainConfig(**values), args.preset


# ---- Muon on the conv filters -----------------------------------------------------------

def orthogonalize_padded(matrices: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """All matrices zero-padded to the largest rows x cols and orthogonalized in ONE batched call.

    Exact: padding G with zero rows and columns leaves ||G||_F and every product of the
    iteration block-diagonal, so the top-left block of the result is NS(G) (the sums only
    gain exact zeros)."""
    rows, cols = max(m.size(0) for m in matrices), max(m.size(1) for m in matrices)
    stack = matrices[0].new_zeros(len(matrices), rows, cols)
    for i, m in enumerate(matrices):
        stack[i, :m.size(0), :m.size(1)] = m
    out = kernels.newton_schulz(stack, steps=steps)
    return [out[i, :m.size(0), :m.size(1)] for i, m in enumerate(matrices)]


def orthogonalize_grouped(matrices: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """One batched kernels.newton_schulz call per distinct matrix shape."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, m in enumerate(matrices):
        by_shape.setdefault(m.shape, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(matrices)
    for indices in by_shape.values():
        for i, o in zip(indices, kernels.newton_schulz(torch.stack([matrices[i] for i in indices]), steps=steps)):
            out[i] = o
    return out


def orthogonalize_per_matrix(matrices: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """The record's path: one torch.compile'd NS (eager on CPU) per matrix, in a Python loop."""
    return [baseline.record_newton_schulz(m, steps) for m in matrices]


ORTHOGONALIZERS = {"ours": orthogonalize_padded, "grouped": orthogonalize_grouped, "torch": orthogonalize_per_matrix}


class FilterMuon(torch.optim.Optimizer):
    """Muon as the CIFAR record applies it to conv filters p [out, in, k, k], per step:

        buf = m * buf + g;   u = g + m * buf (Nesterov) or buf
        p  *= sqrt(out) / ||p||_F                 (weight renormalized before the step)
        p  -= lr * NS(u reshaped to out x in*k*k)

    with NS the 3-step quintic Newton-Schulz in bf16.  `orthogonalize` maps the list of
    update matrices to their NS (ORTHOGONALIZERS: ours batches all of them in one call)."""

    def __init__(self, params, *, lr: float, momentum: float, nesterov: bool = True, ns_steps: int = 3,
                 orthogonalize: str = "ours"):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov))
        self.ns_steps = ns_steps
        self.orthogonalize = ORTHOGONALIZERS[orthogonalize]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad)) for p in params]
            momentum = group["momentum"]
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads)
            updates = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
            # p *= sqrt(out) / ||p||, rounded as the record's `sqrt(out) / p.norm()` (a reciprocal, then a scalar product).
            scales = torch._foreach_reciprocal(torch._foreach_norm(params))
            torch._foreach_mul_(scales, [math.sqrt(len(p)) for p in params])
            torch._foreach_mul_(params, scales)
            with label("newton_schulz"):
                orthogonal = self.orthogonalize([u.reshape(len(u), -1) for u in updates], self.ns_steps)
            # bf16 -> the parameter's dtype is exact at these magnitudes; the add rounds once, as the record's.
            torch._foreach_add_(params, [o.reshape(p.shape).to(p.dtype) for o, p in zip(orthogonal, params)],
                                alpha=-group["lr"])


def make_optimizers(model: CifarNet, cfg: TrainConfig, orthogonalize: str) -> tuple[torch.optim.SGD, FilterMuon]:
    """(SGD over [whitening bias], [BN biases], [head], Muon over the six filters), as the record."""
    whiten_bias, norm_biases, head = model.sgd_groups()
    decay = cfg.weight_decay * cfg.batch_size
    groups = [dict(params=whiten_bias, lr=cfg.bias_lr, weight_decay=decay / cfg.bias_lr),
              dict(params=norm_biases, lr=cfg.bias_lr, weight_decay=decay / cfg.bias_lr),
              dict(params=head, lr=cfg.head_lr, weight_decay=decay / cfg.head_lr)]
    on_cuda = model.head.weight.is_cuda
    sgd = torch.optim.SGD(groups, momentum=cfg.sgd_momentum, nesterov=True, fused=True if on_cuda else None)
    muon = FilterMuon(model.filters(), lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.ns_steps,
                      orthogonalize=orthogonalize)
    for optimizer in (sgd, muon):
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return sgd, muon


def set_learning_rates(sgd: torch.optim.SGD, muon: FilterMuon, step: int, total_steps: int,
                       whiten_bias_steps: int) -> None:
    """Linear decay to 0, no warm-up: the whitening bias over its own steps, the rest over the run.
    (After its steps the whitening bias gets no gradient, so SGD skips it; the 0 is for clarity.)"""
    whiten_group, *other_groups = sgd.param_groups
    whiten_group["lr"] = whiten_group["initial_lr"] * max(0.0, 1 - step / whiten_bias_steps)
    for group in other_groups + muon.param_groups:
        group["lr"] = group["initial_lr"] * (1 - step / total_steps)


# ---- evaluation with test-time augmentation ------------------------------------------------

def tta_logits(model, images: torch.Tensor, level: int) -> torch.Tensor:
    """Level 0: the image; 1: the mean over it and its mirror; 2: 0.5 * level 1 + 0.5 * the mean
    of level 1 over the one-pixel up-left and down-right translations (reflect-padded)."""
    def mirrored(x):
        return 0.5 * model(x) + 0.5 * model(x.flip(-1))

    if level == 0:
        return model(images)
    if level == 1:
        return mirrored(images)
    h, w = images.shape[-2:]
    padded = F.pad(images, (1,) * 4, mode="reflect")
    translated = [padded[:, :, 0:h, 0:w], padded[:, :, 2:h + 2, 2:w + 2]]
    return 0.5 * mirrored(images) + 0.5 * torch.stack([mirrored(t) for t in translated]).mean(0)


def evaluate(model, loader: cifar_data.Loader, level: int, batch: int = 2000) -> float:
    model.eval()
    with torch.no_grad():
        images = loader.normalize(loader.images)
        logits = torch.cat([tta_logits(model, chunk, level) for chunk in images.split(batch)])
    return (logits.argmax(1) == loader.labels).float().mean().item()


# ---- statistics: Student's t ---------------------------------------------------------------

def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta I_x(a, b), by its continued fraction (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - _incomplete_beta(1 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),                # even term
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd term
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5)  # P(T > |t|)
    return 1 - tail if t > 0 else tail


def t_test_above(values: list[float], target: float) -> dict:
    """One-sided one-sample t-test of H1: mean > target.  p = P(T >= t) under mean = target."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "t": None, "df": None, "p_value": None}
    std = statistics.stdev(values)
    if std == 0:
        t = math.inf if mean > target else -math.inf if mean < target else 0.0
        p = 0.0 if mean > target else 1.0 if mean < target else 0.5
    else:
        t = (mean - target) / (std / math.sqrt(n))
        p = 1 - student_t_cdf(t, n - 1)
    return {"n": n, "mean": mean, "std": std, "t": t, "df": n - 1, "p_value": p}


# ---- one run ------------------------------------------------------------------------------

class Timer:
    """Sums the seconds between start() and stop(): CUDA events on a GPU, a host clock otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        if self.cuda:
            self._begin, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self._begin.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            self.seconds += 1e-3 * self._begin.elapsed_time(self._end)
        else:
            self.seconds += time.perf_counter() - self._t0


def train_run(model: CifarNet, step_model, train_loader: cifar_data.Loader, test_loader: cifar_data.Loader,
              cfg: TrainConfig, chosen: dict, device: torch.device, *, name: str, seed: int,
              log: runlog.RunLog, profiler: Profiler | None = None) -> dict:
    """Reset the model and train it once; returns {"accuracy" (TTA), "time_s", "epochs": [...]}."""
    torch.manual_seed(seed)
    model.reset()
    sgd, muon = make_optimizers(model, cfg, chosen["newton_schulz"])
    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    whiten_bias_steps = cfg.whiten_bias_epochs * steps_per_epoch
    profiler = profiler or Profiler(".", enabled=False, device=device, trace_window=(0, 1))
    timer = Timer(device)

    timer.start()
    model.init_whiten(train_loader.normalize(train_loader.images[:cfg.whiten_images]), eps=cfg.whiten_eps)
    timer.stop()

    epochs, step = [], 0
    for epoch in range(cfg.epochs):
        timer.start()
        model.train()
        for index in range(steps_per_epoch):
            with profiler.step(step):
                with profiler.phase("data"):
                    if index == 0:  # the epoch's augmentation, then its permutation
                        images = train_loader.epoch(epoch)
                        order = train_loader.permutation()
                    inputs, labels = train_loader.batch(images, order, index)
                with profiler.phase("forward"):
                    outputs = step_model(inputs, whiten_bias_grad=step < whiten_bias_steps)
                    with label("head_ce"):
                        loss = F.cross_entropy(outputs, labels, label_smoothing=cfg.label_smoothing, reduction="sum")
                with profiler.phase("backward"):
                    loss.backward()
                with profiler.phase("optimizer"):
                    set_learning_rates(sgd, muon, step, total_steps, whiten_bias_steps)
                    sgd.step()
                    muon.step()
                    model.zero_grad(set_to_none=True)
            step += 1
        timer.stop()
        # Not timed: the last batch's accuracy and the plain (no TTA) test accuracy.
        record = {"epoch": epoch + 1, "train_acc": (outputs.detach().argmax(1) == labels).float().mean().item(),
                  "time_s": timer.seconds}
        if cfg.eval_every_epoch:
            record["val_acc"] = evaluate(step_model, test_loader, level=0)
        epochs.append(record)
        val = f" val_acc:{record['val_acc']:.4f}" if "val_acc" in record else ""
        log.quiet_line(f"{name} epoch:{epoch + 1}/{cfg.epochs} train_acc:{record['train_acc']:.4f}{val} "
                       f"time:{timer.seconds:.3f}s")

    timer.start()
    accuracy = evaluate(step_model, test_loader, level=cfg.tta_level)
    timer.stop()
    return {"accuracy": accuracy, "time_s": timer.seconds, "epochs": epochs}


# ---- main ---------------------------------------------------------------------------------

def resolve_device(cfg: TrainConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    if cfg.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def load_data(cfg: TrainConfig) -> tuple[dict, str]:
    """(splits, a one-line description for the log)."""
    if cfg.data == "cifar10":
        return cifar_data.load_cifar10(cfg.data_dir), "CIFAR-10"
    splits = cifar_data.synthetic(cfg.synthetic_train, cfg.synthetic_test, seed=cfg.seed)
    return splits, f"{cifar_data.SYNTHETIC_NOTE} ({cfg.synthetic_train:,} train / {cfg.synthetic_test:,} test)"


def check_config(cfg: TrainConfig, train_size: int | None = None) -> tuple[int, int, int]:
    """Validate the options (UsageError naming the option); returns the widths.  With
    train_size None the batch size is checked against the synthetic set's size only."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    parts = cfg.widths.split(",")
    require(len(parts) == 3 and all(p.strip().isdigit() and int(p) >= 1 for p in parts),
            f"--widths must be three positive integers, e.g. 64,256,256, got {cfg.widths!r}")
    widths = tuple(int(w) for w in parts)
    for name in ("runs", "epochs", "whiten_bias_epochs", "whiten_images", "ns_steps", "synthetic_train",
                 "synthetic_test"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if train_size is None and cfg.data == "synthetic":
        train_size = cfg.synthetic_train
    require(cfg.batch_size >= 1 and (train_size is None or cfg.batch_size <= train_size),
            f"--batch-size must be in [1, {train_size}] (the training set), got {cfg.batch_size}")
    require(0 <= cfg.translate < 32, f"--translate must be in [0, 32), got {cfg.translate}")
    for name in ("bias_lr", "head_lr", "muon_lr"):
        require(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    for name in ("sgd_momentum", "muon_momentum", "label_smoothing"):
        require(0 <= getattr(cfg, name) < 1, f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    require(cfg.weight_decay >= 0 and cfg.whiten_eps >= 0, "--weight-decay and --whiten-eps must be >= 0")
    try:
        ablation.parse_kernels(cfg.kernels, FAMILIES)
    except ValueError as error:
        raise UsageError(str(error)) from None
    parts = cfg.profile_steps.split(":")
    require(len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1]),
            f"--profile-steps must be START:END with 0 <= START < END (e.g. 10:13), got {cfg.profile_steps!r}")
    require(cfg.device != "cuda" or torch.cuda.is_available(),
            "--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    return widths


def summarize(results: list[dict]) -> dict:
    accuracies = [r["accuracy"] for r in results]
    times = [r["time_s"] for r in results]
    return {"runs": len(results), "accuracy": t_test_above(accuracies, TARGET_ACCURACY),
            "target": TARGET_ACCURACY, "time_mean_s": statistics.fmean(times),
            "time_std_s": statistics.stdev(times) if len(times) > 1 else None}


def summary_lines(summary: dict) -> list[str]:
    acc = summary["accuracy"]
    if acc["std"] is None:
        lines = [f"accuracy: {acc['mean']:.4f} (1 run: no std, no t-test)"]
    else:
        lines = [f"accuracy: mean {acc['mean']:.4f} std {acc['std']:.4f} over {acc['n']} runs",
                 f"t-test, H1 mean > {summary['target']:.2%}: t = {acc['t']:.3f}, df = {acc['df']}, "
                 f"one-sided p = {acc['p_value']:.4g}"]
    spread = f" (std {summary['time_std_s']:.3f} s)" if summary["time_std_s"] is not None else ""
    return lines + [f"time: mean {summary['time_mean_s']:.3f} s per run{spread}"]


def write_results(run_dir: Path, cfg: TrainConfig, preset: str, data_line: str, kernels_line: str,
                  env: dict, results: list[dict], summary: dict) -> None:
    (run_dir / "results.json").write_text(json.dumps(
        {"config": dataclasses.asdict(cfg), "preset": preset, "data": data_line, "kernels": kernels_line,
         "environment": env, "runs": results, "summary": summary}, indent=2) + "\n")
    gpu = env["gpu"]["name"] if env.get("gpu") else "CPU"
    rows = "\n".join(f"| {i} | {r['accuracy']:.4f} | {r['time_s']:.3f} |" for i, r in enumerate(results))
    (run_dir / "summary.md").write_text(
        f"# CIFAR-10 speedrun: {preset} preset, {len(results)} run(s)\n\n"
        f"- data: {data_line}\n- kernels: {kernels_line}\n- device: {gpu}; command: `{env['command']}`\n\n"
        + "\n".join(f"- {line}" for line in summary_lines(summary))
        + "\n\n| run | TTA accuracy | time (s) |\n|---:|---:|---:|\n" + rows + "\n")


def main(argv=None) -> int:
    """The trainer: user errors are one `error:` line and status 2 (speedrun.cli)."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    cfg, preset = parse_args(argv)
    check_config(cfg)
    chosen = ablation.parse_kernels(cfg.kernels, FAMILIES)
    kernels_line = ablation.describe(chosen, FAMILIES)
    device, dtype = resolve_device(cfg)
    run_dir = Path(cfg.run_dir or f"runs/cifar-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise UsageError(f"--run-dir {run_dir} already holds a run: choose another folder, or add --overwrite "
                         "to replace it")
    # ---- data (not timed), before the run folder exists: a download or a bad tarball fails first
    if cfg.data == "cifar10":
        try:
            splits, data_line = load_data(cfg)
        except (ValueError, RuntimeError) as error:  # ensure_cifar10's md5/download/format messages name the file
            raise UsageError(f"--data cifar10: {error}") from None
    else:
        splits, data_line = load_data(cfg)
    widths = check_config(cfg, len(splits["train"]["labels"]))
    if run_dir.exists() and cfg.overwrite:
        shutil.rmtree(run_dir)
    log = runlog.RunLog(run_dir, enabled=True)
    env = runlog.environment(runlog.command_line("speedrun.cifar", argv))
    log.header(dataclasses.asdict(cfg), env, kernels_line)
    log.line(f"data: {data_line}")
    train_loader = cifar_data.Loader(splits["train"], batch_size=cfg.batch_size, device=device, dtype=dtype,
                                     flip=cfg.flip, translate=cfg.translate, crop=chosen["augment"])
    test_loader = cifar_data.Loader(splits["test"], batch_size=2000, device=device, dtype=dtype, drop_last=False)

    # ---- the model, built and compiled once for all runs (not timed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = CifarNet(widths, dtype=dtype).to(device).to(memory_format=torch.channels_last)
    use_compile = cfg.compile and device.type == "cuda"
    step_model = torch.compile(model, mode=cfg.compile_mode) if use_compile else model
    log.line(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, widths {widths}, {dtype}, "
             f"{len(train_loader)} steps/epoch x {cfg.epochs} epochs, compile={use_compile}, device={device}")

    if cfg.warmup and device.type == "cuda":
        real_labels = train_loader.labels
        train_loader.labels = torch.randint(0, 10, real_labels.shape, device=device)
        warm = train_run(model, step_model, train_loader, test_loader, cfg, chosen, device, name="warmup",
                         seed=cfg.seed - 1, log=log)
        train_loader.labels = real_labels
        log.line(f"warm-up run (random labels, not counted): {warm['time_s']:.3f} s")

    results = []
    for run in range(cfg.runs):
        trace_start, trace_end = (int(s) for s in cfg.profile_steps.split(":"))
        profiler = Profiler(run_dir / "profile", enabled=cfg.profile and run == 0, device=device,
                            trace_window=(trace_start, trace_end))
        result = train_run(model, step_model, train_loader, test_loader, cfg, chosen, device, name=f"run {run}",
                           seed=cfg.seed + run, log=log, profiler=profiler)
        profile = profiler.finish()
        if profile:
            log.metric({"event": "profile", "summary": profile})
            log.line(f"profile: {run_dir / 'profile' / 'summary.md'} (run 0's time includes the profiler)")
        results.append(result)
        log.line(f"run {run}: tta_acc {result['accuracy']:.4f} time {result['time_s']:.3f} s")
        log.metric({"event": "run", "run": run, **result})

    summary = summarize(results)
    for line in summary_lines(summary):
        log.line(line)
    if cfg.data == "synthetic":
        log.line(f"note: {cifar_data.SYNTHETIC_NOTE}")
    log.metric({"event": "summary", **summary})
    write_results(run_dir, cfg, preset, data_line, kernels_line, env, results, summary)
    log.line(f"results: {run_dir / 'results.json'}, {run_dir / 'summary.md'}")
    log.close()
    return 0
