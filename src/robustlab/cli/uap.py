"""robustlab attack --method uap: a universal perturbation crafted on part of the data, fooling rate on the rest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from robustlab.cli import common


def run_uap(args: argparse.Namespace, threat: Any) -> int:
    """Craft on the first ``--fit-examples`` images (white-box on --model, or on the --surrogate ensemble), report
    the fooling rate of the perturbation on the held-out images, asking the target for labels only."""
    import torch
    from torch import nn

    from robustlab.attacks._surrogate import Ensemble, SurrogateOptions
    from robustlab.attacks.base import build_config
    from robustlab.attacks.uap import UAPConfig, fooling_rate, universal_perturbation
    from robustlab.cli.attack import load_surrogates
    from robustlab.data import read_batch
    from robustlab.errors import ConfigError

    common.output_file(args.out, "--out")
    device = common.device_from(args.device)
    model, _ = common.open_model(args, device)
    data = common.open_data(args)
    common.check_model_fits_data(model, data, args, device)
    x, _ = read_batch(data, range(len(data)))
    x = x.to(device)
    threat.check_inputs(x, name=f"data set {args.data!r}")
    fit = args.fit_examples if args.fit_examples is not None else len(x) // 2
    if not 1 <= fit < len(x):
        raise ConfigError(f"--fit-examples must leave held-out images: give 1..{len(x) - 1}, got {fit}")
    surrogates = load_surrogates(args, device)
    if surrogates:
        crafter: Any = Ensemble(surrogates, SurrogateOptions())
    elif isinstance(model, nn.Module):
        crafter = model
    else:
        raise ConfigError("uap crafts white-box: the model is a black box here, so give a --surrogate MODEL")
    config = build_config(UAPConfig, dict(args.option), "uap")
    assert isinstance(config, UAPConfig)
    config.validate()
    found = universal_perturbation(crafter, x[:fit], threat, config, seed=args.seed)
    held_out = fooling_rate(model, x[fit:], found.perturbation, threat, batch_size=args.batch_size)
    summary = {
        "method": "uap", "variant": config.method, "norm": threat.norm.value, "eps": threat.eps,
        "crafted_on": "surrogates" if surrogates else "the model", "fit_examples": fit,
        "held_out_examples": len(x) - fit, "fit_fooling_rate_by_pass": found.fit_fooling,
        "held_out_fooling_rate": held_out.rate, "target_label_queries": held_out.queries,
        "perturbation_norm": float(threat.distance(found.perturbation, torch.zeros_like(found.perturbation))[0]),
        "config": config.as_dict(),
    }  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"universal perturbation ({config.method}, {threat}) crafted on {summary['crafted_on']} with {fit} images")
    print(f"  fooling rate on {len(x) - fit} held-out images  {100 * held_out.rate:.2f}%")
    print(f"  its {threat.norm.value} norm                      {summary['perturbation_norm']:.4f}")
    return common.EXIT_OK
