"""The C++ kernels compiled for each vector width this CPU runs (``robalign.ops._cpp.ARCHS``:
AVX-512, AVX2, generic), not only the one the installed extension was built for: a CI machine
may build another, and the kernels use width-specific ATen code (Sleef-free exp, blends, bfloat16
conversion). Each build's row kernels — forward, backward and the one-pass step's fused kernel, float32 and
bfloat16, the head transforms, an ignored row, in place, the float32 column kernel and the top-1 check by columns — against float64 autograd or torch.argmax, at the tolerances of
test_head_transform (float32 rows 1e-6 relative; bfloat16 inputs are exact in float64, so the
same, the gradient written in bfloat16 within its half-ulp), the half-precision transposed copy
equal to ``srcᵀ``, and the non-finite rows equal to the installed extension's.

The width the installed extension has is skipped: the rest of the suite tests it.
"""

import pytest
import torch

from robalign.ops import _cpp
from test_head_transform import transformed_rows_reference

TRANSFORMS = [(1.0, 0.0), (1.3, 0.0), (0.7, 2.0), (1.0, 30.0)]


@pytest.fixture(scope="module")
def build_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cpp_widths")


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(_cpp.ARCHS))
def test_each_vector_width_gives_the_reference_values(arch, build_root):
    if arch not in _cpp.cpu_archs():
        pytest.skip(f"this CPU does not run {arch}")
    if arch == _cpp.build_arch():
        pytest.skip(f"{arch} is the installed extension's width, which the whole suite tests")
    from torch.utils import cpp_extension

    directory = build_root / arch
    directory.mkdir()
    module = cpp_extension.load(name=f"robalign_C_{arch}", sources=[str(_cpp.csrc_dir() / s) for s in _cpp.SOURCES],
                                extra_cflags=_cpp.compile_args(arch) + _cpp.parallel_args(),
                                extra_ldflags=_cpp.parallel_args(), build_directory=str(directory), verbose=False)
    installed = _cpp.load()
    gen = torch.Generator().manual_seed(0)
    v = 3001                            # 2048 + 953: tails under one vector and over one, of any width
    for dtype in (torch.float32, torch.bfloat16):
        for scale, cap in TRANSFORMS:
            logits = (torch.randn(2, 4, v, generator=gen) * 5).to(dtype)[:, :-1]     # [2, 3, V], strided
            labels = torch.randint(v, (6,), generator=gen)
            labels[1] = -100
            coeff = torch.randn(6, generator=gen)
            lse_want, tgt_want, want = transformed_rows_reference(logits, labels, coeff, scale, cap)
            lse, target = module.rows_lse_target(logits, labels, -100, scale, cap)
            torch.testing.assert_close(lse.double(), lse_want, rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(target.double(), tgt_want, rtol=1e-6, atol=1e-5)
            for inplace in (False, True):
                x = logits.clone()
                out = x if inplace else torch.empty_like(x)
                module.rows_softmax_grad(x, labels, lse, coeff, -100, out, scale, cap)
                tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-6)
                torch.testing.assert_close(out.double().reshape(6, v), want, **tol)
                x = logits.clone()                                          # the fused step: coefficient 1
                out = x if inplace else torch.full_like(x, float("nan"))
                lse1, target1 = module.rows_lse_target_grad(x, labels, -100, out, scale, cap)
                unit = transformed_rows_reference(logits, labels, torch.ones(6), scale, cap)[2]
                torch.testing.assert_close(lse1.double(), lse_want, rtol=1e-6, atol=1e-5)
                torch.testing.assert_close(out.double().reshape(6, v), unit, **tol)
    # the float32 column kernel: columns in whole vectors and a partial one, rows in four-row steps and
    # one at a time, split between the threads
    from test_column_layout import reference as columns_reference
    zt = torch.randn(v, 37, generator=gen) * 5
    zt[:, 0] = torch.linspace(-5, 30, v)                                # the maximum in the last share
    labels = torch.randint(v, (37,), generator=gen)
    lse_want, tgt_want, want = columns_reference(zt, labels)
    lse, target, ok = module.cols_lse_target_grad(zt, labels, -100, zt)
    assert ok
    torch.testing.assert_close(lse.double(), lse_want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(target.double(), tgt_want, rtol=0, atol=0)
    torch.testing.assert_close(zt.double(), want, rtol=1e-5, atol=1e-7)
    # the top-1 check by columns (the NaN lanes found by the width's zero_mask): ties, NaNs, -inf
    zt = torch.randint(-3, 4, (v, 37), generator=gen).float()
    zt[torch.rand(v, 37, generator=gen) < 0.002] = float("nan")
    zt[:, 5] = -float("inf")
    labels = zt.argmax(0)
    labels[1::3] = (labels[1::3] + 1) % v
    assert torch.equal(module.labels_are_argmax(zt, labels, True), zt.argmax(0) == labels)
    # the transposed copy of a half-precision chunk (AVX-512 permutes or ATen's scalar loop): full and
    # partial 32 x 32 tiles of a column slice
    for dtype in (torch.bfloat16, torch.float16):
        src = torch.randn(45, v, generator=gen).to(dtype)[:, 7:7 + 70]
        out = torch.empty(70, 45, dtype=dtype)
        module.transpose_into_(out, src)
        assert torch.equal(out, src.T)
    # non-finite logits: the same NaN / inf pattern and values as the installed extension
    logits = torch.randn(1, 5, v, generator=gen)
    logits[0, 0, 3], logits[0, 1, :], logits[0, 2, 7] = float("nan"), -float("inf"), float("inf")
    labels = torch.tensor([1, 2, 7, 4, 5])
    logits[0, 3, 4] = -float("inf")
    for scale, cap in TRANSFORMS:
        got, want = module.rows_lse_target(logits, labels, -100, scale, cap), \
            installed.rows_lse_target(logits, labels, -100, scale, cap)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_the_build_flags_follow_robalign_cpu_arch(monkeypatch):
    monkeypatch.setenv("ROBALIGN_CPU_ARCH", "generic")
    assert _cpp.compile_args() == ["-O3", "-ffp-contract=off"]          # every width: no fused a·b − c
    monkeypatch.setenv("ROBALIGN_CPU_ARCH", "native")
    assert _cpp.compile_args() == ["-O3", "-ffp-contract=off", *_cpp.ARCHS[_cpp.cpu_archs()[0]][0]]
    monkeypatch.setenv("ROBALIGN_CPU_ARCH", "avx9000")
    with pytest.raises(ValueError, match=r"ROBALIGN_CPU_ARCH must be 'native' or one of \['avx2', 'avx512', 'generic'\], "
                                         r"got 'avx9000'"):
        _cpp.compile_args()
