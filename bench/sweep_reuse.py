"""What sharing a sweep's work saves: a 4-width sweep in one process with one cache folder, against the
same 4 jobs each run alone with an empty cache folder.

    python bench/sweep_reuse.py [--model resnet20_cifar10] [--dataset cifar10_test2000] [--bits 4 6 8 16]

In the sweep, the first job gathers the calibration statistics, predicts with
the float network, times the kernels and fills the image cache; the later
jobs reuse them (``result.json`` says where each came from). Alone, every job
does all of it. The figures are the jobs' own ``seconds`` (process start-up
left out), all run here, one after the other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run.py {' '.join(args)} failed:\n{proc.stderr[-3000:]}")


def results(folder: Path) -> list[dict]:
    return sorted((json.loads(p.read_text()) for p in folder.rglob("result.json")), key=lambda r: r["param_bits"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20_cifar10")
    parser.add_argument("--dataset", default="cifar10_test2000")
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 6, 8, 16])
    args = parser.parse_args()
    common = [f"model={args.model}", f"dataset={args.dataset}", f"data_dir={REPO.parent / 'shared' / 'data'}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run(["-m", *common, "bits=" + ",".join(map(str, args.bits)), f"cache_dir={work / 'cache'}", f"hydra.sweep.dir={work / 'sweep'}"], work)
        for b in args.bits:
            run([*common, f"bits={b}", f"cache_dir={work / f'alone-cache-{b}'}", f"hydra.run.dir={work / f'alone-{b}'}"], work)
        swept = results(work / "sweep")
        alone = {b: results(work / f"alone-{b}")[0] for b in args.bits}
    print(f"# {args.model} on {args.dataset}, {swept[0]['n_eval']} evaluation images, bits {', '.join(map(str, args.bits))}\n")
    print("| bits | alone: s | in the sweep: s | calibration statistics | float predictions | kernel choices, image cache |")
    print("|---:|---:|---:|---|---|---|")
    for r in swept:
        b = r["param_bits"]
        shared = "computed" if r is swept[0] else "reused"
        print(f"| {b} | {alone[b]['seconds']:.1f} | {r['seconds']:.1f} | {r['calibration_stats']} | {r['float_predictions']} | {shared} |")
    total_alone = sum(r["seconds"] for r in alone.values())
    total_swept = sum(r["seconds"] for r in swept)
    print(f"| all | {total_alone:.1f} | {total_swept:.1f} | | | |")
    print(f"\nThe sweep's jobs took {total_swept:.1f} s against {total_alone:.1f} s alone ({total_swept / total_alone:.2f}x).")


if __name__ == "__main__":
    main()
