"""A client's update clipped under the mask: what server and client of a private data soup share.

The update is the difference between a candidate and the soup it retrained from, over the
model's trainable tensors: each masked tensor's values under the mask (zero outside it, in
either form), and the dense extras (biases, norm-layer weights). Norm statistics and integer
counters are not part of it: a private job never takes them from a client. The clipping is
Flower's own (``flwr.supercore.differential_privacy``, the FlatClip of McMahan et al. that
its DP wrappers and ``fixedclipping_mod`` / ``adaptiveclipping_mod`` use).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, adaptive_clip_inputs_inplace

__all__ = ["KEY_CLIPPING_NORM", "KEY_NORM_BIT", "clip_update", "private_names"]

NORM_STATISTICS = ("running_mean", "running_var")  # BatchNorm's buffers, re-estimated on the server


def private_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors of ``state`` that make up a client's private update.

    Parameters
    ----------
    state : mapping of str to Tensor
        A state dict, full or in the compact form of ``fedsms.merge.values_under_mask``.

    Returns
    -------
    list of str
        The floating-point tensors that are not norm statistics, in ``state``'s order.
    """
    return [name for name, tensor in state.items() if tensor.is_floating_point() and not name.endswith(NORM_STATISTICS)]


def clip_update(
    values: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], bound: float
) -> tuple[dict[str, torch.Tensor], bool]:
    """``reference`` plus the update ``values − reference`` scaled to L2 norm at most ``bound``.

    Both mappings hold the same form (full state dicts, or the values under one mask), so
    the norm is the update's norm under the mask either way (pruned entries are zero in both).

    Parameters
    ----------
    values : mapping of str to Tensor
        The candidate.
    reference : mapping of str to Tensor
        The soup it retrained from.
    bound : float
        The clipping norm (positive).

    Returns
    -------
    tuple of (dict of str to Tensor, bool)
        The clipped candidate's private tensors (``private_names(reference)``, in its dtypes on
        the CPU; the bound holds up to their rounding) and whether the update was scaled down (Flower's ``norm_bit``).
    """
    names = private_names(reference)
    update = [
        (values[name].detach().cpu().double() - reference[name].detach().cpu().double()).numpy() for name in names
    ]
    try:
        clipped = adaptive_clip_inputs_inplace(update, bound)
    except ZeroDivisionError:  # Flower divides by the norm: an unchanged candidate has nothing to clip
        clipped = False
    out = {
        name: (reference[name].detach().cpu().double() + torch.from_numpy(np.asarray(delta))).to(reference[name].dtype)
        for name, delta in zip(names, update)
    }
    return out, bool(clipped)
