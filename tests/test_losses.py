"""The losses pin formulas and invariants: plain InfoNCE at a=0, soft targets, knowledge guards,
ConVIRT's direction weights, ALBEF's alpha warm-up, aligned < shuffled, batch permutation, padding,
vectorised == per-sample loop (MLIP/MGCA local, GLoRIA on unnormalised features, MGCA's clipped
attention weights), GLoRIA's attention finding a planted region, word-piece aggregation, hard negatives
drawn with a temperature, Sinkhorn marginals, and the distributed gather (two real gloo processes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlip_core.knowledge.graph import CHEXPERT_14
from mlip_core.losses import (
    CategoryLoss,
    GloriaLocalLoss,
    GlobalContrastiveLoss,
    LocalAlignmentLoss,
    MGCALocalLoss,
    aggregate_wordpieces,
    clipped_attention_weights,
    gloria_attention,
    gloria_local_loop,
    local_alignment_loop,
    local_token_weights,
    mine_hard_negatives,
    same_finding_set,
    sinkhorn,
    supervised_contrastive,
)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def paired(B: int = 8, d: int = 16, noise: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Image/text embeddings where text i is a noisy copy of image i."""
    img = unit(B, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    txt = F.normalize(img + noise * torch.randn(B, d, generator=g), dim=-1)
    return img, txt


def labels_from_sets(sets: list[set[int]]) -> torch.Tensor:
    lab = torch.full((len(sets), 14), float("nan"))
    for i, s in enumerate(sets):
        lab[i, :] = 0.0
        for j in s:
            lab[i, j] = 1.0
    return lab


SCALE = torch.tensor(1 / 0.07)


# ---------------------------------------------------------------------------------------------
# Global


def direct_infonce(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """Textbook InfoNCE, written element by element."""
    B = img.shape[0]
    total = 0.0
    for i in range(B):
        s_i2t = [scale * float(img[i] @ txt[j]) for j in range(B)]
        s_t2i = [scale * float(txt[i] @ img[j]) for j in range(B)]
        total += -s_i2t[i] + math.log(sum(math.exp(s) for s in s_i2t))
        total += -s_t2i[i] + math.log(sum(math.exp(s) for s in s_t2i))
    return torch.tensor(total / (2 * B))


def test_global_loss_with_alpha_zero_equals_plain_infonce():
    img, txt = paired()
    img_m, txt_m = paired(seed=5)
    loss = GlobalContrastiveLoss(soft_alpha=0.0, knowledge_negatives=False)(img, txt, SCALE, img_m, txt_m)["loss"]
    assert torch.allclose(loss, direct_infonce(img, txt, float(SCALE)), atol=1e-5)


def test_soft_targets_follow_albef_formula_and_decompose_into_infonce_plus_kl():
    img, txt = paired()
    img_m, txt_m = paired(seed=5)
    a = 0.4
    out = GlobalContrastiveLoss(soft_alpha=a, knowledge_negatives=False)(img, txt, SCALE, img_m, txt_m)
    eye = torch.eye(8)
    p_i2t_m = (SCALE * img_m @ txt_m.T).softmax(1)
    p_t2i_m = (SCALE * txt_m @ img_m.T).softmax(1)
    logp_i2t = (SCALE * img @ txt.T).log_softmax(1)
    logp_t2i = (SCALE * txt @ img.T).log_softmax(1)
    expected = 0.5 * (
        -(((1 - a) * eye + a * p_i2t_m) * logp_i2t).sum(1).mean()
        - (((1 - a) * eye + a * p_t2i_m) * logp_t2i).sum(1).mean()
    )
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    # (1-a)*InfoNCE + a*(KL(p_m || p) + H(p_m)): the KL term is what the divergence encoder adds.
    entropy = 0.5 * (-(p_i2t_m * p_i2t_m.log()).sum(1).mean() - (p_t2i_m * p_t2i_m.log()).sum(1).mean())
    infonce = direct_infonce(img, txt, float(SCALE))
    assert torch.allclose(out["loss"], (1 - a) * infonce + a * (out["kl_online_momentum"] + entropy), atol=1e-4)


def test_same_finding_set_needs_equal_nonempty_positive_sets():
    lab = labels_from_sets([{1, 4}, {1, 4}, {1}, set(), set(), {8}, {8}, {13}])
    lab[2, 4] = -1.0  # uncertain is not positive: row 2 stays {1}
    lab[3, 4] = float("nan")
    same = same_finding_set(lab)
    assert same[0, 1] and same[1, 0] and same[0, 0]
    assert not same[0, 2] and not same[2, 0]
    assert not same[3, 4] and not same[3, 3]  # empty sets are never "the same finding set"
    # "No Finding" (column 8) says the set is empty: two normal studies are not guarded from each other
    assert CHEXPERT_14[8] == "No Finding"
    assert not same[5, 6] and not same[5, 5] and not same[5, 3]
    assert same[7, 7] and not same[7, 0]  # Support Devices is a finding like any other
    with pytest.raises(ValueError, match="CHEXPERT_14"):
        same_finding_set(lab[:, :13])


def test_knowledge_guard_removes_same_finding_pairs_from_the_negatives():
    img, txt = paired(B=6)
    lab = labels_from_sets([{1}, {1}, {8}, {8}, set(), {2}])  # 0 and 1 share Cardiomegaly; 2, 3 are normal
    out = GlobalContrastiveLoss(soft_alpha=0.0, knowledge_negatives=True)(img, txt, SCALE, labels=lab)
    logits = SCALE * img @ txt.T
    keep = ~same_finding_set(lab) | torch.eye(6, dtype=torch.bool)
    rows = []
    for i in range(6):
        for mat in (logits, logits.T):
            row = mat[i][keep[i]]
            pos = int(keep[i][: i + 1].sum()) - 1  # index of the diagonal among the kept columns
            rows.append(-row[pos] + torch.logsumexp(row, 0))
    assert torch.allclose(out["loss"], torch.stack(rows).mean(), atol=1e-5)
    assert out["guarded_fraction"] == pytest.approx(2 / 36)
    # a guarded column can move anywhere without changing the loss of the other row
    txt2 = txt.clone()
    txt2[1] = unit(16, seed=9)
    out2 = GlobalContrastiveLoss(soft_alpha=0.0, knowledge_negatives=True)(img, txt2, SCALE, labels=lab)
    row0 = lambda t: -(SCALE * img[0] @ t[0]) + torch.logsumexp(SCALE * img[0] @ t[[0, 2, 3, 4, 5]].T, 0)
    assert torch.allclose(row0(txt), row0(txt2))
    assert not torch.allclose(out["loss"], out2["loss"])  # ...while row 1 itself did change


def test_global_loss_aligned_pairs_lower_than_shuffled():
    img, txt = paired(B=16)
    img_m, txt_m = paired(B=16, seed=3)
    loss_fn = GlobalContrastiveLoss(soft_alpha=0.4, knowledge_negatives=True)
    lab = labels_from_sets([{i % 5} for i in range(16)])
    aligned = loss_fn(img, txt, SCALE, img, txt, lab)["loss"]
    perm = torch.roll(torch.arange(16), 1)
    shuffled = loss_fn(img, txt[perm], SCALE, img, txt[perm], lab)["loss"]
    assert aligned < shuffled


def test_global_loss_is_invariant_to_batch_permutation():
    img, txt = paired(B=10)
    img_m, txt_m = paired(B=10, seed=3)
    lab = labels_from_sets([{i % 3} for i in range(10)])
    loss_fn = GlobalContrastiveLoss(soft_alpha=0.4, knowledge_negatives=True)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    a = loss_fn(img, txt, SCALE, img_m, txt_m, lab)["loss"]
    b = loss_fn(img[perm], txt[perm], SCALE, img_m[perm], txt_m[perm], lab[perm])["loss"]
    assert torch.allclose(a, b, atol=1e-5)


def test_convirt_weights_image_to_text_by_lambda_and_gloria_mgca_sum_both_directions():
    img, txt = paired(B=8, noise=0.6)
    logits = SCALE * img @ txt.T
    target = torch.arange(8)
    l_i2t = F.cross_entropy(logits, target)  # ConVIRT l(v->u): each image over the reports
    l_t2i = F.cross_entropy(logits.T, target)
    assert not torch.allclose(l_i2t, l_t2i, atol=1e-3)  # the test can tell the directions apart
    convirt = GlobalContrastiveLoss(0.0, False, i2t_weight=0.75)(img, txt, SCALE)
    assert torch.allclose(convirt["loss"], 0.75 * l_i2t + 0.25 * l_t2i, atol=1e-5)
    assert torch.allclose(convirt["loss_i2t"], l_i2t, atol=1e-5)
    summed = GlobalContrastiveLoss(0.0, False, i2t_weight=1.0, t2i_weight=1.0)(img, txt, SCALE)["loss"]
    assert torch.allclose(summed, l_i2t + l_t2i, atol=1e-5)


def test_alpha_argument_overrides_soft_alpha_for_one_call():
    img, txt = paired()
    img_m, txt_m = paired(seed=5)
    warm = GlobalContrastiveLoss(soft_alpha=0.4, knowledge_negatives=False)
    for a in (0.0, 0.1, 0.4):
        fixed = GlobalContrastiveLoss(soft_alpha=a, knowledge_negatives=False)(img, txt, SCALE, img_m, txt_m)["loss"]
        assert torch.allclose(warm(img, txt, SCALE, img_m, txt_m, alpha=a)["loss"], fixed, atol=1e-6)
    # ALBEF's epoch-0 ramp alpha * min(1, i / len(loader)): step 0 is plain InfoNCE, and the loss moves with it
    step0 = warm(img, txt, SCALE, img_m, txt_m, alpha=0.0)["loss"]
    assert torch.allclose(step0, direct_infonce(img, txt, float(SCALE)), atol=1e-5)
    ramp = warm(img, txt, SCALE, img_m, txt_m, alpha=0.2)["loss"]
    assert not torch.allclose(ramp, warm(img, txt, SCALE, img_m, txt_m)["loss"])


# ---------------------------------------------------------------------------------------------
# Local


def local_inputs(B: int = 4, L: int = 12, P: int = 9, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    patches = unit(B, P, d, seed=seed)
    # tokens near some patch of their own image, so alignment is learnable
    idx = torch.randint(0, P, (B, L), generator=g)
    tokens = F.normalize(patches[torch.arange(B)[:, None], idx] + 0.3 * torch.randn(B, L, d, generator=g), dim=-1)
    lengths = torch.tensor([L, L - 3, L - 5, 4][:B])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    entity = torch.full((B, L), -1)
    entity[:, 1] = 3
    return tokens, patches, mask, entity


def test_local_loss_vectorised_equals_per_sample_loop():
    tokens, patches, mask, entity = local_inputs()
    w = local_token_weights(mask, entity, 2.0)
    vec = LocalAlignmentLoss(0.1)(tokens, patches, mask, w)["loss"]
    loop = local_alignment_loop(tokens, patches, mask, w, 0.1)
    assert torch.allclose(vec, loop, atol=1e-5)


def test_padding_tokens_do_not_change_the_local_loss():
    tokens, patches, mask, entity = local_inputs()
    w = local_token_weights(mask, entity, 2.0)
    base = LocalAlignmentLoss(0.1)(tokens, patches, mask, w)["loss"]
    # overwrite the padded positions with garbage and append 5 more padded positions
    g = torch.Generator().manual_seed(7)
    tokens2 = tokens.clone()
    tokens2[~mask] = unit(int((~mask).sum()), 16, seed=11)
    tokens2 = torch.cat([tokens2, unit(4, 5, 16, seed=12)], 1)
    mask2 = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], 1)
    entity2 = torch.cat([entity, torch.randint(0, 5, (4, 5), generator=g)], 1)
    w2 = local_token_weights(mask2, entity2, 2.0)
    padded = LocalAlignmentLoss(0.1)(tokens2, patches, mask2, w2)["loss"]
    assert torch.allclose(base, padded, atol=1e-6)
    gl = GloriaLocalLoss()
    assert torch.allclose(gl(tokens, patches, mask)["loss"], gl(tokens2, patches, mask2)["loss"], atol=1e-5)


def test_local_losses_aligned_lower_than_shuffled():
    tokens, patches, mask, entity = local_inputs(B=4, L=12, P=16)
    w = local_token_weights(mask, entity, 2.0)
    perm = torch.roll(torch.arange(4), 1)
    loc = LocalAlignmentLoss(0.1)
    assert loc(tokens, patches, mask, w)["loss"] < loc(tokens, patches[perm], mask, w)["loss"]
    gl = GloriaLocalLoss()
    # GLoRIA contrasts across the batch: shuffling which image is "paired" raises the loss
    assert gl(tokens, patches, mask)["loss"] < gl(tokens, patches[perm], mask)["loss"]


def test_local_losses_are_invariant_to_batch_permutation():
    tokens, patches, mask, entity = local_inputs()
    w = local_token_weights(mask, entity, 2.0)
    perm = torch.tensor([2, 0, 3, 1])
    loc = LocalAlignmentLoss(0.1)
    assert torch.allclose(loc(tokens, patches, mask, w)["loss"], loc(tokens[perm], patches[perm], mask[perm], w[perm])["loss"], atol=1e-6)
    gl = GloriaLocalLoss()
    assert torch.allclose(gl(tokens, patches, mask)["loss"], gl(tokens[perm], patches[perm], mask[perm])["loss"], atol=1e-5)


def test_gloria_loss_matches_a_per_pair_loop():
    tokens, patches, mask, _ = local_inputs(B=3)
    gl = GloriaLocalLoss(4.0, 5.0, 10.0)
    B = 3
    scores = torch.zeros(B, B)
    for t in range(B):
        w = tokens[t][mask[t]]  # (l, d)
        for i in range(B):
            raw = w @ patches[i].T  # (l, P)
            a = (raw.softmax(0) * 4.0).softmax(1)
            ctx = a @ patches[i]
            cos = F.cosine_similarity(w, ctx, dim=-1)
            scores[t, i] = torch.logsumexp(5.0 * cos, 0)
    target = torch.arange(B)
    expected = 0.5 * (F.cross_entropy(10 * scores, target) + F.cross_entropy(10 * scores.T, target))
    assert torch.allclose(gl(tokens, patches, mask)["loss"], expected, atol=1e-5)


def test_knowledge_tokens_weigh_more_and_padding_weighs_nothing():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    entity = torch.tensor([[-1, 4, -1, 2]])
    w = local_token_weights(mask, entity, 3.0)
    assert torch.allclose(w, torch.tensor([[0.2, 0.6, 0.2, 0.0]]))


# ---------------------------------------------------------------------------------------------
# MGCA: clipped attention weights and the patch->word direction


def mgca_clip_loop(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MGCA's per-sample clipping (mgca_module.py L140-152) with its torch.quantile, then renormalised."""
    out = []
    for a, m in zip(attn, mask):
        a = a.clone()
        lo, hi = torch.quantile(a[m], 0.1), torch.quantile(a[m], 0.9)
        a[m] = a[m].clip(lo, hi)
        a[~m] = 0
        out.append(a / a.sum())
    return torch.stack(out)


def test_clipped_attention_weights_equal_mgca_per_sample_quantiles():
    g = torch.Generator().manual_seed(4)
    attn = torch.rand(6, 20, generator=g) ** 3  # skewed, like [CLS] attention
    lengths = torch.tensor([20, 13, 7, 2, 1, 11])
    mask = torch.arange(20)[None] < lengths[:, None]
    mask[5] = torch.rand(20, generator=g) < 0.5  # not a prefix
    w = clipped_attention_weights(attn, mask)
    assert torch.allclose(w, mgca_clip_loop(attn, mask), atol=1e-6)
    assert torch.allclose(w.sum(1), torch.ones(6)) and (w[~mask] == 0).all()
    # clipping changed something: the largest raw weight is pulled down to the 90% quantile
    assert (w[0].max() / w[0].min()) < (attn[0].max() / attn[0].min())
    # ViT patches: no mask = all valid
    assert torch.allclose(clipped_attention_weights(attn), mgca_clip_loop(attn, torch.ones_like(mask)), atol=1e-6)


def mgca_local_loop(words, patches, mask, word_w, patch_w, tau=0.1, patch_direction=True):
    """MGCA's token-level loss written per sample (mgca_module.py L126-223, dot-product attention)."""
    B, P = patches.shape[:2]
    total = words.new_zeros(())
    for b in range(B):
        v = mask[b]
        t, wt, p = words[b][v], word_w[b][v], patches[b]
        for q, k, w in ((t, p, wt), (p, t, patch_w[b])) if patch_direction else ((t, p, wt),):
            attn = torch.softmax(q @ k.T / tau, dim=-1)
            c = F.normalize(attn @ k, dim=-1)
            s = q @ c.T / tau
            tgt = torch.arange(q.shape[0])
            total = total + 0.5 * ((w * F.cross_entropy(s, tgt, reduction="none")).sum()
                                   + (w * F.cross_entropy(s.T, tgt, reduction="none")).sum())
    return total / B


def mgca_inputs():
    tokens, patches, mask, _ = local_inputs(B=4, L=12, P=9)
    g = torch.Generator().manual_seed(8)
    word_w = clipped_attention_weights(torch.rand(4, 12, generator=g), mask)
    patch_w = clipped_attention_weights(torch.rand(4, 9, generator=g))
    return tokens, patches, mask, word_w, patch_w


def test_mgca_local_loss_vectorised_equals_per_sample_loop():
    tokens, patches, mask, word_w, patch_w = mgca_inputs()
    out = MGCALocalLoss(0.1)(tokens, patches, mask, word_w, patch_w)
    assert torch.allclose(out["loss"], mgca_local_loop(tokens, patches, mask, word_w, patch_w), atol=1e-5)
    assert torch.allclose(out["loss"], out["loss_word"] + out["loss_patch"], atol=1e-6)
    # a CNN tower has no [CLS] attention: None means uniform 1/P over patches
    uniform = torch.full((4, 9), 1 / 9)
    assert torch.allclose(MGCALocalLoss(0.1)(tokens, patches, mask, word_w)["loss"],
                          mgca_local_loop(tokens, patches, mask, word_w, uniform), atol=1e-5)
    # word direction alone is LocalAlignmentLoss
    word_only = MGCALocalLoss(0.1, patch_direction=False)(tokens, patches, mask, word_w)
    assert torch.allclose(word_only["loss"], LocalAlignmentLoss(0.1)(tokens, patches, mask, word_w)["loss"], atol=1e-6)


@pytest.mark.parametrize("normalize_patch_context", [True, False])
def test_local_losses_hand_written_backward_equals_autograd_of_the_per_sample_loops(normalize_patch_context):
    tokens, patches, mask, word_w, patch_w = (t.double() if t.is_floating_point() else t for t in mgca_inputs())
    word_w = word_w.clone().requires_grad_()  # weights get a gradient too when they carry one

    def grads(loss):
        return torch.autograd.grad(loss, [tokens, patches, word_w])

    tokens, patches = tokens.requires_grad_(), patches.requires_grad_()
    ours = LocalAlignmentLoss(0.1)(tokens, patches, mask, word_w)["loss"]
    ref = local_alignment_loop(tokens, patches, mask, word_w, 0.1)
    assert torch.allclose(ours, ref, atol=1e-12)
    g_ours = grads(ours)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g_ours, grads(ref)))
    assert g_ours[0][~mask].abs().max() == 0  # padding tokens get no gradient
    # both MGCA directions, the patch->word one with masked keys (padded words) and an unnormalised context
    out = MGCALocalLoss(0.1, normalize_patch_context=normalize_patch_context)(tokens, patches, mask, word_w, patch_w)
    words = tokens.detach().clone().requires_grad_()
    pat = patches.detach().clone().requires_grad_()
    ref = 0.0
    for b in range(4):
        v = mask[b]
        for q, k, w, norm in ((words[b][v], pat[b], word_w[b][v], True),
                              (pat[b], words[b][v], patch_w[b], normalize_patch_context)):
            c = torch.softmax(q @ k.T / 0.1, dim=-1) @ k
            s = q @ (F.normalize(c, dim=-1) if norm else c).T / 0.1
            tgt = torch.arange(q.shape[0])
            ref = ref + 0.5 * ((w * F.cross_entropy(s, tgt, reduction="none")).sum()
                               + (w * F.cross_entropy(s.T, tgt, reduction="none")).sum()) / 4
    assert torch.allclose(out["loss"], ref, atol=1e-12)
    ga = torch.autograd.grad(out["loss"], [tokens, patches, word_w])
    gb = torch.autograd.grad(ref, [words, pat, word_w])
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ga, gb))


def test_mgca_patch_direction_is_a_real_term_with_gradient_to_the_patches():
    tokens, patches, mask, word_w, patch_w = mgca_inputs()
    patches = patches.clone().requires_grad_()
    both = MGCALocalLoss(0.1)(tokens, patches, mask, word_w, patch_w)
    word_only = MGCALocalLoss(0.1, patch_direction=False)(tokens, patches, mask, word_w, patch_w)
    assert both["loss_patch"] > 0.1 and word_only["loss_patch"] == 0
    assert not torch.allclose(both["loss"], word_only["loss"])
    g_both = torch.autograd.grad(both["loss"], patches)[0]
    g_word = torch.autograd.grad(word_only["loss"], patches)[0]
    assert (g_both - g_word).abs().max() > 1e-3  # the patch->word term sends its own gradient to the patches
    # padded words are masked out of the patches' attention: garbage there changes nothing
    t2 = tokens.clone()
    t2[~mask] = unit(int((~mask).sum()), 16, seed=21)
    assert torch.allclose(MGCALocalLoss(0.1)(t2, patches, mask, word_w, patch_w)["loss"], both["loss"], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# GLoRIA on unnormalised features


def gloria_inputs(B=6, L=11, P=10, D=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = 3.0 * torch.randn(B, L, D, generator=g)  # unnormalised, as GLoRIA's BERT features
    regions = 2.0 * torch.randn(B, P, D, generator=g)
    lengths = torch.tensor([L, 3, 7, 1, 5, 9, 4, 8][:B])
    mask = torch.arange(L)[None] < lengths[:, None]
    mask[2] = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1, 0, 1, 0][:L]).bool()  # words need not be a prefix
    return words, regions, mask


@pytest.mark.parametrize("agg", ["sum", "mean"])
@pytest.mark.parametrize("chunk_words,cache", [(1, "raw+q"), (12, "raw"), (30, "none"), (10_000, "raw+q")])
def test_gloria_vectorised_equals_gloria_per_report_loop(agg, chunk_words, cache):
    words, regions, mask = gloria_inputs()
    w1, r1 = words.clone().requires_grad_(), regions.clone().requires_grad_()
    w2, r2 = words.clone().requires_grad_(), regions.clone().requires_grad_()
    vec = GloriaLocalLoss(agg=agg, chunk_words=chunk_words, cache=cache)(w1, r1, mask)["loss"]
    ref = gloria_local_loop(w2, r2, mask, agg=agg)
    assert torch.allclose(vec, ref, atol=1e-5)
    vec.backward()
    ref.backward()
    assert torch.allclose(w1.grad, w2.grad, atol=1e-5) and torch.allclose(r1.grad, r2.grad, atol=1e-5)
    assert r1.grad.abs().max() > 1e-4  # a real gradient, not zeros on both sides
    assert w1.grad[~mask].abs().max() == 0  # padding words get none
    with torch.no_grad():  # evaluation keeps no cache and gives the same value
        assert torch.allclose(GloriaLocalLoss(agg=agg, chunk_words=chunk_words, cache=cache)(w1, r1, mask)["loss"], ref)


def test_gloria_direction_weights_and_padding():
    words, regions, mask = gloria_inputs(seed=2)
    mean = GloriaLocalLoss()(words, regions, mask)
    summed = GloriaLocalLoss(i2t_weight=1.0, t2i_weight=1.0)(words, regions, mask)  # GLoRIA's l_loss0 + l_loss1
    assert torch.allclose(summed["loss"], mean["loss_i2t"] + mean["loss_t2i"], atol=1e-5)
    ref = gloria_local_loop(words, regions, mask, i2t_weight=1.0, t2i_weight=1.0)
    assert torch.allclose(summed["loss"], ref, atol=1e-5)
    garbage = words.clone()
    garbage[~mask] = 100.0 * torch.randn(int((~mask).sum()), 24)
    assert torch.allclose(GloriaLocalLoss()(garbage, regions, mask)["loss"], mean["loss"], atol=1e-5)
    with pytest.raises(ValueError, match="at least one word"):
        GloriaLocalLoss()(words, regions, mask & (torch.arange(6)[:, None] != 3))


def planted(normalise: bool):
    """Each word w of report b has its own region k(w) in image b, a scaled copy of the word; the other
    regions are weak noise."""
    B, L, P, D = 3, 6, 49, 64
    g = torch.Generator().manual_seed(5)
    words = torch.randn(B, L, D, generator=g)
    regions = 0.05 * torch.randn(B, P, D, generator=g)
    k = torch.stack([torch.randperm(P, generator=g)[:L] for _ in range(B)])  # (B, L) planted region per word
    regions[torch.arange(B)[:, None], k] = 3.0 * words
    mask = torch.ones(B, L, dtype=torch.bool)
    if normalise:
        words, regions = F.normalize(words, dim=-1), F.normalize(regions, dim=-1)
    return words, regions, mask, k


def test_gloria_attention_puts_its_weight_on_the_planted_region_of_each_word():
    words, regions, mask, k = planted(normalise=False)
    B, L, P = k.shape[0], k.shape[1], regions.shape[1]
    attn = gloria_attention(words, regions, 4.0, mask)  # (T, I, L, P)
    assert torch.allclose(attn.sum(-1), torch.ones(B, B, L), atol=1e-5)
    on_planted = attn[torch.arange(B), torch.arange(B)].gather(2, k[..., None]).squeeze(2)  # (B, L)
    assert (on_planted >= 10.0 / P).all()
    # the loss reports the same attention for the matched pairs (GLoRIA's att_maps)
    out = GloriaLocalLoss(chunk_words=7)(words, regions, mask)
    assert torch.allclose(out["attention"], attn[torch.arange(B), torch.arange(B)], atol=1e-6)
    # the reason inputs must not be normalised: on unit vectors the same attention is almost uniform
    wn, rn, _, _ = planted(normalise=True)
    flat = gloria_attention(wn, rn, 4.0, mask)[torch.arange(B), torch.arange(B)].gather(2, k[..., None])
    assert (flat < 3.0 / P).all()
    assert GloriaLocalLoss()(wn, rn, mask)["word_norm"] == pytest.approx(1.0)


def test_aggregate_wordpieces_sums_the_pieces_of_each_word_like_gloria():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 7, 5, generator=g).requires_grad_()
    # [CLS] pneu ##mo ##thorax is small [SEP] | [CLS] no effusion [SEP] [PAD] [PAD] [PAD]
    index = torch.tensor([[0, 1, 1, 1, 2, 3, -1], [0, 1, 2, -1, -1, -1, -1]])
    words, mask = aggregate_wordpieces(tokens, index)
    assert words.shape == (2, 4, 5)
    assert mask.tolist() == [[True] * 4, [True, True, True, False]]
    expected = torch.zeros(2, 4, 5)
    for b in range(2):  # GLoRIA's aggregate_tokens: torch.stack(token_bank).sum(axis=0), zero padding
        for j in range(7):
            if index[b, j] >= 0:
                expected[b, index[b, j]] += tokens[b, j].detach()
    assert torch.allclose(words, expected, atol=1e-6)
    assert torch.allclose(words[0, 1], tokens[0, 1:4].sum(0))
    words.sum().backward()
    assert tokens.grad[index >= 0].eq(1).all() and tokens.grad[index < 0].eq(0).all()


# ---------------------------------------------------------------------------------------------
# Category


def test_sinkhorn_is_doubly_stochastic():
    scores = unit(32, 16) @ unit(8, 16, seed=1).T  # (B=32, K=8)
    q = sinkhorn(scores, epsilon=0.05, iterations=100)
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-5)  # each sample's code is a distribution
    assert torch.allclose(q.sum(0), torch.full((8,), 32 / 8), atol=1e-3)  # equipartition over prototypes
    q3 = sinkhorn(scores, epsilon=0.05, iterations=3)  # the training setting: rows exact, columns close
    assert torch.allclose(q3.sum(1), torch.ones(32), atol=1e-5)
    # closer to equipartition than the plain softmax of the same sharpened scores
    assert (q3.sum(0) - 4).abs().max() < ((scores / 0.05).softmax(1).sum(0) - 4).abs().max()


def test_category_loss_aligned_lower_than_shuffled_and_permutation_invariant():
    img, txt = paired(B=16, noise=0.1)
    protos = unit(8, 16, seed=4)
    lab = labels_from_sets([{i % 4} for i in range(16)])
    loss_fn = CategoryLoss(temperature=0.2, supcon=True)
    aligned = loss_fn(img, txt, protos, lab)
    shuffled = loss_fn(img, txt[torch.roll(torch.arange(16), 3)], protos, lab)
    assert aligned["swapped"] < shuffled["swapped"]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    permuted = loss_fn(img[perm], txt[perm], protos, lab[perm])
    assert torch.allclose(aligned["loss"], permuted["loss"], atol=1e-5)


def test_supervised_contrastive_pulls_images_that_share_a_finding():
    lab = labels_from_sets([{1}, {1}, {2}, {2}])
    base = unit(2, 16, seed=3)
    grouped = F.normalize(base[[0, 0, 1, 1]] + 0.05 * unit(4, 16, seed=4), dim=-1)
    mixed = F.normalize(base[[0, 1, 0, 1]] + 0.05 * unit(4, 16, seed=4), dim=-1)
    assert supervised_contrastive(grouped, lab) < supervised_contrastive(mixed, lab)
    no_pos = labels_from_sets([{1}, {2}, set(), {3}])
    assert supervised_contrastive(grouped, no_pos) == 0.0
    # two normal ("No Finding") studies are not positives of each other
    normal = labels_from_sets([{8}, {8}, {8, 2}, {3}])
    assert supervised_contrastive(grouped, normal) == 0.0


# ---------------------------------------------------------------------------------------------
# Proxy tasks and gradients


def test_hard_negatives_are_never_the_positive_nor_a_guarded_pair():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 5
    exclude = torch.zeros(6, 6, dtype=torch.bool)
    exclude[0, 1] = exclude[1, 0] = True
    for _ in range(20):
        neg_t, neg_i = mine_hard_negatives(sim, exclude)
        assert (neg_t != torch.arange(6)).all() and (neg_i != torch.arange(6)).all()
        assert neg_t[0] != 1 and neg_i[0] != 1
    # all other samples guarded: fall back to any other sample rather than fail
    neg_t, _ = mine_hard_negatives(sim[:2, :2], torch.ones(2, 2, dtype=torch.bool))
    assert neg_t.tolist() == [1, 0]


def test_hard_negatives_follow_softmax_of_cosine_over_temperature():
    B = 64
    g = torch.Generator().manual_seed(0)
    sim = 0.02 * torch.randn(B, B, generator=g)  # cosine ~0 for unrelated pairs
    sim.fill_diagonal_(1.0)
    hard = (torch.arange(B) + 1) % B  # one planted look-alike per image (and, transposed, per text)
    sim[torch.arange(B), hard] = 0.9
    draws = 100

    def hits(temperature: float) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(1)
        t_hit = i_hit = 0
        for _ in range(draws):
            neg_t, neg_i = mine_hard_negatives(sim, temperature=temperature, generator=gen)
            assert (neg_t != torch.arange(B)).all()
            t_hit += int((neg_t == hard).sum())
            i_hit += int((hard[neg_i] == torch.arange(B)).sum())  # text j's look-alike image is j-1
        return t_hit / (draws * B), i_hit / (draws * B)

    uniform = 1 / (B - 1)
    t_rate, i_rate = hits(0.07)  # ALBEF: softmax(sim / temp), temp 0.07
    assert t_rate >= 10 * uniform and i_rate >= 10 * uniform
    t_flat, _ = hits(1.0)  # cosine without the temperature: barely above uniform
    assert t_flat < 4 * uniform
    # the generator makes the draws reproducible
    a = mine_hard_negatives(sim, generator=torch.Generator().manual_seed(9))
    b = mine_hard_negatives(sim, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_loss_term_has_finite_gradients():
    img, txt = paired(B=6)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    tokens, patches, mask, entity = local_inputs(B=4)
    tokens, patches = tokens.requires_grad_(), patches.requires_grad_()
    protos = unit(5, 16).requires_grad_()
    lab = labels_from_sets([{1}, {1}, {2}, set(), {3}, {1, 2}])
    scale = SCALE.clone().requires_grad_()
    losses = [
        GlobalContrastiveLoss(0.4, True)(img, txt, scale, img.detach(), txt.detach(), lab)["loss"],
        LocalAlignmentLoss()(tokens, patches, mask, local_token_weights(mask, entity, 2.0))["loss"],
        GloriaLocalLoss()(tokens, patches, mask)["loss"],
        MGCALocalLoss()(tokens, patches, mask, local_token_weights(mask, entity, 1.0))["loss"],
        CategoryLoss()(img, txt, protos, lab)["loss"],
    ]
    for loss in losses:
        grads = torch.autograd.grad(loss, [t for t in (img, txt, tokens, patches, protos, scale)], allow_unused=True)
        used = [g for g in grads if g is not None]
        assert used and all(torch.isfinite(g).all() for g in used)
        assert any(g.abs().sum() > 0 for g in used)


# ---------------------------------------------------------------------------------------------
# Distributed: two gloo processes vs one process on the full batch


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt = paired(B=8)
        img_m, txt_m = paired(B=8, seed=5)
        lab = labels_from_sets([{i % 3} for i in range(8)])
        sl = slice(rank * 4, rank * 4 + 4)
        x = img[sl].clone().requires_grad_()
        y = txt[sl].clone().requires_grad_()
        loss = GlobalContrastiveLoss(0.4, True)(x, y, SCALE, img_m[sl], txt_m[sl], lab[sl])["loss"]
        loss.backward()
        q = sinkhorn(img[sl] @ unit(4, 16, seed=4).T, 0.05, 3, world_size=world)
        torch.save({"loss": loss.detach(), "gx": x.grad, "gy": y.grad, "q": q}, f"{out_dir}/rank{rank}.pt")
        # Both ranks must be done with every collective before either tears gloo down: a rank that
        # destroys the group while its peer is still exchanging aborts the process (seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_global_loss_gathers_across_two_gloo_ranks_like_one_big_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    img, txt = paired(B=8)
    img_m, txt_m = paired(B=8, seed=5)
    lab = labels_from_sets([{i % 3} for i in range(8)])
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    full = GlobalContrastiveLoss(0.4, True)(x, y, SCALE, img_m, txt_m, lab)["loss"]
    full.backward()
    # the mean of the ranks' losses is the full-batch loss ...
    assert torch.allclose((r[0]["loss"] + r[1]["loss"]) / 2, full.detach(), atol=1e-5)
    # ... and each rank's shard gets world_size x its full-batch gradient (DDP then divides by 2)
    assert torch.allclose(torch.cat([r[0]["gx"], r[1]["gx"]]), 2 * x.grad, atol=1e-5)
    assert torch.allclose(torch.cat([r[0]["gy"], r[1]["gy"]]), 2 * y.grad, atol=1e-5)
    q_full = sinkhorn(img @ unit(4, 16, seed=4).T, 0.05, 3)
    assert torch.allclose(torch.cat([r[0]["q"], r[1]["q"]]), q_full, atol=1e-5)
