"""Model registry: the CIFAR ResNets of He et al. (2016), torchvision classifiers, user factories.

Every model is built from a small, JSON-serialisable :class:`ModelSpec`, so a compact model can be
rebuilt later (``latprune.load``) from the spec plus its pruned layer shapes and weights.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
from typing import Callable

import torch
from torch import nn

from latprune.errors import BadInput

log = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn: Callable[..., nn.Module]):
        _REGISTRY[name] = fn
        return fn

    return deco


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build the dense model: a registered name or ``package.module:factory``."""

    name: str
    num_classes: int = 10

    def build(self) -> nn.Module:
        if ":" in self.name:
            return _build_user_model(self.name, self.num_classes)
        if self.name not in _REGISTRY:
            raise BadInput(
                f"unknown model {self.name!r}: use one of {', '.join(sorted(_REGISTRY))} "
                "or 'package.module:factory'"
            )
        return _REGISTRY[self.name](num_classes=self.num_classes)


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def _build_user_model(ref: str, num_classes: int) -> nn.Module:
    mod_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise BadInput(
            f"cannot import model factory {ref!r} ({e}): check the module is on PYTHONPATH "
            "and the factory name after ':'"
        ) from None
    try:
        model = factory(num_classes=num_classes)
    except TypeError:
        model = factory()
    if not isinstance(model, nn.Module):
        raise BadInput(f"model factory {ref!r} returned {type(model).__name__}, not an nn.Module")
    return model


# ----------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, section 4.2) with option-B (1x1 conv projection) shortcuts.


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: widths 16/32/64, n basic blocks per stage."""

    def __init__(self, depth: int, num_classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, w, 2 if (i > 0 and j == 0) else 1))
                c_in = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet20")
def resnet20(num_classes: int = 10) -> nn.Module:
    return CifarResNet(20, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 10) -> nn.Module:
    return CifarResNet(56, num_classes)


def _torchvision(name: str):
    def factory(num_classes: int = 10) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    factory.__name__ = name
    return factory


for _name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small"):
    register_model(_name)(_torchvision(_name))


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose outputs are class logits: never pruned on their output side."""
    last = None
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = m
    return [last] if last is not None else []
