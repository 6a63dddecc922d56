"""Identity encoder (upstream `ResNeXtEncoder`, spec §3.1).

The trunk is torchvision's ResNeXt50-32x4d so the checkpoint's `model.*` keys load unchanged; we only
call its layers up to `layer4` ourselves because the identity vector is the pooled layer4 map, not the
ImageNet logits of `model.fc`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnext50_32x4d

from pcavs.constants import ID_DIM

ID_MAP_CHANNELS = 512
ID_MAP_SIZE = 7
NUM_CLASSES = 5830  # size of the unused training-time identity classifier `fc`


class IdentityEncoder(nn.Module):
    """Photo (B,3,224,224) RGB in [-1,1] (no ImageNet mean/std) → identity vector and generator start map."""

    checkpoint_role = "identity encoder"

    def __init__(self) -> None:
        super().__init__()
        # Registration order = upstream order, so state_dict() lists keys like the released file.
        self.model = resnext50_32x4d(weights=None)
        self.conv1x1 = nn.Conv2d(2048, ID_MAP_CHANNELS, kernel_size=1, padding=0, bias=True)
        # Identity-classification head used only in training; kept so the checkpoint's `fc.*` has a home.
        self.fc = nn.Linear(ID_DIM, NUM_CLASSES)

    def trunk(self, img: torch.Tensor) -> torch.Tensor:
        """layer4 feature map (B,2048,H/32,W/32)."""
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(img))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (id_feature (B,2048), id_map (B,512,7,7)). `model.fc` is deliberately not run."""
        feat = self.trunk(img.to(self.conv1x1.weight.dtype))  # float32 encoders, whatever the caller's dtype
        id_feature = torch.flatten(self.model.avgpool(feat), 1)
        # The adaptive pool is a no-op at 224 input; upstream keeps it so other sizes still give 7x7.
        id_map = F.adaptive_avg_pool2d(self.conv1x1(feat), (ID_MAP_SIZE, ID_MAP_SIZE))
        return id_feature, id_map
