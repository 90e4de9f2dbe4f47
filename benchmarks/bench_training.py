"""Training throughput benchmark (CPU), ratios measured against baselines in the same run.

Run: ``.venv/bin/python benchmarks/bench_training.py`` (options: ``--help``).

1. Training ms per image of ``training.fit.train_epoch`` over ``CachedImageDataset`` +
   DataLoader vs a minimal hand-written PyTorch loop (index the cached tensor, forward,
   backward, AdamW) on the same images, model, loss and optimizer; also the real CV step
   (the ``training.recipe.Recipe`` defaults: one-cycle schedule stepped per batch, EMA update,
   random resized crop). Target: minimal / CV step >= 0.9. Rounds alternate the loops and the
   median is reported (the machine is shared).
4. Wall time of one epoch of the CV recipe at 224 px over every shared 256 px image
   (``training.fit.fit``, the one fit loop, with one epoch; skipped with ``--quick``).
2. Loader-only images/s (the DataLoader without a model, with and without augmentation) vs the
   training step's images/s: the loader must not be the bottleneck.
3. Parsing and indexing the full 112,120-row ``Data_Entry_2017.csv`` (read, multilabel filter,
   5 patient-wise folds as ``triage train --cv 5`` draws them): time and peak Python memory
   (tracemalloc).

Needs the real data in ../shared/data/cxr14 (or ``--data``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from ratios import print_ratio

ROOT = Path(__file__).resolve().parents[1]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cxr14")
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=96, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 64 images")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds = min(args.images, 64), min(args.rounds, 2)
    return args


def main() -> None:
    args = _parse()
    import torch

    from training.cv import patient_folds
    from training.data import (
        Augment,
        CachedImageDataset,
        attach_images,
        index_images,
        load_tensors,
        read_labels,
        select_task,
    )
    from training.fit import loss_function, train_epoch
    from triage_core.models import create_model, default_spec

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, arch {args.arch}, "
        f"{args.image_size} px, {args.images} images, batch {args.batch_size}"
    )

    # 3. label file parse/index (first: before the large tensors exist)
    full = args.data / "Data_Entry_2017.csv"

    def parse() -> tuple[list[Any], Any]:
        records = read_labels(full)
        return records, patient_folds(select_task(records, "multilabel"), 5, seed=0)

    start = time.perf_counter()
    records, fold = parse()
    parse_s = time.perf_counter() - start
    tracemalloc.start()  # a second pass: tracing slows allocation-heavy code several-fold
    parse()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    start = time.perf_counter()
    index = index_images(args.data / "256")
    index_s = time.perf_counter() - start

    # data for 1 and 2
    small = read_labels(args.data / "labels.csv")
    kept, paths = attach_images(small, index)
    task = select_task(kept, "multilabel").subset(range(args.images))
    spec = default_spec(args.arch).replace(input_size=args.image_size)
    images = load_tensors(paths[: args.images], spec)
    targets = task.targets

    def setup() -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = create_model(args.arch, 3)
        criterion = loss_function("multilabel", targets, 3)
        return model, criterion, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def ours(augment: bool) -> Callable[[], float]:
        model, criterion, optimizer = setup()
        dataset = CachedImageDataset(images, targets, spec, Augment() if augment else None)
        loader: Any = torch.utils.data.DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )

        def epoch() -> float:
            start = time.perf_counter()
            _, seen = train_epoch(model, loader, criterion, optimizer, task="multilabel")
            return seen / (time.perf_counter() - start)

        return epoch

    def cv_step() -> Callable[[], float]:
        from timm.utils import ModelEmaV3

        from training.recipe import Recipe

        model, criterion, optimizer = setup()
        recipe = Recipe(batch_size=args.batch_size)
        dataset = CachedImageDataset(images, targets, spec, recipe.augment())
        loader: Any = torch.utils.data.DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=1e-4, total_steps=10_000, pct_start=0.3
        )
        ema = ModelEmaV3(model, decay=recipe.ema, use_warmup=True)

        def epoch() -> float:
            start = time.perf_counter()
            _, seen = train_epoch(
                model,
                loader,
                criterion,
                optimizer,
                task="multilabel",
                step_scheduler=schedule,
                ema=ema,
            )
            return seen / (time.perf_counter() - start)

        return epoch

    def minimal() -> Callable[[], float]:
        model, criterion, optimizer = setup()
        y_all = torch.as_tensor(targets)

        def epoch() -> float:
            model.train()
            start = time.perf_counter()
            order = torch.randperm(len(images))
            seen = 0
            for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                idx = order[i : i + args.batch_size]
                x, y = images[idx].float(), y_all[idx]
                loss = criterion(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += len(idx)
            return seen / (time.perf_counter() - start)

        return epoch

    runners: dict[str, Callable[[], float]] = {
        "minimal loop": minimal(),
        "train_epoch (no augmentation)": ours(False),
        "train_epoch (augmentation)": ours(True),
        "CV step": cv_step(),
    }
    for run in runners.values():
        run()  # warm-up epoch (allocator, oneDNN kernels)
    results: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            results[name].append(run())
    med = {name: statistics.median(v) for name, v in results.items()}

    def loader_rate(augment: bool) -> float:
        dataset = CachedImageDataset(images, targets, spec, Augment() if augment else None)
        loader: Any = torch.utils.data.DataLoader(
            dataset,  # type: ignore[arg-type]
            batch_size=args.batch_size,
            shuffle=True,
        )
        rates = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            seen = sum(len(x) for x, _ in loader)
            rates.append(seen / (time.perf_counter() - start))
        return statistics.median(rates)

    load_plain, load_aug = loader_rate(False), loader_rate(True)

    epoch_wall = "skipped (--quick)"
    if not args.quick:
        from training.fit import fit
        from training.recipe import Recipe

        recipe = Recipe(epochs=1, batch_size=args.batch_size)
        full_spec = recipe.spec()
        all_images = load_tensors(paths, full_spec)
        all_targets = select_task(kept, "multilabel").multi_hot()
        start = time.perf_counter()
        fit(recipe, all_images, all_targets, full_spec)
        epoch_wall = f"{time.perf_counter() - start:.1f} ({len(paths)} images)"

    def ms(name: str) -> str:
        return f"{1000.0 / med[name]:.1f}"

    rows: list[tuple[str, Any]] = [
        ("training ms/image, minimal hand-written loop (baseline)", ms("minimal loop")),
        ("training ms/image, train_epoch, no augmentation", ms("train_epoch (no augmentation)")),
        ("training ms/image, CV step (one-cycle + EMA + crop)", ms("CV step")),
        (
            "ratio minimal / CV step (speed relative to the baseline)  [target >= 0.9]",
            f"{med['CV step'] / med['minimal loop']:.3f}",
        ),
        ("wall time of one 224 px CV-recipe epoch over the shared set, s", epoch_wall),
        ("training images/s, minimal hand-written loop (baseline)", f"{med['minimal loop']:.1f}"),
        (
            "training images/s, train_epoch, no augmentation",
            f"{med['train_epoch (no augmentation)']:.1f}",
        ),
        (
            "training images/s, train_epoch, augmentation",
            f"{med['train_epoch (augmentation)']:.1f}",
        ),
        (
            "ratio train_epoch (no aug) / minimal  [target >= 0.95]",
            f"{med['train_epoch (no augmentation)'] / med['minimal loop']:.3f}",
        ),
        (
            "ratio train_epoch (aug) / minimal",
            f"{med['train_epoch (augmentation)'] / med['minimal loop']:.3f}",
        ),
        ("loader-only images/s, no augmentation", f"{load_plain:.0f}"),
        ("loader-only images/s, augmentation", f"{load_aug:.0f}"),
        (
            "ratio loader (aug) / training step (aug)  [must be >> 1]",
            f"{load_aug / med['train_epoch (augmentation)']:.1f}",
        ),
        (f"parse + multilabel filter + 5 folds of {len(records):,} rows, s", f"{parse_s:.2f}"),
        ("  peak Python memory, MB (tracemalloc, separate pass)", f"{peak / 2**20:.1f}"),
        (
            "  patients, images per fold",
            f"{len({r.patient_id for r in records}):,}, {np.bincount(fold).tolist()}",
        ),
        (f"index {len(index)} image files, s", f"{index_s:.3f}"),
        ("cached tensors, MB (float16)", f"{images.numel() * 2 / 2**20:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    print("per-round images/s:", {k: [round(x, 1) for x in v] for k, v in results.items()})
    print_ratio(
        "training CV step / minimal hand-written loop, images/s",
        med["CV step"],
        med["minimal loop"],
        target=0.9,
    )
    print_ratio(
        "training train_epoch (no augmentation) / minimal loop, images/s",
        med["train_epoch (no augmentation)"],
        med["minimal loop"],
        target=0.95,
    )
    print_ratio(
        "training loader (augmentation) / training step (augmentation), images/s",
        load_aug,
        med["train_epoch (augmentation)"],
        target=2.0,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
