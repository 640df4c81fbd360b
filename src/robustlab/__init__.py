"""robustlab: evaluate, train and certify the adversarial robustness of PyTorch models.

Public API::

    import robustlab
    threat = robustlab.ThreatModel("linf", 0.3)
    result = robustlab.attack(model, x, y, threat, method="pgd", steps=40)
    result.success.float().mean()
"""

from robustlab.api import attack, attack_batches
from robustlab.attacks import Attack, AttackConfig, AttackResult, get_attack, list_attacks, register_attack
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
from robustlab.evaluation import Suite, evaluate
from robustlab.goals import Goal, least_likely_targets, random_targets
from robustlab.models import Normalize, build_model, list_models, load_model, save_checkpoint
from robustlab.oracles import Access, GradientOracle, LabelOracle, ScoreOracle
from robustlab.threat import Norm, ThreatModel

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
    "RobustlabError",
    "ScoreOracle",
    "StateFileError",
    "Suite",
    "ThreatModel",
    "attack",
    "attack_batches",
    "build_model",
    "evaluate",
    "get_attack",
    "least_likely_targets",
    "list_attacks",
    "list_datasets",
    "list_models",
    "load_dataset",
    "load_model",
    "random_targets",
    "register_attack",
    "save_checkpoint",
    "train_val_split",
]
