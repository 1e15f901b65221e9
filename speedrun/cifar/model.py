"""The airbench94 network (DESIGN.md §3b): a frozen 2x2 whitening conv, three conv groups, a linear head.

    whiten: conv2x2 3 -> 24 (no padding; frozen weight from the patch covariance, trainable bias)
    GELU
    3 x ConvGroup(widths 64, 256, 256):
        conv3x3 (same padding, no bias) -> MaxPool2 -> BN -> GELU -> conv3x3 -> BN -> GELU
    MaxPool3 -> flatten -> Linear(256 -> 10, no bias, weight rescaled to std 1) -> / 256

BatchNorm: weight frozen at 1, trainable bias, momentum 0.6 in the record's convention (the
weight of the old running statistics; PyTorch's momentum is 1 - that = 0.4), eps 1e-12, kept
in fp32 while everything else runs in `dtype` (the record: fp16 on the GPU).  Every 3x3 conv
starts from PyTorch's default init with its first in_channels filters replaced by the
identity (dirac), so each group starts close to passing its input through.

With the default widths the model has 1,972,792 parameters (the record's ~1.97M), of which
1,967,616 are the six 3x3 filters Muon trains.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speedrun.profiler import label

WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
WHITEN_WIDTH = 2 * 3 * WHITEN_KERNEL ** 2  # the 12 eigen-filters of a 2x2x3 patch and their negations


class BatchNorm(nn.BatchNorm2d):
    def __init__(self, num_features: int, momentum: float = 0.6, eps: float = 1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)  # PyTorch's convention
        self.weight.requires_grad = False


class Conv(nn.Conv2d):
    """3x3, same padding, no bias; default init, then the identity on the first in_channels filters."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            w = self.weight
            nn.init.dirac_(w[:w.size(1)])


class ConvGroup(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = Conv(in_channels, out_channels)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(out_channels)
        self.conv2 = Conv(out_channels, out_channels)
        self.norm2 = BatchNorm(out_channels)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        with label("norm"):
            x = self.activ(self.norm1(x))
        x = self.conv2(x)
        with label("norm"):
            return self.activ(self.norm2(x))


class CifarNet(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = WIDTHS, num_classes: int = 10,
                 dtype: torch.dtype = torch.float16):
        super().__init__()
        self.whiten = nn.Conv2d(3, WHITEN_WIDTH, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        self.layers = nn.Sequential(
            nn.GELU(),
            ConvGroup(WHITEN_WIDTH, widths[0]),
            ConvGroup(widths[0], widths[1]),
            ConvGroup(widths[1], widths[2]),
            nn.MaxPool2d(3),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        for module in self.modules():  # BatchNorm in fp32, the rest in `dtype`
            if isinstance(module, BatchNorm):
                module.float()
            elif not list(module.children()):
                module.to(dtype)

    def reset(self) -> None:
        """Fresh weights for a new run (the BN running statistics too); the whitening weight
        stays as it is until `init_whiten`."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                module.reset_parameters()
        with torch.no_grad():
            self.head.weight *= 1 / self.head.weight.std()

    @torch.no_grad()
    def init_whiten(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the frozen whitening filters from the 2x2 patch covariance of `images` [N, 3, H, W].

        With C = E diag(lambda) E^T the (uncentered) covariance of the flattened 2x2x3 patches,
        the filters are the rows of diag(1/sqrt(lambda + eps)) E^T and their negations, so the
        first 12 output channels have covariance diag(lambda / (lambda + eps)) ~ I."""
        c, (h, w) = images.shape[1], self.whiten.weight.shape[2:]
        patches = images.unfold(2, h, 1).unfold(3, w, 1)           # [N, c, H-1, W-1, h, w]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w).float()
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance, UPLO="U")
        filters = eigenvectors.T.reshape(-1, c, h, w) / torch.sqrt(eigenvalues.view(-1, 1, 1, 1) + eps)
        self.whiten.weight.copy_(torch.cat((filters, -filters)))

    def forward(self, x: torch.Tensor, whiten_bias_grad: bool = True) -> torch.Tensor:
        bias = self.whiten.bias if whiten_bias_grad else self.whiten.bias.detach()
        x = F.conv2d(x, self.whiten.weight, bias)
        x = self.layers(x)
        x = x.view(len(x), -1)
        return self.head(x) / x.size(-1)

    def filters(self) -> list[nn.Parameter]:
        """The six trainable 3x3 conv filters (Muon's parameters), in network order."""
        return [p for p in self.parameters() if p.ndim == 4 and p.requires_grad]

    def sgd_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
        """(whitening bias, BatchNorm biases, head weight): the Nesterov-SGD parameters."""
        norm_biases = [m.bias for m in self.modules() if isinstance(m, BatchNorm)]
        return [self.whiten.bias], norm_biases, [self.head.weight]
