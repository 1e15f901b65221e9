"""The CIFAR-10 speedrun: airbench94_muon (94% mean test accuracy) on our kernels.

  speedrun.cifar.model   the network, its initialization and the whitening layer
  speedrun.cifar.data    CIFAR-10 download/cache, the synthetic stand-in, the on-device loader
  speedrun.cifar.train   optimizers, schedule, TTA evaluation, statistics, `python -m speedrun.cifar`
"""
