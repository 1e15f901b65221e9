"""Training data for the GPT trainer.

  speedrun.data.fineweb     the FineWeb GPT-2 token shard format (.bin), TokenLoader (the
                            2025-01 record's distributed loader, resumable), and the downloader
                            `python -m speedrun.data.fineweb --train-shards N`
  speedrun.data.synthetic   the embedded default corpus: a Markov chain with a known entropy
                            rate, generated on first use in the same .bin format

The submodules are not imported here so that `python -m speedrun.data.<module>` runs each
one exactly once.
"""
