"""The pretraining collator: the batch format the model reads, entity tokens from the real extractor,
and text-swap pairs that alter exactly one finding sentence with one from another report."""

from __future__ import annotations

import math

import pytest
import torch

from mlip_core.config import ImageTowerConfig, TextTowerConfig, named_config
from mlip_core.data.collate import PretrainCollator
from mlip_core.data.reports import split_sentences
from mlip_core.knowledge.extract import KnowledgeExtractor
from mlip_core.model.encoders import build_tokenizer
from mlip_core.model.mlip import MLIP

# Invented report texts in the usual style (no IU or MIMIC text).
REPORTS = [
    "The heart is enlarged. Small left pleural effusion. No pneumothorax.",
    "No acute cardiopulmonary abnormality. Lungs are clear.",
    "Right lower lobe opacity concerning for pneumonia. Heart size is normal.",
    "Mild pulmonary edema. Bilateral pleural effusions, larger on the right.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TextTowerConfig(name="tiny"))


@pytest.fixture(scope="module")
def extractor():
    return KnowledgeExtractor()


def items(texts=REPORTS, size: int = 32) -> list[dict]:
    out = []
    for i, text in enumerate(texts):
        labels = torch.full((14,), float("nan"))
        labels[i % 14] = 1.0
        out.append({"image": torch.rand(1, size, size), "text": text, "labels": labels, "study_id": 100 + i, "index": i})
    return out


def decode(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_batch_has_every_key_the_model_reads(tokenizer, extractor):
    batch = PretrainCollator(tokenizer, extractor, max_length=32, swap_prob=0.5)(items())
    B = len(REPORTS)
    assert batch["image"].shape == (B, 1, 32, 32)
    L = batch["input_ids"].shape[1]
    for key in ("attention_mask", "token_entity", "token_status"):
        assert batch[key].shape == (B, L) and batch[key].dtype == torch.long
    assert batch["labels"].shape == (B, 14) and torch.isnan(batch["labels"][0, 1])  # blanks stay NaN
    assert batch["study_id"].tolist() == [100, 101, 102, 103] and batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["swap_input_ids"].shape[0] == B and batch["swap_attention_mask"].shape == batch["swap_input_ids"].shape
    assert batch["swap_label"].shape == (B,) and set(batch["swap_label"].tolist()) <= {0, 1}
    assert L <= 32 and batch["attention_mask"].sum(1).max() == L  # padded to the longest report only


def test_token_entity_marks_the_finding_tokens(tokenizer, extractor):
    batch = PretrainCollator(tokenizer, extractor, max_length=64, swap_prob=0.0)(items())
    graph = extractor.graph
    ids, ent = batch["input_ids"][0], batch["token_entity"][0]
    effusion = graph.index("pleural_effusion")
    words = decode(tokenizer, ids[ent == effusion])
    assert "effusion" in words
    assert (ent[batch["attention_mask"][0] == 0] == -1).all()  # padding carries no entity
    assert ent[0] == -1  # nor does [CLS]


def test_swap_replaces_exactly_one_sentence_with_one_from_another_report(tokenizer, extractor):
    texts = REPORTS * 3
    collate = PretrainCollator(tokenizer, extractor, max_length=64, swap_prob=1.0, generator=torch.Generator().manual_seed(0))
    batch = collate(items(texts))
    assert batch["swap_label"].sum() == len(texts)  # every report here has a finding sentence to swap
    for i, text in enumerate(texts):
        original = [s.lower() for s in split_sentences(text)]
        swapped = decode(tokenizer, batch["swap_input_ids"][i])
        # the swapped text is the original sentences with exactly one replaced
        kept = [s for s in original if s in swapped]
        assert len(kept) == len(original) - 1, (text, swapped)
        new = swapped
        for s in kept:
            new = new.replace(s, "", 1)
        new = new.strip()
        others = {s.lower() for j, t in enumerate(texts) if j != i for s in split_sentences(t)}
        assert new in others, (new, swapped)


def test_swap_probability_is_respected_and_unaltered_reports_are_identical(tokenizer, extractor):
    texts = REPORTS * 50
    collate = PretrainCollator(tokenizer, extractor, max_length=64, swap_prob=0.3, generator=torch.Generator().manual_seed(1))
    batch = collate(items(texts))
    rate = batch["swap_label"].float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / len(texts))
    same = batch["swap_label"] == 0
    n = min(batch["input_ids"].shape[1], batch["swap_input_ids"].shape[1])
    assert torch.equal(batch["input_ids"][same, :n], batch["swap_input_ids"][same, :n])


def test_swap_is_reproducible_from_a_seeded_generator(tokenizer, extractor):
    def run():
        c = PretrainCollator(tokenizer, extractor, 64, 0.5, generator=torch.Generator().manual_seed(7))
        return c(items(REPORTS * 4))

    a, b = run(), run()
    assert torch.equal(a["swap_input_ids"], b["swap_input_ids"]) and torch.equal(a["swap_label"], b["swap_label"])


def test_collator_pickles_for_dataloader_workers_with_its_generator_state(tokenizer, extractor):
    import pickle

    c = PretrainCollator(tokenizer, extractor, 64, 0.5, generator=torch.Generator().manual_seed(3))
    clone = pickle.loads(pickle.dumps(c))
    a, b = c(items(REPORTS * 3)), clone(items(REPORTS * 3))
    assert torch.equal(a["swap_input_ids"], b["swap_input_ids"]) and torch.equal(a["swap_label"], b["swap_label"])


def test_nothing_to_swap_is_label_zero_and_counted(tokenizer, extractor):
    collate = PretrainCollator(tokenizer, extractor, 64, swap_prob=1.0)
    batch = collate(items(["", "No pneumothorax.", "Heart size is normal."]))
    assert batch["swap_label"].tolist() == [0, 1, 1]  # the empty report has no sentence to swap
    assert collate.stats["swap_drawn_but_no_candidate"] == 1
    lonely = collate(items(["No pneumothorax.", "No pneumothorax."]))
    assert lonely["swap_label"].tolist() == [0, 0]  # the only donor sentence is the same sentence
    one = collate(items(["No pneumothorax."]))
    assert one["swap_label"].tolist() == [0]  # a batch of one has no other report


def test_without_swap_or_extractor(tokenizer):
    batch = PretrainCollator(tokenizer, None, 64, swap_prob=0.0)(items())
    assert "swap_input_ids" not in batch
    assert (batch["token_entity"] == -1).all()
    with pytest.raises(KeyError, match="text"):
        PretrainCollator(tokenizer, None, 64, 0.0)([{"image": torch.rand(1, 8, 8), "labels": torch.zeros(14)}])
    with pytest.raises(ValueError, match="swap_prob"):
        PretrainCollator(tokenizer, None, 64, 1.5)


def test_collated_batch_trains_the_full_mlip_model(tokenizer, extractor):
    cfg = named_config("mlip")
    cfg.model.image = ImageTowerConfig(name="test_resnet", image_size=32)
    cfg.model.text = TextTowerConfig(name="tiny")
    cfg.model.embed_dim, cfg.model.proj_hidden_dim, cfg.model.fusion_dim, cfg.model.fusion_layers = 16, 32, 32, 1
    graph = extractor.graph
    torch.manual_seed(0)
    ent = torch.randn(len(graph.entity_ids), 32)
    findings = [graph.index(i) for i in graph.finding_ids]
    model = MLIP(cfg, ent, prototype_entities=findings)
    batch = PretrainCollator(tokenizer, extractor, 64, swap_prob=0.5)(items())
    out = model(batch)
    assert {"loss_global", "loss_local", "loss_category", "loss_itm", "loss_swap"} <= set(out)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.objective.terms["local"].knowledge_proj.weight.grad.abs().sum() > 0


def test_reports_tokenised_once_give_the_batch_that_tokenising_each_batch_gives(tokenizer, extractor):
    from mlip_core.data.collate import PRECOMPUTED_TOKEN_KEYS

    collate = PretrainCollator(tokenizer, extractor, 64, swap_prob=0.0)
    rows = collate.encode_all(REPORTS)
    assert rows["input_ids"].shape == (len(REPORTS), 64)
    plain = collate(items())
    cached = collate([dict(it, **{k: rows[k][i] for k in PRECOMPUTED_TOKEN_KEYS}) for i, it in enumerate(items())])
    assert plain["input_ids"].shape[1] < 64  # cut to the longest report, as padding="longest" does
    for key in PRECOMPUTED_TOKEN_KEYS:
        assert torch.equal(plain[key], cached[key]), key
    assert (plain["token_entity"] >= 0).any()  # the extractor's marks are part of what is cached
