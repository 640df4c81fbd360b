"""Run every benchmark in turn (never two at once: the machine has two cores) and update docs/benchmarks.md."""

from __future__ import annotations

import subprocess
import sys

# Cheapest first; the long ones (score-based attacks, evaluation against AutoAttack, training, certification) take
# from tens of minutes to hours on 2 cores (evaluation, training and certification resume from bench-output/).
BENCHMARKS = [
    ["benchmarks.pgd_speed"],
    ["benchmarks.pgd_speed_large"],
    ["benchmarks.fw_comparison"],
    ["benchmarks.pretrained_pgd40"],
    ["benchmarks.serving"],
    ["benchmarks.model_access"],
    ["benchmarks.serving_abuse"],
    ["benchmarks.distributed"],
    ["benchmarks.memory"],
    ["benchmarks.hard_label"],
    ["benchmarks.score_attacks"],
    ["benchmarks.transfer"],
    ["benchmarks.evaluation"],
    ["benchmarks.masks"],
    ["benchmarks.certification"],
    ["benchmarks.verification"],
    ["benchmarks.analysis"],
    ["benchmarks.training"],
    ["benchmarks.training_scale"],
]


def main() -> int:
    failed = []
    for module in BENCHMARKS:
        print(f"== {' '.join(module)}", flush=True)
        done = subprocess.run([sys.executable, "-m", *module], check=False)
        if done.returncode != 0:
            failed.append(module[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
