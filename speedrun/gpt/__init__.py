"""The NanoGPT speedrun: the 2025-01-26 record's model (model.py), the record's own op
implementations for ablation (baseline.py), and the trainer (train.py; run it with
`python -m speedrun.gpt`)."""
