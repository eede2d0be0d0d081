"""robalign.kernels — Triton GPU kernels (installed from the top-level kernels/ folder).

Each op follows one chain of names: ``_<op>_fwd_kernel`` (``@triton.jit``) → the launcher
``<op>_fwd`` → the ``torch.library`` op → the public function in :mod:`robalign`. A public op
name exported here is what :mod:`robalign.backends` looks for; none is exported until its
kernels land, so forcing ``backend="triton"`` raises a clear error meanwhile.
"""
