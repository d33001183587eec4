"""The three layouts ``mamba_ssm`` accepts for the B and C of a selective scan, and one view of all.

For u of shape (batch, dim, L) and A of shape (dim, N), B (and, independently, C) may be

* variable: (batch, N, L), one B_t per step shared by every channel (Mamba's own layout);
* grouped:  (batch, G, N, L), G dividing dim; channel d uses group d // (dim // G);
* constant: (dim, N), one time-invariant B per channel (S4D-style).

Every kernel reads them through one view, :func:`as_grouped`: a (batch or 1, G, N, L or 1) tensor
whose size-1 batch and time axes broadcast. It is a view, never a copy, so a constant B costs
dim x N values however long the sequence.
"""

from __future__ import annotations

from torch import Tensor


def layout(X: Tensor) -> str:
    """ "constant", "variable" or "grouped", from the number of dimensions."""
    return {2: "constant", 3: "variable", 4: "grouped"}.get(X.dim(), "invalid")


def check(name: str, X: Tensor, batch: int, dim: int, length: int, nstate: int) -> None:
    """Raise a ValueError naming ``name`` unless X has one of the three layouts."""
    ok = {
        "constant": (dim, nstate),
        "variable": (batch, nstate, length),
        "grouped": (batch, X.shape[1] if X.dim() == 4 else -1, nstate, length),
    }.get(layout(X))
    groups = X.shape[1] if X.dim() == 4 else 1
    if ok is None or tuple(X.shape) != ok or groups < 1 or dim % groups:
        raise ValueError(
            f"selective_scan: {name} must have shape (dim, N) = {(dim, nstate)}, (batch, N, L) = "
            f"{(batch, nstate, length)} or (batch, G, N, L) = {(batch, 'G', nstate, length)} "
            f"with G dividing dim={dim}, got {tuple(X.shape)}"
        )


def as_grouped(X: Tensor) -> Tensor:
    """The (batch or 1, G, N, L or 1) view of B or C in any layout."""
    kind = layout(X)
    if kind == "constant":
        return X[None, :, :, None]  # G = dim groups of one channel each, fixed in time
    if kind == "variable":
        return X[:, None]  # one group
    return X


def channels_per_group(X4: Tensor, dim: int) -> int:
    return dim // X4.shape[1]
