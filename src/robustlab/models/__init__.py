"""Models: normalization as the first layer, the architectures of the robustness literature, and loading.

- :class:`Normalize` / :class:`NormalizedModel` (:mod:`~robustlab.models.normalization`): ``(x - mean) / std``
  inside the model, so attacks, threat models and certificates all work in the raw input box (RobustBench's
  ``normalize_model``; the ``NormalizeLayer`` of Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via
  Randomized Smoothing", ICML 2019).
- Architectures (:mod:`~robustlab.models.architectures`), registered by name (:mod:`~robustlab.models.registry`:
  :func:`build_model`, :func:`list_models`, :func:`register_model`): :class:`SmallCNN`, :class:`LeNet5`
  (advertorch's MNIST model), :class:`PreActResNet18`, :class:`WideResNet` (``wrn-34-10``) and :class:`ResNet`
  (``resnet18``/``resnet50`` with the CIFAR stem, ``-imagenet`` with ImageNet's); ``build_model(name,
  normalize=True)`` puts the architecture's input statistics in front of it.
- :func:`save_checkpoint` / :func:`load_checkpoint` (:mod:`~robustlab.models.checkpoints`): a self-describing
  file (format tag, architecture name and options, weights, normalization) that loads with
  ``torch.load(weights_only=True)``.
- :func:`load_model` (:mod:`~robustlab.models.loading`): one entry point for every way a model is handed over: a
  TorchScript file, a robustlab checkpoint, a bare state dict plus ``arch``, a ``package.module:function``
  factory, or a pretrained name (:func:`list_pretrained`, :mod:`~robustlab.models.pretrained`). Models come back
  in eval mode on the requested device. Files are read safely (:mod:`~robustlab.models.files`).
"""

from __future__ import annotations

from robustlab.models.architectures import LeNet5, PreActResNet18, ResNet, SmallCNN, WideResNet, sequential_cnn
from robustlab.models.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    Checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from robustlab.models.loading import load_model
from robustlab.models.normalization import Normalize, NormalizedModel
from robustlab.models.pretrained import PRETRAINED, PretrainedInfo, list_pretrained
from robustlab.models.registry import MODELS, ModelInfo, build_model, list_models, model_info, register_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "MODELS",
    "PRETRAINED",
    "Checkpoint",
    "LeNet5",
    "ModelInfo",
    "Normalize",
    "NormalizedModel",
    "PreActResNet18",
    "PretrainedInfo",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "build_model",
    "list_models",
    "list_pretrained",
    "load_checkpoint",
    "load_model",
    "model_info",
    "register_model",
    "save_checkpoint",
    "sequential_cnn",
]
