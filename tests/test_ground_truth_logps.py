"""robalign.ground_truth.sequence_logps and friends against closed forms."""

import math

import pytest
import torch

from robalign import ground_truth
from conftest import packed_from_padded, random_batch


def test_hand_computed_two_tokens():
    # one sequence, V = 2: logits [0, ln 3] -> p = [1/4, 3/4]; second token ignored
    logits = torch.tensor([[[0.0, math.log(3)], [5.0, -1.0], [1.0, 1.0]]], dtype=torch.float64)
    labels = torch.tensor([[1, -100, 0]])
    logps, counts = ground_truth.sequence_logps(logits, labels)
    assert counts.tolist() == [2]
    assert logps.item() == pytest.approx(math.log(3 / 4) + math.log(1 / 2), abs=1e-12)


def test_matches_log_softmax_gather():
    logits, labels = random_batch(5, 7, 11)
    logps, counts = ground_truth.sequence_logps(logits, labels)
    lsm = torch.log_softmax(logits, -1)
    mask = labels != -100
    tok = lsm.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(logps, tok.sum(-1), rtol=1e-12, atol=1e-12)
    assert counts.tolist() == mask.sum(-1).tolist()


def test_all_ignored_row_is_zero_without_nan_grad():
    logits, labels = random_batch(3, 5, 6, all_ignored=(1,))
    logits[1] = float("-inf")                        # padding rows may hold anything
    logits.requires_grad_(True)
    logps, counts = ground_truth.sequence_logps(logits, labels)
    assert logps[1].item() == 0 and counts[1].item() == 0
    logps.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[1] == 0).all()


def test_gradient_closed_form():
    """d logp / d z[t, v] = onehot(y_t) − softmax(z_t) on scored tokens, 0 elsewhere."""
    logits, labels = random_batch(3, 4, 5)
    logits.requires_grad_(True)
    coeff = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    logps, _ = ground_truth.sequence_logps(logits, labels)
    (logps * coeff).sum().backward()
    mask = (labels != -100)[..., None]
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 5).double()
    expected = coeff[:, None, None] * (onehot - torch.softmax(logits.detach(), -1)) * mask
    torch.testing.assert_close(logits.grad, expected, rtol=1e-12, atol=1e-12)


def test_packed_equals_padded():
    logits, labels = random_batch(4, 6, 9)
    lengths = [6, 0, 3, 5]
    for s, n in enumerate(lengths):
        labels[s, n:] = -100
    flat_z, flat_y, cu = packed_from_padded(logits, labels, lengths)
    torch.testing.assert_close(ground_truth.sequence_logps(flat_z, flat_y, cu_seqlens=cu),
                               ground_truth.sequence_logps(logits, labels))


def test_linear_equals_logits_path():
    hidden = torch.randn(3, 4, 8, dtype=torch.float64)
    weight = torch.randn(10, 8, dtype=torch.float64)
    bias = torch.randn(10, dtype=torch.float64)
    labels = torch.randint(10, (3, 4))
    labels[0, 1] = -100
    got = ground_truth.linear_sequence_logps(hidden, weight, labels, bias)
    want = ground_truth.sequence_logps(hidden @ weight.T + bias, labels)
    torch.testing.assert_close(got, want)


def test_low_precision_inputs_are_computed_in_float32():
    logits, labels = random_batch(2, 3, 7, dtype=torch.bfloat16)
    logps, _ = ground_truth.sequence_logps(logits, labels)
    assert logps.dtype == torch.float32
    want, _ = ground_truth.sequence_logps(logits.double(), labels)
    torch.testing.assert_close(logps.double(), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("fn", ["logits", "linear"])
def test_gradcheck(fn):
    labels = torch.tensor([[1, -100, 2], [-100, -100, -100]])
    if fn == "logits":
        z = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z: ground_truth.sequence_logps(z, labels)[0], (z,))
    else:
        h = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        b = torch.randn(4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda h, w, b: ground_truth.linear_sequence_logps(h, w, labels, b)[0], (h, w, b))


def test_shift_labels_padded_and_packed():
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    assert ground_truth.shift_labels(labels).tolist() == [[-100, 5, 6, 7, -100]]
    packed = torch.tensor([1, 2, 3, 4, 5])
    cu = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    assert ground_truth.shift_labels(packed, cu_seqlens=cu).tolist() == [2, -100, 4, 5, -100]
