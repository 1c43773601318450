"""In-memory arrays, the other data sources the trainers accept, and the batch iterator
every trainer and evaluator uses.

``ArrayData`` holds a whole data set as two tensors. Its inputs are either images,
(N, C, H, W) ``uint8`` (0..255) or floating (already in [0, 1]), or anything else of shape
(N, ...): integer token ids for an ``nn.Embedding`` (kept integer), float features (N, F).
Only image batches are scaled (``uint8`` / 255) and only they can be augmented or
corrupted; normalisation lives inside the model (see ``fedsms.models.Normalize``) so that
corruptions act on real pixel values. Everything is a tensor op on a whole batch: no
DataLoader workers, no per-sample Python.

On a GPU the batches stay there: :func:`resident` moves an ``ArrayData`` that fits to the
device once, and :func:`batches` then draws its order, gathers its batches and augments
them on that device (from a generator seeded by the caller's, so a seed still fixes every
draw), with no host round trip per batch; data left on the host goes over in pinned,
non-blocking copies.

Every trainer and evaluator also takes, wherever it takes an ``ArrayData`` (see
:data:`DataSource`): a map-style or iterable torch ``Dataset`` of (x, y) pairs (batched
here, shuffled with the trainer's seeded generator), a ``DataLoader`` (used as it is: its
batch size, order and workers are the caller's), or a callable that returns an iterable of
(x, y) batches (called once per pass over the data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fedsms import FedSMSError


@dataclass(frozen=True)
class ArrayData:
    """A data set in memory: ``images`` (the inputs, see the module docstring) and ``labels``.

    Parameters
    ----------
    images : torch.Tensor
        The inputs: (N, C, H, W) uint8 in 0..255 or float in [0, 1], or any (N, ...) inputs
        (token ids, features).
    labels : torch.Tensor
        (N,) int64 class indices, or any (N, ...) targets of a custom loss.

    Raises
    ------
    ValueError
        If ``images`` and ``labels`` differ in length.
    """

    images: torch.Tensor  # (N, C, H, W) uint8 in 0..255 or float in [0, 1]; or any (N, ...) inputs
    labels: torch.Tensor  # (N,), int64 class indices (or any (N, ...) targets of a custom loss)

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"images ({self.images.shape[0]}) and labels ({self.labels.shape[0]}) differ in length")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ArrayData:
        """The examples at ``indices``, in that order (a copy).

        Parameters
        ----------
        indices : torch.Tensor or sequence of int
            Example indices (converted to int64).

        Returns
        -------
        ArrayData
            The selected examples.
        """
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ArrayData(self.images[indices], self.labels[indices])

    def head(self, n: int) -> ArrayData:
        """The first ``n`` examples (all of them when there are fewer); shares storage.

        Parameters
        ----------
        n : int
            Number of examples.

        Returns
        -------
        ArrayData
            A view of the first ``n`` examples.
        """
        return ArrayData(self.images[:n], self.labels[:n])

    @property
    def is_image(self) -> bool:
        """Whether the inputs are images (N, C, H, W) of uint8 or floating dtype."""
        return is_image(self.images)

    def float_images(self, indices: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The images at ``indices`` as float32 in [0, 1] (see :func:`to_float`), a copy.

        Parameters
        ----------
        indices : torch.Tensor, slice or None, optional
            Which examples; None: all.

        Returns
        -------
        torch.Tensor
            float32 images.
        """
        x = self.images if indices is None else self.images[indices]
        return to_float(x)

    def inputs(self, indices: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The inputs at ``indices`` as a model takes them (see :func:`prepare_inputs`), a copy.

        Parameters
        ----------
        indices : torch.Tensor, slice or None, optional
            Which examples; None: all.

        Returns
        -------
        torch.Tensor
            The prepared inputs.
        """
        x = self.images if indices is None else self.images[indices]
        return prepare_inputs(x)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """Images as float32: uint8 scaled by 1/255, any other dtype cast as it is (a copy).

    Parameters
    ----------
    images : torch.Tensor
        uint8 images in 0..255 or floating images in [0, 1].

    Returns
    -------
    torch.Tensor
        New float32 tensor; never the input's storage.
    """
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.to(torch.float32, copy=True)  # never hand out the data set's own storage


def is_image(x: torch.Tensor) -> bool:
    """Whether ``x`` is a batch of images: (N, C, H, W) of uint8 (0..255) or floating dtype.

    Parameters
    ----------
    x : torch.Tensor
        A batch of inputs.

    Returns
    -------
    bool
        True for a 4-D uint8 or floating tensor.
    """
    return x.ndim == 4 and (x.dtype == torch.uint8 or x.is_floating_point())


def prepare_inputs(x: torch.Tensor, *, copy: bool = True) -> torch.Tensor:
    """Inputs as a model takes them: uint8 images (N, C, H, W) scaled to float32 in [0, 1],
    other floating inputs as float32, integer inputs (token ids) integer: int32 and int64
    as they are, narrower integers widened to int64 (what ``nn.Embedding`` takes); bool
    inputs unchanged.

    With ``copy`` the result never shares the caller's storage.

    Parameters
    ----------
    x : torch.Tensor
        A batch of inputs.
    copy : bool, default True
        Always return new storage. Without it, inputs already in the right dtype are
        returned as they are (narrow integers and uint8 images are converted anyway).

    Returns
    -------
    torch.Tensor
        The prepared inputs.
    """
    if is_image(x):
        return to_float(x) if copy or x.dtype != torch.float32 else x
    if x.is_floating_point():
        return x.to(torch.float32, copy=copy)
    if x.dtype in (torch.uint8, torch.int8, torch.int16):
        return x.to(torch.int64)
    return x.clone() if copy else x


@dataclass(frozen=True)
class Augmentation:
    """Random translation by up to ``crop_padding`` pixels, optional h-flip.

    Called as ``augmentation(x, generator)`` on a batch of images (N, C, H, W); every draw
    comes from ``generator``. A signal stored as (C, 1, L) shifts along its length only.

    Parameters
    ----------
    crop_padding : int, default 0
        Largest shift in pixels, in each direction; 0: no translation.
    flip : bool, default False
        Flip each image horizontally with probability 1/2.
    fill : float, default 0.0
        Value of the pixels shifted in (in the [0, 1] input scale): 0 is black for images;
        a signal mapped to [0, 1] pads with the value of its zero level.
    """

    crop_padding: int = 0
    flip: bool = False
    fill: float = 0.0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.crop_padding > 0:
            x = random_translate(x, self.crop_padding, generator, fill=self.fill)
        if self.flip:
            flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    @property
    def active(self) -> bool:
        """Whether it changes anything (an ``Augmentation()`` is the identity)."""
        return self.crop_padding > 0 or self.flip


def check_augmentable(x: torch.Tensor) -> None:
    """Raise one sentence unless ``x`` is a batch of images that augmentation can move.

    Parameters
    ----------
    x : torch.Tensor
        A batch of inputs (or a whole data set's).

    Raises
    ------
    FedSMSError
        If ``x`` is not a batch of images (N, C, H, W) of uint8 or floating dtype.
    """
    if not is_image(x):
        raise FedSMSError(
            f"translation/flip augmentation moves pixels and needs image inputs (N, C, H, W), but the inputs "
            f"have shape {tuple(x.shape)} and dtype {str(x.dtype).removeprefix('torch.')}; pass augmentation=None "
            "(or set augment to false) for non-image data"
        )


def random_translate(x: torch.Tensor, pad: int, generator: torch.Generator, fill: float = 0.0) -> torch.Tensor:
    """Pad-and-random-crop for a whole batch with one gather per axis (no per-sample loop).

    An axis of size 1 (the height of a signal stored as (C, 1, L)) is not moved: a shift
    along it would replace the whole signal by padding.

    Parameters
    ----------
    x : torch.Tensor
        Images (N, C, H, W).
    pad : int
        Padding on each side, >= 1: each image moves by -pad..pad pixels along each axis
        longer than 1.
    generator : torch.Generator
        Source of the shifts, on ``x``'s device.
    fill : float, default 0.0
        Value of the padding shifted in.

    Returns
    -------
    torch.Tensor
        The translated images, of ``x``'s shape and dtype.
    """
    n, c, h, w = x.shape
    pad_h = pad if h > 1 else 0
    padded = torch.nn.functional.pad(x, (pad, pad, pad_h, pad_h), value=fill)
    if pad_h:
        dy = torch.randint(0, 2 * pad_h + 1, (n,), generator=generator, device=x.device)
        rows = (
            (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
        )
        padded = padded.gather(2, rows)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(3, cols)


def batches(
    data: ArrayData,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: Augmentation | None = None,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images float32 in [0, 1], labels) batches; shuffling and augmentation draw
    from ``generator`` only, so a seed fixes the batch order exactly.

    Non-image inputs are prepared as :func:`prepare_inputs` says (token ids stay integer).

    Parameters
    ----------
    data : ArrayData
        The data.
    batch_size : int
        Examples per batch (the last one may be smaller unless ``drop_last``).
    shuffle : bool, default False
        Draw a new order from ``generator``; otherwise the data's own order.
    generator : torch.Generator, optional
        Required when shuffling or augmenting.
    augment : Augmentation, optional
        Applied to each batch; an active one needs image inputs.
    drop_last : bool, default False
        Skip a last, smaller batch.
    device : torch.device or str, default "cpu"
        Where the batches go.

    Yields
    ------
    tuple of (torch.Tensor, torch.Tensor)
        Inputs and labels on ``device``.

    Raises
    ------
    ValueError
        If shuffling or augmenting without a generator.
    FedSMSError
        If an active augmentation meets non-image inputs.
    """
    n = len(data)
    if (shuffle or augment is not None) and generator is None:
        raise ValueError("shuffling or augmenting needs a torch.Generator for reproducibility")
    if augment is not None and augment.active:
        check_augmentable(data.images)
    where = data.images.device
    draws = generator_on(where, generator) if generator is not None else None
    order = torch.randperm(n, generator=draws, device=where) if shuffle else torch.arange(n, device=where)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = data.inputs(idx)
        if augment is not None:
            x = augment(x, draws)
        yield to_device(x, device), to_device(data.labels[idx], device)


def generator_on(device: torch.device | str, generator: torch.Generator) -> torch.Generator:
    """``generator`` itself when it draws on ``device``; otherwise a generator there, seeded
    by one draw from ``generator`` (so the caller's seed still fixes every draw).

    Parameters
    ----------
    device : torch.device or str
        Where the draws are needed (the data's device).
    generator : torch.Generator
        The caller's generator (usually a CPU one); advanced by one draw when a new
        generator is made.

    Returns
    -------
    torch.Generator
        A generator on ``device``.
    """
    device = torch.device(device)
    if generator.device.type == device.type and (generator.device.index or 0) == (device.index or 0):
        return generator
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``: as it is when already there, through pinned memory (a copy that
    does not wait for the GPU) from the host to a CUDA device.

    Parameters
    ----------
    x : torch.Tensor
        A batch.
    device : torch.device or str
        Where it goes.

    Returns
    -------
    torch.Tensor
        ``x`` on ``device``.
    """
    device = torch.device(device)
    if x.device.type == "cpu" and device.type == "cuda":
        x = x.pin_memory()  # a pageable host buffer would make the copy wait for the stream
    return x.to(device, non_blocking=True)


def resident(data: DataSource, device: torch.device | str, fraction: float = 0.25) -> DataSource:
    """``data`` moved to a CUDA ``device`` once, when it is an ``ArrayData`` whose tensors
    fit in ``fraction`` of the device's free memory; anything else as it is.

    Batching resident data (:func:`batches`) then gathers, augments and shuffles on the
    device: no host copy per batch.

    Parameters
    ----------
    data : DataSource
        The data.
    device : torch.device or str
        Where training or evaluation runs.
    fraction : float, default 0.25
        Largest share of the device's free memory the data may take; the rest is left to
        the model, its activations and the optimizer.

    Returns
    -------
    DataSource
        An ``ArrayData`` on ``device``, or ``data`` itself (on the CPU, for other sources,
        for data already there or too large).
    """
    device = torch.device(device)
    if not isinstance(data, ArrayData) or device.type != "cuda" or data.images.device == device:
        return data
    size = data.images.nbytes + data.labels.nbytes
    free, _ = torch.cuda.mem_get_info(device)
    if size > fraction * free:
        return data  # batched from the host through pinned memory instead
    return ArrayData(data.images.to(device), data.labels.to(device))


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches of ``batch_size`` in ``n`` examples.

    Parameters
    ----------
    n : int
        Number of examples.
    batch_size : int
        Examples per batch, >= 1.
    drop_last : bool, default False
        Whether a last, smaller batch is dropped.

    Returns
    -------
    int
        ``n // batch_size`` with ``drop_last``, else ``ceil(n / batch_size)``.
    """
    return n // batch_size if drop_last else -(-n // batch_size)


# ---- any data source -------------------------------------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor]
BatchFn = Callable[[], Iterable[Batch]]
DataSource = ArrayData | Dataset | DataLoader | BatchFn
"""What trainers and evaluators take: an ``ArrayData``, a torch ``Dataset`` of (x, y)
pairs, a ``DataLoader`` of (x, y) batches, or a callable returning an iterable of them."""


def _kind(data: object) -> str:
    if isinstance(data, ArrayData):
        return "arrays"
    if isinstance(data, DataLoader):
        return "loader"
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return "dataset"
    if callable(data):
        return "batches"
    raise FedSMSError(
        f"data of type {type(data).__name__} cannot be trained or evaluated on; pass an ArrayData, a torch "
        "Dataset of (x, y) pairs, a DataLoader or a callable that returns an iterable of (x, y) batches"
    )


def count_examples(data: DataSource) -> int | None:
    """The number of examples of ``data`` where it is known without a pass over it.

    Parameters
    ----------
    data : DataSource
        The data (a ``DataLoader`` counts its dataset).

    Returns
    -------
    int or None
        ``len`` of the data or the loader's dataset; None for a callable, an iterable
        dataset or anything without a length.

    Raises
    ------
    FedSMSError
        If ``data`` is not a data source.
    """
    kind = _kind(data)
    source = data.dataset if kind == "loader" else data
    if kind == "batches" or isinstance(source, IterableDataset):
        return None
    try:
        return len(source)
    except TypeError:
        return None


def count_batches(data: DataSource, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over ``data`` (what :func:`iterate_batches` yields). A
    ``DataLoader`` tells its own length; a callable or an unsized source is counted by
    one pass over it (without a model).

    Parameters
    ----------
    data : DataSource
        The data.
    batch_size : int
        Batch size for an ``ArrayData`` or a ``Dataset``.
    drop_last : bool, default False
        Whether a last, smaller batch is dropped (``ArrayData`` and ``Dataset`` only).

    Returns
    -------
    int
        The number of batches.

    Raises
    ------
    FedSMSError
        If ``data`` is not a data source.
    """
    kind = _kind(data)
    n = count_examples(data)
    if kind in ("arrays", "dataset") and n is not None:
        return num_batches(n, batch_size, drop_last)
    if kind == "loader":
        try:
            return len(data)
        except TypeError:
            pass
    batches_ = data() if kind == "batches" else data
    if kind == "batches" and not isinstance(batches_, Iterator):
        try:
            return len(batches_)
        except TypeError:
            pass
    if kind == "dataset":
        batches_ = DataLoader(data, batch_size=batch_size, drop_last=drop_last)
    return sum(1 for _ in batches_)


def iterate_batches(
    data: DataSource,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: Augmentation | None = None,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> Iterator[Batch]:
    """(inputs, labels) batches of any :data:`DataSource`, inputs prepared by
    :func:`prepare_inputs`, both on ``device``.

    An ``ArrayData`` goes through :func:`batches`; a ``Dataset`` is batched by a
    ``DataLoader`` of ``batch_size`` (shuffled by ``generator`` when ``shuffle``); a
    ``DataLoader`` and a callable's batches come as they are (``batch_size``, ``shuffle``
    and ``drop_last`` are theirs to decide). ``augment`` applies to image batches only
    (anything else raises). With ``limit`` at most that many examples are yielded (the
    last batch cut short).

    Parameters
    ----------
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int
        Batch size for an ``ArrayData`` or a ``Dataset``.
    shuffle : bool, default False
        Shuffle an ``ArrayData`` or a map-style ``Dataset`` with ``generator``.
    generator : torch.Generator, optional
        Required when shuffling or augmenting.
    augment : Augmentation, optional
        Applied to each batch (image batches only).
    drop_last : bool, default False
        Skip a last, smaller batch (``ArrayData`` and ``Dataset`` only).
    device : torch.device or str, default "cpu"
        Where the batches go.
    limit : int, optional
        Yield at most this many examples; None: all. For an ``ArrayData`` the first
        ``limit`` examples are taken before shuffling.

    Yields
    ------
    tuple of (torch.Tensor, torch.Tensor)
        Inputs and labels on ``device``.

    Raises
    ------
    FedSMSError
        If ``data`` is not a data source, a batch is not an (x, y) pair with the same first
        dimension, or an active augmentation meets non-image inputs.
    ValueError
        If shuffling or augmenting without a generator.
    """
    kind = _kind(data)
    if kind == "arrays":
        if limit is not None:
            data = data.head(limit)
        yield from batches(
            data, batch_size, shuffle=shuffle, generator=generator, augment=augment, drop_last=drop_last, device=device
        )
        return
    if augment is not None and generator is None:
        raise ValueError("augmenting needs a torch.Generator for reproducibility")
    if kind == "dataset":
        if shuffle and isinstance(data, IterableDataset):
            shuffle = False  # an iterable dataset has its own order
        source: Iterable = DataLoader(
            data, batch_size=batch_size, shuffle=shuffle, generator=generator if shuffle else None, drop_last=drop_last
        )
    else:
        source = data() if kind == "batches" else data
    seen = 0
    for batch in source:
        if limit is not None and seen >= limit:
            return
        x, y = _pair(batch)
        if limit is not None and seen + len(y) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        x = prepare_inputs(x, copy=False)
        if augment is not None and augment.active:
            check_augmentable(x)
            x = augment(x, generator_on(x.device, generator))
        seen += len(y)
        yield to_device(x, device), to_device(y, device)


def _pair(batch: object) -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise FedSMSError(
            f"a batch must be a pair (inputs, labels), got {type(batch).__name__}"
            + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
            + "; make the data yield (x, y)"
        )
    x, y = batch
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(y)
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise FedSMSError(
            f"a batch has inputs of shape {tuple(x.shape)} and labels of shape {tuple(y.shape)}; both need the "
            "same first (batch) dimension"
        )
    return x, y
