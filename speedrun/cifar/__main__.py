"""`python -m speedrun.cifar`: see speedrun/cifar/train.py or `--help`."""
from speedrun.cifar.train import main

raise SystemExit(main())
