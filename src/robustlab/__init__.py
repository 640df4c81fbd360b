"""robustlab: evaluate, train and certify the adversarial robustness of PyTorch models.

Public API::

    import robustlab
    threat = robustlab.ThreatModel("linf", 0.3)
    result = robustlab.attack(model, x, y, threat, method="pgd", steps=40)
    result.success.float().mean()
"""

from robustlab.api import attack
from robustlab.attacks import Attack, AttackConfig, AttackResult, get_attack, list_attacks, register_attack
from robustlab.errors import (
    ConfigError,
    DataNotFoundError,
    InvalidInputError,
    ModelError,
    QueryBudgetExceeded,
    RobustlabError,
)
from robustlab.goals import Goal, least_likely_targets, random_targets
from robustlab.oracles import Access, GradientOracle, LabelOracle, ScoreOracle
from robustlab.threat import Norm, ThreatModel

__version__ = "0.1.0"

__all__ = [
    "Access",
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
    "QueryBudgetExceeded",
    "RobustlabError",
    "ScoreOracle",
    "ThreatModel",
    "attack",
    "get_attack",
    "least_likely_targets",
    "list_attacks",
    "random_targets",
    "register_attack",
]
