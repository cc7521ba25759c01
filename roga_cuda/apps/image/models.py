"""Backbones with a binary head (one logit: > 0 means fake).

* ``resnet34`` — ResNet-34 whose ``state_dict`` keys and shapes match torchvision's
  ``resnet34`` (``width=64``), so ImageNet weights load from a local torchvision file
  (``pretrained=/path/resnet34-b627a593.pth``; the 1000-class ``fc`` is replaced). Nothing
  is downloaded. ``width`` < 64 gives the same depth with thinner layers (CPU demos).
* ``xception`` — Xception (entry flow, ``middle_blocks`` middle-flow blocks, exit flow)
  with the parameter names of the Xception port that DeepfakeBench uses
  (conv1..conv4, bn1..bn4, block1..block12, ``last_linear``), so its weight file loads;
  ``width`` scales every channel count for small runs.
* ``efficientnet_b4`` — through ``timm`` when installed (a clear error otherwise).
* ``meso4`` — Meso-4 (Afchar et al. 2018).
"""
import os

import torch
import torch.nn as nn

from ..common.checkpoint import load_checkpoint

__all__ = ["build_model", "ResNet34", "Xception", "Meso4", "MODELS", "load_pretrained"]


# ----------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet34(nn.Module):
    """torchvision's ResNet-34 layout (BasicBlock, layers [3, 4, 6, 3]) with ``num_classes``
    outputs; torchvision's initialisation (Kaiming normal convs, BN weight 1 / bias 0)."""

    layers = (3, 4, 6, 3)

    def __init__(self, num_classes=1, width=64, dropout=0.0):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, self.layers[0])
        self.layer2 = self._make_layer(width * 2, self.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, self.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, self.layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    head_keys = ("fc.weight", "fc.bias")


# --------------------------------------------------------------------------------- Xception
class SeparableConv2d(nn.Module):
    def __init__(self, cin, cout, k=1, stride=1, padding=0, dilation=1, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, k, stride, padding, dilation, groups=cin, bias=bias)
        self.pointwise = nn.Conv2d(cin, cout, 1, 1, 0, 1, 1, bias=bias)

    def forward(self, x):
        return self.pointwise(self.conv1(x))


class XBlock(nn.Module):
    def __init__(self, cin, cout, reps, strides=1, start_with_relu=True, grow_first=True):
        super().__init__()
        if cout != cin or strides != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride=strides, bias=False)
            self.skipbn = nn.BatchNorm2d(cout)
        else:
            self.skip = None
        rep = []
        filters = cin
        if grow_first:
            rep += [nn.ReLU(inplace=True), SeparableConv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout)]
            filters = cout
        for _ in range(reps - 1):
            rep += [nn.ReLU(inplace=True), SeparableConv2d(filters, filters, 3, 1, 1), nn.BatchNorm2d(filters)]
        if not grow_first:
            rep += [nn.ReLU(inplace=True), SeparableConv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout)]
        if not start_with_relu:
            rep = rep[1:]
        else:
            rep[0] = nn.ReLU(inplace=False)  # the block input is also the skip input
        if strides != 1:
            rep.append(nn.MaxPool2d(3, strides, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, inp):
        x = self.rep(inp)
        skip = self.skipbn(self.skip(inp)) if self.skip is not None else inp
        return x + skip


class Xception(nn.Module):
    """Xception (Chollet 2017). ``width`` multiplies every channel count (1.0 = the original
    22.9M-parameter net); ``middle_blocks`` (8 in the original) sets the middle flow."""

    def __init__(self, num_classes=1, width=1.0, middle_blocks=8, dropout=0.0):
        super().__init__()
        c = lambda n: max(8, int(round(n * width)))  # noqa: E731
        self.conv1 = nn.Conv2d(3, c(32), 3, 2, 0, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c(32), c(64), 3, bias=False)
        self.bn2 = nn.BatchNorm2d(c(64))
        self.relu2 = nn.ReLU(inplace=True)
        self.block1 = XBlock(c(64), c(128), 2, 2, start_with_relu=False)
        self.block2 = XBlock(c(128), c(256), 2, 2)
        self.block3 = XBlock(c(256), c(728), 2, 2)
        for i in range(middle_blocks):
            setattr(self, f"block{4 + i}", XBlock(c(728), c(728), 3, 1))
        self.n_middle = middle_blocks
        setattr(self, f"block{4 + middle_blocks}", XBlock(c(728), c(1024), 2, 2, grow_first=False))
        self.conv3 = SeparableConv2d(c(1024), c(1536), 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(c(1536))
        self.relu3 = nn.ReLU(inplace=True)
        self.conv4 = SeparableConv2d(c(1536), c(2048), 3, 1, 1)
        self.bn4 = nn.BatchNorm2d(c(2048))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_linear = nn.Linear(c(2048), num_classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        for i in range(1, 5 + self.n_middle):
            x = getattr(self, f"block{i}")(x)
        x = self.relu3(self.bn3(self.conv3(x)))
        x = torch.relu(self.bn4(self.conv4(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.last_linear(self.dropout(x))

    head_keys = ("last_linear.weight", "last_linear.bias", "fc.weight", "fc.bias")


# ------------------------------------------------------------------------------------ Meso4
class Meso4(nn.Module):
    """Meso-4: four conv blocks (8, 8, 16, 16 channels) and a small dense head. The
    original takes 256x256 input; other sizes work (the head adapts via adaptive pooling
    to the 8x8 grid Meso-4 ends with at 256 px, or less for small inputs)."""

    def __init__(self, num_classes=1, image_size=256, dropout=0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 5, padding=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 5, padding=2, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 16, 5, padding=2, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.grid = max(1, min(8, image_size // 32))
        self.pool = nn.AdaptiveAvgPool2d(self.grid)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(16 * self.grid * self.grid, 16)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc2 = nn.Linear(16, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.bn1(torch.relu(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(self.bn2(torch.relu(self.conv2(x))), 2)
        x = nn.functional.max_pool2d(self.bn3(torch.relu(self.conv3(x))), 2)
        x = nn.functional.max_pool2d(self.bn4(torch.relu(self.conv4(x))), 4, ceil_mode=True)
        x = torch.flatten(self.pool(x), 1)
        x = self.leaky(self.fc1(self.dropout(x)))
        return self.fc2(self.dropout(x))

    head_keys = ("fc2.weight", "fc2.bias")


# ---------------------------------------------------------------------------- EfficientNet
def _efficientnet_b4(num_classes=1, dropout=None):
    try:
        import timm
    except ImportError:
        raise ImportError("model 'efficientnet_b4' needs the timm package: pip install timm "
                          "(or pip install 'roga_cuda[image]'); or pick resnet34, xception or meso4") from None
    kw = {} if dropout is None else {"drop_rate": dropout}
    m = timm.create_model("efficientnet_b4", pretrained=False, num_classes=num_classes, **kw)
    m.head_keys = ("classifier.weight", "classifier.bias")
    return m


MODELS = ("resnet34", "xception", "efficientnet_b4", "meso4")


def load_pretrained(model, path):
    """Load backbone weights from a local file (a state_dict, or a checkpoint with 'model'
    / 'state_dict'), skipping the classification head; any other missing or mismatched
    key is an error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path} (nothing is downloaded; give a local file)")
    sd = load_checkpoint(path, weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    head = set(getattr(model, "head_keys", ()))
    own = model.state_dict()
    fixed = {}
    for k, v in sd.items():
        if k in head or k not in own:
            continue
        if "pointwise" in k and v.dim() == 2 and own[k].dim() == 4:  # that Xception port stores 1x1 convs as 2-D
            v = v[:, :, None, None]
        if v.shape != own[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)} "
                             "(check model.arch / model.width)")
        fixed[k] = v
    missing = [k for k in own if k not in fixed and k not in head]
    if missing:
        raise ValueError(f"{path}: {len(missing)} model key(s) missing from the file, e.g. {missing[:3]}; "
                         f"is this a {type(model).__name__} checkpoint?")
    model.load_state_dict(fixed, strict=False)
    return model


def build_model(arch="resnet34", image_size=64, width=None, pretrained=None, dropout=0.0, middle_blocks=8):
    if arch == "resnet34":
        m = ResNet34(1, width=int(width or 64), dropout=dropout)
    elif arch == "xception":
        m = Xception(1, width=float(width or 1.0), middle_blocks=middle_blocks, dropout=dropout)
    elif arch == "meso4":
        m = Meso4(1, image_size=image_size, dropout=dropout if dropout else 0.5)
    elif arch == "efficientnet_b4":
        m = _efficientnet_b4(1, dropout=dropout or None)
    else:
        raise ValueError(f"unknown model.arch {arch!r}; choose one of {', '.join(MODELS)}")
    if pretrained:
        load_pretrained(m, pretrained)
    return m
