"""The Triton kernels compiled ahead of time for NVIDIA GPUs, on this CPU machine: Triton lowers
each kernel variant the ops launch (float32, bfloat16 and float16 logits; the head transform's
identity, scale and soft-cap; with and without the reference row) through its GPU pipeline to a
cubin for sm_80 (A100) and sm_90 (H100/H200) with the ptxas it ships. The interpreter checks what
the kernels compute; this checks that the GPU compiler takes them — what the interpreter cannot
(it runs Python, so code the compiler refuses, such as a tuple of mixed constexpr types or an
unsupported math call, passes there).

A variant is compiled with the ``BLOCK_V`` and ``num_warps`` the launcher would pick
(:func:`robalign.kernels.logps.block_size`) at a small and a large vocabulary. At V = 128256 each is
compiled once more with what Triton's launcher infers from 16-aligned pointers and strides
(``tt.divisibility`` 16 on them and on V): the PTX must then read each row, and the backward write
its gradient, in 16-byte vectors (``ld``/``st.global.v4``) — the reason the kernels specialise on
strides (kernels/logps.py) — and must not without it. The tests run under
``TRITON_INTERPRET=1`` (tests/conftest.py), where ``triton.jit`` gives interpreted functions, so
the compiles run in one child process without it (run this file as a script to see them).
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ARCHS = (80, 90)
FLOATS = {"scale": "fp32", "cap_in": "fp32", "cap": "fp32"}


def variants():
    """``(id, kind, dtype, has_ref, transform, vocab)`` of every compiled variant."""
    for dtype, transform, vocab in itertools.product(DTYPES, (0, 1, 2), (200, 128256)):
        for has_ref in (False, True):
            yield f"fwd-{dtype}-{'ref-' if has_ref else ''}t{transform}-V{vocab}", "fwd", dtype, has_ref, transform, vocab
        yield f"bwd-{dtype}-t{transform}-V{vocab}", "bwd", dtype, False, transform, vocab


ALIGNED = {"fwd": ("p_logits", "p_ref", "V", "stride_b", "stride_t", "ref_stride_b", "ref_stride_t"),
           "bwd": ("p_logits", "p_out", "V", "stride_b", "stride_t", "out_stride_b", "out_stride_t")}


def _source(kind, dtype, has_ref, transform, block, aligned=False):
    from triton.compiler import ASTSource

    from robalign.kernels import logps as K

    t = DTYPES[dtype]
    strides = ("stride_b", "stride_t", "ref_stride_b", "ref_stride_t") if kind == "fwd" else \
        ("stride_b", "stride_t", "out_stride_b", "out_stride_t")
    if kind == "fwd":
        signature = {"p_logits": f"*{t}", "p_ref": f"*{t}" if has_ref else "constexpr", "p_labels": "*i64",
                     "p_lse": "*fp32", "p_target": "*fp32", "p_ref_logp": "*fp32" if has_ref else "constexpr"}
        constexprs = {"BLOCK_V": block, "HAS_REF": has_ref, "TRANSFORM": transform,
                      **({} if has_ref else {"p_ref": None, "p_ref_logp": None})}
        fn = K._rows_lse_target_fwd_kernel.fn                          # under @triton.heuristics
    else:
        signature = {"p_logits": f"*{t}", "p_labels": "*i64", "p_lse": "*fp32", "p_coeff": "*fp32", "p_out": f"*{t}"}
        constexprs = {"BLOCK_V": block, "TRANSFORM": transform}
        fn = K._rows_softmax_grad_bwd_kernel
    signature.update({"T": "i32", "V": "i32", **{s: "i64" for s in strides}, "ignore_index": "i32", **FLOATS,
                      **{name: "constexpr" for name in ("BLOCK_V", "HAS_REF", "TRANSFORM") if name in fn.arg_names}})
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED[kind]
             if aligned and signature[n] != "constexpr"}
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs or None)


def compile_all() -> dict:
    """Compile every variant for every arch; ``{"<id>-sm<arch>": {"error"} or {"cubin", "tanh", "exps"}}``."""
    import triton
    from triton.backends.compiler import GPUTarget

    from robalign.kernels import logps as K

    results = {}
    for name, kind, dtype, has_ref, transform, vocab in variants():
        block, warps = K.block_size(vocab)
        for arch, aligned in [(a, False) for a in ARCHS] + ([(90, True)] if vocab % 16 == 0 else []):
            key = f"{name}-sm{arch}" + ("-aligned" if aligned else "")
            try:
                compiled = triton.compile(_source(kind, dtype, has_ref, transform, block, aligned),
                                          target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            except Exception as err:  # noqa: BLE001 — reported to the test, which fails with it
                results[key] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                continue
            ttir, ptx = compiled.asm["ttir"], compiled.asm["ptx"]
            results[key] = {"cubin": len(compiled.asm["cubin"]), "tanh": "tanh" in ttir or "libdevice" in ttir,
                            "exps": ttir.count("math.exp"), "vector_loads": "ld.global.v4" in ptx,
                            "vector_stores": "st.global.v4" in ptx}
    return results


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("variant", [v[0] for v in variants()])
def test_kernel_compiles_to_a_cubin(compiled, variant, arch):
    result = compiled[f"{variant}-sm{arch}"]
    assert "error" not in result, result.get("error")
    assert result["cubin"] > 0, "ptxas produced no binary"
    assert not result["tanh"], "the soft-cap's tanh is the kernels' own formula from exp, as the interpreter runs it"
    if "-t2-" in variant:
        plain = compiled[f"{variant.replace('-t2-', '-t0-')}-sm{arch}"]
        assert result["exps"] > plain["exps"], "the soft-cap's tanh (from exp) is in the kernel"



@pytest.mark.slow
@pytest.mark.parametrize("variant", [v[0] for v in variants() if v[0].endswith("V128256")])
def test_aligned_rows_are_read_and_written_in_16_byte_vectors(compiled, variant):
    aligned, plain = compiled[f"{variant}-sm90-aligned"], compiled[f"{variant}-sm90"]
    assert "error" not in aligned, aligned.get("error")
    assert aligned["vector_loads"] and not plain["vector_loads"]
    if variant.startswith("bwd"):
        assert aligned["vector_stores"] and not plain["vector_stores"]


if __name__ == "__main__":
    print(json.dumps(compile_all()))
