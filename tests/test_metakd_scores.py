"""Transferability scores t_i (Meta-KD spec 1a): both variants against cosines worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel

from hrkd.data.loading import EncodedSplit
from hrkd.errors import HRKDError
from hrkd.metakd.scores import embed_rows, gather_scores, score, transferability_code, transferability_paper

R2 = math.sqrt(2.0)


def test_code_variant_uses_the_cosine_to_the_mean_of_the_other_centroids():
    # 2-D, three domains: c0 = mean([2,0],[0,2]) = [1,1], c1 = [1,0], c2 = [0,3].
    emb = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0]])
    dom = torch.tensor([0, 0, 1, 2])
    t = transferability_code(emb, dom, 3)
    # Row [2,0] of domain 0: cos(., [1,1]) = 1/sqrt2; others' mean [0.5, 1.5]: cos = 1/(2 sqrt 2.5).
    row0 = 0.5 / R2 + 0.5 * 1.0 / (2 * math.sqrt(2.5))
    # Row [1,0] of domain 1: cos(., [1,0]) = 1; others' mean ([1,1]+[0,3])/2 = [0.5, 2]: cos = 0.5/sqrt(4.25).
    row2 = 0.5 * 1.0 + 0.5 * 0.5 / math.sqrt(4.25)
    # Row [0,3] of domain 2: cos(., [0,3]) = 1; others' mean ([1,1]+[1,0])/2 = [1, 0.5]: cos = 0.5/sqrt(1.25).
    row3 = 0.5 + 0.5 * 0.5 / math.sqrt(1.25)
    torch.testing.assert_close(t[[0, 2, 3]], torch.tensor([row0, row2, row3]), rtol=1e-6, atol=1e-6)
    # NOT the mean of the cosines (= 0.5/sqrt2 + 0.5 * (1 + 0)/2 for row 0).
    assert abs(t[0].item() - (0.5 / R2 + 0.25)) > 0.05
    # alpha / zeta weight the two terms.
    t2 = transferability_code(emb, dom, 3, alpha=1.0, zeta=0.0)
    assert t2[0].item() == pytest.approx(1 / R2, rel=1e-6)


def paper_toy():
    # 3-D, three domains, two labels. Prototypes: P00 = mean([1,0,0],[0,0,1]) = [.5,0,.5], P01 = [0,1,0],
    # P10 = [1,1,0], P11 = [0,0,1], P20 = [0,1,0], P21 = [0,1,1].
    emb = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0],   # domain 0: a (y0), b (y0), c (y1)
                        [1.0, 1.0, 0], [0, 0, 1.0],             # domain 1: d (y0), e (y1)
                        [0, 1.0, 0], [0, 1.0, 1.0]])            # domain 2: f (y0), g (y1)
    dom = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    lab = torch.tensor([0, 0, 1, 0, 1, 0, 1])
    return emb, dom, lab


def test_paper_variant_uses_per_class_per_domain_prototypes_and_the_mean_of_cosines():
    emb, dom, lab = paper_toy()
    t = transferability_paper(emb, dom, lab, 3, 2)
    a = 0.5 * (1 / R2) + 0.25 * (1 / R2 + 0.0)           # cos(a,P00) ; cos(a,P10), cos(a,P20)
    b = 0.5 * (1 / R2) + 0.25 * (0.0 + 0.0)
    c = 0.5 * 1.0 + 0.25 * (0.0 + 1 / R2)                 # own P01 ; P11, P21
    d = 0.5 * 1.0 + 0.25 * (0.5 + 1 / R2)                 # cos([1,1,0],[.5,0,.5]) = 0.5 ; cos(d, P20) = 1/sqrt2
    torch.testing.assert_close(t[:4], torch.tensor([a, b, c, d]), rtol=1e-6, atol=1e-6)
    # alpha=1, zeta=0: only the own-domain prototype.
    own = transferability_paper(emb, dom, lab, 3, 2, alpha=1.0, zeta=0.0)
    torch.testing.assert_close(own[:4], torch.tensor([1 / R2, 1 / R2, 1.0, 1.0]), rtol=1e-6, atol=1e-6)
    # The code variant ignores labels, so it gives other numbers on the same rows.
    assert (transferability_code(emb, dom, 3) - t).abs().max() > 0.05


def test_paper_variant_skips_domains_without_the_class():
    emb, dom, lab = paper_toy()
    keep = torch.arange(6)  # drop g: domain 2 has no label-1 row, so no P21
    t = transferability_paper(emb[keep], dom[keep], lab[keep], 3, 2)
    assert t[2].item() == pytest.approx(0.5 * 1.0 + 0.5 * 0.0, abs=1e-6)  # c: only P11 left, cos 0
    assert t[4].item() == pytest.approx(0.5 * 1.0 + 0.5 * 0.0, abs=1e-6)  # e: only P01 left, cos 0
    # A label no other domain has: the cross term falls back to the own-domain cosine.
    lonely = transferability_paper(emb[:3], torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1]), 2, 2)
    assert lonely[2].item() == pytest.approx(1.0, abs=1e-6)


def test_score_dispatch_and_errors():
    emb, dom, lab = paper_toy()
    torch.testing.assert_close(score(emb, dom, lab, 3, 2, "code", 0.5, 0.5), transferability_code(emb, dom, 3))
    with pytest.raises(HRKDError, match="variant"):
        score(emb, dom, lab, 3, 2, "prototype", 0.5, 0.5)
    with pytest.raises(HRKDError, match="at least 2 domains"):
        transferability_code(emb, torch.zeros(7, dtype=torch.long), 1)
    with pytest.raises(HRKDError, match="needs training rows"):
        transferability_code(emb, torch.zeros(7, dtype=torch.long), 2)


def test_gather_scores_follows_collate_order():
    scores = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.7, 0.8])]
    step = [(1, torch.tensor([1, 0])), (0, torch.tensor([2]))]
    torch.testing.assert_close(gather_scores(scores, step), torch.tensor([0.8, 0.7, 0.3]))


def tiny_split(n=5, width=8):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([8, 3, 5, 2, 6], dtype=torch.int32)[:n]
    ids = torch.randint(5, 30, (n, width), generator=g, dtype=torch.int32)
    ids[:, 0] = 2
    ids[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    return EncodedSplit(ids, torch.zeros_like(ids, dtype=torch.int8), lengths, torch.zeros(n, dtype=torch.long))


def test_embed_rows_is_the_full_width_mean_over_positions_1_and_batching_does_not_matter():
    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=8)).eval()
    split = tiny_split()
    mask = (torch.arange(8)[None, :] < split.lengths[:, None]).long()
    with torch.no_grad():
        full = enc(input_ids=split.input_ids.long(), attention_mask=mask,
                   token_type_ids=split.token_type_ids.long()).last_hidden_state
    padded = full[:, 1:].mean(1)  # every position 1..7, padding included (the authors' E(x))
    real = torch.stack([full[i, 1:int(n)].mean(0) for i, n in enumerate(split.lengths)])  # real tokens only
    for bs in (1, 2, 5):
        torch.testing.assert_close(embed_rows(enc, split, bs, torch.device("cpu")), padded, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(embed_rows(enc, split, bs, torch.device("cpu"), mask_padding=True), real,
                                   rtol=1e-4, atol=1e-5)
    assert (padded - real).abs().max() > 1e-3  # the option matters
