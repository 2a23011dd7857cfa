"""The model: towers and their offline weights, every named config trains (finite loss and gradients),
the divergence encoder is an exact EMA with no gradient, configs round-trip through YAML."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlip_core.config import (
    ABLATION_PARTS,
    Config,
    ImageTowerConfig,
    TextTowerConfig,
    all_config_names,
    config_to_dict,
    load_config,
    named_config,
    save_config,
)
from mlip_core.model.encoders import (
    ImageTower,
    TextTower,
    build_tokenizer,
    efficientnet_lite0_package_path,
    map_efficientnet_lite0_state_dict,
)
from mlip_core.model.mlip import MLIP, embed_entities, local_token_mask

TEXTS = [
    "Heart size is enlarged. Small left pleural effusion.",
    "No acute cardiopulmonary abnormality.",
    "Right lower lobe opacity concerning for pneumonia.",
    "Lungs are clear. No pneumothorax.",
]
E, D_TINY = 6, 32


def small(name: str) -> Config:
    """A named config shrunk to test size (tiny timm ResNet at 32 px, tiny random BERT)."""
    cfg = named_config(name)
    cfg.model.image = ImageTowerConfig(name="test_resnet", image_size=32)
    cfg.model.text = TextTowerConfig(name="tiny", tiny_hidden_size=D_TINY)
    cfg.model.embed_dim, cfg.model.proj_hidden_dim = 16, 32
    cfg.model.fusion_dim, cfg.model.fusion_layers, cfg.model.num_free_prototypes = 32, 1, 4
    return cfg


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TextTowerConfig(name="tiny"))


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    B, L = enc["input_ids"].shape
    entity = torch.full((B, L), -1)
    entity[0, 1:3] = 0
    entity[0, 7:9] = 1
    entity[2, 4] = 2
    labels = torch.zeros(B, 14)
    labels[0, 1] = labels[0, 9] = 1  # cardiomegaly + effusion
    labels[1, 8] = labels[3, 8] = 1  # two "No Finding" reports
    labels[2, 11] = 1
    swap = tokenizer([TEXTS[0].replace("Small left", "Lungs are clear."), *TEXTS[1:]], padding=True, return_tensors="pt")
    status = torch.where(entity >= 0, 1, -2)
    status[0, 7:9] = 0  # the second mention of report 0 is negated
    words = torch.full((B, L), -1)
    for i in range(B):
        ids = enc.word_ids(i)
        words[i] = torch.tensor([-1 if w is None else w for w in ids])
    return {
        "image": torch.randn(B, 1, 32, 32, generator=g),
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_entity": entity,
        "token_status": status,
        "word_index": words,
        "labels": labels,
        "swap_input_ids": swap["input_ids"],
        "swap_attention_mask": swap["attention_mask"],
        "swap_label": torch.tensor([1, 0, 0, 0]),
    }


def entity_embeddings() -> torch.Tensor:
    return torch.randn(E, D_TINY, generator=torch.Generator().manual_seed(3))


EXPECTED_TERMS = {
    "convirt": {"global"},
    "gloria": {"global", "local"},
    "mgca": {"global", "local", "category"},
    "mlip": {"global", "local", "category", "itm", "swap"},
}


@pytest.mark.parametrize("name", all_config_names())
def test_every_named_config_gives_finite_loss_terms_and_gradients(name, batch):
    torch.manual_seed(0)
    model = MLIP(small(name), entity_embeddings(), prototype_entities=[0, 1, 2])
    out = model(batch)
    terms = {k[len("loss_"):] for k in out if k.startswith("loss_")}
    if name in EXPECTED_TERMS:
        assert terms == EXPECTED_TERMS[name]
    else:
        part = name[len("mlip_no_"):]
        dropped = {"local": "local", "category": "category", "itm": "itm", "swap": "swap"}.get(part)
        assert terms == EXPECTED_TERMS["mlip"] - ({dropped} if dropped else set())
    lc = model.config.loss
    weights = {"global": lc.weight_global, "local": lc.weight_local, "category": lc.weight_category,
               "itm": lc.weight_itm, "swap": lc.weight_swap}
    assert torch.allclose(out["loss"], sum(weights[t] * out[f"loss_{t}"] for t in terms))
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    # the towers and heads of every enabled term are trained
    trained = {".".join(n.split(".")[:4 if n.startswith("objective.terms") else 2 if n.startswith("objective")
                                     else 1]) for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert {"image_tower", "text_tower", "image_proj", "text_proj"} <= trained
    # the baselines keep their papers' fixed temperature
    assert ("logit_scale" in trained) == model.config.model.learn_temperature
    if "local" in terms:  # GLoRIA reads the raw word features: only its region projection has weights
        assert "objective.terms.local.image_proj" in trained
        assert ("objective.terms.local.text_proj" in trained) == (lc.local != "gloria")
    if "category" in terms:
        assert "objective.terms.category.prototypes" in trained
    if "itm" in terms:
        assert {"objective.fusion", "objective.terms.itm.head"} <= trained
    if "swap" in terms:
        assert {"objective.fusion", "objective.terms.swap.head"} <= trained
    if lc.local == "mlip" and lc.knowledge_fusion:
        assert "objective.terms.local.knowledge_proj" in trained


def test_momentum_encoder_gets_no_gradient_and_moves_by_the_ema_rule(batch):
    torch.manual_seed(0)
    model = MLIP(small("mlip"), entity_embeddings(), prototype_entities=[0, 1])
    momentum = dict(model.image_tower_m.named_parameters())
    assert all(not p.requires_grad for p in momentum.values())
    model.train()
    assert model.image_tower.training and not model.image_tower_m.training and not model.text_tower_m.training
    # identical to the online towers at the start
    for (n, p), pm in zip(model.image_tower.named_parameters(), momentum.values()):
        assert torch.equal(p, pm), n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(batch)["loss"].backward()
    assert all(p.grad is None for m in model._momentum_modules() for p in m.parameters())
    opt.step()
    before = {id(pm): pm.detach().clone() for m in model._momentum_modules() for pm in m.parameters()}
    model.num_updates.fill_(10_000)  # past the warm-up: the configured rate
    model.momentum_update()
    m = model.config.model.momentum
    largest_move = 0.0
    for online, mom in model._momentum_pairs():
        for p, pm in zip(online.parameters(), mom.parameters()):
            expected = m * before[id(pm)] + (1 - m) * p.detach()
            assert torch.allclose(pm, expected, atol=1e-6, rtol=0)  # equal up to float32 rounding
            largest_move = max(largest_move, float((pm - before[id(pm)]).abs().max()))
    assert largest_move > 1e-4  # the step was far larger than the tolerance above
    # BatchNorm running statistics follow the online tower exactly
    for b, bm in zip(model.image_tower.buffers(), model.image_tower_m.buffers()):
        assert torch.equal(b, bm)


def test_momentum_update_follows_tensors_that_a_conversion_replaced():
    """momentum_update lists its tensors once; .to()/.double() put new buffer tensors in the modules, and the EMA
    must then copy into those, not into the replaced ones."""
    torch.manual_seed(0)
    model = MLIP(small("mlip"), entity_embeddings(), prototype_entities=[0, 1])
    model.momentum_update(0.5)  # lists the tensors
    model.double()  # new buffer tensors (parameters keep their objects)
    bn = next(m for m in model.image_tower.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.add_(1.0)
    p = next(q for q in model.image_proj.parameters())
    with torch.no_grad():
        p.add_(1.0)
    model.momentum_update(0.5)
    bn_m = dict(model.image_tower_m.named_modules())[next(n for n, m in model.image_tower.named_modules() if m is bn)]
    assert torch.equal(bn_m.running_mean, bn.running_mean) and bn_m.running_mean.dtype == torch.float64
    p_m = next(q for q in model.image_proj_m.parameters())
    assert torch.allclose(p_m, p - 0.5)  # halfway towards the online weight that moved by 1

def test_momentum_rate_warms_up_then_holds_the_configured_rate():
    model = MLIP(small("mlip_no_knowledge_fusion"), entity_embeddings(), prototype_entities=[0])
    m = model.config.model.momentum
    rates = [model.momentum_rate(t) for t in (0, 10, 100, 10_000)]
    assert rates[0] == pytest.approx(0.1) and rates[1] == pytest.approx(11 / 20)
    assert rates == sorted(rates) and rates[-1] == m
    model.config.model.momentum_warmup = False
    assert model.momentum_rate(0) == m
    model.momentum_update()
    assert int(model.num_updates) == 1  # counted with the model, so a resumed run continues the warm-up


def test_features_are_named_and_the_objective_sums_them_with_weights(batch):
    torch.manual_seed(0)
    model = MLIP(small("mlip"), entity_embeddings(), prototype_entities=[0]).eval()
    with torch.no_grad():
        f = model.features(batch)
        assert {"image_global", "text_global", "image_global_m", "text_global_m", "logit_scale", "image_patches",
                "text_tokens", "attention_mask"} <= set(f)
        model.objective.weights["swap"] = 0.0
        out = model(batch)
    total = sum(model.objective.weights[t] * out[f"loss_{t}"] for t in model.objective.weights)
    assert torch.allclose(out["loss"], total)


def test_precomputed_text_features_give_the_same_loss_as_the_frozen_tower(batch):
    from mlip_core.model.encoders import precompute_text_features

    torch.manual_seed(0)
    cfg = small("mlip")
    cfg.model.text.freeze_layers = cfg.model.text.tiny_layers
    model = MLIP(cfg, entity_embeddings(), prototype_entities=[0])
    assert model.text_tower.frozen
    model.train()
    assert not model.text_tower.training  # a frozen tower adds no dropout noise
    feats = precompute_text_features(model.text_tower, batch)
    cached = dict(batch, **feats)
    torch.manual_seed(1)
    a = model(batch)
    torch.manual_seed(1)
    b = model(cached)
    for key in ("loss_global", "loss_local", "loss_category", "loss_itm", "loss"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_albef_alpha_warms_up_over_the_first_epoch():
    from mlip_core.objective import GlobalTerm, Progress

    term = GlobalTerm(named_config("mlip").loss)
    a = named_config("mlip").loss.soft_alpha
    assert term.alpha(Progress(0, 100)) == 0.0
    assert term.alpha(Progress(50, 100)) == pytest.approx(a / 2)
    assert term.alpha(Progress(250, 100)) == pytest.approx(a)
    assert GlobalTerm(named_config("convirt").loss).alpha(Progress(250, 100)) == 0.0


def test_mgca_prototypes_are_frozen_during_the_first_epoch(batch):
    from mlip_core.objective import Progress

    torch.manual_seed(0)
    assert named_config("mgca").model.num_free_prototypes == 500
    model = MLIP(small("mgca"))
    protos = model.objective.terms["category"].prototypes
    model.steps_per_epoch = 10
    model(batch)["loss"].backward()
    assert protos.grad is None
    model.zero_grad()
    model.num_updates.fill_(10)
    model(batch)["loss"].backward()
    assert protos.grad is not None and protos.grad.abs().sum() > 0
    assert isinstance(Progress(5, 10).epoch_fraction, float)


def test_frozen_image_stages_get_no_gradient_and_keep_batchnorm_statistics():
    tower = ImageTower(ImageTowerConfig(name="resnet18", image_size=32, frozen_stages=2)).train()
    stats = tower.backbone.layer1[0].bn1.running_mean.clone()
    out = tower(torch.randn(4, 1, 32, 32))
    (out.global_.sum() + out.patches.sum()).backward()
    assert tower.backbone.conv1.weight.grad is None and tower.backbone.layer2[0].conv1.weight.grad is None
    assert tower.backbone.layer3[0].conv1.weight.grad is not None
    assert torch.equal(tower.backbone.layer1[0].bn1.running_mean, stats)
    with pytest.raises(ValueError, match="stages"):
        ImageTower(ImageTowerConfig(name="resnet18", image_size=32, frozen_stages=9))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_staged_forward_of_a_partly_frozen_cnn_equals_timms_forward_intermediates(name):
    for frozen, level in [(1, -1), (2, -2), (3, 0), (3, 1)]:
        torch.manual_seed(0)
        tower = ImageTower(ImageTowerConfig(name=name, image_size=64, frozen_stages=frozen, patch_level=level)).train()
        x = torch.randn(3, 1, 64, 64)
        out = tower(x)  # stem and frozen stages, then the rest (what MLIP shares with its momentum copy)
        final, inter = tower.backbone.forward_intermediates(x, indices=[tower._level])
        assert torch.equal(out.global_, tower.backbone.forward_head(final, pre_logits=True)), (frozen, level)
        assert torch.equal(out.patches, inter[0].flatten(2).transpose(1, 2)), (frozen, level)


def test_momentum_tower_shares_the_frozen_trunk_and_still_computes_its_own_forward(batch):
    torch.manual_seed(0)
    cfg = small("mlip")
    cfg.model.image = ImageTowerConfig(name="resnet18", image_size=32, frozen_stages=2)
    model = MLIP(cfg, entity_embeddings(), prototype_entities=[0, 1]).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # the momentum copy's trainable stages now differ from the online tower's
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
        model.momentum_update(0.5)
    f = model.features(batch)
    with torch.no_grad():
        own = F.normalize(model.image_proj_m(model.image_tower_m(batch["image"]).global_), dim=-1)
    assert torch.allclose(f["image_global_m"], own, atol=1e-6, rtol=0)
    assert not torch.allclose(f["image_global_m"], f["image_global"].detach(), atol=1e-3)


def test_model_loss_is_invariant_to_batch_permutation(batch):
    torch.manual_seed(0)
    model = MLIP(small("mlip_no_itm"), entity_embeddings(), prototype_entities=[0, 1, 2]).eval()
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = model(batch)
        b = model({k: v[perm] for k, v in batch.items()})
    for key in ("loss_global", "loss_local", "loss_category", "loss_swap", "loss"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_swap_branch_reuses_features_of_unaltered_reports_exactly(batch):
    torch.manual_seed(0)
    model = MLIP(small("mlip"), entity_embeddings(), prototype_entities=[0]).eval()
    with torch.no_grad():
        tokens = model.text_tower(batch["input_ids"], batch["attention_mask"]).tokens
        fast = model.encode_swap_tokens(batch, tokens)
        full = model.text_tower(batch["swap_input_ids"], batch["swap_attention_mask"]).tokens
    valid = batch["swap_attention_mask"].bool()
    assert torch.allclose(fast[valid], full[valid], atol=1e-5)
    # a row labelled unaltered whose text differs is still re-encoded
    lying = dict(batch, swap_label=torch.zeros(4, dtype=torch.long))
    with torch.no_grad():
        again = model.encode_swap_tokens(lying, tokens)
    assert torch.allclose(again[valid], full[valid], atol=1e-5)


def test_knowledge_fusion_changes_only_entity_tokens_and_respects_negation(batch):
    torch.manual_seed(0)
    model = MLIP(small("mlip"), entity_embeddings(), prototype_entities=[0])
    local = model.objective.terms["local"]
    tokens = torch.randn(*batch["input_ids"].shape, D_TINY)
    fused = local.fuse_knowledge(tokens, batch["token_entity"], batch["token_status"], model.entity_embeddings)
    has = batch["token_entity"] >= 0
    assert torch.equal(fused[~has], tokens[~has])
    assert not torch.allclose(fused[has], tokens[has])
    # two tokens of the same entity receive the same knowledge vector
    assert torch.allclose(fused[0, 1] - tokens[0, 1], fused[0, 2] - tokens[0, 2], atol=1e-6)
    # the negated mention (tokens 7-8 of report 0, entity 1) gets the "negated" status vector, not entity 1's
    knowledge = local.knowledge_proj(model.entity_embeddings)
    added = fused[0, 7] - tokens[0, 7]
    assert torch.allclose(added, local.status_embedding.weight[0], atol=1e-6)
    assert not torch.allclose(added, knowledge[1], atol=1e-3)
    # the same mention asserted positive receives entity 1's knowledge
    positive = batch["token_status"].clone()
    positive[0, 7:9] = 1
    as_positive = local.fuse_knowledge(tokens, batch["token_entity"], positive, model.entity_embeddings)
    assert torch.allclose(as_positive[0, 7] - tokens[0, 7], knowledge[1], atol=1e-6)


def test_local_embedding_projects_the_knowledge_table_instead_of_the_fused_tokens(batch):
    torch.manual_seed(0)
    model = MLIP(small("mlip"), entity_embeddings(), prototype_entities=[0]).double()
    local = model.objective.terms["local"]
    f = {"text_tokens": torch.randn(*batch["input_ids"].shape, D_TINY, dtype=torch.float64),
         "image_patches": torch.randn(4, 5, model.image_tower.patch_dim, dtype=torch.float64)}
    t, v = local.embed(f, batch, model)
    fused = local.fuse_knowledge(f["text_tokens"], batch["token_entity"], batch["token_status"],
                                 model.entity_embeddings)
    assert torch.allclose(t, F.normalize(local.text_proj(fused), dim=-1), atol=1e-12)
    assert torch.allclose(v, F.normalize(local.image_proj(f["image_patches"]), dim=-1), atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2])
def test_fusion_head_equals_torch_decoder_layers_on_the_first_token_and_on_itm_pairs(layers):
    from mlip_core.objective import FusionHead

    torch.manual_seed(0)
    head = FusionHead(24, 20, 32, layers, 4).double().train()
    tokens, patches = torch.randn(5, 9, 24, dtype=torch.float64), torch.randn(5, 7, 20, dtype=torch.float64)
    mask = torch.arange(9)[None] < torch.tensor([9, 4, 7, 1, 9])[:, None]

    def reference(t, m, p):  # every position through nn.TransformerDecoderLayer.forward
        x, memory = head.text_in(t), head.image_in(p)
        for layer in head.layers:
            x = layer(x, memory, tgt_key_padding_mask=~m)
        return head.norm(x[:, 0])

    texts, images = torch.tensor([0, 1, 2, 3, 4, 3, 0, 2, 4]), torch.tensor([0, 1, 2, 3, 4, 0, 1, 4, 4])
    for ours, ref in ((head(tokens, mask, patches), reference(tokens, mask, patches)),
                      (head(tokens, mask, patches, pairs=(texts, images)),
                       reference(tokens[texts], mask[texts], patches[images]))):
        assert torch.allclose(ours, ref, atol=1e-12)
        params = list(head.parameters())
        grads = zip(torch.autograd.grad(ours.square().sum(), params), torch.autograd.grad(ref.square().sum(), params))
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in grads)


def test_negated_mentions_are_not_up_weighted_in_the_local_loss(batch):
    torch.manual_seed(0)
    model = MLIP(small("mlip"), entity_embeddings(), prototype_entities=[0])
    local = model.objective.terms["local"]
    words = local_token_mask(batch["attention_mask"])
    w = local.word_weights({}, batch, words)
    kw = model.config.loss.knowledge_token_weight
    # report 0: tokens 1-2 positive (weight kw), tokens 7-8 negated (weight 1), as are plain words
    assert torch.allclose(w[0, 1] / w[0, 3], torch.tensor(kw)) and torch.allclose(w[0, 7], w[0, 3])


def test_prototypes_start_at_the_knowledge_embeddings_through_the_text_head():
    torch.manual_seed(0)
    ent = entity_embeddings()
    model = MLIP(small("mlip"), ent, prototype_entities=[4, 1])
    with torch.no_grad():
        expected = F.normalize(model.text_proj(ent[[4, 1]]), dim=-1)
    prototypes = model.objective.terms["category"].prototypes
    assert prototypes.shape == (2 + 4, 16)
    assert torch.allclose(prototypes[:2], expected, atol=1e-6)


def test_knowledge_configs_without_entity_embeddings_fail_with_a_fix():
    with pytest.raises(ValueError, match="embed_entities"):
        MLIP(small("mlip"), None)
    MLIP(small("mgca"), None)  # MGCA needs no knowledge


def test_local_token_mask_drops_cls_sep_and_padding():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert local_token_mask(mask).int().tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]


@pytest.mark.parametrize("name", ["convirt", "mlip"])
def test_forward_hands_back_the_embeddings_that_encode_image_and_text_give(name, batch):
    """Validation reads the objective's own embeddings instead of running the towers again: they must be what
    encode_image / encode_batch_text return in eval mode (with a frozen trunk shared by the momentum tower)."""
    torch.manual_seed(0)
    cfg = small(name)
    cfg.model.image = ImageTowerConfig(name="resnet18", image_size=32, frozen_stages=2)
    model = MLIP(cfg, entity_embeddings(), prototype_entities=[0, 1]).eval()
    with torch.no_grad():
        out = model(batch)
        assert torch.allclose(out["image_embedding"], model.encode_image(batch["image"]), atol=1e-6, rtol=0)
        assert torch.allclose(out["text_embedding"], model.encode_batch_text(batch), atol=1e-6, rtol=0)
    assert not out["image_embedding"].requires_grad


def test_encode_image_and_text_are_unit_vectors_and_tower_exports_as_state_dict(batch):
    torch.manual_seed(0)
    model = MLIP(small("convirt"))
    zi = model.encode_image(batch["image"])
    zt = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert zi.shape == zt.shape == (4, 16)
    assert torch.allclose(zi.norm(dim=-1), torch.ones(4), atol=1e-5)
    fresh = ImageTower(small("convirt").model.image)
    fresh.load_state_dict(model.image_tower.state_dict())
    model.eval(), fresh.eval()
    assert torch.allclose(fresh(batch["image"]).global_, model.image_tower(batch["image"]).global_)


# ---------------------------------------------------------------------------------------------
# Towers


@pytest.mark.parametrize(
    "name,size,grid,patch_dim",
    [("resnet18", 64, (4, 4), 256), ("vit_tiny_patch16_224", 32, (2, 2), 192), ("test_efficientnet", 32, (2, 2), 48)],
)
def test_image_tower_gives_global_vector_and_patch_grid(name, size, grid, patch_dim):
    tower = ImageTower(ImageTowerConfig(name=name, image_size=size))
    out = tower(torch.randn(2, 1, size, size))
    assert out.global_.shape == (2, tower.global_dim)
    assert out.grid == grid and out.patches.shape == (2, grid[0] * grid[1], patch_dim)
    assert tower.patch_dim == patch_dim


def test_packaged_efficientnet_lite0_weights_recognise_an_imagenet_photo():
    import timm
    from matplotlib import cbook
    from PIL import Image

    state = torch.load(efficientnet_lite0_package_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    model.load_state_dict(map_efficientnet_lite0_state_dict(state, model))
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB").resize((224, 224))
    x = torch.tensor(np.asarray(img)).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        top = model(((x - 0.5) / 0.5)[None]).argmax(1).item()
    assert top == 652  # ImageNet "military uniform": Grace Hopper in her US Navy uniform


def test_grey_image_tower_loads_the_packaged_weights_with_summed_stem():
    tower = ImageTower(ImageTowerConfig(name="tf_efficientnet_lite0", pretrained="efficientnet_lite0_package", image_size=64))
    state = torch.load(efficientnet_lite0_package_path(), map_location="cpu", weights_only=True)
    assert tower.missing_keys == []
    assert torch.allclose(tower.backbone.conv_stem.weight, state["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(tower.backbone.bn2.running_var, state["_bn1.running_var"])


def test_missing_local_weights_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ImageTower(ImageTowerConfig(name="test_resnet", pretrained=str(tmp_path / "nope.pth")))


def test_text_tower_freezes_embeddings_and_first_layers():
    tower = TextTower(TextTowerConfig(name="tiny", tiny_layers=3, freeze_layers=2))
    enc = tower.encoder
    assert not any(p.requires_grad for p in enc.embeddings.parameters())
    assert not any(p.requires_grad for layer in enc.encoder.layer[:2] for p in layer.parameters())
    assert all(p.requires_grad for p in enc.encoder.layer[2].parameters())
    with pytest.raises(ValueError, match="only 3 layers"):
        TextTower(TextTowerConfig(name="tiny", tiny_layers=3, freeze_layers=4))


def test_text_tower_mean_pooling_ignores_padding(tokenizer):
    tower = TextTower(TextTowerConfig(name="tiny")).eval()
    one = tokenizer(["small left pleural effusion"], return_tensors="pt")
    padded = tokenizer(["small left pleural effusion"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        a = tower(one["input_ids"], one["attention_mask"]).sentence
        b = tower(padded["input_ids"], padded["attention_mask"]).sentence
    assert torch.allclose(a, b, atol=1e-5)


def test_packaged_minilm_embeds_entities_meaningfully_and_caches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MLIP_WORKSPACE", str(tmp_path))
    cfg = TextTowerConfig(name="minilm")
    tower, tok = TextTower(cfg), build_tokenizer(cfg)
    texts = ["pleural effusion: fluid in the pleural space", "fluid collecting around the lung",
             "rib fracture: a break in a rib bone"]
    emb = embed_entities(tower, tok, texts)
    assert emb.shape == (3, 384)
    cos = F.cosine_similarity(emb[0:1], emb)
    assert cos[1] > cos[2]  # the pretrained encoder knows effusion is fluid, not a fracture
    cached = list((tmp_path / "cache").glob("entities_minilm_*.pt"))
    assert len(cached) == 1
    assert torch.equal(embed_entities(tower, tok, texts), emb)
    tiny = TextTower(TextTowerConfig(name="tiny"))
    embed_entities(tiny, tok, texts)  # random towers are never cached
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1


# ---------------------------------------------------------------------------------------------
# Configs


def test_config_round_trips_through_yaml_and_rejects_unknown_keys(tmp_path):
    cfg = named_config("gloria")
    cfg.model.image.name = "vit_tiny_patch16_224"
    cfg.loss.gloria_temp2 = 3.0
    path = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(path) == cfg
    path.write_text(path.read_text().replace("gloria_temp2", "gloria_tmp2"))
    with pytest.raises(ValueError, match="gloria_tmp2"):
        load_config(path)


def test_each_ablation_differs_from_mlip_in_its_part_only():
    full = dataclasses.asdict(named_config("mlip").loss)
    changed_by = {
        "divergence": {"divergence"},
        "knowledge_negatives": {"knowledge_negatives"},
        "local": {"local"},
        "knowledge_fusion": {"knowledge_fusion"},
        "category": {"category"},
        "itm": {"itm"},
        "swap": {"swap"},
    }
    assert set(changed_by) == set(ABLATION_PARTS)
    for part, keys in changed_by.items():
        ablated = dataclasses.asdict(named_config(f"mlip_no_{part}").loss)
        assert {k for k in full if full[k] != ablated[k]} == keys
    with pytest.raises(ValueError, match="mlip_no_swap"):
        named_config("mlip_no_everything")


def test_gloria_config_feeds_raw_unnormalised_words_and_regions_to_its_attention(batch):
    torch.manual_seed(0)
    model = MLIP(small("gloria"))
    out = model(batch)
    # GLoRIA's word softmax needs raw dot products; L2-normalised inputs would report norms of exactly 1
    assert abs(float(out["local_word_norm"]) - 1.0) > 0.1 and abs(float(out["local_region_norm"]) - 1.0) > 1e-3
    lc = model.config.loss
    assert (lc.global_i2t_weight, lc.global_t2i_weight) == (1.0, 1.0)  # GLoRIA sums both directions
    assert not model.config.model.learn_temperature and model.config.model.init_temperature == pytest.approx(0.1)


def test_mgca_config_runs_both_token_directions(batch):
    torch.manual_seed(0)
    model = MLIP(small("mgca"))
    out = model(batch)
    assert float(out["local_loss_word"]) > 0 and float(out["local_loss_patch"]) > 0
    assert torch.allclose(out["loss_local"], out["local_loss_word"] + out["local_loss_patch"], atol=1e-5)
