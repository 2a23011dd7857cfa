"""Text swapping with a frozen text tower: swapped reports built once per dataset and encoded once
(``frozen_swap_features``) must give the fusion head what encoding them every step gives, and the per-item draw
(``TextFeatureDataset``) must follow ``swap_prob``, pick a precomputed version, and repeat under the same seed."""

from __future__ import annotations

import torch

from mlip_core.config import TextTowerConfig
from mlip_core.data.collate import PretrainCollator
from mlip_core.data.reports import split_sentences
from mlip_core.knowledge.extract import KnowledgeExtractor
from mlip_core.model.encoders import TextTower, build_tokenizer, precompute_text_features
from mlip_core.train import SeededDataset, TextFeatureDataset, frozen_swap_features, swapped_versions

# Invented report texts in the usual style (no IU or MIMIC text).
REPORTS = [
    "The heart is enlarged. Small left pleural effusion. No pneumothorax.",
    "No acute cardiopulmonary abnormality. Lungs are clear.",
    "Right lower lobe opacity concerning for pneumonia. Heart size is normal.",
    "Mild pulmonary edema. Bilateral pleural effusions, larger on the right.",
    "Stable cardiomegaly. No focal consolidation.",
    "Left basilar atelectasis. No pleural effusion.",
] * 3
MAX_LENGTH = 40


def frozen_tiny_tower() -> TextTower:
    torch.manual_seed(0)
    cfg = TextTowerConfig(name="tiny", tiny_hidden_size=32, freeze_layers=2, max_length=MAX_LENGTH)
    tower = TextTower(cfg)
    assert tower.frozen
    return tower


class Reports(torch.utils.data.Dataset):
    def __len__(self):
        return len(REPORTS)

    def __getitem__(self, i):
        return {"index": i, "text": REPORTS[i]}


def build(variants: int = 3):
    tokenizer = build_tokenizer(TextTowerConfig(name="tiny"))
    tower = frozen_tiny_tower()
    collate = PretrainCollator(tokenizer, KnowledgeExtractor(), MAX_LENGTH, swap_prob=0.5)
    enc = tokenizer(REPORTS, max_length=MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
    own = precompute_text_features(tower, enc)
    # versions equal to a report reuse its features (what build_run passes)
    swap = frozen_swap_features(collate, tower, tokenizer, REPORTS, MAX_LENGTH, variants, group_size=6, seed=0,
                                own_features=own)
    return tokenizer, tower, collate, swap, own


def test_swapped_versions_are_encoded_as_the_tower_encodes_their_text():
    tokenizer, tower, collate, swap, own = build()
    V, N, L, D = swap["swap_text_tokens"].shape
    assert (V, N, L) == (3, len(REPORTS), MAX_LENGTH) and swap["swap_label"].shape == (V, N)
    assert collate.stats["swapped"] == 0  # the collator the run uses is not touched
    texts, labels = swapped_versions(collate, REPORTS, 3, group_size=6, seed=0)
    assert torch.equal(labels, swap["swap_label"]) and labels.float().mean() > 0.9
    for v in range(V):
        for i in range(N):
            assert (texts[v][i] != REPORTS[i]) == bool(labels[v, i])
            # one finding sentence replaced: the same number of sentences, all but one kept
            if labels[v, i]:
                a, b = split_sentences(REPORTS[i]), split_sentences(texts[v][i])
                assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    enc = tokenizer([t for version in texts for t in version], max_length=MAX_LENGTH, truncation=True,
                    padding="max_length", return_tensors="pt")
    direct = precompute_text_features(tower, enc)["text_tokens"].view(V, N, L, D)
    assert torch.equal(swap["swap_attention_mask"], enc["attention_mask"].view(V, N, L))
    valid = swap["swap_attention_mask"].bool()
    assert torch.allclose(swap["swap_text_tokens"].float()[valid], direct[valid], atol=1e-2)
    # the groups are seeded: the same versions again, other versions with another seed
    assert swapped_versions(collate, REPORTS, 3, group_size=6, seed=0)[0] == texts
    assert swapped_versions(collate, REPORTS, 3, group_size=6, seed=1)[0] != texts


def test_the_item_draw_follows_swap_prob_reads_a_precomputed_version_and_repeats():
    _, _, _, swap, own = build()
    data = SeededDataset(TextFeatureDataset(Reports(), own, swap, swap_prob=0.4), seed=7)
    drawn, again = [], []
    for epoch in range(40):
        for i in range(len(REPORTS)):
            item = data[(epoch, i)]
            label = int(item["swap_label"])
            drawn.append(label)
            tokens = item["swap_text_tokens"].float()
            if label:
                assert any(torch.equal(item["swap_text_tokens"], swap["swap_text_tokens"][v, i])
                           for v in range(swap["swap_label"].shape[0]) if swap["swap_label"][v, i])
            else:
                assert torch.allclose(tokens, own["text_tokens"][i], atol=1e-2)
                assert torch.equal(item["swap_attention_mask"], swap["attention_mask"][i])
            if epoch < 3:
                again.append(int(data[(epoch, i)]["swap_label"]))
    rate = sum(drawn) / len(drawn)
    assert 0.33 < rate < 0.47, rate  # 0.4 * (share of versions with a swap) over 720 draws
    assert again == drawn[: len(again)]  # the same (seed, epoch, item) draws the same


def test_the_model_reads_precomputed_swap_tokens_as_if_it_had_encoded_the_swapped_reports():
    from mlip_core.config import ImageTowerConfig, named_config
    from mlip_core.model.mlip import MLIP

    tokenizer = build_tokenizer(TextTowerConfig(name="tiny"))
    cfg = named_config("mlip")
    cfg.model.image = ImageTowerConfig(name="test_resnet", image_size=32)
    cfg.model.text = TextTowerConfig(name="tiny", tiny_hidden_size=32, freeze_layers=2, max_length=MAX_LENGTH)
    cfg.model.embed_dim, cfg.model.proj_hidden_dim, cfg.model.fusion_dim, cfg.model.num_free_prototypes = 16, 32, 32, 4
    cfg.loss.local, cfg.loss.category = "none", False
    torch.manual_seed(0)
    model = MLIP(cfg)
    collate = PretrainCollator(tokenizer, KnowledgeExtractor(), MAX_LENGTH, swap_prob=1.0,
                               generator=torch.Generator().manual_seed(0))
    items = [{"image": torch.rand(1, 32, 32), "text": t, "labels": torch.zeros(14), "index": i}
             for i, t in enumerate(REPORTS[:6])]
    batch = collate(items)
    enc = tokenizer([tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["swap_input_ids"]],
                    max_length=MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
    cached = {k: v for k, v in batch.items() if k not in ("swap_input_ids",)}
    cached["swap_text_tokens"] = precompute_text_features(model.text_tower, enc)["text_tokens"].half()
    cached["swap_attention_mask"] = enc["attention_mask"]
    model.eval()
    f = model.features(batch)
    every_step = model.encode_swap_tokens(batch, f["text_tokens"])
    once = model.encode_swap_tokens(cached, f["text_tokens"])
    assert once.dtype == f["text_tokens"].dtype
    for i in range(len(items)):  # the valid positions of each swapped report agree (fp16 storage)
        n = int(batch["swap_attention_mask"][i].sum())
        assert torch.allclose(once[i, :n], every_step[i, :n], atol=2e-2), i
    swap = model.objective.terms["swap"]
    from mlip_core.objective import Context, Progress

    ctx = Context(model=model, fusion=model.objective.fusion, progress=Progress())
    a, b = swap(f, batch, ctx)["loss"], swap(f, cached, ctx)["loss"]
    assert torch.allclose(a, b, atol=1e-3)


class _CountingTower(torch.nn.Module):
    """Wraps a frozen tower and counts the rows it encodes."""

    def __init__(self, tower: TextTower) -> None:
        super().__init__()
        self.tower, self.rows = tower, 0
        self.frozen = tower.frozen

    def forward(self, ids, mask, cls_attention=False):
        self.rows += ids.shape[0]
        return self.tower(ids, mask, cls_attention=cls_attention)


def test_repeated_and_known_reports_are_copied_not_encoded_again():
    tokenizer = build_tokenizer(TextTowerConfig(name="tiny"))
    counting = _CountingTower(frozen_tiny_tower())
    enc = tokenizer(REPORTS, max_length=MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
    feats = precompute_text_features(counting, enc, chunk=4)
    assert counting.rows == 6  # REPORTS is six reports three times
    for i in range(len(REPORTS)):  # each row as the tower gives it alone
        alone = counting.tower(enc["input_ids"][i:i + 1], enc["attention_mask"][i:i + 1], cls_attention=True)
        assert torch.allclose(feats["text_tokens"][i], alone.tokens[0], atol=1e-5)
        assert torch.allclose(feats["text_sentence"][i], alone.sentence[0], atol=1e-5)
        assert torch.allclose(feats["text_cls_attention"][i], alone.cls_attention[0], atol=1e-5)
    # Rows equal to known ones take the known features (here planted as zeros + i, so a copy is visible).
    known_enc = {k: v[:6] for k, v in enc.items()}
    planted = {k: torch.zeros_like(v[:6]) + torch.arange(6).view(-1, *[1] * (v.ndim - 1)) for k, v in feats.items()}
    extra = tokenizer(["Enlarged heart. No effusion.", REPORTS[2], REPORTS[4]], max_length=MAX_LENGTH,
                      truncation=True, padding="max_length", return_tensors="pt")
    counting.rows = 0
    mixed = precompute_text_features(counting, {k: extra[k] for k in ("input_ids", "attention_mask")},
                                     known=(known_enc, planted))
    assert counting.rows == 1  # only the new report
    assert torch.equal(mixed["text_sentence"][1], planted["text_sentence"][2])
    assert torch.equal(mixed["text_tokens"][2], planted["text_tokens"][4])
    alone = counting.tower(extra["input_ids"][:1], extra["attention_mask"][:1], cls_attention=True)
    assert torch.allclose(mixed["text_tokens"][0], alone.tokens[0], atol=1e-5)


def test_bf16_autocast_gives_float32_features_near_the_float32_pass():
    """``autocast_dtype=torch.bfloat16`` (``train.frozen_precision = "bf16"``): the tower runs under autocast (the
    features differ from float32's) yet stays close to it, and the features come back as float32."""
    tokenizer, tower = build_tokenizer(TextTowerConfig(name="tiny")), frozen_tiny_tower()
    enc = tokenizer(REPORTS, max_length=MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
    exact = precompute_text_features(tower, enc)
    fast = precompute_text_features(tower, enc, autocast_dtype=torch.bfloat16)
    for k in ("text_tokens", "text_sentence", "text_cls_attention"):
        assert fast[k].dtype == torch.float32
        rel = (fast[k] - exact[k]).norm() / exact[k].norm()
        assert 0 < rel < 0.03, (k, rel)
    # the swap versions take the precision too: close to, and not equal to, the float32 encoding
    collate = PretrainCollator(tokenizer, KnowledgeExtractor(), MAX_LENGTH, swap_prob=0.5)
    args = (collate, tower, tokenizer, REPORTS, MAX_LENGTH, 2)
    s32 = frozen_swap_features(*args, group_size=6, own_features=exact)["swap_text_tokens"].float()
    s16 = frozen_swap_features(*args, group_size=6, own_features=fast, precision="bf16")["swap_text_tokens"].float()
    assert 0 < (s16 - s32).norm() / s32.norm() < 0.03
