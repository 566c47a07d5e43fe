"""Models: the ``model`` group's options, each registered here with its schema.

Models know nothing about workers or parallelism: the engines stack them afterwards
(:mod:`dpl.core.workers`). A model is built for its data's shape: ``in_channels``, ``num_classes``
and ``image_size`` (a window's length for text), plus the option's own keys. The modules that define
them import torch; this one does not, so the registry loads without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from dpl.config.schema import at_least, check, key
from dpl.registry import Registry


@dataclass(frozen=True)
class ModelFacts:
    text: bool = False  # a sequence model over bytes (dataset facts text), not an image model
    # what optimizer.decay_params=auto means for it (dpl.components.optim.decay): all, or matrices (no decay on
    # biases, norm weights and embeddings, the language-model recipe of nanoGPT's configure_optimizers)
    decay: str = "all"


MODELS = Registry("model", "the network every worker trains", facts=ModelFacts())


@dataclass
class ModelConfig:
    name: str = key(MISSING, "the model (an option of the group)")


@dataclass
class GptConfig(ModelConfig):
    """A decoder-only transformer over bytes (:class:`dpl.components.models.gpt.GPT`)."""

    n_layer: int = key(2, "transformer blocks")
    n_head: int = key(2, "attention heads per block")
    n_embd: int = key(64, "embedding width (a multiple of n_head)")
    block_size: int = key(64, "the longest context in bytes (positions); dataset.block_size may not exceed it")
    dropout: float = key(0.0, "dropout after the embeddings, the attention and the MLP")

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            at_least(f"model.{name}", getattr(self, name), 1, "an integer")
        check(self.n_embd % self.n_head == 0, "model.n_embd", self.n_embd, f"a multiple of model.n_head={self.n_head}")
        check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "0 <= x < 1")


IMAGES, TEXT = ModelFacts(), ModelFacts(text=True, decay="matrices")


@MODELS.register("lenet5", ModelConfig, facts=IMAGES)
def lenet5(in_channels: int, num_classes: int, image_size: int) -> Any:
    """The study's LeNet-5 (64-channel convolutions)."""
    from dpl.components.models.lenet import LeNet5

    return LeNet5(in_channels, num_classes, image_size)


@MODELS.register("resnet20", ModelConfig, facts=IMAGES)
def resnet20(in_channels: int, num_classes: int, image_size: int) -> Any:
    """ResNet-20 for CIFAR (He et al. 2016), with BatchNorm."""
    from dpl.components.models.resnet import ResNet20

    return ResNet20(in_channels, num_classes, image_size)


def gpt(in_channels: int, num_classes: int, image_size: int, **sizes: Any) -> Any:
    """A GPT of the option's sizes (``gpt``, ``gpt_tiny`` and ``gpt_small`` differ in their YAML's values)."""
    from dpl.components.models.gpt import GPT

    return GPT(in_channels, num_classes, image_size, **sizes)


for _name in ("gpt", "gpt_tiny", "gpt_small"):
    MODELS.add(_name, GptConfig, gpt, TEXT, module=__name__)


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, **options: Any) -> Any:
    """The model ``name`` for the data's shape; ``options``: the option's own keys (a GPT's sizes)."""
    return MODELS.build(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
