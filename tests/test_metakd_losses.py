"""Meta-KD loss functions against numbers worked out by hand (hrkd/metakd/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from hrkd.errors import HRKDError
from hrkd.losses import attention_loss, soft_cross_entropy
from hrkd.metakd.losses import (
    expertise_weights,
    masked_positions_mean,
    meta_teacher_loss,
    per_example_attention_mse,
    per_example_mse,
    per_example_soft_ce,
    weighted_mean,
)

LN3 = math.log(3.0)


def test_positions_mean_drops_cls_and_includes_padding_unless_masked():
    hidden = torch.tensor([[[10.0, 1.0], [2.0, 0.0], [4.0, 6.0]]])  # [1, 3, 2]; position 0 is [CLS]
    torch.testing.assert_close(masked_positions_mean(hidden), torch.tensor([[3.0, 3.0]]))  # (2+4)/2, (0+6)/2
    mask = torch.tensor([[1, 1, 0]])  # position 2 is padding
    torch.testing.assert_close(masked_positions_mean(hidden, mask), torch.tensor([[2.0, 0.0]]))
    torch.testing.assert_close(masked_positions_mean(hidden, skip_first=False), torch.tensor([[16 / 3, 7 / 3]]))
    only_cls = torch.tensor([[1, 0, 0]])
    torch.testing.assert_close(masked_positions_mean(hidden, only_cls), torch.tensor([[0.0, 0.0]]))


def test_meta_teacher_loss_weights_each_row_and_its_domain_term():
    # Row 1: softmax([0, ln3]) = [1/4, 3/4], label 1 -> CE = ln(4/3); domain logits [0, 0] -> CE = ln 2.
    # Row 2: same task logits, label 0 -> CE = ln 4; domain logits [ln3, 0], corrupted target 1 -> CE = ln 4.
    logits = torch.tensor([[0.0, LN3], [0.0, LN3]])
    labels = torch.tensor([1, 0])
    q = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    z = torch.tensor([0, 1])
    t = torch.tensor([0.5, 1.0])
    loss, ce, da = meta_teacher_loss(logits, labels, q, z, t, 0.5)
    l1 = math.log(4 / 3) + 0.5 * math.log(2)
    l2 = math.log(4) + 0.5 * math.log(4)
    assert loss.item() == pytest.approx((0.5 * l1 + 1.0 * l2) / 2, rel=1e-6)  # t_i scales the domain term too
    assert ce.item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)
    assert da.item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    # gamma1 = 0: the released Amazon script (domain loss off); no branch outputs needed.
    loss0, _, da0 = meta_teacher_loss(logits, labels, None, None, t, 0.0)
    assert loss0.item() == pytest.approx((0.5 * math.log(4 / 3) + math.log(4)) / 2, rel=1e-6) and da0.item() == 0.0
    with pytest.raises(ValueError, match="domain_logits"):
        meta_teacher_loss(logits, labels, None, None, t, 0.5)


def test_expertise_weights_formula():
    t = torch.tensor([1.0, 0.5, 0.9, 0.2])
    logits = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [0.0, LN3]])
    labels = torch.tensor([0, 0, 0, 1])
    lam = expertise_weights(logits, labels, t)
    # p = 1/2, ~1, ~0, 3/4
    expected = [2.0 / (1 + math.exp(0.25)), 1.5 / 2, 1.9 / (1 + math.e), 1.2 / (1 + math.exp(1 / 16))]
    torch.testing.assert_close(lam, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert not lam.requires_grad


def test_weighted_mean_is_per_example_not_mean_of_weights_times_mean_loss():
    # The EasyNLP bug: reducing the loss over the batch first gives mean(lambda) * mean(L).
    losses = torch.tensor([1.0, 3.0])
    lam = torch.tensor([0.2, 1.8])
    assert weighted_mean(losses, lam).item() == pytest.approx((0.2 * 1 + 1.8 * 3) / 2)  # = 2.8
    assert weighted_mean(losses, lam).item() != pytest.approx(lam.mean().item() * losses.mean().item())  # = 2.0
    with pytest.raises(ValueError, match=r"\[B\]"):
        weighted_mean(torch.ones(2, 1), torch.ones(2))


def test_per_example_mse_by_hand():
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 3.0]]])
    torch.testing.assert_close(per_example_mse(a, b), torch.tensor([4 / 4, (1 + 1 + 1 + 9) / 4]))
    with pytest.raises(ValueError, match="shapes differ"):
        per_example_mse(a, b[:1])


def test_per_example_attention_zeroes_padded_keys_and_averages_heads_and_cells():
    s = torch.zeros(2, 1, 2, 2)
    t = torch.ones(2, 1, 2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    # Row 0: all 4 cells differ by 1 -> 1. Row 1: key column 1 zeroed in both -> 2 of 4 cells -> 0.5.
    torch.testing.assert_close(per_example_attention_mse(s, t, mask), torch.tensor([1.0, 0.5]))
    # mask_queries also zeroes query row 1 of row 1 -> 1 of 4 cells.
    torch.testing.assert_close(per_example_attention_mse(s, t, mask, mask_queries=True), torch.tensor([1.0, 0.25]))


def test_per_example_terms_average_to_the_batch_losses_of_hrkd_losses():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    for mq in (False, True):
        torch.testing.assert_close(per_example_attention_mse(s, t, mask, mask_queries=mq).mean(),
                                   attention_loss(s, t, mask, mask_queries=mq))
    zs, zt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    for temp, cm in ((1.0, False), (2.0, True)):
        torch.testing.assert_close(per_example_soft_ce(zs, zt, temp, class_mean=cm).mean(),
                                   soft_cross_entropy(zs, zt, temp, class_mean=cm))


def test_per_example_soft_ce_by_hand():
    # teacher p = [1/2, 1/2]; student log-softmax([0, ln3]) = [ln 1/4, ln 3/4]
    value = per_example_soft_ce(torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]]))
    assert value.item() == pytest.approx(0.5 * (math.log(4) + math.log(4 / 3)), rel=1e-6)
    halved = per_example_soft_ce(torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]]), class_mean=True)
    assert halved.item() == pytest.approx(value.item() / 2, rel=1e-6)
    with pytest.raises(HRKDError, match="temperature"):
        per_example_soft_ce(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)
