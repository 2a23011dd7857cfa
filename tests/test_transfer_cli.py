"""``python -m mlip_core.transfer``: argument wiring, the last line's format, and one-line errors (exit 2).

Everything runs in a temporary workspace ($MLIP_WORKSPACE), in-process through ``main([...])``, on the small
``--quick`` worlds with towers at 32 px and a few steps, so that the whole file stays well under two minutes on
two cores."""

from __future__ import annotations

import re
import runpy
import sys
from dataclasses import asdict

import pytest
from mlip_core.data.fixture_trees import make_chexpert_tree, make_covidx_tree

from mlip_core.checkpoint import write_image_tower_export
from mlip_core.config import ImageTowerConfig
from mlip_core.paths import WORKSPACE_ENV
import mlip_core.transfer.__main__ as cli
from mlip_core.transfer import Encoder, build_tower
from mlip_core.transfer.__main__ import main

LAST = re.compile(r"^task=(\w+) fraction=([0-9.e-]+) metric=(\S+) value=(\d\.\d{4})$")
SMALL = ["--image-size", "32"]  # towers at 32 px: a quarter of the compute of the default 64


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """One temporary workspace for the module (the quick worlds are rendered once, then reused)."""
    root = tmp_path_factory.mktemp("workspace")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(WORKSPACE_ENV, str(root))
        # 120 images instead of 300: the smallest CheXpert world whose test split holds 10 positives of each
        # finding (the CLI's own --quick size is timed in the README, not here).
        mp.setattr(cli, "QUICK_IMAGES", 120)
        yield root


def _run(capsys, *args: str) -> tuple[int, list[str], list[str]]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err.strip().splitlines()


def _last(lines: list[str]) -> tuple[str, float, str, float]:
    m = LAST.match(lines[-1])
    assert m, f"last line not in the contract's format: {lines[-1]!r}"
    return m.group(1), float(m.group(2)), m.group(3), float(m.group(4))


def _one_error(rc: int, err: list[str], *words: str) -> None:
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    for w in words:
        assert w in err[0], (w, err[0])


# ------------------------------------------------------------------------------------------------- runs
def test_linear_quick_prints_the_contract_line(ws, capsys):
    rc, lines, err = _run(capsys, "--task", "linear", "--encoder", "random", "--data", "offline", "--quick", *SMALL)
    assert rc == 0, err
    task, fraction, metric, value = _last(lines)
    assert (task, fraction, metric) == ("linear", 0.1, "macro_AUROC")
    assert 0.0 <= value <= 1.0
    assert any(line.split()[:1] == ["Cardiomegaly"] for line in lines)  # the per-label table
    assert (ws / "transfer_worlds" / "chexpert_quick").is_dir()
    assert "(120 images, 64 px" in "\n".join(lines)
    assert not (ws / "transfer_worlds" / "chexpert").exists()  # the quick world never touches the normal one


def test_segment_quick_runs(ws, capsys):
    rc, out, err = _run(capsys, "--task", "segment", "--encoder", "random", "--data", "offline", "--quick",
                        "--steps", "3", *SMALL)
    assert rc == 0, err
    task, fraction, metric, value = _last(out)
    assert (task, fraction, metric) == ("segment", 0.1, "dice") and 0.0 <= value <= 1.0


def test_detect_quick_runs(ws, capsys):
    rc, out, err = _run(capsys, "--task", "detect", "--encoder", "random", "--data", "offline", "--quick",
                        "--steps", "2", "--fraction", "0.05", *SMALL)
    assert rc == 0, err
    task, fraction, metric, value = _last(out)
    assert (task, fraction, metric) == ("detect", 0.05, "mAP@0.4:0.75") and 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def chexpert_tree(tmp_path_factory):
    """A CheXpert-v1.0-small tree: 8 training and 3 test patients, both classes of every label in valid.csv."""
    parent = tmp_path_factory.mktemp("chexpert")
    make_chexpert_tree(parent)
    return parent


def test_linear_on_a_real_chexpert_layout(ws, chexpert_tree, capsys):
    rc, out, err = _run(capsys, "--task", "linear", "--encoder", "random", "--data", str(chexpert_tree),
                        "--fraction", "1", *SMALL)
    assert rc == 0, err
    task, fraction, metric, value = _last(out)
    assert (task, fraction, metric) == ("linear", 1.0, "macro_AUROC") and 0.0 <= value <= 1.0


def test_an_export_folder_is_an_encoder_and_gives_its_towers_features(ws, chexpert_tree, tmp_path, capsys):
    # The random tower's own weights, exported: the same features, so the same probe and the same value.
    enc = Encoder("random", "tower", 32, tower={"name": "tf_efficientnet_lite0", "pretrained": ""})
    cfg = ImageTowerConfig(name="tf_efficientnet_lite0", pretrained="", image_size=32)
    write_image_tower_export(build_tower(enc).state_dict(), {"model": {"image": asdict(cfg)}}, step=0,
                             out=tmp_path / "export")
    runs = {}
    for encoder, extra in ((str(tmp_path / "export"), []), (str(tmp_path / "export" / "image_tower.pt"), []),
                           ("random", SMALL)):
        rc, out, err = _run(capsys, "--task", "linear", "--encoder", encoder, "--data", str(chexpert_tree),
                            "--fraction", "1", *extra)
        assert rc == 0, err
        runs[encoder] = out
    assert any("at 32 px" in line for line in runs[str(tmp_path / "export")])  # the export's image size
    assert len({_last(out) for out in runs.values()}) == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A pretraining run folder as the trainer leaves one (config.yaml, a step checkpoint, export/): ConVIRT's
    config with a random ResNet-18 at 32 px and the tiny random BERT (as tests/test_zeroshot.py builds it)."""
    import torch

    from mlip_core.checkpoint import model_checkpoint_state, save_step_checkpoint
    from mlip_core.config import config_to_dict, pretrain_config, save_config
    from mlip_core.model.mlip import MLIP

    cfg = pretrain_config("convirt", image_tower="resnet18", image_pretrained="", image_size=32, text_tower="tiny",
                          max_length=16, seed=3)
    cfg.model.text.pretrained = False
    torch.manual_seed(0)
    model = MLIP(cfg).eval()
    state, omitted = model_checkpoint_state(model)
    run = tmp_path_factory.mktemp("runs") / "convirt_tiny"
    save_config(cfg, run / "config.yaml")
    save_step_checkpoint({"step": 1, "epoch": 0, "batch_in_epoch": 1, "model": state, "omitted": omitted,
                          "optimizer": {}, "rng": {}, "config": config_to_dict(cfg)}, run / "checkpoints", 1)
    write_image_tower_export(model.image_tower.state_dict(), config_to_dict(cfg), 1, run / "export")
    return run


def test_a_run_folder_serves_zeroshot_and_the_probe(ws, tiny_run, chexpert_tree, capsys):
    rc, out, err = _run(capsys, "--task", "zeroshot", "--encoder", str(tiny_run), "--data", str(chexpert_tree),
                        "--fraction", "0.5")  # ignored: zero-shot uses no labels
    assert rc == 0, err
    task, fraction, metric, value = _last(out)
    assert (task, fraction, metric) == ("zeroshot", 0.0, "macro_AUROC") and 0.0 <= value <= 1.0
    rc, out, err = _run(capsys, "--task", "linear", "--encoder", str(tiny_run), "--data", str(chexpert_tree),
                        "--fraction", "1")
    assert rc == 0, err
    assert any("resnet18 at 32 px" in line for line in out) and _last(out)[0] == "linear"


def test_finetune_and_a_multiclass_dataset(ws, chexpert_tree, tmp_path, capsys):
    rc, out, err = _run(capsys, "--task", "finetune", "--encoder", "random", "--data", str(chexpert_tree),
                        "--fraction", "1", "--steps", "1", "--arch", "resnet18", *SMALL)  # ResNet: faster cold start
    assert rc == 0, err
    assert any("resnet18 at 32 px" in line for line in out)
    assert _last(out)[:3] == ("finetune", 1.0, "macro_AUROC")
    make_covidx_tree(tmp_path)  # normal / pneumonia / COVID-19: the headline is accuracy
    rc, out, err = _run(capsys, "--task", "linear", "--dataset", "covidx", "--encoder", "random", "--data",
                        str(tmp_path), "--fraction", "1", *SMALL)
    assert rc == 0, err
    task, fraction, metric, value = _last(out)
    assert (task, metric) == ("linear", "accuracy") and 0.0 <= value <= 1.0


# ----------------------------------------------------------------------------------------------- errors
def test_zeroshot_needs_a_run_folder(ws, tmp_path, capsys):
    (tmp_path / "image_tower.pt").write_bytes(b"")
    (tmp_path / "image_tower.json").write_text("{}")
    for encoder in (str(tmp_path), "random"):
        rc, _, err = _run(capsys, "--task", "zeroshot", "--encoder", encoder, "--data", "offline")
        _one_error(rc, err, "run folder", "text tower", "--encoder RUN_DIR")


def test_a_folder_that_is_not_the_layout_is_one_clear_error(ws, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _run(capsys, "--task", "linear", "--encoder", "random", "--data", str(empty), *SMALL)
    _one_error(rc, err, "valid.csv", "train.csv", "--data offline")
    make_chexpert_tree(tmp_path / "chexpert")
    rc, _, err = _run(capsys, "--task", "segment", "--encoder", "random", "--data", str(tmp_path / "chexpert"), *SMALL)
    _one_error(rc, err, "train-rle.csv", "dicom-images-train")
    assert not (tmp_path / "chexpert" / "mlip-transfer-manifest.json").exists()  # a real folder is only read
    rc, _, err = _run(capsys, "--task", "detect", "--encoder", "random", "--data", str(tmp_path / "nowhere"), *SMALL)
    _one_error(rc, err, "no such folder")


@pytest.mark.parametrize("args, words", [
    (["--task", "linear", "--encoder", "/no/such/run"], ["no such file or folder", "random"]),
    (["--task", "linear", "--encoder", "random", "--fraction", "0"], ["outside (0, 1]"]),
    (["--task", "linear", "--encoder", "random", "--fraction", "1.5"], ["outside (0, 1]"]),
    (["--task", "segment", "--encoder", "random", "--dataset", "chexpert"], ["--dataset siim"]),
    (["--task", "linear", "--encoder", "imagenet", "--arch", "convnext_atto"], ["tf_efficientnet_lite0"]),
    (["--task", "linear", "--encoder", "random", "--arch", "no_such_net"], ["no_such_net", "--arch"]),
])
def test_bad_arguments_are_one_line_and_exit_2(ws, capsys, args, words):
    rc, _, err = _run(capsys, *args, "--data", "offline")
    _one_error(rc, err, *words)
    assert not (ws / "transfer_worlds" / "chexpert").exists()  # refused before any world is written


def test_a_run_folder_without_an_export_is_refused(ws, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("name: x\n")
    rc, _, err = _run(capsys, "--task", "linear", "--encoder", str(tmp_path), "--data", "offline")
    _one_error(rc, err, "export/image_tower.pt")


def test_unknown_task_exits_non_zero(ws):
    with pytest.raises(SystemExit) as exc:
        main(["--task", "classify", "--encoder", "random", "--data", "offline"])
    assert exc.value.code != 0


def test_module_entry_point_exits_2_with_one_error_line(ws, capsys, monkeypatch):
    # ``python -m mlip_core.transfer`` runs __main__.py as the script __main__; so does run_path, in-process (no
    # second interpreter to import torch into). An exception would escape here instead of SystemExit(2).
    monkeypatch.setattr(sys, "argv", ["mlip_core.transfer", "--task", "zeroshot", "--encoder", "random", "--data",
                                      "offline"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(cli.__file__, run_name="__main__")
    out, err = capsys.readouterr()
    _one_error(exc.value.code, err.strip().splitlines(), "--task zeroshot")
    assert out == ""
