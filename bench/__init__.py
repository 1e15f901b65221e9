"""Microbenchmarks: each kernel beside its competitors, against the device's measured ceilings.

`python -m bench` runs every `bench/bench_<op>.py` that defines `main(argv)`;
`bench.harness` holds what they share (timing, ceilings, the results writer).
"""
