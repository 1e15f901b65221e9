"""speedrun: the trainers built on `kernels`.

The GPT trainer (speedrun.gpt, the 2025-01 NanoGPT record) and the CIFAR-10 trainer
(speedrun.cifar, airbench94_muon), with their optimizers, data and profiler, land here;
see the project's issues 3 and 8.  Today the package holds no code of its own yet.
"""
