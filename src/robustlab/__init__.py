"""robustlab: evaluate, train and certify the adversarial robustness of PyTorch models.

Public API::

    import robustlab
    threat = robustlab.ThreatModel("linf", 0.3)
    result = robustlab.attack(model, x, y, threat, method="pgd", steps=40)
    result.success.float().mean()

The four jobs are top-level: :func:`attack`, :func:`evaluate`, :func:`train` and :class:`RandomizedSmoothing`
(certification), with the registries' listings beside them (:func:`list_attacks`, :func:`list_objectives`,
:func:`list_suites`, :func:`list_models`, :func:`list_datasets`). See docs/architecture.md for the layers.
"""

from robustlab.api import attack, attack_batches
from robustlab.attacks import Attack, AttackConfig, AttackResult, get_attack, list_attacks, register_attack
from robustlab.attacks.minimum_norm import minimum_norm
from robustlab.certification import RandomizedSmoothing
from robustlab.data import ArrayDataset, list_datasets, load_dataset, train_val_split
from robustlab.errors import (
    ConfigError,
    DataNotFoundError,
    InvalidInputError,
    ModelError,
    QueryBudgetExceeded,
    RobustlabError,
    StateFileError,
)
from robustlab.evaluation import Suite, evaluate, list_suites
from robustlab.goals import Goal, least_likely_targets, random_targets
from robustlab.models import Normalize, build_model, list_models, load_model, save_checkpoint
from robustlab.oracles import Access, GradientOracle, LabelOracle, ScoreOracle
from robustlab.threat import Norm, ThreatModel
from robustlab.training import TrainConfig, list_objectives, train

__version__ = "0.1.0"

__all__ = [
    "Access",
    "ArrayDataset",
    "Attack",
    "AttackConfig",
    "AttackResult",
    "ConfigError",
    "DataNotFoundError",
    "Goal",
    "GradientOracle",
    "InvalidInputError",
    "LabelOracle",
    "ModelError",
    "Norm",
    "Normalize",
    "QueryBudgetExceeded",
    "RandomizedSmoothing",
    "RobustlabError",
    "ScoreOracle",
    "StateFileError",
    "Suite",
    "ThreatModel",
    "TrainConfig",
    "attack",
    "attack_batches",
    "build_model",
    "evaluate",
    "get_attack",
    "least_likely_targets",
    "list_attacks",
    "list_datasets",
    "list_models",
    "list_objectives",
    "list_suites",
    "load_dataset",
    "load_model",
    "minimum_norm",
    "random_targets",
    "register_attack",
    "save_checkpoint",
    "train",
    "train_val_split",
]
