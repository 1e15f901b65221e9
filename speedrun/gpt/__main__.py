"""`python -m speedrun.gpt`: see speedrun/gpt/train.py or `--help`."""
from speedrun.gpt.train import main

raise SystemExit(main())
