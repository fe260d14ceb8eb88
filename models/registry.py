"""Model registry: the CIFAR ResNets of He et al. (2016), torchvision classifiers, user factories.

Every model is built from a small, JSON-serialisable :class:`ModelSpec`, so a compact model can be
rebuilt later (``latprune.load``) from the spec plus its pruned layer shapes and weights.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from pathlib import Path
from typing import Callable

from torch import nn

from latprune.errors import BadInput, one_line
from latprune.models import cifar_resnet

__all__ = ["ModelSpec", "register_model", "available_models", "BUNDLED_WEIGHTS", "bundled_weights"]

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


# Trained dense models shipped with the package (plain state dicts in models/weights/; how each was
# made, its accuracy and sha256 are in README, "Bundled weights", and in the .json beside it):
# (model, dataset, classes) -> file name
BUNDLED_WEIGHTS = {("resnet20", "fashion-mnist", 10): "resnet20-fashion-mnist.pt"}
WEIGHTS_DIR = Path(__file__).resolve().with_name("weights")


def bundled_weights(model: str, data: str, num_classes: int) -> Path | None:
    """The shipped trained weights for this model on this dataset, or None."""
    name = BUNDLED_WEIGHTS.get((model, data, num_classes))
    path = WEIGHTS_DIR / name if name else None
    return path if path is not None and path.is_file() else None


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
        params = inspect.signature(factory).parameters.values()
        takes_classes = any(q.name == "num_classes" or q.kind is q.VAR_KEYWORD for q in params)
    except (TypeError, ValueError):  # a callable without an inspectable signature
        takes_classes = True
    try:
        model = factory(num_classes=num_classes) if takes_classes else factory()
    except Exception as e:  # the user's own code failed: say whose, and what it said
        raise BadInput(f"model factory {ref!r} raised {type(e).__name__}: {one_line(e, 160)}: fix the factory "
                       "(run it in Python to see its traceback, or pass -v)") from e
    if not isinstance(model, nn.Module):
        raise BadInput(f"model factory {ref!r} returned {type(model).__name__}, not an nn.Module")
    return model


for _name, _factory in (("resnet20", cifar_resnet.resnet20), ("resnet56", cifar_resnet.resnet56)):
    register_model(_name)(_factory)


def _torchvision(name: str):
    def factory(num_classes: int = 10) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)

    factory.__name__ = name
    return factory


for _name in ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"):
    register_model(_name)(_torchvision(_name))
