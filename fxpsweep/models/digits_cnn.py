"""The embedded default model: a small CNN trained by fxpsweep on scikit-learn's digits.

scikit-learn ships 1797 real 8x8 handwritten digits (pixel values 0..16), so
this model needs no download. Its trained weights ship inside the package
(``weights/digits_cnn-<recipe key>.pt``, beside a JSON file with the recipe,
the file's sha256 and where it was trained): training is deterministic on one
machine but not across processors (CPU kernels sum in different orders), and
shipping the weights makes the default network, and so the README's table,
the same everywhere. A recipe that differs from the shipped one is trained on
first use (fixed seed, one thread, a few seconds) and cached under
``cache_dir``. ``python -m fxpsweep.models.digits_cnn --ship`` retrains the
default recipe and rewrites the shipped files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fxpsweep.data.splits import digits_splits
from fxpsweep.core.errors import ConfigError
from fxpsweep.models import PretrainedModel
from fxpsweep.core.progress import progress
from fxpsweep.core.storage import atomic_torch_save, atomic_write_json, load_checkpoint

log = logging.getLogger(__name__)


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions with BatchNorm and ReLU, global average pooling, one linear layer.

    Input: ``(N, 1, 8, 8)`` pixel intensities in ``[0, 1]``. Output: 10 logits.
    """

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@dataclass(frozen=True)
class TrainingRecipe:
    """Everything that determines the trained weights (it keys the cache)."""

    width: int = 32
    epochs: int = 40
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    test_fraction: float = 0.3  # held out for evaluation, stratified
    split_seed: int = 0
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def train(recipe: TrainingRecipe) -> DigitsCNN:
    """Train a DigitsCNN on the training split of the digits, deterministically."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: identical floating-point sums on every run
    try:
        generator = torch.Generator().manual_seed(recipe.seed)
        torch.manual_seed(recipe.seed)
        train_set, _ = digits_splits(recipe.test_fraction, recipe.split_seed)
        x, y = train_set.tensors
        model = DigitsCNN(recipe.width)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * -(-len(x) // recipe.batch_size)
        )
        model.train()
        for _ in progress(range(recipe.epochs), desc="training digits_cnn", unit="epoch"):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), recipe.batch_size):
                idx = order[start : start + recipe.batch_size]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        return model.eval()
    finally:
        torch.set_num_threads(threads)


WEIGHTS_DIR = Path(__file__).parent / "weights"


def checkpoint_path(cache_dir: str | Path, recipe: TrainingRecipe) -> Path:
    """Where a recipe that is not shipped is cached once trained."""
    return Path(cache_dir).expanduser() / f"digits_cnn-{recipe.key()}.pt"


def shipped_weights(recipe: TrainingRecipe) -> Path | None:
    """The shipped weights file of ``recipe``, checked against its recorded sha256; None if none ships."""
    path = WEIGHTS_DIR / f"digits_cnn-{recipe.key()}.pt"
    record = path.with_suffix(".json")
    if not path.exists() or not record.exists():
        return None
    expected = json.loads(record.read_text())["sha256"]
    if file_sha256(path) != expected:
        raise ConfigError(
            f"{path} does not match the sha256 recorded in {record.name}: the package is damaged; "
            "reinstall fxpsweep, or run python -m fxpsweep.models.digits_cnn --ship to retrain it"
        )
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrained_digits_cnn(cache_dir: str | Path, recipe: TrainingRecipe | None = None) -> PretrainedModel:
    """The trained embedded model: the shipped weights, or (another recipe) from the cache or trained now."""
    recipe = recipe or TrainingRecipe()
    model = DigitsCNN(recipe.width)
    path = shipped_weights(recipe)
    if path is None:
        path = checkpoint_path(cache_dir, recipe)
        if not path.exists():
            log.info("training the digits model of a new recipe once; cached at %s", path)
            atomic_torch_save(train(recipe).state_dict(), path)
    model.load_state_dict(load_checkpoint(path))
    return PretrainedModel(model.eval(), meta={"checkpoint": str(path)})


def ship(recipe: TrainingRecipe) -> Path:
    """Train ``recipe`` and write it as the shipped weights, with its recipe, sha256 and provenance."""
    path = WEIGHTS_DIR / f"digits_cnn-{recipe.key()}.pt"
    atomic_torch_save(train(recipe).state_dict(), path)
    atomic_write_json(path.with_suffix(".json"), {
        "recipe": asdict(recipe),
        "sha256": file_sha256(path),
        "trained_with": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(),
        },
    })
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Train the embedded digits CNN of the default recipe.")
    parser.add_argument("--ship", action="store_true", help="rewrite the weights shipped in the package")
    parser.add_argument("--cache-dir", default="~/.cache/fxpsweep", help="where to cache them otherwise")
    args = parser.parse_args()
    recipe = TrainingRecipe()
    if args.ship:
        target = ship(recipe)
    else:
        target = checkpoint_path(args.cache_dir, recipe)
        atomic_torch_save(train(recipe).state_dict(), target)
    print(f"saved {target}")
