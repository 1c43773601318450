"""Norm-layer recalibration: averaged BatchNorm statistics do not match the averaged
weights, so after merging they are reset and re-estimated by forward passes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from fedsms import FedSMSError
from fedsms.codec import MAX_MAGNITUDE, in_range
from fedsms.data.arrays import ArrayData, DataSource, batches, count_examples, iterate_batches


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics.

    Parameters
    ----------
    model : torch.nn.Module
        The model to inspect.

    Returns
    -------
    list of torch.nn.modules.batchnorm._BatchNorm
        In ``model.modules()`` order; empty when the model has none to recalibrate.
    """
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recalibrate_norms(
    model: nn.Module,
    data: DataSource,
    *,
    fraction: float = 0.2,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> int:
    """Reset BatchNorm running statistics and re-estimate them in train mode over a seeded
    ``fraction`` of ``data`` (cumulative average, not momentum). Returns examples used.

    ``data`` is any :data:`fedsms.data.arrays.DataSource`. An ``ArrayData`` or a sized
    ``Dataset`` gives a seeded random ``fraction`` of its examples in equal batches; a
    ``DataLoader`` gives its first ``fraction`` of examples in its own batches, and a
    callable (whose size is unknown) all of its batches.

    The layers' momenta and the model's train/eval mode are restored afterwards; the
    model is left on ``device``.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose norm statistics are re-estimated, in place.
    data : DataSource
        Examples to forward (labels are ignored).
    fraction : float, default 0.2
        Fraction of ``data``'s examples to forward, in (0, 1]; at least one example.
    batch_size : int, default 256
        Largest batch for an ``ArrayData`` or ``Dataset`` (the batches are made equal in
        size); a ``DataLoader`` keeps its own.
    device : torch.device or str, default "cpu"
        Where the forward passes run.
    seed : int, default 0
        Seed of the random subset.

    Returns
    -------
    int
        Number of examples forwarded; 0 when the model has no norm layers to recalibrate.
    """
    layers = norm_layers(model)
    if not layers:
        return 0
    total = count_examples(data)
    n = max(1, int(round(fraction * total))) if total is not None else None
    if isinstance(data, ArrayData) or (n is not None and not isinstance(data, DataLoader)):
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
        if isinstance(data, ArrayData):
            source: DataSource = data.subset(order)
        else:
            source = Subset(data, order.tolist())
        # BatchNorm's cumulative average weights every batch equally, so the batches are made
        # equal in size: a small last batch would otherwise skew the statistics badly.
        batch_size = -(-n // -(-n // batch_size))
    else:
        source = data
    was_training = model.training
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average over all recalibration batches
    model.to(device).train()
    used = 0
    try:
        if isinstance(source, ArrayData):
            for x, _ in batches(source, batch_size, device=device):
                model(x)
            used = n
        else:
            for x, y in iterate_batches(source, batch_size, device=device, limit=n):
                model(x)
                used += len(y)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return used


# ---- pooling statistics estimated elsewhere (federated recalibration) ---------------
# Averaging per-client variances would drop the spread between client means, so the pooled
# variance is E[x²] − E[x]²: Σ nᵢ(vᵢ + mᵢ²)/N − M², with M = Σ nᵢmᵢ/N.


def norm_stat_names(model: nn.Module) -> list[str]:
    """State-dict names of every running mean/var/count, in state-dict order.

    Parameters
    ----------
    model : torch.nn.Module
        The model to inspect (see ``norm_layers``).

    Returns
    -------
    list of str
        ``<layer>.running_mean``, ``<layer>.running_var`` and ``<layer>.num_batches_tracked``
        for each norm layer.
    """
    layers = {id(m) for m in norm_layers(model)}
    prefixes = [name for name, module in model.named_modules() if id(module) in layers]
    suffixes = ("running_mean", "running_var", "num_batches_tracked")
    return [f"{p}.{s}" for p in prefixes for s in suffixes]


def norm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s norm statistics, as a client sends them after recalibrating.

    Parameters
    ----------
    model : torch.nn.Module
        The model to read.

    Returns
    -------
    dict of str to torch.Tensor
        Keyed and ordered as ``norm_stat_names(model)``.
    """
    state = model.state_dict()
    return {name: state[name].detach().cpu().clone() for name in norm_stat_names(model)}


class NormStatsError(FedSMSError, ValueError):
    """Norm statistics that cannot be pooled; nothing of them was added."""


class NormStatsAverage:
    """Pools norm statistics that clients estimated on their own data (federated recalibration).

    Means are averaged weighted by example counts; variances are pooled as E[x²] − E[x]²,
    so the spread between client means is kept; ``num_batches_tracked`` keeps its maximum.
    Sums are kept in float64.

    Parameters
    ----------
    model : torch.nn.Module
        A model of the job's architecture; its current statistics give the expected names,
        shapes and dtypes.

    Attributes
    ----------
    template : dict of str to torch.Tensor
        The model's statistics at construction (``norm_stats(model)``).
    count : int
        Number of clients' statistics added.
    examples : int
        Total examples behind the added statistics.
    """

    def __init__(self, model: nn.Module) -> None:
        self.template = norm_stats(model)
        self.count, self.examples = 0, 0
        self._sums: dict[str, torch.Tensor] = {}

    def add(self, stats: Mapping[str, torch.Tensor], examples: int) -> None:
        """Add one client's statistics.

        Parameters
        ----------
        stats : mapping of str to torch.Tensor
            The client's statistics, named and ordered as ``norm_stat_names(model)``.
        examples : int
            Number of examples the client estimated them on; > 0.

        Raises
        ------
        NormStatsError
            If the names differ from the model's, ``examples`` is not a positive int, or a
            tensor has another shape or non-finite values; nothing is added then.
        """
        if list(stats) != list(self.template):
            raise NormStatsError("norm statistics name other tensors than the model's norm layers")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
            raise NormStatsError(f"norm statistics over {examples!r} examples")
        for name, value in stats.items():  # every check before the first sum changes
            if not isinstance(value, torch.Tensor) or value.shape != self.template[name].shape:
                raise NormStatsError(
                    f"norm statistic {name!r} has shape {tuple(getattr(value, 'shape', ()))}, "
                    f"not {tuple(self.template[name].shape)}"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise NormStatsError(f"norm statistic {name!r} has NaN or Inf values")
        for name, value in stats.items():
            value = value.double()
            if name.endswith("running_mean"):
                var_name = name[: -len("mean")] + "var"
                second = stats[var_name].double() + value**2  # E[x²] of this client
                self._accumulate(var_name, second * examples)
                self._accumulate(name, value * examples)
            elif name.endswith("num_batches_tracked"):
                self._sums[name] = torch.maximum(self._sums.get(name, value), value)
        self.count += 1
        self.examples += examples

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        self._sums[name] = self._sums[name] + value if name in self._sums else value

    def result(self) -> dict[str, torch.Tensor]:
        """The pooled statistics, ready to load into the model's state dict.

        Returns
        -------
        dict of str to torch.Tensor
            Keyed and ordered as ``template``, in its dtypes; variances clamped at zero.

        Raises
        ------
        NormStatsError
            If nothing was added, or a pooled statistic breaks the numeric contract of every
            soup value (``fedsms.codec.in_range``: clients' means far apart pool into an
            enormous variance).
        """
        if not self.count:
            raise NormStatsError("no norm statistics were added; nothing to pool")
        out = {}
        for name, template in self.template.items():
            if name.endswith("running_mean"):
                value = self._sums[name] / self.examples
            elif name.endswith("running_var"):
                mean = self._sums[name[: -len("var")] + "mean"] / self.examples
                value = (self._sums[name] / self.examples - mean**2).clamp_min(0)
            else:
                value = self._sums[name]
            if value.is_floating_point() and not in_range(value):  # in float64, before the cast
                raise NormStatsError(
                    f"the pooled norm statistic {name!r} is beyond ±{MAX_MAGNITUDE:g} (the clients' statistics are "
                    "too far apart to pool)"
                )
            out[name] = value.to(template.dtype)
        return out
