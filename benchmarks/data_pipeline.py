"""Data pipeline throughput: decoded, augmented images/s from JPEG, 16-bit PNG and DICOM files through
medtricks' train transforms and ``XrayDataset``, with 0 and 2 DataLoader workers, without and with
the decode cache, compared with the training step rate of the model they would feed.

Images: phantom chest radiographs (``synthesize_phantoms``, 12-bit DICOM, ``--source-size`` pixels,
1024 by default) written to a temporary folder, then the same pixels saved as 16-bit PNG and as
8-bit JPEG (quality 95), so the three formats hold the same picture. With ``MEDTRICKS_REAL_DATA``
set, the real Kermany JPEGs (224x224) and the four real DICOM radiographs are measured too (read in
place, never copied).

Modes, each one pass over all images as the training loop sees it (a new DataLoader iterator, worker
start-up included, ``persistent_workers=False`` as in ``medtricks run``), batch 32, shuffled:

- ``no_cache``: every image decoded, resized and augmented (median of ``--repeats`` passes);
- ``cache_fill``: the first pass with an empty MONAI decode cache (decodes and writes the cache);
- ``cache_warm``: later passes that read the decoded, resized arrays from the cache (median).

The files sit in the OS page cache in every mode (they were just written), so "no_cache" measures
decoding, not disk reads. The training rate is the medtricks engine's img/s on random tensors of
the same size (``--train-rate`` to give one instead); ``ratio_to_train`` = loader img/s / training
img/s, target >= 3 with the warm cache at 224. Both are measured alone: in a real run on a 2-core
machine, loader workers and the training step share the cores.

Run (from the repository root)::

    python -m benchmarks.data_pipeline            # full, a few minutes
    python -m benchmarks.data_pipeline --quick    # seconds, smoke test
    MEDTRICKS_REAL_DATA=../shared/data python -m benchmarks.data_pipeline
"""

from __future__ import annotations

import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `medtricks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import base_parser, format_table, machine_info, ratio, results_dir, summarize, write_results

NAME = "data_pipeline"
FORMATS = ("jpeg", "png16", "dicom")
MODES = ("no_cache", "cache_fill", "cache_warm")
TARGET_RATIO = 3.0  # loader >= 3x the training step rate, warm cache, 224 px


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> dict[str, list[Path]]:
    """``n`` phantom radiographs as 12-bit DICOM (``synthesize_phantoms``), and the same pixels as
    16-bit PNG and 8-bit JPEG (quality 95). Returns ``{format: [paths]}``."""
    import numpy as np
    from PIL import Image

    from medtricks.data import read_image, synthesize_phantoms

    csv_path = synthesize_phantoms(
        folder / "dicom", n=n, classes=("normal", "pneumonia"), size=size, fmt="dicom", seed=seed
    )
    with open(csv_path, newline="") as fh:
        dicoms = [folder / "dicom" / row["path"] for row in csv.DictReader(fh)]
    paths: dict[str, list[Path]] = {"jpeg": [], "png16": [], "dicom": dicoms}
    (folder / "png16").mkdir()
    (folder / "jpeg").mkdir()
    for index, dicom in enumerate(dicoms):
        image = read_image(dicom)  # float32 in [0, 1], windowed, MONOCHROME1 inverted
        png, jpeg = folder / "png16" / f"img_{index:05d}.png", folder / "jpeg" / f"img_{index:05d}.jpeg"
        Image.fromarray(np.round(image * 65535.0).astype(np.uint16)).save(png)
        Image.fromarray(np.round(image * 255.0).astype(np.uint8)).save(jpeg, quality=95)
        paths["png16"].append(png)
        paths["jpeg"].append(jpeg)
    return paths


def real_images(root: Path, n: int) -> dict[str, list[Path]]:
    """Up to ``n`` Kermany JPEGs (evenly spaced over the sorted list, so both classes appear) and the
    real DICOM files under ``root`` (the MEDTRICKS_REAL_DATA folder); missing parts are left out."""
    found: dict[str, list[Path]] = {}
    jpegs = sorted((root / "kermany224" / "train").glob("*/*.jpeg"))
    if jpegs:
        step = max(1, len(jpegs) // n)
        found["kermany_jpeg"] = jpegs[::step][:n]
    dicoms = sorted((root / "dicom").glob("*.dcm"))
    if dicoms:
        found["real_dicom"] = dicoms
    return found


def _dataset(paths: list[Path], transform, cache_dir: Optional[Path]):
    import pandas as pd

    from medtricks.data import XrayDataset

    manifest = pd.DataFrame({"path": [str(p) for p in paths], "target": [i % 2 for i in range(len(paths))]})
    return XrayDataset(manifest, transform, cache_dir=cache_dir)


def one_pass(dataset, *, workers: int, batch_size: int, seed: int = 0) -> float:
    """Images/s of one shuffled pass over ``dataset`` (DataLoader start-up included)."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
    started = time.perf_counter()
    count = sum(int(targets.shape[0]) for _images, targets in loader)
    elapsed = time.perf_counter() - started
    if count != len(dataset):
        raise RuntimeError(f"the loader yielded {count} images, expected {len(dataset)}")
    return count / elapsed


def measure_format(
    paths: list[Path], transform, *, workers: int, batch_size: int, repeats: int, scratch: Path
) -> dict[str, Any]:
    """The three modes for one list of files and one worker count; img/s summaries per mode."""
    batch_size = min(batch_size, len(paths))
    plain = _dataset(paths, transform, cache_dir=None)
    no_cache = summarize(one_pass(plain, workers=workers, batch_size=batch_size, seed=r) for r in range(repeats))
    cache_dir = Path(tempfile.mkdtemp(prefix="cache-", dir=scratch))  # empty: the first pass fills it
    cached = _dataset(paths, transform, cache_dir=cache_dir)
    fill = one_pass(cached, workers=workers, batch_size=batch_size)
    warm = summarize(one_pass(cached, workers=workers, batch_size=batch_size, seed=r + 1) for r in range(repeats))
    cache_mb = sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / 2**20
    return {
        "n_images": len(paths),
        "workers": workers,
        "img_per_s": {"no_cache": no_cache["median"], "cache_fill": fill, "cache_warm": warm["median"]},
        "runs": {"no_cache": no_cache, "cache_warm": warm},
        "cache_mb": cache_mb,
        "source_mb": sum(Path(p).stat().st_size for p in paths) / 2**20,
    }


def train_rate(model: str, image_size: int, batch_size: int, steps: int) -> float:
    """The medtricks engine's training img/s for ``model`` on 1-channel random tensors."""
    from benchmarks.train_throughput import Config, make_batches, measure

    cfg = Config(
        model=model, in_chans=1, batch_size=batch_size, image_size=image_size, warmup=1, steps=steps, progress=False
    )
    return measure("medtricks", cfg, make_batches(cfg))["img_per_s"]


def _parser():
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=128, help="images per format (default 128)")
    parser.add_argument("--source-size", type=int, default=1024, help="phantom side in pixels (default 1024)")
    parser.add_argument("--image-size", type=int, default=224, help="training crop (default 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers (default 0 2)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per mode (median; default 3)")
    parser.add_argument("--preset", default="cxr_light", help="augmentation preset (default cxr_light)")
    parser.add_argument("--model", default="resnet18", help="model whose training rate the loader must beat")
    parser.add_argument(
        "--train-rate", type=float, default=None, help="training img/s to compare with, instead of measuring it"
    )
    parser.add_argument("--train-steps", type=int, default=3, help="timed updates for the training rate")
    return parser


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.quick:
        args.n, args.source_size, args.image_size, args.batch_size = 8, 128, 64, 4
        args.repeats, args.train_steps = 1, 1
    import albumentations
    import monai
    import pydicom

    from medtricks.data import build_transforms

    machine = machine_info(
        albumentations=albumentations.__version__, monai=monai.__version__, pydicom=pydicom.__version__
    )
    print(f"data pipeline on {machine['cpu']} ({machine['logical_cpus']} CPUs), load {machine['loadavg_start']}")
    # Gray-ImageNet statistics; the values do not change the cost.
    transform = build_transforms(args.preset, args.image_size, mean=(0.449,), std=(0.226,), in_chans=1, train=True)

    if args.train_rate is not None:
        train_img_s, train_source = args.train_rate, "given (--train-rate)"
    else:
        print(f"measuring the training rate of {args.model} (1x{args.image_size}, batch {args.batch_size}) ...")
        train_img_s = train_rate(args.model, args.image_size, args.batch_size, args.train_steps)
        train_source = f"medtricks engine, {args.model} 1x{args.image_size}, batch {args.batch_size}, random tensors"

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medtricks-bench-data-") as tmp:
        scratch = Path(tmp)
        started = time.perf_counter()
        sets = make_images(scratch / "images", args.n, args.source_size)
        print(f"wrote {args.n} {args.source_size}px images per format in {time.perf_counter() - started:.0f} s")
        real_root = os.environ.get("MEDTRICKS_REAL_DATA")
        if real_root:
            sets.update(real_images(Path(real_root).expanduser(), args.n))
        for fmt, paths in sets.items():
            for workers in args.workers:
                entry = measure_format(
                    paths, transform, workers=workers, batch_size=args.batch_size, repeats=args.repeats, scratch=scratch
                )
                entry["format"] = fmt
                entry["source"] = (
                    "real"
                    if fmt in ("kermany_jpeg", "real_dicom")
                    else f"phantom {args.source_size}x{args.source_size}"
                )
                entry["ratio_to_train"] = {m: ratio(entry["img_per_s"][m], train_img_s) for m in MODES}
                entry["meets_target"] = (entry["ratio_to_train"]["cache_warm"] or 0.0) >= TARGET_RATIO
                results[f"{fmt}/workers{workers}"] = entry
                print(
                    f"  {fmt:12s} workers={workers}: "
                    + ", ".join(f"{m} {entry['img_per_s'][m]:,.1f}" for m in MODES)
                    + " img/s"
                )

    synthetic = [e for e in results.values() if e["format"] in FORMATS]
    payload = {
        "benchmark": NAME,
        "quick": bool(args.quick),
        "method": (
            "one shuffled DataLoader pass per measurement (new iterator, worker start-up included); "
            "no_cache and cache_warm: median of repeats; cache_fill: the first pass into an empty "
            "MONAI decode cache; files in the OS page cache; loader and training measured separately"
        ),
        "config": {
            "n": args.n,
            "source_size": args.source_size,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "repeats": args.repeats,
            "preset": args.preset,
            "in_chans": 1,
        },
        "train_img_per_s": train_img_s,
        "train_rate_source": train_source,
        "target": {"ratio_to_train_cache_warm": TARGET_RATIO},
        "target_met": bool(synthetic) and all(e["meets_target"] for e in synthetic),
        "machine": machine,
        "results": results,
    }
    rows = [
        {
            "format": e["format"],
            "workers": e["workers"],
            "n": e["n_images"],
            **{f"{m} img/s": e["img_per_s"][m] for m in MODES},
            "warm / train": e["ratio_to_train"]["cache_warm"],
            "cache MiB": e["cache_mb"],
            ">= 3x": e["meets_target"],
        }
        for e in results.values()
    ]
    print(f"training rate: {train_img_s:.2f} img/s ({train_source})")
    print(format_table(rows, list(rows[0])))
    path = write_results(payload, results_dir(args.out, args.quick), NAME)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
