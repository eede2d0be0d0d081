"""The one-pass loss's chunk step and its helpers (robalign.ops.library.rows_lse_target_grad, the
C++ backend's fused ``rows_lse_target_grad``, ``accumulate_`` and ``gemm_into_``), and what the one-pass loss gains
from them in bfloat16.

- ``rows_lse_target_grad`` on every kernel backend (the C++ fused kernel; Triton under the
  interpreter and the torch backend through their two kernels): lse, label logit and the unit
  gradient ``(onehot − softmax(z'))·f'(z)`` against float64 autograd, float32 and bfloat16, strided
  views, V not a multiple of any vector width, an ignored row, in place and out, with and without
  a head transform. Tolerances as test_cpp_vector_widths: float32 1e-6 relative on lse (its float32
  rounding), 1e-5 on the gradient; bfloat16 rows are exact in float64 and the gradient is written
  in bfloat16, so within its half-ulp (2⁻⁸ relative).
- Non-finite rows (NaN, all −inf, a +inf logit): the fused kernel gives the two kernels' values.
- ``accumulate_``: ``beta·buffer + product`` for beta 0 (over garbage), 1 and 0.5, against float64.
- ``gemm_into_`` (MKL's half-precision GEMMs into float32): the same, every row/column-major layout,
  bfloat16 and float16; False where it cannot run.
- The one-pass loss in bfloat16: its head gradient's error against float64 is within twice that
  of materialised bfloat16 logits (the naive path, float32 log-softmax), the bound the issue set.
"""

import math

import pytest
import torch

import robalign
from conftest import KERNEL_BACKENDS, torch_threads
from robalign.ops import library
from robalign.ops.registry import get
from test_head_transform import transformed_rows_reference

TRANSFORMS = [pytest.param((1.0, 0.0), id="identity"), pytest.param((0.7, 2.0), id="softcap"),
              pytest.param((1.3, 0.0), id="scale")]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("v", [1003, 3001])
def test_lse_target_and_unit_gradient_in_one_step(backend, dtype, transform, inplace, v):
    """V 1003 ends in a tail under one vector, 3001 in a tail of one vector and a part of one
    (3001 = 2048 + 953, 953 = 29·32 + 16 + 9): every element is written (``out`` starts as NaN)."""
    name, device = backend
    rows = get(name).load_rows()
    scale, cap = transform
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, v, generator=gen) * 4).to(dtype)[:, :-1].to(device)   # [2, 3, V], strided
    labels = torch.randint(v, (6,), generator=gen)
    labels[4] = -100
    labels = labels.to(device)
    lse_want, tgt_want, grad_want = transformed_rows_reference(logits.cpu(), labels.cpu(), torch.ones(6), scale, cap)
    x = logits.clone()
    out = x if inplace else torch.full_like(x, float("nan"))
    lse, target = library.rows_lse_target_grad(rows, x, labels, -100, out, scale=scale, softcap=cap)
    torch.testing.assert_close(lse.double().cpu(), lse_want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target.double().cpu(), tgt_want, rtol=1e-6, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(out.double().cpu().reshape(6, v), grad_want, **tol)
    assert (out.reshape(6, v)[4] == 0).all()


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_cpp_half_precision_rows_across_blocks_of_a_running_maximum(inplace):
    """The C++ kernel takes a bfloat16 row in blocks of 2048 with a running maximum (the sum rescaled
    when it grows, each block scaled by its own maximum's factor at the end). Rows of V 5000 (three
    blocks) whose maximum lies in the first, the middle or the last block, whose first block is all
    −inf (its factor is 0) or whose first two are, and rows with a NaN or +inf only in the last block
    (the first sweep has stored e for the blocks before; the two kernels' limits must still come out,
    and an in-place row must be intact for them). Finite rows against float64 autograd within
    bfloat16's half-ulp; non-finite ones against the two kernels, one ulp apart at most."""
    from robalign.ops import cpu

    v, rows = 5000, 8
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(1, rows, v, generator=gen) * 3
    logits[0, 0, 10] = 40.0                                            # the maximum in the first block
    logits[0, 1, 3000] = 40.0                                          # in the middle block
    logits[0, 2, 4999] = 40.0                                          # in the last block, the last logit
    logits[0, 3, :2048] = -float("inf")                                # the first block all −inf
    logits[0, 4, :4096] = -float("inf")                                # the first two blocks
    logits[0, 5, 4500] = float("nan")
    logits[0, 6, 4700] = float("inf")
    logits[0, 7] = logits[0, 7] - 80.0                                 # far below 0: no overflow, no underflow of the sum
    logits = logits.to(torch.bfloat16)
    labels = torch.tensor([10, 5, 4999, 2500, 4500, 1, 4700, 123])
    finite = [0, 1, 2, 3, 4, 7]
    lse_want, tgt_want, grad_want = transformed_rows_reference(logits[:, finite], labels[finite], torch.ones(6), 1.0, 0.0)
    x = logits.clone()
    out = x if inplace else torch.full_like(x, float("nan"))
    lse, target = cpu.rows_lse_target_grad(x, labels, -100, out)
    torch.testing.assert_close(lse[finite].double(), lse_want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target[finite].double(), tgt_want, rtol=0, atol=0)
    torch.testing.assert_close(out[0, finite].double(), grad_want, rtol=2 ** -8, atol=1e-6)
    assert (out[0, 3, :2048] == 0).all() and (out[0, 4, :4096] == 0).all()
    odd = torch.tensor([5, 6])
    lse_two, _, _ = cpu.rows_lse_target(logits[:, odd], labels[odd], -100)
    want = torch.empty_like(logits[:, odd])
    cpu.rows_softmax_grad(logits[:, odd], labels[odd], lse_two, torch.ones(2), -100, want)
    torch.testing.assert_close(lse[odd], lse_two, equal_nan=True)
    torch.testing.assert_close(out[:, odd].float(), want.float(), rtol=2 ** -7, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_fused_kernel_takes_the_two_kernels_limits_on_non_finite_rows(dtype):
    from robalign.ops import cpu

    gen = torch.Generator().manual_seed(2)
    v = 1003
    logits = torch.randn(1, 5, v, generator=gen)
    logits[0, 0, 3], logits[0, 1, :], logits[0, 2, 7] = float("nan"), -float("inf"), float("inf")
    logits[0, 3, 4] = -float("inf")                                   # the label's logit alone is −inf
    logits = logits.to(dtype)
    labels = torch.tensor([1, 2, 7, 4, 5])
    lse_want, tgt_want, _ = cpu.rows_lse_target(logits, labels, -100)
    want = torch.empty_like(logits)
    cpu.rows_softmax_grad(logits, labels, lse_want, torch.ones(5), -100, want)
    out = torch.empty_like(logits)
    lse, target = cpu.rows_lse_target_grad(logits, labels, -100, out)
    torch.testing.assert_close(lse, lse_want, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(target, tgt_want, equal_nan=True)
    # bfloat16: each kernel rounds its float32 value once, so the two may be one ulp (2⁻⁷ relative) apart
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(out.float(), want.float(), **tol, equal_nan=True)
    assert math.isnan(lse[0]) and lse[1] == -math.inf and lse[2] == math.inf


def test_cpp_fused_kernel_rows_as_long_as_a_256k_vocabulary():
    from robalign.ops import cpu

    gen = torch.Generator().manual_seed(3)
    v = 262147
    logits = torch.randn(1, 2, v, generator=gen) * 3
    labels = torch.tensor([5, v - 1])
    lse_want, tgt_want, grad_want = transformed_rows_reference(logits, labels, torch.ones(2), 1.0, 0.0)
    out = torch.full_like(logits, float("nan"))
    lse, target = cpu.rows_lse_target_grad(logits, labels, -100, out)
    torch.testing.assert_close(lse.double(), lse_want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.double().reshape(2, v), grad_want, rtol=1e-5, atol=1e-7)


def test_cpp_kernels_run_on_torchs_threads():
    """Built without torch's OpenMP flags, at::parallel_for is serial: the row kernels then ran on one
    thread whatever torch.get_num_threads() said (found in session 15, after fourteen sessions)."""
    from robalign.ops import cpu

    if torch.get_num_threads() < 2:
        pytest.skip("torch runs one thread here")
    assert cpu.parallel_threads(64) == torch.get_num_threads()
    with torch_threads(1):
        assert cpu.parallel_threads(64) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_scaled_to_is_mul_then_to(dtype):
    """One pass of ``buffer·scale`` narrowed to ``dtype``: the same float32 product and the same rounding
    as ``buffer.mul(scale).to(dtype)``, bit for bit; the buffer is left as it was."""
    from robalign.ops import cpu

    gen = torch.Generator().manual_seed(6)
    buffer = torch.randn(1000, 77, generator=gen) * 100
    before = buffer.clone()
    for scale in (1.0, 0.37, 3e-5):
        got = cpu.scaled_to(buffer, scale, dtype)
        assert got.dtype == dtype and got.shape == buffer.shape
        assert torch.equal(got, buffer.mul(torch.tensor(scale, dtype=torch.float32)).to(dtype))
    assert torch.equal(buffer, before)
    with pytest.raises(RuntimeError, match="scaled_to: dtype must be bfloat16 or float16"):
        cpu.scaled_to(buffer, 1.0, torch.float64)
    with pytest.raises(RuntimeError, match="scaled_to: buffer must be contiguous float32 or"):
        cpu.scaled_to(buffer.double(), 1.0, dtype)
    with pytest.raises(RuntimeError, match="scaled_to: buffer must be contiguous float32 or"):
        cpu.scaled_to(buffer.T, 1.0, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_scaled_to_into_a_given_tensor(dtype):
    """With ``out`` (a recycled block, robalign.ops.workspace), the same values written there and
    ``out`` returned; an ``out`` of another dtype, shape or layout, one sharing the buffer's memory, or
    one for a buffer already in ``dtype`` is refused by name."""
    from robalign.ops import cpu

    gen = torch.Generator().manual_seed(8)
    buffer = torch.randn(300, 41, generator=gen) * 10
    out = torch.full((300, 41), float("nan"), dtype=dtype)
    got = cpu.scaled_to(buffer, 0.37, dtype, out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, buffer.mul(torch.tensor(0.37, dtype=torch.float32)).to(dtype))
    for bad in (torch.empty(300, 41, dtype=torch.float32), torch.empty(41, 300, dtype=dtype),
                torch.empty(41, 300, dtype=dtype).T):
        with pytest.raises(RuntimeError, match="scaled_to: out must be a contiguous CPU"):
            cpu.scaled_to(buffer, 1.0, dtype, bad)
    shared = torch.empty(300 * 41 * 2, dtype=dtype)
    with pytest.raises(RuntimeError, match="scaled_to: out must not share memory with buffer"):
        cpu.scaled_to(shared.view(torch.float32).view(300, 41), 1.0, dtype, shared[: 300 * 41].view(300, 41))
    with pytest.raises(RuntimeError, match="scaled_to: out is for a float32 buffer"):
        cpu.scaled_to(out, 1.0, dtype, torch.empty_like(out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_scaled_to_in_place_from_the_half_dtype(dtype):
    """A gradient already in ``dtype`` (one product formed it) is scaled in float32 and rounded once, in
    place: bit for bit ``buffer.float().mul(scale).to(dtype)``, and the same tensor comes back."""
    from robalign.ops import cpu

    gen = torch.Generator().manual_seed(7)
    start = (torch.randn(1000, 77, generator=gen) * 100).to(dtype)
    for scale in (1.0, 0.37, 3e-5):
        buffer = start.clone()
        got = cpu.scaled_to(buffer, scale, dtype)
        assert got.data_ptr() == buffer.data_ptr() and got.dtype == dtype
        assert torch.equal(got, start.float().mul(torch.tensor(scale, dtype=torch.float32)).to(dtype))
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(RuntimeError, match="scaled_to: buffer must be contiguous float32 or"):
        cpu.scaled_to(start.to(other), 1.0, dtype)


@pytest.mark.parametrize("rows", [200, 384, 700, 1407, 1408])
def test_half_precision_times_weight_in_pieces(rows):
    """``U·W`` of a bfloat16 chunk in equal pieces of at most 320 rows where oneDNN runs it on one thread
    (384–1407 rows), whole elsewhere: the same product, within bfloat16's rounding of each output."""
    from robalign.ops.one_pass import _times_weight

    gen = torch.Generator().manual_seed(8)
    u = torch.randn(rows, 600, generator=gen).bfloat16()
    w = torch.randn(600, 40, generator=gen).bfloat16()
    want = u.double() @ w.double()
    got = _times_weight(u, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 40)
    torch.testing.assert_close(got.double(), want, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_cpp_accumulate_into_a_float32_buffer(dtype, beta):
    from robalign.ops import cpu

    gen = torch.Generator().manual_seed(4)
    start = torch.randn(300, 77, generator=gen)
    product = torch.randn(300, 77, generator=gen).to(dtype)
    buffer = start.clone() if beta else torch.full_like(start, float("nan"))   # beta 0 ignores what is there
    cpu.accumulate_(buffer, product, beta)
    want = (beta * start.double() if beta else 0) + product.double()
    torch.testing.assert_close(buffer.double(), want, rtol=1e-6, atol=1e-6)


LAYOUTS = [pytest.param((False, False), id="a-b"), pytest.param((True, False), id="aT-b"),
           pytest.param((False, True), id="a-bT"), pytest.param((True, True), id="aT-bT")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpp_gemm_into_a_float32_buffer(dtype, beta, layout):
    """``gemm_into_``: ``beta·buffer + a·b`` with half-precision ``a``, ``b`` (row- or column-major, as
    views) summed and added in float32, against float64 of the same values: float32 rounding of sums
    of 300 products, within 1e-5 relative to the largest entry. beta 0 ignores what was there (NaN)."""
    from robalign.ops import cpu

    gen = torch.Generator().manual_seed(6)
    a = torch.randn(70, 300, generator=gen).to(dtype)
    b = torch.randn(300, 45, generator=gen).to(dtype)
    a_in = a.T.contiguous().T if layout[0] else a                   # column-major views of the same values
    b_in = b.T.contiguous().T if layout[1] else b
    start = torch.randn(70, 45, generator=gen)
    buffer = start.clone() if beta else torch.full_like(start, float("nan"))
    if not cpu.gemm_into_(buffer, a_in, b_in, beta):
        pytest.skip(f"this torch build exports no MKL GEMM of {dtype} into float32")
    want = (beta * start.double() if beta else 0) + a.double() @ b.double()
    torch.testing.assert_close(buffer.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_cpp_gemm_into_declines_what_it_cannot_do():
    """False, the buffer untouched, for float32 inputs (no mixed GEMM to run) and for an operand with
    no unit stride; a clear error for shapes that do not multiply."""
    from robalign.ops import cpu

    buffer = torch.zeros(4, 3)
    a, b = torch.randn(4, 5), torch.randn(5, 3)
    assert not cpu.gemm_into_(buffer, a, b, 1.0)
    strided = torch.randn(8, 10).bfloat16()[::2, ::2]
    assert not cpu.gemm_into_(buffer, strided, b.bfloat16(), 1.0)
    assert torch.equal(buffer, torch.zeros(4, 3))
    with pytest.raises(RuntimeError, match="do not give"):
        cpu.gemm_into_(buffer, a.bfloat16(), torch.randn(4, 3).bfloat16(), 1.0)


def test_bfloat16_one_pass_head_gradient_within_twice_materialised_logits():
    """The one-pass loss in bfloat16 (the unit gradient written in bfloat16, the coefficient applied
    to the small operands, the head gradient accumulated in float32) against float64 from the same
    bfloat16 values, next to the naive path on materialised bfloat16 logits."""
    from robalign import ground_truth

    gen = torch.Generator().manual_seed(5)
    s, t, h, v = 8, 40, 96, 3001
    hidden = torch.randn(s, t, h, generator=gen).bfloat16()
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).bfloat16()
    labels = torch.randint(v, (s, t), generator=gen)
    labels[:, :9] = -100
    ref_logps = torch.randn(s, generator=gen) - 5 * t
    objective = robalign.Objective("dpo", beta=0.1)

    def head_grad(hid, w, materialise):
        hid, w = hid.detach().requires_grad_(True), w.detach().requires_grad_(True)
        if materialise:
            logits = hid @ w.T
            logps = ground_truth.sequence_logps(logits.float() if w.dtype != torch.float64 else logits, labels)[0]
            loss = robalign.DoRALoss(objective, robalign.KLDRO(1.0)).from_logps(
                logps, (labels != -100).sum(-1), ref_logps.to(logps.dtype)).loss
        else:
            loss_fn = robalign.FusedLinearDoRALoss(objective, robalign.KLDRO(1.0),
                                                   params=robalign.LossParams(backend="cpp"))
            loss = loss_fn(hid, w, labels, ref_logps).loss
        return torch.autograd.grad(loss, w)[0].double()

    want = head_grad(hidden.double(), weight.double(), True)
    error = lambda g: float((g - want).norm() / want.norm())                        # noqa: E731
    one_pass, materialised = error(head_grad(hidden, weight, False)), error(head_grad(hidden, weight, True))
    assert one_pass <= 2 * materialised, (one_pass, materialised)
    assert one_pass < 2e-2
