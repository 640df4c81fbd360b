"""The main job (``robustlab demo``, run by ``make demo``).

On MNIST shipped in an offline package, it trains a small CNN (or loads the one cached by an earlier run), runs
every white-box attack over a range of eps on held-out test images, and writes ``report.json`` and a
self-contained ``report.html``: robust accuracy against eps per attack and for their per-example worst case, and
a grid of clean and adversarial images. When advertorch's pretrained LeNet5 pair is installed, it also checks
PGD-40 at eps 0.3 on the clean and the adversarially trained model. Then, on the same CNN: an evaluation with an
attack suite, score-based black-box attacks, RayS's hard-label decision-boundary distance (ADBD) and
success-vs-queries curve, and randomized-smoothing certificates. Two more models are trained (or loaded from the
cache): a fast robust training run (Backward Smoothing, Linf eps 0.3), evaluated on test images, and a small
``seqcnn`` trained with IBP, verified by IBP and CROWN next to PGD's robust accuracy.

The parts: :mod:`~robustlab.demo.run` (:func:`run_demo`, the order and timing of the parts),
:mod:`~robustlab.demo.models` (the cached models and their recipes), :mod:`~robustlab.demo.whitebox` (the
white-box sweep and the pretrained pair, with their report sections) and :mod:`~robustlab.demo.parts` (the later
sections).
"""

from __future__ import annotations

from robustlab.demo.models import DemoTraining, accuracy, demo_model, fit_classifier, train_cached
from robustlab.demo.run import run_demo
from robustlab.demo.whitebox import DEMO_ATTACKS, DemoAttack

__all__ = [
    "DEMO_ATTACKS",
    "DemoAttack",
    "DemoTraining",
    "accuracy",
    "demo_model",
    "fit_classifier",
    "run_demo",
    "train_cached",
]
