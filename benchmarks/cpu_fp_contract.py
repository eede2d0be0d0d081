"""What -ffp-contract=off costs the C++ row kernels: the extension built twice (GCC's default
contraction, and off, as robalign builds it since the head-transform accuracy fix), timed on one
[2048, 32000] float32 chunk, forward (rows_lse_target) and backward (rows_softmax_grad), with the
identity and with a soft-cap, interleaved rounds in one process, after a gate that both builds give
the same lse and gradient to float32 rounding. No floor: it compares one kernel with itself.

    python benchmarks/cpu_fp_contract.py      # builds into ./robalign-bench/fp_contract (about 2 minutes)

Measured on the 2-core CI machine (AVX-512 build; ms, three interleaved rounds, two runs): with the
identity, forward 37–44 with contraction against 37–46 without, backward 40–58 against 41–50; with
the soft-cap, forward 75–87 against 75–86, backward 71–80 against 75–85 — the soft-capped
backward 5–11 % slower in the second run, the rest within the rounds' spread.
"""

import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from robalign.ops import _cpp  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    arch = _cpp.build_arch()
    modules = {}
    for name, extra in (("contract", []), ("no-contract", ["-ffp-contract=off"])):
        folder = Path("robalign-bench") / "fp_contract" / name
        folder.mkdir(parents=True, exist_ok=True)
        modules[name] = load(name=f"fp_{name.replace('-', '_')}", sources=[str(ROOT / "csrc" / "logps_cpu.cpp")],
                             extra_cflags=["-O3", *extra, *_cpp.ARCHS[arch][0]], build_directory=str(folder))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 2048, 32000, generator=gen)
    y = torch.randint(32000, (2048,), generator=gen)
    out, coeff = torch.empty_like(z), torch.ones(2048)
    for scale, cap in ((1.0, 0.0), (0.7, 30.0)):
        # the gate: both builds compute the same lse and gradient (to float32 rounding) before either is timed
        results = []
        for m in modules.values():
            lse = m.rows_lse_target(z, y, -100, scale, cap)[0]
            m.rows_softmax_grad(z, y, lse, coeff, -100, out, scale, cap)
            results.append((lse.clone(), out.clone()))
        torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
        for rnd in range(3):
            for name, m in modules.items():
                lse = m.rows_lse_target(z, y, -100, scale, cap)[0]
                t0 = time.perf_counter()
                for _ in range(5):
                    m.rows_lse_target(z, y, -100, scale, cap)
                t1 = time.perf_counter()
                for _ in range(5):
                    m.rows_softmax_grad(z, y, lse, coeff, -100, out, scale, cap)
                t2 = time.perf_counter()
                print(f"{arch} scale {scale} cap {cap} round {rnd} {name}: forward {(t1 - t0) / 5e-3:.1f} ms, "
                      f"backward {(t2 - t1) / 5e-3:.1f} ms")


if __name__ == "__main__":
    main()
