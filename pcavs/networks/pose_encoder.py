"""Non-identity ("pose") encoder (upstream `FanEncoder`, spec §3.2).

A one-stack FAN landmark hourglass whose 68 heatmaps are squeezed into a 512-d "noid" feature, plus small
MLP heads. At inference only two heads run: `to_headpose`→`headpose_embed` (12-d pose code, from a face
image) and `mouth_embed` (500-d mouth code, from the *audio* feature). The other heads exist only so
the released state_dict has a home for every key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pcavs.constants import MOUTH_DIM, POSE_DIM

NOID_DIM = 512
NUM_LANDMARKS = 68
NUM_CLASSES = 5830
HOURGLASS_DEPTH = 4
HOURGLASS_CHANNELS = 256


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class ConvBlock(nn.Module):
    """FAN's pre-activation residual block: three BN→ReLU→3x3 convs of widths out/2, out/4, out/4 whose
    outputs are concatenated (so the block's width is out), plus an identity or BN→ReLU→1x1 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout // 2)
        self.bn2 = nn.BatchNorm2d(cout // 2)
        self.conv2 = _conv3x3(cout // 2, cout // 4)
        self.bn3 = nn.BatchNorm2d(cout // 4)
        self.conv3 = _conv3x3(cout // 4, cout // 4)
        # Index 1 is a parameter-free ReLU, so the checkpoint keys are downsample.0 (BN) and .2 (conv).
        self.downsample = (
            nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, kernel_size=1, bias=False))
            if cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.conv1(F.relu(self.bn1(x)))
        o2 = self.conv2(F.relu(self.bn2(o1)))
        o3 = self.conv3(F.relu(self.bn3(o2)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.cat((o1, o2, o3), dim=1) + shortcut


class HourGlass(nn.Module):
    """Recursive hourglass. Level L has `b1_L` (skip branch), `b2_L` (after 2x2 max-pool), the level
    below (or `b2_plus_1` at the bottom) and `b3_L`, whose output is resized back to the skip branch's
    size. Sizes go 56→28→14→7→3, so the innermost resize is 3→7: a real bilinear resize to an explicit
    size is required (a ×2 upsampler would give 6)."""

    def __init__(self, depth: int, channels: int) -> None:
        super().__init__()
        self.depth = depth
        self.dropout = nn.Dropout(0.5)  # identity in eval; kept for module parity with upstream
        # Registration order mirrors upstream (b1_L, b2_L, recurse, b3_L) so state_dict() order matches.
        self._register(depth, channels)

    def _register(self, level: int, channels: int) -> None:
        self.add_module(f"b1_{level}", ConvBlock(channels, channels))
        self.add_module(f"b2_{level}", ConvBlock(channels, channels))
        if level > 1:
            self._register(level - 1, channels)
        else:
            self.add_module(f"b2_plus_{level}", ConvBlock(channels, channels))
        self.add_module(f"b3_{level}", ConvBlock(channels, channels))

    def _level(self, level: int, x: torch.Tensor) -> torch.Tensor:
        up = self.dropout(self._modules[f"b1_{level}"](x))
        low = self._modules[f"b2_{level}"](F.max_pool2d(x, 2, stride=2))
        if level > 1:
            low = self._level(level - 1, low)
        else:
            low = self._modules[f"b2_plus_{level}"](low)
        low = self._modules[f"b3_{level}"](low)
        low = F.interpolate(low, size=up.shape[-2:], mode="bilinear", align_corners=False)
        return up + low

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._level(self.depth, x)


class FanTrunk(nn.Module):
    """FAN stem + one hourglass + heatmap head, then bn5→ReLU→conv6(stride 2)→flatten→ReLU→fc: a 512-d
    feature that carries pose/expression but (by training) not identity."""

    def __init__(self) -> None:
        super().__init__()
        # Registration order mirrors upstream so state_dict() order matches the manifest.
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = ConvBlock(64, 128)
        self.conv3 = ConvBlock(128, 128)
        self.conv4 = ConvBlock(128, HOURGLASS_CHANNELS)
        self.m0 = HourGlass(HOURGLASS_DEPTH, HOURGLASS_CHANNELS)
        self.top_m_0 = ConvBlock(HOURGLASS_CHANNELS, HOURGLASS_CHANNELS)
        self.conv_last0 = nn.Conv2d(HOURGLASS_CHANNELS, HOURGLASS_CHANNELS, kernel_size=1)
        self.l0 = nn.Conv2d(HOURGLASS_CHANNELS, NUM_LANDMARKS, kernel_size=1)
        self.bn_end0 = nn.BatchNorm2d(HOURGLASS_CHANNELS)
        self.avgpool = nn.MaxPool2d((2, 2), 2)  # unused upstream leftover (no parameters)
        self.conv6 = nn.Conv2d(NUM_LANDMARKS, 1, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(28 * 28, NOID_DIM)
        self.bn5 = nn.BatchNorm2d(NUM_LANDMARKS)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(img)))
        x = F.max_pool2d(self.conv2(x), 2)
        x = self.conv4(self.conv3(x))
        x = self.top_m_0(self.m0(x))
        heatmaps = self.l0(F.relu(self.bn_end0(self.conv_last0(x))))
        x = self.conv6(F.relu(self.bn5(heatmaps)))
        return self.fc(F.relu(torch.flatten(x, 1)))


class PoseEncoder(nn.Module):
    """Face crop (B,3,224,224) RGB in [-1,1] → 12-d head-pose code; audio feature → 500-d mouth code."""

    checkpoint_role = "pose encoder"

    def __init__(self) -> None:
        super().__init__()
        self.model = FanTrunk()
        # Training-only heads (identity classifier, mouth/pose classifiers, mouth mapper): never run.
        self.classifier = nn.Sequential(nn.Linear(NOID_DIM, NOID_DIM), nn.ReLU(), nn.Linear(NOID_DIM, NUM_CLASSES))
        self.to_mouth = nn.Sequential(nn.Linear(NOID_DIM, NOID_DIM), nn.ReLU(), nn.Linear(NOID_DIM, NOID_DIM))
        self.mouth_embed = nn.Sequential(nn.ReLU(), nn.Linear(NOID_DIM, MOUTH_DIM))
        self.mouth_fc = nn.Sequential(nn.ReLU(), nn.Linear(NOID_DIM, NUM_CLASSES))
        self.to_headpose = nn.Sequential(nn.Linear(NOID_DIM, NOID_DIM), nn.ReLU(), nn.Linear(NOID_DIM, NOID_DIM))
        self.headpose_embed = nn.Sequential(nn.ReLU(), nn.Linear(NOID_DIM, POSE_DIM))
        self.headpose_fc = nn.Sequential(nn.ReLU(), nn.Linear(POSE_DIM, NUM_CLASSES))

    def noid_feature(self, img: torch.Tensor) -> torch.Tensor:
        """Trunk output (B,512)."""
        return self.model(img)

    def headpose_feature(self, noid: torch.Tensor) -> torch.Tensor:
        """(B,512) noid feature → (B,512) head-pose feature."""
        return self.to_headpose(noid)

    def pose_code(self, img: torch.Tensor) -> torch.Tensor:
        """Face crop → (B,12) pose code (trunk → to_headpose → headpose_embed)."""
        img = img.to(self.model.conv1.weight.dtype)  # float32 encoders, whatever the caller's dtype
        return self.headpose_embed(self.headpose_feature(self.noid_feature(img)))

    def mouth_code(self, audio_feature_scaled: torch.Tensor) -> torch.Tensor:
        """(B,512) audio feature *already multiplied by the mouth weight (1.2)* → (B,500) mouth code."""
        return self.mouth_embed(audio_feature_scaled.to(self.mouth_embed[1].weight.dtype))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.pose_code(img)
