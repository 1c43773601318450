"""Pruning masks: which tensors are prunable, how masks are chosen, enforced and named.

A mask is a ``dict[str, torch.Tensor]`` from parameter name to a ``bool`` tensor of the
parameter's shape (True = kept). Every standard weight matrix is prunable (linear,
convolution, attention projections, recurrent weights); biases, norm layers and embeddings
are not unless a name pattern includes them. The dict's order is the model's parameter
order, and that order defines the wire order and the digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from fnmatch import fnmatch

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from fedsms import FedSMSError
from fedsms.schema import PRUNING_METHODS

Mask = dict[str, torch.Tensor]

# Every standard weight matrix is prunable: the weights of linear and convolution layers,
# the attention projections of nn.MultiheadAttention (its out_proj is an nn.Linear) and the
# input/hidden weights of recurrent layers. Biases, norm layers and embeddings are not,
# unless a name pattern asks for them.
PRUNABLE_LAYERS = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_RECURRENT_WEIGHTS = ("weight_ih_l", "weight_hh_l", "weight_hr_l")


def is_weight_matrix(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s own parameter ``name`` is a standard weight matrix (prunable by default).

    Parameters
    ----------
    module : torch.nn.Module
        The module that owns the parameter.
    name : str
        The parameter's name within the module (e.g. ``"weight"``, ``"in_proj_weight"``).

    Returns
    -------
    bool
        True for the ``weight`` of linear and convolution layers, the projection weights of
        ``nn.MultiheadAttention`` and the ``weight_ih/hh/hr`` of ``nn.RNN/GRU/LSTM``.
    """
    if isinstance(module, PRUNABLE_LAYERS):
        return name == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return name in _ATTENTION_WEIGHTS
    if isinstance(module, nn.RNNBase):
        return name.startswith(_RECURRENT_WEIGHTS)
    return False


def _patterns(patterns: str | Iterable[str]) -> list[str]:
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    return [p.strip() for p in patterns if p.strip()]


def prunable_names(
    model: nn.Module,
    *,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
) -> list[str]:
    """Names of the prunable weights, in the model's parameter order.

    By default every standard weight matrix (:func:`is_weight_matrix`): linear and
    convolution weights, attention projections, recurrent weights; never biases, norm
    layers or embeddings. ``include`` adds parameters whose names match a pattern (of at
    least 2 dimensions: a vector is never pruned), ``exclude`` removes those that match one;
    then ``keep_first_dense`` / ``keep_last_dense`` apply.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose modules are inspected.
    keep_first_dense : bool, default False
        Leave the first prunable weight (in parameter order) out, so it stays dense.
    keep_last_dense : bool, default False
        Leave the last prunable weight out (usually the classifier), so it stays dense.
    include, exclude : str or iterable of str, optional
        ``fnmatch`` patterns over parameter names (a string: comma-separated), e.g.
        ``"embed*"`` or ``"head.*,*.out_proj.weight"``.

    Returns
    -------
    list of str
        Parameter names such as ``"features.0.weight"``, in ``model.named_parameters()`` order.
    """
    return [
        name for name, reason in prune_plan(model, keep_first_dense, keep_last_dense, include, exclude) if not reason
    ]


def prune_plan(
    model: nn.Module,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
) -> list[tuple[str, str]]:
    """Every parameter and why it is not pruned (empty: it is), in parameter order.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    keep_first_dense, keep_last_dense, include, exclude
        As for :func:`prunable_names`.

    Returns
    -------
    list of tuple of (str, str)
        ``(name, reason)``; the reason is ``""`` for a pruned parameter, else e.g.
        ``"bias"``, ``"norm layer"``, ``"embedding"``, ``"excluded by 'head.*'"``,
        ``"keep-first-dense"``.
    """
    include, exclude = _patterns(include), _patterns(exclude)
    owners = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{name}" if module_name else name] = (module, name)
    plan = []
    for full, param in model.named_parameters():
        module, name = owners[full]
        reason = "" if is_weight_matrix(module, name) else _not_a_weight_matrix(module, name, param)
        if reason and param.dim() >= 2 and any(fnmatch(full, p) for p in include):
            reason = ""
        hit = next((p for p in exclude if fnmatch(full, p)), None)
        if not reason and hit is not None:
            reason = f"excluded by {hit!r}"
        plan.append([full, reason])
    pruned = [entry for entry in plan if not entry[1]]
    if keep_first_dense and pruned:
        pruned[0][1] = "keep-first-dense"
    if keep_last_dense and pruned:
        pruned[-1][1] = "keep-last-dense"
    return [(name, reason) for name, reason in plan]


def _not_a_weight_matrix(module: nn.Module, name: str, param: torch.Tensor) -> str:
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "embedding (prune-include to prune it)"
    if "norm" in type(module).__name__.lower():
        return "norm layer"
    if "bias" in name or param.dim() < 2:
        return "bias or vector"
    return "not a standard weight matrix (prune-include to prune it)"


def prune_table(model: nn.Module, mask: Mapping[str, torch.Tensor], plan: list[tuple[str, str]]) -> str:
    """A table of every parameter: its shape, whether it is pruned and at what sparsity, or
    why not; then the sparsity over the pruned tensors and over all parameters.

    Parameters
    ----------
    model : torch.nn.Module
        The model (its parameters).
    mask : Mask
        The job's mask; its tensors are the pruned ones.
    plan : list of tuple of (str, str)
        What :func:`prune_plan` returned for the model (why a tensor is not pruned).

    Returns
    -------
    str
        Lines ready to print.
    """
    params = dict(model.named_parameters())
    reasons = dict(plan)
    width = max(len(n) for n in params)
    lines = [f"{'tensor':<{width}}  {'shape':<18}  pruned"]
    for name, param in params.items():
        if name in mask:
            said = f"yes, {1 - int(mask[name].sum()) / mask[name].numel():.1%} zero"
        else:
            said = f"no: {reasons.get(name) or 'not in the mask'}"
        lines.append(f"{name:<{width}}  {str(tuple(param.shape)):<18}  {said}")
    total = sum(p.numel() for p in params.values())
    pruned = sum(mask[n].numel() for n in mask)
    zeros = sum(mask[n].numel() - int(mask[n].sum()) for n in mask)
    lines.append(
        f"sparsity {zeros / max(pruned, 1):.2%} over the {pruned:,} pruned weights "
        f"({pruned / total:.1%} of the parameters), {zeros / total:.2%} over all {total:,} parameters"
    )
    return "\n".join(lines)


def dense_mask(model: nn.Module, names: Iterable[str]) -> Mask:
    """A mask that keeps every entry of the named weights (sparsity 0).

    Parameters
    ----------
    model : torch.nn.Module
        The model the mask is for; it gives each tensor's shape.
    names : iterable of str
        Parameter names to mask, usually ``prunable_names(model)``; their order becomes the
        mask's order.

    Returns
    -------
    Mask
        Each name mapped to an all-True bool tensor of that parameter's shape (on the
        parameter's device).

    Raises
    ------
    KeyError
        If a name is not a parameter of ``model``.
    """
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}


# ---- schedule ------------------------------------------------------------------------


def prune_fraction_per_phase(target_sparsity: float, phases: int) -> float:
    """q such that pruning q of the remaining weights in each of ``phases`` phases reaches
    ``target_sparsity``: q = 1 - (1 - s)^(1/P).

    Parameters
    ----------
    target_sparsity : float
        Final fraction of prunable weights that are zero, in [0, 1).
    phases : int
        Number of prune phases, at least 1.

    Returns
    -------
    float
        The fraction of the still-kept weights pruned in each phase.

    Raises
    ------
    FedSMSError
        If ``target_sparsity`` is outside [0, 1) or ``phases`` is below 1.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise FedSMSError(f"target sparsity must be in [0, 1), got {target_sparsity}; pass e.g. 0.9")
    if phases < 1:
        raise FedSMSError(f"phases must be at least 1, got {phases}")
    return 1.0 - (1.0 - target_sparsity) ** (1.0 / phases)


def sparsity_after_phase(target_sparsity: float, phases: int, phase: int) -> float:
    """Sparsity after phase ``phase`` (1-based): 1 - (1 - q)^p; phase 0 is dense.

    Parameters
    ----------
    target_sparsity : float
        Final sparsity after the last phase, in [0, 1).
    phases : int
        Number of prune phases, at least 1.
    phase : int
        The phase, 0 (dense) to ``phases`` (``target_sparsity``).

    Returns
    -------
    float
        Fraction of prunable weights that are zero after ``phase``.

    Raises
    ------
    FedSMSError
        If ``target_sparsity`` or ``phases`` is out of range (see ``prune_fraction_per_phase``).
    """
    q = prune_fraction_per_phase(target_sparsity, phases)
    return 1.0 - (1.0 - q) ** phase


def kept_count(total: int, sparsity: float) -> int:
    """Entries kept at ``sparsity``: the exact count every pruning method hits.

    Parameters
    ----------
    total : int
        Number of entries the sparsity is measured over.
    sparsity : float
        Fraction of ``total`` to prune, in [0, 1].

    Returns
    -------
    int
        ``total - round(sparsity * total)``.
    """
    return total - int(round(sparsity * total))


# ---- choosing a mask -----------------------------------------------------------------


def compute_mask(
    params: Mapping[str, torch.Tensor],
    old_mask: Mask,
    sparsity: float,
    *,
    method: str = "global",
    generator: torch.Generator | None = None,
) -> Mask:
    """The next mask at ``sparsity`` (over all entries of ``old_mask``'s tensors).

    Only entries kept by ``old_mask`` can survive (IMP never regrows), so the result is a
    subset of ``old_mask``. ``global`` ranks |w| across all tensors, ``uniform`` prunes each
    tensor to the same sparsity, ``random`` draws the survivors uniformly at random.
    When reaching ``sparsity`` would need regrowth, every entry ``old_mask`` keeps stays kept.

    Parameters
    ----------
    params : mapping of str to torch.Tensor
        The current weights (a state dict or named parameters); only the names in
        ``old_mask`` are read, on any device.
    old_mask : Mask
        The current mask; its names and order are the result's.
    sparsity : float
        Target fraction of zero entries, in [0, 1], counted over all of ``old_mask``'s
        entries (``global``, ``random``) or over each tensor (``uniform``).
    method : str, default "global"
        ``global`` or ``uniform`` magnitude pruning, or ``random``.
    generator : torch.Generator, optional
        Source of randomness; required by ``random``, ignored otherwise.

    Returns
    -------
    Mask
        The new mask, on the CPU, a subset of ``old_mask``.

    Raises
    ------
    FedSMSError
        If ``method`` is not a known pruning method.
    ValueError
        If ``method`` is ``random`` and no ``generator`` is given.
    """
    if method not in PRUNING_METHODS:
        raise FedSMSError(f"unknown pruning method {method!r}; use one of {', '.join(PRUNING_METHODS)}")
    if method == "uniform":
        return {
            name: _keep_top(_scores(params[name], keep), keep, kept_count(keep.numel(), sparsity))
            for name, keep in old_mask.items()
        }
    if method == "random" and generator is None:
        raise ValueError("random pruning needs a torch.Generator")
    names = list(old_mask)
    flat_keep = torch.cat([old_mask[n].reshape(-1) for n in names])
    if method == "global":
        flat_scores = torch.cat([_scores(params[n], old_mask[n]).reshape(-1) for n in names])
    else:
        flat_scores = torch.rand(flat_keep.shape, generator=generator, dtype=torch.float64)
        flat_scores = flat_scores.masked_fill(~flat_keep, -1.0)
    new_flat = _keep_top(flat_scores, flat_keep, kept_count(flat_keep.numel(), sparsity))
    return dict(zip(names, (chunk.view_as(old_mask[n]) for n, chunk in zip(names, _split(new_flat, old_mask)))))


def prune_state(
    state: Mapping[str, torch.Tensor], old_mask: Mask, sparsity: float, *, method: str = "global", seed: int = 0
) -> tuple[dict[str, torch.Tensor], Mask]:
    """One prune step of IMP on a state dict: the next mask at ``sparsity`` and the state
    with everything outside it set to zero.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        The state dict to prune; tensors not in ``old_mask`` pass through unchanged.
    old_mask : Mask
        The current mask; the new one is a subset of it.
    sparsity : float
        Target sparsity, in [0, 1] (see ``compute_mask``).
    method : str, default "global"
        ``global``, ``uniform`` or ``random`` (see ``compute_mask``).
    seed : int, default 0
        Seed of the generator ``random`` pruning draws from; the same seed gives the same mask.

    Returns
    -------
    tuple of (dict of str to torch.Tensor, Mask)
        The pruned state (same keys and order; masked tensors are new, the others the same
        objects as in ``state``) and the new mask.

    Raises
    ------
    FedSMSError
        If ``method`` is not a known pruning method.
    """
    new = compute_mask(state, old_mask, sparsity, method=method, generator=torch.Generator().manual_seed(seed))
    return {k: v * new[k].to(v.dtype) if k in new else v for k, v in state.items()}, new


def _scores(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """|w| in float64 on the CPU; already pruned entries score -1 so they are never kept."""
    return weight.detach().to("cpu", torch.float64).abs().masked_fill(~keep.cpu(), -1.0)


def _keep_top(scores: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    available = int(keep.sum())
    if k > available:
        # Reaching the sparsity would need regrowth; keep what is left instead.
        k = available
    flat = scores.reshape(-1)
    new = torch.zeros(flat.shape, dtype=torch.bool)
    if k > 0:
        # topk breaks ties by position, so the kept count is exact even with equal |w|.
        new[torch.topk(flat, k, sorted=False).indices] = True
    return new.view_as(keep) & keep.cpu()


def _split(flat: torch.Tensor, like: Mask) -> list[torch.Tensor]:
    return list(torch.split(flat, [m.numel() for m in like.values()]))


# ---- applying and enforcing ---------------------------------------------------------


def check_mask_fits(model: nn.Module, mask: Mask) -> None:
    """Check that every tensor ``mask`` names is a parameter of ``model`` with the same shape.

    Parameters
    ----------
    model : torch.nn.Module
        The model the mask should fit.
    mask : Mask
        The mask to check.

    Raises
    ------
    FedSMSError
        If the mask names a tensor the model lacks, or one of another shape.
    """
    params = dict(model.named_parameters())
    for name, keep in mask.items():
        if name not in params:
            raise FedSMSError(
                f"mask names tensor {name!r} which the model does not have; use a mask made for this model"
            )
        if tuple(params[name].shape) != tuple(keep.shape):
            raise FedSMSError(
                f"mask for {name!r} has shape {tuple(keep.shape)} but the model's is "
                f"{tuple(params[name].shape)}; use a mask made for this model"
            )


class MaskEnforcer:
    """Zeroes the pruned entries of a model's weights in place.

    ``apply()`` is one fused ``torch._foreach_mul_`` over all masked tensors, cheap enough
    to run after every optimizer step.

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on its device: the mask is copied to each weight's device and
        dtype once, here.
    mask : Mask
        Parameter name to a bool tensor of that parameter's shape (True = kept).

    Raises
    ------
    FedSMSError
        If the mask names a tensor the model lacks or has another shape.
    """

    def __init__(self, model: nn.Module, mask: Mask) -> None:
        check_mask_fits(model, mask)
        params = dict(model.named_parameters())
        self.params = [params[n] for n in mask]
        # in each weight's device, dtype and memory layout (channels-last included): one fused multiply
        self.factors = [torch.empty_like(params[n]).copy_(keep) for n, keep in mask.items()]

    @torch.no_grad()
    def apply(self) -> None:
        """Multiply each masked weight by its mask, in place and without autograd."""
        if self.params:
            torch._foreach_mul_(self.params, self.factors)


class MaskHook:
    """Keeps a model's pruned weights at zero after every step of one optimizer.

    Returned by :func:`enforce_mask`. ``remove()`` detaches it; it is also a context
    manager that detaches on exit.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer whose steps are followed (a step post-hook is registered on it).
    enforcer : MaskEnforcer
        The zeroing to run after each step.

    Attributes
    ----------
    enforcer : MaskEnforcer
        The fused zeroing it runs after each ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, enforcer: MaskEnforcer) -> None:
        self.enforcer = enforcer
        self._handle = optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: enforcer.apply())

    def apply(self) -> None:
        """Zero the pruned weights now (as after a step)."""
        self.enforcer.apply()

    def remove(self) -> None:
        """Detach from the optimizer: later steps no longer zero the pruned weights."""
        self._handle.remove()

    def __enter__(self) -> MaskHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def enforce_mask(optimizer: torch.optim.Optimizer, model: nn.Module, mask: Mask) -> MaskHook:
    """Keep the pruned weights of ``model`` exactly zero through ``optimizer``'s steps.

    The pruned entries are zeroed at once and then after every ``optimizer.step()``
    (an optimizer step post-hook running one fused multiply over all masked tensors), so
    any optimizer works unchanged: SGD with momentum, Nesterov or weight decay, Adam,
    AdamW, steps after gradient clipping, or a ``GradScaler`` (a skipped step changes
    nothing, so there is nothing to zero). The optimizer's own state (momentum buffers,
    Adam moments) may keep nonzero entries for pruned weights; they never reach the model.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer that updates ``model``'s parameters.
    model : torch.nn.Module
        The model, already on its device (the mask is copied to each weight's device and
        dtype once, here).
    mask : dict of str to torch.Tensor
        Parameter name to a bool tensor of that parameter's shape (True = kept).

    Returns
    -------
    MaskHook
        Call ``remove()`` on it (or use it as a context manager) to detach.

    Raises
    ------
    FedSMSError
        If the mask names a tensor the model lacks or has another shape.
    """
    enforcer = MaskEnforcer(model, mask)
    enforcer.apply()
    return MaskHook(optimizer, enforcer)


def outside_mask_nonzeros(state: Mapping[str, torch.Tensor], mask: Mask) -> dict[str, int]:
    """Per tensor, the count of nonzero entries the mask says must be zero.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        A state dict holding at least every tensor ``mask`` names.
    mask : Mask
        The mask the state should respect.

    Returns
    -------
    dict of str to int
        Only the tensors with at least one such entry; empty when the state respects the mask.

    Raises
    ------
    KeyError
        If ``state`` lacks a tensor the mask names.
    """
    counts = {}
    for name, keep in mask.items():
        bad = int(torch.count_nonzero(state[name].detach().cpu() * (~keep.cpu())))
        if bad:
            counts[name] = bad
    return counts


# ---- reporting and naming ------------------------------------------------------------


def sparsity(mask: Mask) -> float:
    """Fraction of the masked entries that are pruned, over all tensors together.

    Parameters
    ----------
    mask : Mask
        The mask to measure.

    Returns
    -------
    float
        In [0, 1]; 0.0 for an empty mask.
    """
    total = sum(m.numel() for m in mask.values())
    kept = sum(int(m.sum()) for m in mask.values())
    return 1.0 - kept / total if total else 0.0


def sparsity_report(mask: Mask) -> list[dict]:
    """One row per tensor (name, shape, numel, nnz, sparsity) and a final ``total`` row.

    Parameters
    ----------
    mask : Mask
        The mask to describe.

    Returns
    -------
    list of dict
        Rows with keys ``name``, ``shape`` (list of int), ``numel``, ``nnz`` (kept entries)
        and ``sparsity`` (float in [0, 1]), ready for JSON or ``format_report``.
    """
    rows = []
    for name, keep in mask.items():
        nnz = int(keep.sum())
        rows.append(
            {
                "name": name,
                "shape": list(keep.shape),
                "numel": keep.numel(),
                "nnz": nnz,
                "sparsity": 1.0 - nnz / keep.numel(),
            }
        )
    numel = sum(r["numel"] for r in rows)
    nnz = sum(r["nnz"] for r in rows)
    rows.append(
        {"name": "total", "shape": [], "numel": numel, "nnz": nnz, "sparsity": 1.0 - nnz / numel if numel else 0.0}
    )
    return rows


def format_report(rows: list[dict]) -> str:
    """A plain-text table of ``sparsity_report`` rows, one line per tensor under a header.

    Parameters
    ----------
    rows : list of dict
        Rows as ``sparsity_report`` returns them (at least one).

    Returns
    -------
    str
        The table, lines joined by newlines, without a trailing newline.
    """
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'tensor':<{width}}  {'numel':>10}  {'nnz':>10}  {'sparsity':>8}"]
    lines += [f"{r['name']:<{width}}  {r['numel']:>10}  {r['nnz']:>10}  {r['sparsity']:>8.2%}" for r in rows]
    return "\n".join(lines)


def pack_mask(mask: Mask) -> bytes:
    """All mask bits in mask order, packed 8 per byte (little bit order).

    Parameters
    ----------
    mask : Mask
        The mask to pack; each tensor is flattened in row-major order.

    Returns
    -------
    bytes
        ``ceil(total entries / 8)`` bytes; the last byte is padded with zero bits.
    """
    if not mask:
        return b""
    flat = torch.cat([m.reshape(-1).cpu() for m in mask.values()]).numpy()
    return np.packbits(flat, bitorder="little").tobytes()


def unpack_mask(data: bytes, shapes: Mapping[str, tuple[int, ...]]) -> Mask:
    """The inverse of ``pack_mask``: bits back into one bool tensor per name.

    Parameters
    ----------
    data : bytes
        Packed bits, as ``pack_mask`` writes them.
    shapes : mapping of str to tuple of int
        Each tensor's name and shape, in mask order.

    Returns
    -------
    Mask
        CPU bool tensors of the given shapes, in the order of ``shapes``.

    Raises
    ------
    FedSMSError
        If ``data`` is not exactly as long as the shapes need.
    """
    total = sum(int(np.prod(s)) for s in shapes.values())
    if len(data) != (total + 7) // 8:
        raise FedSMSError(f"mask bits have {len(data)} bytes but the shapes need {(total + 7) // 8}")
    # unpackbits writes 0s and 1s: numpy's bool, viewed, not converted
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=total, bitorder="little").view(bool)
    out, start = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = torch.from_numpy(flat[start : start + n].copy()).view(*shape)
        start += n
    return out


def mask_digest(mask: Mask) -> str:
    """sha256 over names, shapes and bits: two masks with the same digest are the same mask.

    Parameters
    ----------
    mask : Mask
        The mask to name; its order matters.

    Returns
    -------
    str
        64 lowercase hex characters.
    """
    h = hashlib.sha256()
    for name, keep in mask.items():
        h.update(f"{name}:{tuple(keep.shape)};".encode())
    h.update(pack_mask(mask))
    return h.hexdigest()


# ---- torch.nn.utils.prune interop ---------------------------------------------------


def export_to_torch_prune(model: nn.Module, mask: Mask) -> None:
    """Attach ``weight_orig``/``weight_mask`` reparametrisations, as ``prune.custom_from_mask``.

    The model is changed in place; its state dict then holds ``<name>_orig`` and
    ``<name>_mask`` in place of each masked ``<name>``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to reparametrise.
    mask : Mask
        The mask to attach; each tensor is moved to its weight's device.

    Raises
    ------
    FedSMSError
        If the mask names a tensor the model lacks or has another shape.
    """
    check_mask_fits(model, mask)
    modules = dict(model.named_modules())
    for name, keep in mask.items():
        module_name, _, param = name.rpartition(".")
        module = modules[module_name]
        torch_prune.custom_from_mask(module, param, keep.to(getattr(module, param).device))


def import_from_torch_prune(model: nn.Module, *, make_permanent: bool = True) -> Mask:
    """Read the masks of every ``torch.nn.utils.prune``-pruned weight.

    With ``make_permanent`` the reparametrisation is removed (``prune.remove``) so the model
    holds plain zeroed weights again, as fedsms expects.

    Parameters
    ----------
    model : torch.nn.Module
        A model pruned with ``torch.nn.utils.prune`` (for example by ``export_to_torch_prune``).
    make_permanent : bool, default True
        Remove the reparametrisation from ``model`` (in place) after reading each mask.

    Returns
    -------
    Mask
        CPU bool masks keyed by the weights' plain names (``layer.weight``), in the model's
        parameter order; empty when nothing is pruned.
    """
    mask = {}
    for module_name, module in model.named_modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                param = hook._tensor_name
                full = f"{module_name}.{param}" if module_name else param
                mask[full] = getattr(module, f"{param}_mask").detach().cpu().bool().clone()
                if make_permanent:
                    torch_prune.remove(module, param)
    order = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return dict(sorted(mask.items(), key=lambda kv: order.get(kv[0], len(order))))
