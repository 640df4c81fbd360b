"""Peak memory of ``robustlab evaluate`` on image folders as the folder grows (issue 22).

For each configuration the command runs as a child process of ``/usr/bin/time -v`` (its "Maximum resident set
size" is the peak of the robustlab process) while this script samples, every 0.1 s, the resident memory of the
whole process tree from ``/proc`` (robustlab and any DataLoader workers, summed: an upper bound, since forked
workers share pages). A data set of N images streams if the peak does not grow with N.

Configurations (generated data in ``bench-output/memory``, reused between runs):

- 3x32x32 PNG folders of 2,000 and 20,000 images, 10 classes; a SmallCNN (3 channels, random weights);
  ``--suite standard`` at eps 8/255; streamed with 0 and 2 DataLoader workers; and, for contrast, the same
  folder read into memory first (``ArrayDataset``, what every command did before streaming).
- 3x224x224 JPEG folders of 200 and 2,000 images, 10 classes; a ResNet-50 with the ImageNet stem (random
  weights). The standard suite on 2,000 ImageNet-size images with a ResNet-50 takes days on 2 CPU cores, so these
  runs use a cheap configuration: ``--attacks fgsm --no-diagnostics`` at batch 16 (a clean pass, one FGSM step
  with its re-check, the final re-verification: every image read three times). The memory that depends on the
  data set is the same as for any suite: per-example numbers in memory, images read per batch, adversarial
  examples written to OUT/adversarial.npy.

Usage::

    flock /work/notes/bench.lock .venv/bin/python -m benchmarks.memory            # the documented run
    .venv/bin/python -m benchmarks.memory --quick                                  # 200/2,000 and 20/200 images
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import markdown_table, write_docs_section

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench-output" / "memory"
ROBUSTLAB = Path(sys.executable).with_name("robustlab")
CLASSES = 10
# Batches of the 3x32x32 runs: small enough that every stage of the standard suite fills whole batches on both
# folders (APGD-CE leaves ~1% of the examples: 57 of 2,000, 549 of 20,000). With the default 256 the later stages of
# the small run attack one partial batch of 57 and those of the large one full batches of 256, and the attack's
# working memory for 4.5x more examples per batch (+80 MB) was counted as growth with the data.
BATCH_32 = 32


# ----------------------------------------------------------------------------------------------- the data
def image_folder(count: int, size: int, suffix: str) -> Path:
    """``count`` images of ``size x size`` in 10 class folders (smooth random images), made once and reused."""
    from PIL import Image

    folder = WORK / f"folder-{size}px-{count}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(count + size)
    for index in range(count):
        label = index % CLASSES
        target = folder / f"class{label:02d}"
        target.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (max(size // 16, 2), max(size // 16, 2), 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        noisy = np.clip(np.asarray(image, dtype=np.int16) + rng.integers(-8, 9, (size, size, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(target / f"{index:06d}{suffix}", quality=90)
    marker.touch()
    return folder


def model_file(arch: str, *, zero_bias: bool = False, **kwargs: Any) -> Path:
    """A robustlab checkpoint of ``arch`` with seeded random weights (``zero_bias``: every bias set to zero).

    With its random biases a SmallCNN predicts one class for nearly every input and keeps it under any small
    perturbation, so every stage of the standard suite attacks every image (17 minutes for 2,000 images on one
    core); without biases its predictions follow the input and APGD-CE flips 99% of them, which keeps the 20,000
    image run to minutes. The data-dependent memory is the same either way.
    """
    import torch

    from robustlab.models import build_model, save_checkpoint

    path = WORK / (f"{arch}-zero-bias.pt" if zero_bias else f"{arch}.pt")
    if not path.exists():
        torch.manual_seed(0)
        model = build_model(arch, **kwargs)
        if zero_bias:
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if name.endswith("bias"):
                        parameter.zero_()
        save_checkpoint(model, path, arch=arch, arch_kwargs=dict(kwargs))
    return path


# ------------------------------------------------------------------------------------------- measuring
def _tree_rss_kb(root: int) -> int:
    """Resident memory (kB) of ``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier += children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


@dataclass
class Measured:
    peak_process_mb: float
    peak_tree_mb: float
    seconds: float


def measure(command: list[str], log: Path) -> Measured:
    """Run ``command`` under /usr/bin/time -v, sampling the process tree's resident memory."""
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, _tree_rss_kb(process.pid))
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - started
    text = log.read_text()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({code}); see {log}:\n{text[-2000:]}")
    maximum = next(int(line.split(":")[1]) for line in text.splitlines() if "Maximum resident set size" in line)
    return Measured(maximum / 1024, peak / 1024, seconds)


IN_MEMORY = """
import sys, robustlab
from robustlab.data import from_arrays, open_dataset, read_batch
from robustlab.evaluation import evaluate
folder, model_path, eps, batch = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
stream = open_dataset(folder)
x, y = read_batch(stream, range(len(stream)))          # the whole split as float32, as before streaming
data = robustlab.ArrayDataset(x, y, "folder", stream.num_classes)
model = robustlab.load_model(model_path)
result = evaluate(model, data, robustlab.ThreatModel("linf", eps), "standard", batch_size=batch, progress=False)
print(result.robust_accuracy)
"""


def evaluate_command(folder: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [str(ROBUSTLAB), "evaluate", "--model", str(model), "--data", str(folder), "--out", str(out), "--quiet",
            "--no-resume", *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the runs
def run(
    sizes_32: list[int], sizes_224: list[int], workers: list[int], workers_224: list[int], in_memory: bool
) -> list[list[object]]:
    rows: list[list[object]] = []
    env_eps = f"{8 / 255:.6f}"
    small = model_file("smallcnn", zero_bias=True, in_channels=3, num_classes=CLASSES)
    for mode in [f"streamed, {w} workers" for w in workers] + (["in memory (before streaming)"] if in_memory else []):
        first: float | None = None
        for count in sizes_32:
            folder = image_folder(count, 32, ".png")
            out = WORK / "runs" / f"32-{count}-{mode.split(',')[0].replace(' ', '-')}"
            if mode.startswith("in memory"):
                command = [sys.executable, "-c", IN_MEMORY, str(folder), str(small), env_eps, str(BATCH_32)]
            else:
                count_workers = mode.split(", ")[1].split()[0]
                command = evaluate_command(folder, small, out, "--eps", env_eps, "--suite", "standard",
                                           "--workers", count_workers, "--batch-size", str(BATCH_32))  # fmt: skip
            out.mkdir(parents=True, exist_ok=True)
            measured = measure(command, out / "log.txt")
            first = first if first is not None else measured.peak_process_mb
            growth = f"{100 * (measured.peak_process_mb / first - 1):+.1f}%"
            rows.append(["3x32x32 PNG, SmallCNN, standard suite", f"{count:,}", mode,
                         f"{measured.peak_process_mb:.0f}", f"{measured.peak_tree_mb:.0f}", growth,
                         f"{measured.seconds:.0f}"])  # fmt: skip
            print(rows[-1], flush=True)
    resnet = model_file("resnet50-imagenet", num_classes=CLASSES)
    for w in workers_224 if sizes_224 else []:
        first = None
        for count in sizes_224:
            folder = image_folder(count, 224, ".jpg")
            out = WORK / "runs" / f"224-{count}-{w}"
            out.mkdir(parents=True, exist_ok=True)
            command = evaluate_command(folder, resnet, out, "--eps", env_eps, "--attacks", "fgsm", "--no-diagnostics",
                                       "--batch-size", "16", "--workers", str(w))  # fmt: skip
            measured = measure(command, out / "log.txt")
            first = first if first is not None else measured.peak_process_mb
            growth = f"{100 * (measured.peak_process_mb / first - 1):+.1f}%"
            rows.append(["3x224x224 JPEG, ResNet-50, FGSM only (cheap)", f"{count:,}", f"streamed, {w} workers",
                         f"{measured.peak_process_mb:.0f}", f"{measured.peak_tree_mb:.0f}", growth,
                         f"{measured.seconds:.0f}"])  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ten times fewer images (a smoke run, not documented)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (3x32x32 runs)")
    parser.add_argument(
        "--workers-224", type=int, nargs="+", default=[0], help="DataLoader workers of the (slow) 3x224x224 runs"
    )
    parser.add_argument("--no-in-memory", action="store_true", help="skip the in-memory contrast rows")
    parser.add_argument("--skip-224", action="store_true", help="skip the ImageNet-size runs")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    sizes_32 = [2_000 // scale, 20_000 // scale]
    sizes_224 = [] if args.skip_224 else [200 // scale, 2_000 // scale]
    WORK.mkdir(parents=True, exist_ok=True)
    rows = run(sizes_32, sizes_224, args.workers, args.workers_224, not args.no_in_memory)
    headers = ["data and work", "images", "how the data is read", "peak RSS, robustlab process (MB)",
               "peak RSS, process tree (MB)", "growth from the smaller set", "wall time (s)"]  # fmt: skip
    table = markdown_table(headers, rows)
    print(table)
    if args.quick:
        return 0
    body = (
        "`robustlab evaluate` on generated image folders (`python -m benchmarks.memory`). The process peak is "
        "`/usr/bin/time -v`'s maximum resident set size of the robustlab process; the tree peak sums the resident "
        "memory of robustlab and its DataLoader workers sampled every 0.1 s (forked workers share pages, so the sum "
        "overstates them). The 3x32x32 runs use the standard suite (eps 8/255) with a SmallCNN of random weights "
        "and every bias set to zero (with random biases it predicts one class everywhere and every stage attacks "
        "every image: 17 minutes for 2,000 images on one core; without them APGD-CE flips 99% of the predictions, "
        "so the later stages attack few), in batches of 32 so that every stage attacks whole batches on both folders "
        "(with 256, the later stages of the small run attacked one partial batch and their working memory counted "
        "as growth); the in-memory rows read the "
        "folder into an ArrayDataset first, as every command did before streaming. **The 3x224x224 runs do not "
        "use the standard suite**: on 2 CPU cores it would take days for 2,000 images with a ResNet-50, so they "
        "run `--attacks fgsm --no-diagnostics --batch-size 16` (random weights); the data-dependent memory is the "
        "same for any suite (per-example numbers, one batch of images at a time, adversarial examples written to "
        "OUT/adversarial.npy). Each run pinned to one core (`taskset`, one torch thread: OMP_NUM_THREADS=1)"
        " while other jobs used the other core; the times are wall times under that "
        "sharing.\n\n" + table
    )
    write_docs_section("memory", "Memory: evaluate on growing image folders (streamed data)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
