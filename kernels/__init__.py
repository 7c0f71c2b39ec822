"""The pixel InfoNCE op of CLUDA (Eq. 2), with no N x N matrix in memory.

`pixel_infonce(feats, labels, *, temperature, ...)` is the only public entry point; see its
docstring for the contract (also DESIGN.md, "The loss contract"). Importing this package needs
neither triton nor a GPU: the Triton module is imported on first use.
"""
from kernels.functional import pixel_infonce

__all__ = ["pixel_infonce"]
