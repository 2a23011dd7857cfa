"""Zero-shot classification: knowledge-graph prompts, prompt ensembling, the pos/neg softmax by hand, planted
embeddings that must score AUROC 1, and the whole evaluation on a tiny saved run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mlip_core.data.fixture_trees import make_covidx_tree
from mlip_core.data.downstream import CHEXPERT_5
from mlip_core.data.skips import SkipReport
from mlip_core.knowledge.graph import KnowledgeGraph
from mlip_core.transfer.classify import ClassificationTask, auroc_per_label
from mlip_core.transfer.finetune import covidx_task
from mlip_core.transfer.zeroshot import (ensemble_embedding, finding_terms, pos_neg_probability, prompt_embeddings,
                                         zeroshot_eval, zeroshot_multiclass, zeroshot_prompts, zeroshot_scores)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def graph() -> KnowledgeGraph:
    return KnowledgeGraph.load_default()


# ---------------------------------------------------------------------------------------------
# Prompts


def test_every_chexpert5_finding_has_its_name_and_a_negated_name(graph):
    prompts = zeroshot_prompts(graph, CHEXPERT_5)
    assert list(prompts) == CHEXPERT_5
    for label, p in prompts.items():
        name = graph.entity(p["entity"]).name.lower()
        assert p["entity"] is not None and graph.entity(p["entity"]).chexpert == label
        assert name in p["positive"] and f"no {name}" in p["negative"] and f"no evidence of {name}" in p["negative"]
        assert not any(t.startswith("no ") for t in p["positive"])
        assert all(n.startswith("no ") for n in p["negative"])
    assert "effusion" in prompts["Pleural Effusion"]["positive"]  # synonyms come along
    assert "pulmonary edema" in prompts["Edema"]["positive"]


def test_terms_drop_plurals_and_adjectives_and_attributes_follow_the_graph(graph):
    _, terms = finding_terms(graph, "Atelectasis")
    assert terms[0] == "atelectasis" and "atelectases" not in terms and "atelectatic" not in terms
    p = zeroshot_prompts(graph, ["Pleural Effusion", "Cardiomegaly"], attributes=True, modifiers=("small",))
    eff, heart = p["Pleural Effusion"]["positive"], p["Cardiomegaly"]["positive"]
    assert {"left pleural effusion", "right pleural effusion", "small left pleural effusion"} <= set(eff)
    assert not any(t.startswith(("left", "right")) for t in heart)  # the heart is not a paired organ
    assert "small cardiomegaly" in heart
    assert "no left pleural effusion" not in p["Pleural Effusion"]["negative"]
    unknown = zeroshot_prompts(graph, ["Pleural Other"])["Pleural Other"]
    assert unknown["entity"] is None and unknown["positive"] == ["pleural other"]


# ---------------------------------------------------------------------------------------------
# Ensembling and scores on hand-made embeddings


def test_prompt_ensemble_is_the_renormalised_mean_of_normalised_embeddings():
    emb = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(ensemble_embedding(emb), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert not torch.allclose(ensemble_embedding(emb), F.normalize(emb.mean(0), dim=0))  # not the raw mean


def test_pos_neg_softmax_by_hand():
    img = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0)
    pos, neg = torch.tensor([[0.6, 0.8]]), torch.tensor([[0.0, 5.0]])  # cosines 0.6 and 0.0
    p = pos_neg_probability(img, pos, neg, temperature=0.5)
    assert p.shape == (1, 1)
    assert p.item() == pytest.approx(math.exp(0.6 / 0.5) / (math.exp(0.6 / 0.5) + math.exp(0.0)))


class _Planted(nn.Module):
    """A stand-in for a run's model: ``encode_text`` looks prompts up in a table, ``encode_image`` returns the
    embedding whose row index the image's first pixel holds."""

    def __init__(self, texts: dict[str, torch.Tensor], images: torch.Tensor, tau: float = 0.1) -> None:
        super().__init__()
        self.config = SimpleNamespace(model=SimpleNamespace(text=SimpleNamespace(max_length=8)))
        self.texts = list(texts)
        self.register_buffer("text_emb", torch.stack([texts[t] for t in self.texts]))
        self.register_buffer("image_emb", images)
        self.unused = nn.Parameter(torch.zeros(1))
        self.tau = tau

    def encode_text(self, ids, mask):
        return F.normalize(self.text_emb[ids[:, 0]], dim=-1)

    def encode_image(self, x):
        return F.normalize(self.image_emb[x[:, 0, 0, 0].round().long()], dim=-1)

    def temperature(self):
        return torch.tensor(self.tau)


class _Tok:
    def __init__(self, texts):
        self.index = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts, **kwargs):
        ids = torch.tensor([[self.index[t]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _index_images(n: int) -> torch.Tensor:
    x = torch.zeros(n, 1, 4, 4)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return x


def test_images_embedded_at_their_prompts_score_auroc_1_and_the_ensemble_is_used():
    rng = torch.Generator().manual_seed(0)
    prompts = {"A": {"positive": ["a", "big a"], "negative": ["no a", "no evidence of a"]},
               "B": {"positive": ["b"], "negative": ["no b"]}}
    # A's prompts live in dimensions 0-3, B's in 4-7.
    texts = {}
    for name, dims in (("A", slice(0, 4)), ("B", slice(4, 8))):
        for t in prompts[name]["positive"] + prompts[name]["negative"]:
            v = torch.zeros(8)
            v[dims] = torch.randn(4, generator=rng)
            texts[t] = v
    model = _Planted(texts, torch.zeros(1, 8))
    tok = _Tok(model.texts)
    pos, neg = prompt_embeddings(model, tok, prompts)
    by_hand = F.normalize(F.normalize(texts["a"], dim=0) + F.normalize(texts["big a"], dim=0), dim=0)
    assert torch.allclose(pos[0], by_hand, atol=1e-6)
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0], [0, 1]], dtype=float)
    emb = torch.stack([torch.cat([(pos[0] if ya else neg[0])[:4], (pos[1] if yb else neg[1])[4:]]) for ya, yb in y])
    model.image_emb = emb
    scores = zeroshot_scores(model, tok, _index_images(len(y)), prompts)
    assert scores.shape == (6, 2) and ((scores > 0) & (scores < 1)).all()
    aurocs, skipped = auroc_per_label(y, scores, ["A", "B"])
    assert aurocs == {"A": 1.0, "B": 1.0} and not skipped
    cos = zeroshot_scores(model, tok, _index_images(len(y)), prompts, mode="positive")
    assert np.allclose(cos[0, 0], 1 / math.sqrt(2), atol=1e-6)  # the image is half A's positive ensemble
    assert auroc_per_label(y, cos, ["A", "B"])[0] == {"A": 1.0, "B": 1.0}


def test_multiclass_zero_shot_picks_the_class_whose_prompts_the_image_matches():
    texts = {t: F.one_hot(torch.tensor(i), 3).float() for i, t in enumerate(["clear lungs", "pneumonia", "covid"])}
    model = _Planted(texts, torch.eye(3)[[2, 0, 1, 2]])
    probs = zeroshot_multiclass(model, _Tok(model.texts), _index_images(4),
                                {"normal": ["clear lungs"], "pneumonia": ["pneumonia"], "COVID-19": ["covid"]})
    assert list(probs.argmax(1)) == [2, 0, 1, 2] and np.allclose(probs.sum(1), 1.0)
    e = math.exp(1 / 0.1)
    assert probs[0, 2] == pytest.approx(e / (e + 2))


# ---------------------------------------------------------------------------------------------
# A tiny saved run, evaluated end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A ConVIRT-config run (ResNet-18 at 32 px, the tiny random BERT) saved as the trainer saves one."""
    from mlip_core.checkpoint import model_checkpoint_state, save_step_checkpoint
    from mlip_core.config import config_to_dict, pretrain_config, save_config
    from mlip_core.model.mlip import MLIP

    cfg = pretrain_config("convirt", image_tower="resnet18", image_pretrained="", image_size=32, text_tower="tiny",
                          max_length=16, seed=3)
    cfg.model.text.pretrained = False
    torch.manual_seed(0)
    model = MLIP(cfg).eval()
    state, omitted = model_checkpoint_state(model)
    run = tmp_path_factory.mktemp("zeroshot") / "run"
    save_config(cfg, run / "config.yaml")
    save_step_checkpoint({"step": 1, "epoch": 0, "batch_in_epoch": 1, "model": state, "omitted": omitted,
                          "optimizer": {}, "rng": {}, "config": config_to_dict(cfg)}, run / "checkpoints", 1)
    return run


def toy_task(tmp_path) -> ClassificationTask:
    """Eight random 40 px images, six in the test split; Cardiomegaly has no test positive."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(p)
        rows.append({"image_path": str(p), "group": f"p{i}", "split": "test" if i < 6 else "train",
                     "Atelectasis": float(i % 2), "Pleural Effusion": float(i in (0, 3)), "Cardiomegaly": 0.0})
    return ClassificationTask("toy", pd.DataFrame(rows), ["Atelectasis", "Pleural Effusion", "Cardiomegaly"],
                              SkipReport("toy"))


def test_zeroshot_eval_scores_a_saved_run_as_result_rows(tiny_run, tmp_path, graph):
    from mlip_core.interpret import load_images, load_run_model

    task = toy_task(tmp_path)
    out = zeroshot_eval(tiny_run, task, cache_root=tmp_path / "cache")
    assert list(out.columns) == ["method", "task", "fraction", "seed", "metric", "value"]
    assert set(out["method"]) == {"convirt"} and set(out["task"]) == {"toy"}
    assert set(out["fraction"]) == {0.0} and set(out["seed"]) == {3}
    vals = out.set_index("metric")["value"]
    assert set(vals.index) == {"AUROC Atelectasis", "AUROC Pleural Effusion", "macro_AUROC"}  # no test positive
    assert vals["macro_AUROC"] == pytest.approx((vals["AUROC Atelectasis"] + vals["AUROC Pleural Effusion"]) / 2)

    model, tok = load_run_model(tiny_run)  # the same numbers by hand
    test = task.split("test")
    scores = zeroshot_scores(model, tok, load_images(test["image_path"].tolist(), 32),
                             zeroshot_prompts(graph, ["Atelectasis", "Pleural Effusion"]))
    by_hand = auroc_per_label(test[["Atelectasis", "Pleural Effusion"]].to_numpy(), scores,
                              ["Atelectasis", "Pleural Effusion"])[0]
    assert vals["AUROC Atelectasis"] == pytest.approx(by_hand["Atelectasis"])
    assert vals["AUROC Pleural Effusion"] == pytest.approx(by_hand["Pleural Effusion"])

    make_covidx_tree(tmp_path / "covidx", n_train=3, n_test=6)
    multi = zeroshot_eval(tiny_run, covidx_task(tmp_path / "covidx"), cache_root=tmp_path / "cache")
    mvals = multi.set_index("metric")["value"]
    assert {"accuracy", "macro_AUROC", "AUROC normal", "AUROC pneumonia", "AUROC COVID-19"} == set(mvals.index)
    assert 0.0 <= mvals["accuracy"] <= 1.0 and set(multi["task"]) == {"COVIDx"}


def test_zeroshot_rows_name_each_run_by_its_grid_config_and_pretraining_seed(tiny_run, tmp_path):
    """Chapter 06's zero-shot column: one zeroshot_eval per run of the run table, renamed to the table's names."""
    from mlip_core.ablation import zeroshot_rows

    task = toy_task(tmp_path)
    runs = pd.DataFrame({"config": ["mlip_no_itm", "mlip"], "seed": [1, 2], "run_dir": [str(tiny_run)] * 2})
    out = pd.DataFrame(zeroshot_rows(runs, task, tmp_path / "cache"))
    alone = zeroshot_eval(tiny_run, task, cache_root=tmp_path / "cache").set_index("metric")["value"]
    macro = out[out["metric"] == "macro_AUROC"].set_index("method")
    assert list(macro.index) == ["mlip_no_itm", "mlip"] and list(macro["seed"]) == [1, 2]
    assert set(out["task"]) == {"zeroshot"} and set(out["fraction"]) == {0.0}
    assert (macro["value"] == alone["macro_AUROC"]).all()  # the same run scored twice: the same number
