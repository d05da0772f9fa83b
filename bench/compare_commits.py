"""fxpsweep's ``x float32`` ratios at two commits, from ``bench/throughput.py`` run in turn for each model.

    python bench/compare_commits.py BEFORE [AFTER] [--models ...] [--rounds-seconds 10]

``BEFORE`` and ``AFTER`` are git revisions (``AFTER`` defaults to the working
tree as it is, uncommitted changes included). Each revision is checked out in a
temporary git worktree; for each model, ``throughput.py --models MODEL`` runs
once from the ``BEFORE`` tree and once from the ``AFTER`` tree, one right
after the other, with this interpreter (so the same libraries) and the tree's
own package first on the path. A ratio is images/s over float32 measured in the
same process, so it carries its own baseline; running the two commits back to
back per model keeps the machine's state as alike as it can be between them.
``after / before`` below 0.90 is a configuration more than 10 % slower.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (?P<model>[^|]+) \| fxpsweep (?P<config>[^|]+) \| [\d.]+ \| (?P<ratio>[\d.]+) \|")


def ratios(tree: Path, model: str, extra: list[str]) -> dict[str, float]:
    """``x float32`` of each fxpsweep configuration of ``model``, from ``throughput.py`` in ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "bench/throughput.py", "--models", model, *extra], cwd=tree, env=env,
                         check=True, capture_output=True, text=True).stdout
    found = {m["config"].strip(): float(m["ratio"]) for m in map(ROW.match, out.splitlines()) if m}
    if not found:
        raise SystemExit(f"no fxpsweep rows in throughput.py's output in {tree}:\n{out}")
    return found


def worktree(revision: str, parent: Path) -> Path:
    """A detached checkout of ``revision`` under ``parent``."""
    path = parent / revision.replace("/", "_")
    subprocess.run(["git", "worktree", "add", "--detach", str(path), revision], cwd=REPO, check=True, capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?", help="default: the working tree")
    parser.add_argument("--models", nargs="+", default=["alexnet", "resnet18", "mobilenet_v2", "resnet20_cifar10"])
    parser.add_argument("--rounds-seconds", default="10", help="throughput.py's --min-seconds")
    args = parser.parse_args()
    extra = ["--repeats", "3", "--min-seconds", args.rounds_seconds]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": worktree(args.before, Path(tmp))}
        trees["after"] = worktree(args.after, Path(tmp)) if args.after else REPO
        try:
            head = subprocess.run([sys.executable, "-c", "import torch; from fxpsweep.backends.kernel_choice import processor_name; "
                                   "print(processor_name(), torch.backends.cpu.get_cpu_capability(), torch.__version__)"],
                                  cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()
            print(f"# {head}; before {args.before}, after {args.after or 'the working tree'}; "
                  f"throughput.py {' '.join(extra)}, each model's two runs back to back\n")
            print("| model | configuration | before, x float32 | after, x float32 | after / before |")
            print("|---|---|---:|---:|---:|", flush=True)
            for model in args.models:
                before, after = ratios(trees["before"], model, extra), ratios(trees["after"], model, extra)
                for config in before:
                    print(f"| {model} | {config} | {before[config]:.2f} | {after[config]:.2f} | {after[config] / before[config]:.2f} |",
                          flush=True)
        finally:
            for name, path in trees.items():
                if path != REPO:
                    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)


if __name__ == "__main__":
    main()
