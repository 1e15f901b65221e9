"""speedrun: the trainers built on `kernels`.

  speedrun.gpt        the NanoGPT speedrun (2025-01-26 record): `python -m speedrun.gpt`
  speedrun.cifar      the CIFAR-10 speedrun (airbench94_muon): `python -m speedrun.cifar`
  speedrun.data       FineWeb .bin shards, their loader and downloader; the synthetic corpus
  speedrun.optim      Muon (batched Newton-Schulz, sharded across ranks), Adam groups, schedules
  speedrun.profiler   per-step phase timing, GPU telemetry and kernel traces, for every trainer
  speedrun.checkpoint, distributed, runlog, ablation: what the trainers share
"""
