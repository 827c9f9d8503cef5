"""Section 2.1 losses (eqs. 1-5) and the re-weighted total (eq. 17), checked against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hrkd.errors import HRKDError
from hrkd.losses import (
    attention_loss,
    embedding_loss,
    hidden_loss,
    mse,
    soft_cross_entropy,
    total_kd_loss,
    uniform_layer_map,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_mse_hand_computed_2x3() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([[1.0, 0.0, 3.0], [2.0, 5.0, 9.0]])
    # differences [0, 2, 0], [2, 0, -3] -> squares 0 + 4 + 0 + 4 + 0 + 9 = 17 over 6 entries
    assert mse(a, b).item() == pytest.approx(17 / 6)


def test_mse_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        mse(torch.zeros(2, 3), torch.zeros(3, 2))


# E^S [1, 2, 2] projected to 3 teacher dims: W (nn.Linear layout [3, 2]) maps x to (x1, x2, x1 + x2).
STUDENT = torch.tensor([[[1.0, 2.0], [0.0, -1.0]]])
WEIGHT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
BIAS = torch.tensor([0.0, 0.0, 1.0])
TEACHER = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])


@pytest.mark.parametrize("loss", [embedding_loss, hidden_loss])
def test_projected_losses_hand_computed(loss) -> None:
    # No bias: projections [1, 2, 3] and [0, -1, -1]; minus teacher -> [0, 1, 2], [0, -1, -1];
    # squares 0 + 1 + 4 + 0 + 1 + 1 = 7 over 6 entries.
    assert loss(STUDENT, TEACHER, WEIGHT).item() == pytest.approx(7 / 6)
    # Bias adds 1 to the third dim: residuals [0, 1, 3], [0, -1, 0]; squares 0 + 1 + 9 + 0 + 1 + 0 = 11.
    assert loss(STUDENT, TEACHER, WEIGHT, BIAS).item() == pytest.approx(11 / 6)


def test_projection_gradients_hand_computed() -> None:
    weight = WEIGHT.clone().requires_grad_(True)
    bias = BIAS.clone().requires_grad_(True)
    embedding_loss(STUDENT, TEACHER, weight, bias).backward()
    # dL/dW = (2/6) R^T X with residuals R = [[0, 1, 3], [0, -1, 0]] and X = [[1, 2], [0, -1]]:
    # teacher dim 0: 0; dim 1: 1*[1, 2] - 1*[0, -1] = [1, 3]; dim 2: 3*[1, 2] = [3, 6]; times 1/3.
    assert torch.allclose(weight.grad, torch.tensor([[0.0, 0.0], [1 / 3, 1.0], [1.0, 2.0]]))
    # dL/db = (2/6) * column sums of R = (1/3) * [0, 0, 3]
    assert torch.allclose(bias.grad, torch.tensor([0.0, 0.0, 1.0]))


def test_projection_rejects_wrong_layout() -> None:
    with pytest.raises(ValueError, match="teacher_dim, student_dim"):
        embedding_loss(STUDENT, TEACHER, WEIGHT.T)


# Scores [B=1, h=2, L=3]; token 3 is padding (mask [1, 1, 0]); column 3 holds junk values.
S_SCORES = torch.tensor([[[[1.0, 2.0, 7.0], [0.0, 1.0, 7.0], [2.0, 2.0, 7.0]],
                          [[2.0, 0.0, 5.0], [0.0, 0.0, 5.0], [0.0, 3.0, 5.0]]]])
T_SCORES = torch.tensor([[[[0.0, 2.0, -1.0], [0.0, 0.0, -1.0], [1.0, 2.0, -1.0]],
                          [[0.0, 0.0, 4.0], [0.0, 0.0, 4.0], [0.0, 1.0, 4.0]]]])
MASK = torch.tensor([[1, 1, 0]])


def test_attention_loss_hand_computed() -> None:
    # With key column 3 zeroed: head 1 differences [[1,0,0],[0,1,0],[1,0,0]] -> squares sum 3;
    # head 2 differences [[2,0,0],[0,0,0],[0,2,0]] -> 4 + 4 = 8.
    # (1/h) sum_i MSE_i = (1/2)(3/9 + 8/9) = 11/18.
    assert attention_loss(S_SCORES, T_SCORES, MASK).item() == pytest.approx(11 / 18)
    # mask_queries also drops query row 3: head 1 loses its [1,0,0] row (3 -> 2), head 2 its
    # [0,2,0] row (8 -> 4): (2 + 4) / 18.
    assert attention_loss(S_SCORES, T_SCORES, MASK, mask_queries=True).item() == pytest.approx(6 / 18)


def test_attention_loss_equals_mean_of_per_head_mse() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    keep = mask.bool()[:, None, None, :]
    s, t = student * keep, teacher * keep
    per_head = sum(F.mse_loss(s[:, i], t[:, i]) for i in range(3)) / 3
    assert attention_loss(student, teacher, mask).item() == pytest.approx(per_head.item(), rel=1e-6)
    assert attention_loss(student, teacher, mask).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-6)


def test_attention_loss_matches_tinybert_replace_mask_convention() -> None:
    # The authors add -10000 at padded keys, then set every entry <= -100 to 0, then nn.MSELoss.
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 2, 5, 5, generator=gen), torch.randn(2, 2, 5, 5, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    additive = (1 - mask)[:, None, None, :] * -10000.0

    def replace(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x <= -100, torch.zeros_like(x), x)

    authors = F.mse_loss(replace(student + additive), replace(teacher + additive))
    assert attention_loss(student, teacher, mask).item() == pytest.approx(authors.item(), rel=1e-6)


def test_attention_loss_ignores_padded_keys_only() -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(1, 2, 3, 3, generator=gen), torch.randn(1, 2, 3, 3, generator=gen)
    base = attention_loss(student, teacher, MASK)

    padded_key = student.clone()
    padded_key[..., 2] += 100.0
    assert attention_loss(padded_key, teacher, MASK).item() == pytest.approx(base.item())

    real_entry = student.clone()
    real_entry[0, 1, 0, 1] += 1.0
    assert attention_loss(real_entry, teacher, MASK).item() != pytest.approx(base.item())

    # A padded query row at a real key counts by default and is dropped by mask_queries.
    padded_query = student.clone()
    padded_query[0, 0, 2, 0] += 1.0
    assert attention_loss(padded_query, teacher, MASK).item() != pytest.approx(base.item())
    assert attention_loss(padded_query, teacher, MASK, mask_queries=True).item() == pytest.approx(
        attention_loss(student, teacher, MASK, mask_queries=True).item()
    )


def test_attention_loss_gradients_skip_padded_keys() -> None:
    student = torch.randn(1, 2, 3, 3, requires_grad=True)
    attention_loss(student, torch.randn(1, 2, 3, 3), MASK).backward()
    assert torch.all(student.grad[..., 2] == 0)
    assert torch.all(student.grad[..., :2] != 0)


def test_attention_loss_rejects_bad_mask() -> None:
    with pytest.raises(ValueError, match="attention_mask"):
        attention_loss(S_SCORES, T_SCORES, torch.ones(1, 4))


def test_soft_cross_entropy_hand_computed_2x3() -> None:
    # Row 1: teacher p = [1/3, 1/3, 1/3], student q = [1/4, 1/4, 1/2] (logit ln 2 on class 3):
    #   CE = -(1/3)(ln 1/4 + ln 1/4 + ln 1/2) = (1/3)(5 ln 2).
    # Row 2: teacher logits [ln 2, 0, 0] -> p = [1/2, 1/4, 1/4], student q uniform: CE = ln 3.
    student = torch.tensor([[0.0, 0.0, LN2], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]])
    expected = (5 * LN2 / 3 + LN3) / 2
    assert soft_cross_entropy(student, teacher).item() == pytest.approx(expected)
    # The authors' mean over classes as well divides by C = 3.
    assert soft_cross_entropy(student, teacher, class_mean=True).item() == pytest.approx(expected / 3)


def test_soft_cross_entropy_temperature_divides_both_logits() -> None:
    # t = 2 turns teacher logits [2 ln 2, 0, 0] into [ln 2, 0, 0] (p = [1/2, 1/4, 1/4]); the
    # uniform student stays uniform: CE = ln 3. At t = 1 p = [4/6, 1/6, 1/6] and CE is still ln 3,
    # so also check a non-uniform student: logits [2 ln 2, 0, 0] / 2 -> q = p, CE = entropy(p).
    teacher = torch.tensor([[2 * LN2, 0.0, 0.0]])
    assert soft_cross_entropy(torch.zeros(1, 3), teacher, 2.0).item() == pytest.approx(LN3)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # = 1.5 ln 2
    assert soft_cross_entropy(teacher, teacher, 2.0).item() == pytest.approx(entropy)
    assert soft_cross_entropy(teacher, teacher, 1.0).item() != pytest.approx(entropy)


def test_soft_cross_entropy_rejects_nonpositive_temperature() -> None:
    with pytest.raises(HRKDError, match="temperature"):
        soft_cross_entropy(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


# D = 2 domains, M = 2 student layers.
EMBD = torch.tensor([1.0, 2.0])
ATTN = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
HIDN = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
PRED = torch.tensor([3.0, 5.0])


def test_total_kd_loss_eq5_hand_computed() -> None:
    # embd 1 + 2 = 3; attn 1 + 0 + 2 + 1 = 4; hidn 0 + 1 + 1 + 1 = 3; gamma * pred = 2 * 8 = 16.
    assert total_kd_loss(EMBD, ATTN, HIDN, PRED, gamma=2.0).item() == pytest.approx(26.0)


def test_total_kd_loss_eq17_hand_computed() -> None:
    ratios = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    # r_0 . embd = 0.5 + 1 = 1.5; layer 1: (attn + hidn) = [1, 1] -> 0.25 + 0.75 = 1;
    # layer 2: [3, 2] -> 3 + 0 = 3; (gamma / D) sum pred = (2 / 2) * 8 = 8. Total 13.5.
    assert total_kd_loss(EMBD, ATTN, HIDN, PRED, 2.0, ratios).item() == pytest.approx(13.5)


def test_total_kd_loss_eq17_with_unit_ratios_differs_from_eq5_only_in_pred_weight() -> None:
    ones = torch.ones(3, 2)
    # With every r = 1, eq. 17 is eq. 5 except gamma -> gamma / D: 26 - 16 + 8 = 18.
    assert total_kd_loss(EMBD, ATTN, HIDN, PRED, 2.0, ones).item() == pytest.approx(18.0)


def test_total_kd_loss_gradient_reaches_ratios() -> None:
    ratios = torch.full((3, 2), 0.5, requires_grad=True)
    total_kd_loss(EMBD, ATTN, HIDN, PRED, 2.0, ratios).backward()
    # d/dr_{0,d} = L_embd^d; d/dr_{m,d} = L_attn^{m,d} + L_hidn^{m,d}.
    assert torch.equal(ratios.grad, torch.tensor([[1.0, 2.0], [1.0, 1.0], [3.0, 2.0]]))


def test_total_kd_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="ratios"):
        total_kd_loss(EMBD, ATTN, HIDN, PRED, 1.0, torch.ones(2, 2))
    with pytest.raises(ValueError, match="attn and hidn"):
        total_kd_loss(EMBD, ATTN, HIDN[:1], PRED, 1.0)


def test_losses_do_not_modify_inputs() -> None:
    tensors = [S_SCORES.clone(), T_SCORES.clone(), STUDENT.clone(), TEACHER.clone(), WEIGHT.clone(), BIAS.clone()]
    attention_loss(tensors[0], tensors[1], MASK, mask_queries=True)
    embedding_loss(tensors[2], tensors[3], tensors[4], tensors[5])
    soft_cross_entropy(tensors[0][0, 0], tensors[1][0, 0], 2.0)
    for after, before in zip(tensors, [S_SCORES, T_SCORES, STUDENT, TEACHER, WEIGHT, BIAS]):
        assert torch.equal(after, before)


@pytest.mark.parametrize(
    ("student", "teacher", "expected"),
    [
        (4, 12, [3, 6, 9, 12]),
        (6, 12, [2, 4, 6, 8, 10, 12]),
        (5, 12, [2, 4, 6, 8, 10]),  # 12 // 5 = 2: teacher layers 11-12 unused
        (3, 8, [2, 4, 6]),  # floored, not rounded (round(8 / 3) = 3 would give [3, 6, 9])
        (2, 2, [1, 2]),
    ],
)
def test_uniform_layer_map(student: int, teacher: int, expected: list[int]) -> None:
    assert uniform_layer_map(student, teacher) == expected


@pytest.mark.parametrize(("student", "teacher"), [(0, 12), (5, 4)])
def test_uniform_layer_map_rejects_impossible_shapes(student: int, teacher: int) -> None:
    with pytest.raises(HRKDError, match="uniform layer mapping"):
        uniform_layer_map(student, teacher)
