"""The GPT speedrun trainer: the 2025-01-26 record's recipe on 1..8 GPUs (or a CPU).

    python -m speedrun.gpt --preset smoke                  # tiny model, embedded corpus, CPU ok
    torchrun --standalone --nproc_per_node=8 -m speedrun.gpt --preset record --data DIR

Reads top to bottom: the configuration and its presets, then `main`: set-up, data,
model, optimizers, and the training loop (validate, step, log, checkpoint).  Every field
of TrainConfig is a command-line option (`--help`), and a preset only changes defaults.

The global batch is kept whatever the number of GPUs: each step consumes
`batch_tokens` tokens as world_size x accumulation forward passes of `seq_len` tokens
(the record: 8 GPUs x 1 pass x 49152), and process r's pass k reads the tokens of the
record's rank r x accumulation + k, so 1 GPU x 8 passes trains on the record's tokens.  Timing follows the record: train_time excludes
validation and the first steps (compilation, warm-up); step_avg is over the timed steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import time
from pathlib import Path

import torch

from kernels.reference import NEWTON_SCHULZ_SCHEDULES
from kernels.sliding_window_attention import HEAD_DIMS
from speedrun import ablation, checkpoint, distributed, optim, runlog
from speedrun.cli import ArgumentParser, UsageError
from speedrun.cli import run as run_cli
from speedrun.data import fineweb, synthetic
from speedrun.gpt import baseline, report
from speedrun.gpt.model import FAMILIES as MODEL_FAMILIES
from speedrun.gpt.model import GPT, GPTConfig
from speedrun.profiler import Profiler

FAMILIES = {**MODEL_FAMILIES, "newton_schulz": ("ours", "torch")}
MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}


def option(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class TrainConfig:
    # data
    data: str | None = option(None, "folder of FineWeb .bin shards (fineweb_train_*.bin, fineweb_val_*.bin); "
                                    "default: the embedded synthetic corpus, generated on first use")
    # schedule
    steps: int = option(1770, "optimizer steps")
    cooldown_frac: float = option(0.4, "fraction of steps at the end over which the LR decays linearly to 0.1x")
    batch_tokens: int = option(8 * 48 * 1024, "tokens per optimizer step, all GPUs together (kept constant: "
                                              "fewer GPUs accumulate gradients)")
    seq_len: int = option(48 * 1024, "tokens per forward pass per GPU: one packed sequence (multiple of 128)")
    window_max: int = option(1792, "long attention window (tokens) reached at the end; it grows linearly from "
                                   "128, in 128-token blocks; the short window is half")
    val_every: int = option(125, "validate every this many steps (and at the end); 0 = only at the end")
    val_tokens: int = option(10485760, "validation tokens per evaluation (all GPUs together)")
    val_seq_len: int = option(4 * 64 * 1024, "tokens per validation forward pass per GPU")
    # optimizers
    muon_lr: float = option(0.05, "Muon learning rate (the blocks' matrices)")
    muon_momentum: float = option(0.95, "Muon momentum after warm-up")
    muon_momentum_start: float = option(0.85, "Muon momentum at step 0")
    muon_momentum_warmup: int = option(300, "steps over which Muon momentum rises linearly")
    muon_coefficients: str = option("ns5", "Muon's Newton-Schulz schedule (5 steps): ns5 (the 2025-01-26 "
                                           "record's fixed triple) or polar_express (Amsel et al. 2025's "
                                           "per-step triples, as modded-nanogpt's current record uses them)")
    head_lr: float = option(0.008, "Adam learning rate of the LM head")
    embed_lr: float = option(0.6, "Adam learning rate of the token and value embeddings")
    scalar_lr: float = option(0.04, "Adam learning rate of the scalars (lambdas, skip weights)")
    # model (GPTConfig)
    vocab_size: int = option(50257, "vocabulary (the head pads it to a multiple of 128)")
    num_layers: int = option(12, "transformer blocks (even: U-net skips pair them)")
    model_dim: int = option(768, "residual width")
    num_heads: int = option(6, "attention heads")
    head_dim: int = option(128, "attention head size (64 or 128 for our attention kernel)")
    mlp_dim: int = option(3072, "MLP hidden width")
    windows: str = option("LSSSLSS-SSSL", "per layer: L long window, S short, - no attention")
    value_embeds: int = option(3, "value-embedding tables, used by the first and last that-many layers")
    attention_window: str = option("blocks", "our attention kernel's windows: blocks (the record's: whole 128-token "
                                             "key blocks, short = half the blocks, at least 1) or exact (token "
                                             "windows of blocks*128 and half that: a different model)")
    # implementation
    kernels: str = option("auto", "implementation per op family: auto (ours), off (the record's torch.compile/"
                                  "FlexAttention/_scaled_mm path), or e.g. attention=flex,mlp=ours; families: "
                                  + ", ".join(f"{f} ({'/'.join(c)})" for f, c in FAMILIES.items())
                                  + "; mlp=ours-fp8: the MLP's first product in e4m3 with amax/448 per-tensor "
                                    "scales in training, the FP8 MLP forward of the current modded-nanogpt record "
                                    "(not the 2025-01-26 one this trainer follows otherwise)")
    compile: str = option("auto", "torch.compile the model: auto (on CUDA), on, off")
    device: str = option("auto", "auto (CUDA if available), cuda, cpu")
    seed: int = option(0, "seed for the model's initialization")
    # outputs
    run_dir: str | None = option(None, "output folder (default runs/gpt-<preset>-<time>); an existing one is "
                                       "refused unless --overwrite")
    overwrite: bool = option(False, "replace an existing --run-dir (its log, metrics and checkpoints are lost)")
    log_every: int = option(10, "read the training loss back every this many steps (a host sync)")
    save_every: int = option(0, "write a checkpoint every this many steps (0 = never; always at the end if >0)")
    resume: str | None = option(None, "checkpoint to resume from: continues exactly where it stopped")
    profile: bool = option(False, "profile: per-step phase times, GPU telemetry, a kernel trace (see --profile-steps)")
    profile_steps: str = option("10:13", "steps start:end traced by torch.profiler when --profile is on")


PRESETS = {
    # The 2025-01-26 record: 8 x 48K tokens per step, 1770 steps, val every 125 over 10.5M tokens.
    "record": {},
    # A tiny model on the embedded corpus: its val loss falls clearly toward the corpus's
    # entropy rate (10.83 -> ~5.0 in 100 steps).  512 tokens per step as 2 passes of 256 on
    # one process, or one per rank under `torchrun --nproc_per_node=2` (the same run).
    # Shaped to finish in about 2 minutes on 2 CPU cores (125 s measured, idle): there the
    # 50304-row head and its loss (CPU reference, fp8 emulated) take ~90% of a step, so the
    # step time scales with the tokens per step, ~1.1 s for 512.
    "smoke": dict(steps=100, batch_tokens=512, seq_len=256, window_max=256, val_every=50,
                  val_tokens=4 * 1024, val_seq_len=2048, muon_momentum_warmup=40,
                  num_layers=4, model_dim=128, num_heads=2, head_dim=64, mlp_dim=512, windows="LSSL",
                  value_embeds=1, log_every=10, profile_steps="3:5"),
}


def parse_args(argv=None) -> tuple[TrainConfig, str]:
    parser = ArgumentParser(
        prog="python -m speedrun.gpt",
        description="Train the NanoGPT speedrun model (the 2025-01-26 record recipe). "
                    "Launch with torchrun for several GPUs; a preset sets the defaults, any option overrides.",
        epilog="Defaults shown are the record preset's; --preset smoke changes: "
               + ", ".join(f"{k}={v}" for k, v in PRESETS["smoke"].items()) + ".")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="record",
                        help="record: the record's configuration; smoke: a tiny model on the embedded corpus")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{field.metadata['help']} (default: {field.default})")
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            choices = {"compile": ("auto", "on", "off"), "device": ("auto", "cuda", "cpu"),
                       "muon_coefficients": tuple(NEWTON_SCHULZ_SCHEDULES)}.get(field.name)
            parser.add_argument(flag, type=kind, default=None, choices=choices,
                                help=field.metadata["help"] + ("" if field.default is None else
                                                               f" (default: {field.default})"))
    args = parser.parse_args(argv)
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if v is not None and k != "preset"}}
    return TrainConfig(**values), args.preset


def window_blocks(step: int, total: int, window_max: int) -> int:
    """The long window at `step`, in 128-token blocks: linear from 128 tokens to window_max,
    rounded up to whole blocks (the record: 1728 * step/total, rounded up, 1..14 blocks)."""
    grown = (window_max - 64) * step / total
    return max(1, math.ceil(grown / baseline.FLEX_BLOCK))


def profile_window(spec: str) -> tuple[int, int]:
    """--profile-steps "start:end" -> (start, end), 0 <= start < end."""
    parts = spec.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
        raise UsageError(f"--profile-steps must be START:END with 0 <= START < END (e.g. 10:13), got {spec!r}")
    return int(parts[0]), int(parts[1])


def attention_windows(choice: str, attention_window: str, compiled: bool) -> str:
    """The log line's account of the attention pattern actually trained."""
    if choice == "flex":
        how = "the record's BlockMask (whole 128-token key blocks)"
        return how + ("" if compiled else "; " + baseline.EAGER_ATTENTION_NOTE)
    if attention_window == "exact":
        return "exact token windows (--attention-window exact: not the record's block-granular pattern)"
    return "whole 128-token key blocks, as the record's BlockMask (--attention-window blocks)"


def check_config(cfg: TrainConfig, world_size: int) -> int:
    """Validate every option before anything is trained or written (UsageError naming the
    option and what to do); returns the gradient-accumulation steps."""
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    block = baseline.FLEX_BLOCK
    for name in ("steps", "log_every", "batch_tokens", "seq_len", "val_tokens", "val_seq_len", "num_layers",
                 "model_dim", "num_heads", "head_dim", "mlp_dim"):
        require(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("val_every", "save_every", "muon_momentum_warmup", "value_embeds"):
        require(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0 (0 = off), "
                                         f"got {getattr(cfg, name)}")
    for name in ("muon_lr", "head_lr", "embed_lr", "scalar_lr"):
        require(getattr(cfg, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    require(0 <= cfg.cooldown_frac <= 1, f"--cooldown-frac must be in [0, 1], got {cfg.cooldown_frac}")
    for name in ("muon_momentum", "muon_momentum_start"):
        require(0 <= getattr(cfg, name) < 1, f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    require(cfg.seq_len % block == 0 and cfg.val_seq_len % block == 0,
            f"--seq-len ({cfg.seq_len}) and --val-seq-len ({cfg.val_seq_len}) must be multiples of {block}")
    require(block <= cfg.window_max <= cfg.seq_len,
            f"--window-max must be in [{block}, --seq-len {cfg.seq_len}] tokens, got {cfg.window_max}")
    per_pass = world_size * cfg.seq_len
    require(cfg.batch_tokens % per_pass == 0,
            f"--batch-tokens ({cfg.batch_tokens}) must be a multiple of processes x --seq-len ({world_size} x "
            f"{cfg.seq_len} = {per_pass}): use --batch-tokens {max(1, cfg.batch_tokens // per_pass) * per_pass}")
    require(cfg.val_tokens >= world_size * cfg.val_seq_len,
            f"--val-tokens ({cfg.val_tokens}) must cover one --val-seq-len pass per process "
            f"({world_size} x {cfg.val_seq_len})")
    # The shards hold GPT-2 token ids, up to EOT = 50256, whatever the corpus.
    require(cfg.vocab_size >= 50257, f"--vocab-size must be >= 50257 (the shards hold GPT-2 token ids up to "
                                     f"50256), got {cfg.vocab_size}")
    require(cfg.num_heads * cfg.head_dim == cfg.model_dim,
            f"--num-heads x --head-dim ({cfg.num_heads} x {cfg.head_dim}) must equal --model-dim ({cfg.model_dim})")
    require(cfg.num_layers % 2 == 0, f"--num-layers must be even (the U-net pairs layers), got {cfg.num_layers}")
    require(len(cfg.windows) == cfg.num_layers and not set(cfg.windows) - set("LS-"),
            f"--windows needs one of L/S/- per layer ({cfg.num_layers}), got {cfg.windows!r}")
    require(cfg.value_embeds <= cfg.num_layers // 2,
            f"--value-embeds must be at most --num-layers / 2 = {cfg.num_layers // 2}, got {cfg.value_embeds}")
    try:
        chosen = ablation.parse_kernels(cfg.kernels, FAMILIES)
    except ValueError as error:
        raise UsageError(str(error)) from None
    require(cfg.muon_coefficients == "ns5" or chosen["newton_schulz"] == "ours",
            f"--muon-coefficients {cfg.muon_coefficients} needs our Newton-Schulz (newton_schulz=ours): the torch "
            "baseline is the 2025-01-26 record's ns5")
    require(chosen["attention"] != "ours" or cfg.head_dim in HEAD_DIMS,
            f"--head-dim must be one of {HEAD_DIMS} for our attention kernel (or --kernels attention=flex), "
            f"got {cfg.head_dim}")
    profile_window(cfg.profile_steps)
    require(cfg.device != "cuda" or torch.cuda.is_available(),
            "--device cuda: no CUDA GPU is visible; use --device cpu (or auto)")
    if cfg.data is not None:
        require(Path(cfg.data).is_dir(), f"--data must be a folder of fineweb_train_*.bin and fineweb_val_*.bin "
                                         f"shards, got {cfg.data!r} ({'a file' if Path(cfg.data).exists() else 'missing'}); "
                                         f"{fineweb.DOWNLOAD_HINT}")
    if cfg.resume is not None:
        require(Path(cfg.resume).is_file(), f"--resume {cfg.resume}: no such checkpoint file")
    return cfg.batch_tokens // per_pass


def data_files(cfg: TrainConfig) -> tuple[Path, float | None]:
    """(shard folder, entropy rate in nats/token if the corpus is the synthetic one)."""
    if cfg.data is not None:
        for split in ("train", "val"):
            if not list(Path(cfg.data).glob(f"fineweb_{split}_*.bin")):
                raise UsageError(f"--data {cfg.data} holds no fineweb_{split}_*.bin shard; {fineweb.DOWNLOAD_HINT}")
    if cfg.data is not None:
        return Path(cfg.data), None
    folder = synthetic.ensure_corpus()
    return folder, synthetic.entropy_rate_of(folder)


def val_loader(folder: Path, cfg: TrainConfig, ctx: distributed.Dist) -> fineweb.TokenLoader:
    """The validation loader; fails at start-up, not at the first validation, if the val
    shards cannot serve --val-tokens."""
    loader = fineweb.TokenLoader.from_pattern(folder, split="val", global_batch_tokens=ctx.world_size * cfg.val_seq_len,
                                              rank=ctx.rank, world_size=ctx.world_size, device=ctx.device)
    passes, available = cfg.val_tokens // loader.global_batch_tokens, loader.batches_per_pass()
    if passes > available:
        raise UsageError(f"--val-tokens {cfg.val_tokens:,} needs {passes} passes of {loader.global_batch_tokens:,} "
                         f"tokens, but the val shards in {folder} serve {available}: use --val-tokens "
                         f"{available * loader.global_batch_tokens:,} or less (or a smaller --val-seq-len)")
    return loader


def evaluate(model, folder: Path, cfg: TrainConfig, ctx: distributed.Dist, blocks: int) -> float:
    """Mean loss over the first val_tokens of the validation shards, all ranks together."""
    loader = val_loader(folder, cfg, ctx)
    passes = cfg.val_tokens // loader.global_batch_tokens
    model.eval()
    total = torch.zeros((), device=ctx.device)
    with torch.no_grad():
        for _ in range(passes):
            inputs, targets = loader.next_batch()
            total += model(inputs, targets, blocks)
    model.train()
    return distributed.all_reduce_mean(total / passes).item()


def main(argv=None) -> int:
    """The trainer: user errors are one `error:` line and status 2 (speedrun.cli)."""
    return run_cli(_main, argv)


def _main(argv=None) -> int:
    cfg, preset = parse_args(argv)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    ctx = distributed.setup(cfg.device)
    clean = False
    try:
        status = train(cfg, preset, ctx, runlog.command_line("speedrun.gpt", argv))
        clean = True
        return status
    finally:
        distributed.teardown(clean=clean)


def train(cfg: TrainConfig, preset: str, ctx: distributed.Dist, command: str) -> int:
    accumulation = check_config(cfg, ctx.world_size)
    chosen = ablation.parse_kernels(cfg.kernels, FAMILIES)
    # ---- everything a user can get wrong is checked before the run folder exists
    folder, entropy_rate = data_files(cfg)
    try:  # the loaders check every shard's header: a bad file fails here, named
        val_loader(folder, cfg, ctx)  # a val split too short for --val-tokens fails here, before training
        # Each process plays `accumulation` of the world_size x accumulation ranks the batch is
        # split over: with fewer than 8 GPUs the run reads the record's 8 ranks' tokens exactly.
        train_loader = fineweb.TokenLoader.from_pattern(folder, split="train",
                                                        global_batch_tokens=ctx.world_size * accumulation * cfg.seq_len,
                                                        rank=ctx.rank, world_size=ctx.world_size, passes=accumulation,
                                                        device=ctx.device, wrap=cfg.data is None)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"--data: {error}") from None
    model_fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k in MODEL_FIELDS}
    state = None
    if cfg.resume:
        state = checkpoint.load(cfg.resume, map_location="cpu")
        if state["model_config"] != dataclasses.asdict(GPTConfig(**model_fields, max_seq_len=max(cfg.seq_len, cfg.val_seq_len))):
            raise UsageError(f"--resume {cfg.resume}: its model configuration differs from this run's; "
                             "resume with the options of the run that wrote it")
        if state["step"] >= cfg.steps:
            raise UsageError(f"--resume {cfg.resume} is at step {state['step']}, not before --steps {cfg.steps}: "
                             "nothing left to train (raise --steps)")
    run_dir = Path(cfg.run_dir or f"runs/gpt-{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise UsageError(f"--run-dir {run_dir} already holds a run: choose another folder, or add --overwrite "
                         "to replace it")
    distributed.barrier()  # every rank has seen the old folder before rank 0 replaces it
    if run_dir.exists() and cfg.overwrite and ctx.is_main:
        shutil.rmtree(run_dir)
    log = runlog.RunLog(run_dir, enabled=ctx.is_main)
    log.header(dataclasses.asdict(cfg), runlog.environment(command), ablation.describe(chosen, FAMILIES))
    device = (f"{torch.cuda.get_device_name(ctx.device)} x {ctx.world_size} process(es)" if ctx.device.type == "cuda"
              else f"CPU, {ctx.world_size} process(es)")

    # ---- model and optimizers
    torch.manual_seed(cfg.seed)
    model_config = GPTConfig(**model_fields, max_seq_len=max(cfg.seq_len, cfg.val_seq_len))  # rotary covers validation
    model = GPT(model_config, {f: chosen[f] for f in MODEL_FAMILIES}).to(ctx.device)
    groups = model.parameter_groups()
    orthogonalize = baseline.record_newton_schulz if chosen["newton_schulz"] == "torch" else None
    muon = optim.Muon(groups["muon"], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                      coefficients=cfg.muon_coefficients, orthogonalize=orthogonalize)
    adam = optim.make_adam(optim.adam_groups(groups["head"], groups["embed"], groups["scalar"],
                                             head_lr=cfg.head_lr, embed_lr=cfg.embed_lr, scalar_lr=cfg.scalar_lr))
    optimizers = [adam, muon]
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and ctx.device.type == "cuda")
    step_model = torch.compile(model) if use_compile else model
    log.line(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {accumulation} accumulation "
             f"step(s) x {ctx.world_size} process(es) x {cfg.seq_len} tokens; compile={use_compile}")
    log.line(f"attention windows: {attention_windows(chosen['attention'], cfg.attention_window, use_compile)}")

    # ---- data, and the position to start from
    start_step, training_time_ms = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        train_loader.load_state_dict(state["train_loader"])
        checkpoint.set_rng_state(state["rng"])
        start_step, training_time_ms = state["step"], state["training_time_ms"]
        log.line(f"resumed from {cfg.resume} at step {start_step}")

    # The training loss summed since its last read-back: part of the state, so a resumed run
    # logs the same train_loss as an uninterrupted one.
    step_loss = torch.zeros((), device=ctx.device)
    if state is not None and "step_loss" in state:
        step_loss.fill_(state["step_loss"])

    def save(step: int) -> None:
        pending_loss = distributed.all_reduce_mean(step_loss.clone()).item()  # every rank takes part
        if ctx.is_main:
            path = checkpoint.save(run_dir / "checkpoints" / f"step{step:06d}.pt", {
                "step": step, "training_time_ms": training_time_ms, "step_loss": pending_loss,
                "config": dataclasses.asdict(cfg),
                "model_config": dataclasses.asdict(model_config),
                "model": model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
                "train_loader": train_loader.state_dict(), "rng": checkpoint.rng_state()})
            log.line(f"checkpoint: {path}")

    trace_start, trace_end = profile_window(cfg.profile_steps)
    profiler = Profiler(run_dir / "profile", enabled=cfg.profile, device=ctx.device,
                        trace_window=(trace_start, trace_end), rank=ctx.rank)
    synchronize = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    timing_warmup = min(10, cfg.steps // 10)  # first steps compile and warm up: not timed

    def validates(step: int) -> bool:
        return step == cfg.steps or (cfg.val_every > 0 and step % cfg.val_every == 0)

    # ---- the loop: validate, then train one step, until the last validation
    synchronize()
    t0 = time.perf_counter()
    try:
        for step in range(start_step, cfg.steps + 1):
            last_step = step == cfg.steps
            blocks = window_blocks(step, cfg.steps, cfg.window_max)
            if step == timing_warmup and start_step <= timing_warmup:
                training_time_ms, t0 = 0.0, time.perf_counter()
            timed_steps = step - timing_warmup

            if validates(step):  # the clock stopped at the end of the step before (or has not run yet)
                val_loss = evaluate(step_model, folder, cfg, ctx, blocks)
                avg = f" step_avg:{training_time_ms / timed_steps:.2f}ms" if timed_steps > 0 else ""
                floor = f" (corpus entropy rate {entropy_rate:.4f})" if entropy_rate is not None else ""
                log.line(f"step:{step}/{cfg.steps} val_loss:{val_loss:.4f}{floor} "
                         f"train_time:{training_time_ms:.0f}ms{avg}")
                log.metric({"event": "val", "step": step, "val_loss": val_loss, "entropy_rate": entropy_rate,
                            "train_time_ms": training_time_ms})
                synchronize()
                t0 = time.perf_counter()
            if last_step:
                break

            with profiler.step(step):
                for _ in range(accumulation):
                    with profiler.phase("data"):
                        inputs, targets = train_loader.next_batch()
                    with profiler.phase("forward"):
                        loss = step_model(inputs, targets, blocks) / accumulation
                    with profiler.phase("backward"):
                        loss.backward()
                    step_loss += loss.detach()
                with profiler.phase("grad_comm"):
                    optim.average_gradients(model.parameters())
                with profiler.phase("optimizer"):
                    optim.apply_schedule(optimizers, step, cfg.steps, cooldown_frac=cfg.cooldown_frac,
                                         momentum_warmup=cfg.muon_momentum_warmup,
                                         momentum_start=cfg.muon_momentum_start, momentum_end=cfg.muon_momentum)
                    for opt in optimizers:
                        opt.step()
                    model.zero_grad(set_to_none=True)

            if validates(step + 1):
                # Stop the clock until the validation restarts it: this step's line and the
                # validation line after it then show the same train_time and step_avg.
                synchronize()
                training_time_ms += 1000 * (time.perf_counter() - t0)
                approx_ms = training_time_ms
            else:
                approx_ms = training_time_ms + 1000 * (time.perf_counter() - t0)
            done_timed = timed_steps + 1  # this step is done: the same divisor as the val line at the next step
            avg = f" step_avg:{approx_ms / done_timed:.2f}ms" if done_timed > 0 else " (warm-up, not timed)"
            record = {"event": "step", "step": step + 1, "train_time_ms": approx_ms, "timed_steps": max(done_timed, 0),
                      "window_blocks": blocks}
            loss_text = ""
            if (step + 1) % cfg.log_every == 0:
                record["train_loss"] = distributed.all_reduce_mean(step_loss).item() / cfg.log_every
                loss_text = f" train_loss:{record['train_loss']:.4f}"
                step_loss.zero_()
            log.quiet_line(f"step:{step + 1}/{cfg.steps}{loss_text} train_time:{approx_ms:.0f}ms{avg}")
            log.metric(record)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                synchronize()
                training_time_ms = approx_ms
                save(step + 1)
                t0 = time.perf_counter()
    except BaseException as error:
        # Ctrl-C or a failure (out of memory, NaN check, a lost rank): summarize what
        # metrics.jsonl holds so far (rank 0 only reads a file: no collective to hang on),
        # then let the exception go on.  A summary that cannot be written must not hide it.
        if ctx.is_main:
            first_line = str(error).splitlines()[0] if str(error) else ""
            cause = ("Ctrl-C" if isinstance(error, KeyboardInterrupt) else
                     f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__)
            try:
                summary_path, _ = report.write_summary(run_dir, preset=preset, timing_warmup=timing_warmup,
                                                       device=device, stopped_by=cause)
                log.line(f"stopped by {cause}; summary: {summary_path}")
            except Exception as summary_error:  # noqa: BLE001 -- reported, the original error still raises
                log.line(f"stopped by {cause}; the summary could not be written: {summary_error}")
        raise

    summary = profiler.finish()
    if summary:
        log.metric({"event": "profile", "summary": summary})
        log.line(f"profile: {run_dir / 'profile' / 'summary.md'}")
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if ctx.device.type == "cuda" else None
    if ctx.is_main:
        summary_path, plot_path = report.write_summary(run_dir, preset=preset, timing_warmup=timing_warmup,
                                                       device=device, peak_memory_gib=peak_gib)
        log.line(f"summary: {summary_path}, plot: {plot_path}")
    log.line(f"peak memory: {peak_gib:.1f} GiB" if peak_gib is not None else "done")
    log.close()
    return 0
