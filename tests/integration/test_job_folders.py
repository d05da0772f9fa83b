"""Job folder names that work for any override: flat, at most 255 bytes, unique; reruns still compare configs."""

from __future__ import annotations

import json
import shlex

from conftest import REPO

from fxpsweep.sweep.jobdir import folder_name


def test_safe_override_strings_are_the_folder_name() -> None:
    assert folder_name("bits=8,model=resnet50") == "bits=8,model=resnet50"
    assert folder_name("calibration.granularity=tensor,eval_limit=1000") == "calibration.granularity=tensor,eval_limit=1000"


def test_paths_spaces_and_long_lists_get_flat_unique_names() -> None:
    path = folder_name("bits=8,dataset.root=/a/b/c")
    assert "/" not in path and path.startswith("bits=8,dataset.root=_a_b_c-h")
    assert path != folder_name("bits=8,dataset.root=_a_b_c")  # replaced characters never merge two jobs
    spaced = folder_name("dataset.root=/data/my images/val")
    assert " " not in spaced and "/" not in spaced
    long_a = ",".join(f"calibration.option_{i}=value_{i}" for i in range(12)) + ",seed=1"
    long_b = long_a[:-1] + "2"
    assert len(long_a.encode()) > 255
    assert len(folder_name(long_a).encode()) <= 255 and folder_name(long_a) != folder_name(long_b)


def listed_folders(stdout: str) -> list[str]:
    """The job folders a dry run lists (the path in parentheses at the end of each line)."""
    return [line.rsplit("(", 1)[1].rstrip(")") for line in stdout.splitlines() if line.split()[:1] == ["new"]]


def test_path_and_spaced_values_give_flat_folders_with_the_full_value_on_record(run_app, tmp_path) -> None:
    proc = run_app("-m", "model=resnet18", "dataset=imagenet", "dataset.root=/a/b/c,/d e/f", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode != 0  # neither folder exists: both jobs fail, on record
    errors = sorted(tmp_path.glob("*/error.json"))
    assert len(errors) == 2 and all(p.parent.parent == tmp_path for p in errors)
    roots = sorted(json.loads(p.read_text())["config"]["dataset"]["root"] for p in errors)
    assert roots == ["/a/b/c", "/d e/f"]


def test_an_override_list_longer_than_255_bytes_gets_a_short_folder(run_app, tmp_path) -> None:
    deep = tmp_path / ("cache-" + "x" * 120) / ("y" * 120)
    args = ("-m", "bits=4,6", f"cache_dir={deep}", "report_images=0", f"hydra.sweep.dir={tmp_path}")
    listing = run_app(*args, "dry_run=true")
    assert listing.returncode == 0, listing.stderr
    folders = listed_folders(listing.stdout)
    assert len(folders) == 2 and len(set(folders)) == 2
    assert all(len(f.rsplit("/", 1)[1].encode()) <= 255 for f in folders)
    proc = run_app("bits=4", f"cache_dir={deep}", "report_images=0", f"hydra.sweep.dir={tmp_path}", "-m")
    assert proc.returncode == 0, proc.stderr
    again = run_app("bits=4", f"cache_dir={deep}", "report_images=0", f"hydra.sweep.dir={tmp_path}", "-m")
    assert "already done, skipped" in again.stdout + again.stderr  # the full config still decides


def test_the_readme_imagenet_example_gives_flat_folders(run_app, tmp_path) -> None:
    readme = (REPO / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("python run.py -m") and "dataset.root=DIR" in l)
    args = shlex.split(line.replace("DIR", "/data/imagenet/val"))[3:]  # after "python run.py -m"
    listing = run_app("-m", *args, "dry_run=true", f"hydra.sweep.dir={tmp_path}")
    assert listing.returncode == 0, listing.stderr
    folders = listed_folders(listing.stdout)
    assert len(folders) == 8
    assert all(f.rsplit("/", 1)[0] == str(tmp_path) and "dataset.root=_data_imagenet_val" in f for f in folders)
