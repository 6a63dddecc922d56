"""Audio content encoder (upstream `ResSESyncEncoder` = ResNetSE with nOut 512, spec §3.3).

Two details are easy to get wrong and both change the numbers: the stem and the first conv of every
SE block apply ReLU *before* BatchNorm (the trained weights expect that order), and the attention
softmax runs over time (the last axis) after flattening channels×frequency channel-major.
"""
from __future__ import annotations

import torch
from torch import nn

from pcavs.constants import N_MELS

AUDIO_FEATURE_DIM = 512
NUM_CLASSES = 5830
LAYER_BLOCKS = (3, 4, 6, 3)
LAYER_WIDTHS = (32, 64, 128, 256)
SE_REDUCTION = 8
ATTENTION_DIM = 128


class SELayer(nn.Module):
    """Squeeze-and-excitation: per-channel gates from the globally pooled map."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction), nn.ReLU(),
            nn.Linear(channels // reduction, channels), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(torch.flatten(self.avg_pool(x), 1))
        return x * gate[:, :, None, None]


class SEBasicBlock(nn.Module):
    """conv3x3(stride) → ReLU → BN → conv3x3 → BN → SE, + shortcut, → ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.se = SELayer(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.relu(self.conv1(x)))  # ReLU before BN, as trained
        out = self.se(self.bn2(self.conv2(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNetSE(nn.Module):
    """SE-ResNet over the (80 mel × T) image, then self-attentive pooling over the remaining time axis."""

    def __init__(self, n_out: int = AUDIO_FEATURE_DIM, n_mels: int = N_MELS) -> None:
        super().__init__()
        w = LAYER_WIDTHS
        self.conv1 = nn.Conv2d(1, w[0], kernel_size=3, stride=1, padding=1, bias=True)
        self.relu = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(w[0])
        self.layer1 = self._stage(w[0], w[0], LAYER_BLOCKS[0], stride=1)
        self.layer2 = self._stage(w[0], w[1], LAYER_BLOCKS[1], stride=2)
        self.layer3 = self._stage(w[1], w[2], LAYER_BLOCKS[2], stride=2)
        self.layer4 = self._stage(w[2], w[3], LAYER_BLOCKS[3], stride=2)
        pooled = w[3] * (n_mels // 8)  # 256 channels × 10 frequency rows = 2560
        self.attention = nn.Sequential(
            nn.Conv1d(pooled, ATTENTION_DIM, kernel_size=1), nn.ReLU(), nn.BatchNorm1d(ATTENTION_DIM),
            nn.Conv1d(ATTENTION_DIM, pooled, kernel_size=1), nn.Softmax(dim=2),
        )
        self.fc = nn.Linear(pooled, n_out)

    @staticmethod
    def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(SEBasicBlock(cin, cout, stride), *(SEBasicBlock(cout, cout) for _ in range(blocks - 1)))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.relu(self.conv1(mel)))  # ReLU before BN, as trained
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, C·F, T'), channel-major
        weights = self.attention(x)                   # softmax over T'
        return self.fc(torch.sum(x * weights, dim=2))


class AudioEncoder(nn.Module):
    """Mel window (B,1,80,20) in [0,1] → (B,512) audio content feature (before the ×1.2 mouth weight)."""

    checkpoint_role = "audio encoder"

    def __init__(self) -> None:
        super().__init__()
        self.model = ResNetSE()
        self.fc = nn.Linear(AUDIO_FEATURE_DIM, NUM_CLASSES)  # training-only word classifier; never run

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # Inputs are cast to the weights' dtype: callers need not know that the encoders stay float32
        # while the generator runs in half precision.
        return self.model(mel.to(self.model.conv1.weight.dtype))
