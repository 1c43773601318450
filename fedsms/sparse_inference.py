"""Sparse inference: pruned layers that run torch's CSR kernels where, measured, they win.

:func:`sparsify` times every pruned ``Linear``, ``Conv1d``/``Conv2d`` and
``MultiheadAttention`` of a model on the target device, at the shapes an example input
gives them, against a sparse replacement, and swaps in the replacement only where it is
faster by at least ``margin``; every other layer stays dense. The choice and both times
per layer form a :class:`SparsePlan`, which :func:`apply_plan` reuses without measuring
and ``fedsms export --plan`` records in the compact file (``fedsms inspect`` shows it).

Kernels (CPU, torch 2.14, measured in BENCHMARKS.md): ``Linear`` through ``torch.mv`` for a
single row and ``torch.addmm`` otherwise, on a CSR weight with int32 indices (int32 was
10-30 % faster than int64; COO was 5-20x slower than dense, so it is not offered).
Convolutions go through ``unfold`` + the same CSR product, which wins only on large,
very sparse kernels. Attention projections (``in_proj_weight``, ``out_proj``) are each
CSR or dense. Replacements are for inference only (no gradients) and compute the same
function within float32 rounding.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedsms import FedSMSError

__all__ = [
    "LayerChoice",
    "SparsePlan",
    "SparseLinear",
    "SparseConv",
    "SparseMultiheadAttention",
    "apply_plan",
    "format_plan",
    "sparsify",
]


def _csr(weight: torch.Tensor) -> torch.Tensor:
    """A 2-D weight as CSR with int32 indices (the faster kernels on CPU)."""
    with warnings.catch_warnings():  # torch warns on every CSR conversion that CSR support is in beta
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.detach().to_sparse_csr()
    return torch.sparse_csr_tensor(
        csr.crow_indices().to(torch.int32),
        csr.col_indices().to(torch.int32),
        csr.values(),
        csr.shape,
        check_invariants=False,  # built by torch itself just above
    )


def _csr_product(csr: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``rows @ W.T + bias`` for a 2-D ``rows``: ``mv`` for one row (the faster kernel), else ``addmm``."""
    if rows.shape[0] == 1:
        out = torch.mv(csr, rows[0])
        return (out if bias is None else out + bias).unsqueeze(0)
    if bias is None:
        return torch.mm(csr, rows.t()).t()
    return torch.addmm(bias.unsqueeze(1), csr, rows.t()).t()


class SparseLinear(nn.Module):
    """``nn.Linear`` on a CSR weight (inference only).

    Parameters
    ----------
    linear : torch.nn.Linear
        The pruned layer; its weight (zeros included) becomes CSR, its bias is kept.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_csr", _csr(linear.weight), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, as ``nn.Linear`` computes it.

        Parameters
        ----------
        x : torch.Tensor
            Inputs (..., in_features).
        """
        out = _csr_product(self.weight_csr, self.bias, x.reshape(-1, self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features)


class SparseConv(nn.Module):
    """``nn.Conv1d`` / ``nn.Conv2d`` as ``unfold`` + a CSR product (inference only).

    Parameters
    ----------
    conv : torch.nn.Conv1d or torch.nn.Conv2d
        The pruned layer: one group, zero padding given as numbers.
    """

    def __init__(self, conv: nn.Conv1d | nn.Conv2d) -> None:
        super().__init__()
        self.one_d = isinstance(conv, nn.Conv1d)
        self.out_channels = conv.out_channels
        # a 1-D layer runs as a 2-D one of height 1
        two = [(1, v[0]) if self.one_d else tuple(v) for v in (conv.kernel_size, conv.stride, conv.dilation)]
        self.kernel_size, self.stride, self.dilation = two
        self.padding = (0, conv.padding[0]) if self.one_d else tuple(conv.padding)
        self.register_buffer("weight_csr", _csr(conv.weight.reshape(conv.out_channels, -1)), persistent=False)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution's output, as the dense layer computes it.

        Parameters
        ----------
        x : torch.Tensor
            Inputs (N, C, L) for a 1-D layer, (N, C, H, W) for a 2-D one.
        """
        image = x.unsqueeze(2) if self.one_d else x
        n, h, w = image.shape[0], image.shape[2], image.shape[3]
        size = [
            (extent + 2 * p - d * (k - 1) - 1) // s + 1
            for extent, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride)
        ]
        cols = F.unfold(image, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C·k, L)
        rows = cols.transpose(1, 2).reshape(n * size[0] * size[1], -1)
        out = _csr_product(self.weight_csr, self.bias, rows)  # (N·L, out)
        out = out.reshape(n, size[0], size[1], self.out_channels).permute(0, 3, 1, 2).contiguous()
        return out.squeeze(2) if self.one_d else out


class SparseMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` whose input and output projections are each CSR or dense
    (inference only: no dropout). Signature and results as ``nn.MultiheadAttention``.

    Its ``_qkv_same_embed_dim`` is False so that ``nn.TransformerEncoderLayer`` takes its
    plain path through this module rather than its fused dense kernel.

    Parameters
    ----------
    attention : torch.nn.MultiheadAttention
        The layer: equal query, key and value widths, no ``bias_k``/``bias_v``, no ``add_zero_attn``.
    sparse_in : bool
        Run the input projection on CSR.
    sparse_out : bool
        Run the output projection on CSR.
    """

    _qkv_same_embed_dim = False

    def __init__(self, attention: nn.MultiheadAttention, sparse_in: bool, sparse_out: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = (
            attention.embed_dim,
            attention.num_heads,
            attention.batch_first,
        )
        in_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=attention.in_proj_bias is not None)
        in_proj.weight = attention.in_proj_weight
        if attention.in_proj_bias is not None:
            in_proj.bias = attention.in_proj_bias
        self.in_proj = SparseLinear(in_proj) if sparse_in else in_proj
        self.out_proj = SparseLinear(attention.out_proj) if sparse_out else attention.out_proj

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """The input projection's bias (``nn.TransformerEncoderLayer`` reads it before taking its plain path)."""
        return self.in_proj.bias

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output (and weights when ``need_weights``), as ``nn.MultiheadAttention``.

        Parameters
        ----------
        query, key, value : torch.Tensor
            (L, E) unbatched, else (N, L, E) with ``batch_first``, (L, N, E) without.
        key_padding_mask : torch.Tensor, optional
            (N, S) or (S,): True (or -inf) marks keys to ignore.
        need_weights : bool
            Also return the attention weights.
        attn_mask : torch.Tensor, optional
            (L, S) or (N·heads, L, S): True (or -inf) marks pairs not to attend.
        average_attn_weights : bool
            Average the returned weights over heads.
        is_causal : bool
            Causal attention when ``attn_mask`` is None.
        """
        unbatched = query.dim() == 2
        self_attention = query is key and key is value
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        e, h = self.embed_dim, self.num_heads
        if self_attention:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:  # each input through the fused projection, its third kept
            q, k, v = (self.in_proj(t)[..., i * e : (i + 1) * e] for i, t in enumerate((query, key, value)))
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(n, -1, h, e // h).transpose(1, 2) for t in (q, k, v))
        mask = self._mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        if is_causal and mask is None:
            mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril().logical_not()
            mask = torch.zeros(length, source, dtype=q.dtype, device=q.device).masked_fill(mask, -math.inf)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(e // h)
        if mask is not None:
            scores = scores + mask
        weights = scores.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(n, length, e)
        out = self.out_proj(out)
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights

    def _mask(self, attn_mask, key_padding_mask, n: int, length: int, source: int, dtype) -> torch.Tensor | None:
        """One additive float mask (N, heads, L, S) from the boolean or float masks given."""
        additive = None
        for given, shape in ((attn_mask, None), (key_padding_mask, (n, 1, 1, source))):
            if given is None:
                continue
            if given.dtype == torch.bool:
                given = torch.zeros(given.shape, dtype=dtype, device=given.device).masked_fill(given, -math.inf)
            if shape is None:
                given = given.reshape(n, self.num_heads, length, source) if given.dim() == 3 else given
            else:
                given = given.reshape(shape)
            additive = given if additive is None else additive + given
        return additive


# ---- the plan ------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """The measured choice for one layer.

    Attributes
    ----------
    name : str
        The module's name in the model.
    kind : str
        ``"linear"``, ``"conv"`` or ``"attention"``.
    sparsity : float
        Fraction of the layer's weight entries that are zero.
    kernel : str
        ``"csr"`` or ``"dense"`` (for attention: ``"csr"`` when either projection is).
    dense_ms, sparse_ms : float
        Milliseconds of the fastest of ``repeats`` calls of the dense layer and of its sparse replacement.
    detail : dict
        For attention, the per-projection choices and times.
    """

    name: str
    kind: str
    sparsity: float
    kernel: str
    dense_ms: float
    sparse_ms: float
    detail: dict = field(default_factory=dict)


@dataclass
class SparsePlan:
    """Which layers run sparse, measured where and at which input shape.

    Attributes
    ----------
    device : str
        ``"cpu"`` or the CUDA device's name.
    threads : int
        ``torch.get_num_threads()`` during the measurement.
    input_shape : list of int
        The example input's shape (its batch size shapes every layer's choice).
    margin : float
        A sparse kernel was chosen when its time was below ``margin`` x the dense time.
    layers : list of LayerChoice
        One per pruned layer, in module order.
    """

    device: str
    threads: int
    input_shape: list[int]
    margin: float
    layers: list[LayerChoice]

    def to_dict(self) -> dict:
        """The plan as JSON-ready values (what ``fedsms export --plan`` records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SparsePlan:
        """A plan from :meth:`to_dict`'s values.

        Raises
        ------
        FedSMSError
            If ``data`` is not such a record.
        """
        try:
            return cls(**{**data, "layers": [LayerChoice(**layer) for layer in data["layers"]]})
        except (TypeError, KeyError):
            raise FedSMSError("the sparse plan is not one fedsms recorded; measure a new one with sparsify") from None


def format_plan(plan: SparsePlan | dict) -> str:
    """A plain-text table of a plan: one line per layer with its kernel and both times.

    Parameters
    ----------
    plan : SparsePlan or dict
        A plan or its :meth:`SparsePlan.to_dict` record.

    Returns
    -------
    str
        The table, without a trailing newline.
    """
    plan = plan if isinstance(plan, SparsePlan) else SparsePlan.from_dict(plan)
    width = max([5, *(len(c.name) for c in plan.layers)])
    lines = [
        f"sparse inference plan: {plan.device}, {plan.threads} threads, input {tuple(plan.input_shape)}, "
        f"sparse where < {plan.margin:g} x dense",
        f"{'layer':<{width}}  {'kind':<9}  {'sparsity':>8}  {'kernel':<6}  {'dense ms':>9}  {'sparse ms':>9}",
    ]
    lines += [
        f"{c.name:<{width}}  {c.kind:<9}  {c.sparsity:>8.2%}  {c.kernel:<6}  {c.dense_ms:>9.4f}  {c.sparse_ms:>9.4f}"
        for c in plan.layers
    ]
    return "\n".join(lines)


# ---- measuring and replacing ---------------------------------------------------------


def _kind(module: nn.Module) -> str | None:
    """Which replacement fits ``module`` (None: none does)."""
    if isinstance(module, nn.MultiheadAttention):
        plain = module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn
        return "attention" if plain else None
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        numeric = not isinstance(module.padding, str) and module.padding_mode == "zeros"
        return "conv" if numeric and module.groups == 1 else None
    return None


def _zeros(*weights: torch.Tensor) -> float:
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total


def _timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    def measure(call: Callable[[], object]) -> float:
        call()  # warm-up: first-call allocations and kernel selection
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return 1e3 * min(times)  # the fastest call: what the kernel costs, least disturbed by other load

    return measure


def _candidates(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Pruned layers a replacement fits, outermost first (an attention's ``out_proj`` belongs to it)."""
    found: dict[str, tuple[str, nn.Module]] = {}
    inside_attention: set[str] = set()
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None or any(name.startswith(a + ".") for a in inside_attention):
            continue
        if kind == "attention":
            inside_attention.add(name)
            weights = (module.in_proj_weight, module.out_proj.weight)
        else:
            weights = (module.weight,)
        if _zeros(*weights) > 0:
            found[name] = (kind, module)
    return found


def _input_shapes(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shape of each named module's first input during one forward of ``example``."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module, args) -> None:  # returns None: a pre-hook's return value would replace the inputs
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    hooks = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _replacement(kind: str, module: nn.Module, sparse_in: bool = True, sparse_out: bool = True) -> nn.Module:
    if kind == "linear":
        return SparseLinear(module)
    if kind == "conv":
        return SparseConv(module)
    return SparseMultiheadAttention(module, sparse_in, sparse_out)


def _choose(name, kind, module, shape, measure, margin, device) -> tuple[LayerChoice, nn.Module | None]:
    x = torch.randn(shape, device=device)  # timing depends on shapes, not values
    if kind == "attention":
        e = module.embed_dim
        rows = torch.randn(math.prod(shape[:-1]), e, device=device)
        detail = {}
        for part, weight, bias in (
            ("in_proj", module.in_proj_weight, module.in_proj_bias),
            ("out_proj", module.out_proj.weight, module.out_proj.bias),
        ):
            csr = _csr(weight)
            dense_ms = measure(lambda w=weight, b=bias: F.linear(rows, w, b))
            sparse_ms = measure(lambda c=csr, b=bias: _csr_product(c, b, rows))
            detail[part] = {"sparsity": _zeros(weight), "dense_ms": dense_ms, "sparse_ms": sparse_ms}
            detail[part]["kernel"] = "csr" if sparse_ms < margin * dense_ms else "dense"
        sparse_in, sparse_out = (detail[p]["kernel"] == "csr" for p in ("in_proj", "out_proj"))
        replacement = _replacement(kind, module, sparse_in, sparse_out)
        dense_ms = measure(lambda: module(x, x, x, need_weights=False))
        sparse_ms = measure(lambda: replacement(x, x, x, need_weights=False))
        choice = LayerChoice(
            name,
            kind,
            _zeros(module.in_proj_weight, module.out_proj.weight),
            "csr" if sparse_in or sparse_out else "dense",
            dense_ms,
            sparse_ms,
            detail,
        )
        return choice, replacement if sparse_in or sparse_out else None
    replacement = _replacement(kind, module)
    dense_ms, sparse_ms = measure(lambda: module(x)), measure(lambda: replacement(x))
    chosen = sparse_ms < margin * dense_ms
    choice = LayerChoice(name, kind, _zeros(module.weight), "csr" if chosen else "dense", dense_ms, sparse_ms)
    return choice, replacement if chosen else None


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _fence_fused_layers(model: nn.Module) -> None:
    """``nn.TransformerEncoder(Layer)`` read their children's dense weights in their fused fast
    paths: turn those paths off wherever a replacement lives."""
    replaced = (SparseLinear, SparseConv, SparseMultiheadAttention)
    for layer in model.modules():
        if not any(isinstance(m, replaced) for m in layer.modules()):
            continue
        if isinstance(layer, nn.TransformerEncoder):
            layer.use_nested_tensor = False  # its nested-tensor path reads the first layer's dense weights
        if isinstance(layer, nn.TransformerEncoderLayer) and isinstance(layer.self_attn, nn.MultiheadAttention):
            layer.self_attn = SparseMultiheadAttention(layer.self_attn, sparse_in=False, sparse_out=False)


def sparsify(
    model: nn.Module, example: torch.Tensor, *, margin: float = 0.9, repeats: int = 7, only: list[str] | None = None
) -> SparsePlan:
    """Replace, in place, each pruned layer whose sparse kernel is measurably faster here.

    The model is put in eval mode and measured on the device of its parameters, at the
    layer input shapes one forward of ``example`` produces, with the current thread count.
    A layer is replaced when its sparse time is below ``margin`` x its dense time.

    Parameters
    ----------
    model : torch.nn.Module
        The pruned model (exact zeros), already on the target device.
    example : torch.Tensor
        An input batch of the shape to serve (its values do not matter).
    margin : float, default 0.9
        How much faster, as a fraction of the dense time, a sparse kernel must be.
    repeats : int, default 7
        Timed calls per layer and variant (the fastest counts), after one warm-up.
    only : list of str, optional
        Measure only these module names (default: every pruned ``Linear``, ``Conv1d``,
        ``Conv2d`` and ``MultiheadAttention``).

    Returns
    -------
    SparsePlan
        The choice and both times for each measured layer.

    Raises
    ------
    FedSMSError
        If ``margin`` is not positive, ``repeats`` is below 1, or ``only`` names a layer
        that is not a pruned layer a replacement fits.
    """
    if not margin > 0 or repeats < 1:
        raise FedSMSError(f"margin must be > 0 and repeats >= 1 (got {margin}, {repeats}); pass e.g. 0.9 and 7")
    model.eval()
    device = next(model.parameters()).device
    found = _candidates(model)
    if only is not None:
        missing = sorted(set(only) - set(found))
        if missing:
            raise FedSMSError(f"{missing[:3]} are not pruned Linear/Conv/attention layers; pass names from the plan")
        found = {n: found[n] for n in only}
    shapes = _input_shapes(model, example.to(device), list(found))
    measure = _timer(device, repeats)
    choices, chosen = [], {}
    with torch.no_grad():
        for name, (kind, module) in found.items():
            if name not in shapes:  # not reached by this input
                continue
            choice, replacement = _choose(name, kind, module, shapes[name], measure, margin, device)
            choices.append(choice)
            if replacement is not None:
                chosen[name] = replacement
    for name, replacement in chosen.items():
        _set(model, name, replacement)
    _fence_fused_layers(model)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return SparsePlan(device_name, torch.get_num_threads(), list(example.shape), margin, choices)


def apply_plan(model: nn.Module, plan: SparsePlan | dict) -> nn.Module:
    """Replace, in place, the layers a recorded plan chose sparse (no measuring).

    Parameters
    ----------
    model : torch.nn.Module
        The pruned model the plan was measured on (same architecture), on its device.
    plan : SparsePlan or dict
        From :func:`sparsify` (or its recorded dict).

    Returns
    -------
    torch.nn.Module
        ``model``, in eval mode.

    Raises
    ------
    FedSMSError
        If the plan names a layer the model lacks or no replacement fits.
    """
    plan = plan if isinstance(plan, SparsePlan) else SparsePlan.from_dict(plan)
    model.eval()
    modules = dict(model.named_modules())
    for choice in plan.layers:
        module = modules.get(choice.name)
        kind = None if module is None else _kind(module)
        if kind != choice.kind:
            raise FedSMSError(
                f"the plan's layer {choice.name!r} ({choice.kind}) does not fit this model; measure its own plan"
            )
        if choice.kernel != "csr":
            continue
        sides = [choice.detail.get(p, {}).get("kernel") == "csr" for p in ("in_proj", "out_proj")]
        with torch.no_grad():
            _set(model, choice.name, _replacement(kind, module, *sides))
    _fence_fused_layers(model)
    return model
