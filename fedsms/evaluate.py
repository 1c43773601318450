"""A task's metrics, and accuracy and calibration under corruptions, for one model or an ensemble.

Everything goes through ``predict``: eval mode, no gradients, batches of any
:data:`fedsms.data.arrays.DataSource` (an ``ArrayData``, a ``Dataset``, a ``DataLoader`` or a
callable yielding (x, y) batches), outputs gathered as float32 on the CPU with their labels.
Clean metrics are the task's (``fedsms.task``; default classification: accuracy, loss, ECE);
the prediction ensemble combines the members' outputs as the task says (classification:
``log(mean probabilities)``, which are valid logits) and is scored by the same metrics.
Accuracy under corruptions is a classification metric of image data.

Corrupted images are drawn from a generator seeded by (seed, corruption, severity), so the
same seed (and batch size) gives the same corrupted images for every model and device.
Corruptions are image operations: out-of-distribution evaluation of non-image data
(tokens, tabular features) raises one sentence saying so.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from fedsms import FedSMSError
from fedsms.corruptions import CORRUPTIONS, SEVERITIES, check_corruption, corrupt
from fedsms.data.arrays import ArrayData, DataSource, is_image, iterate_batches, resident
from fedsms.task import CLASSIFICATION, Task, classification_metrics

metrics_from_logits = classification_metrics  # the classification task's metrics, by their old name


def corruption_generator(seed: int, name: str, severity: int) -> torch.Generator:
    """The CPU generator whose draws corrupt the data for (seed, name, severity).

    Parameters
    ----------
    seed : int
        The evaluation seed.
    name : str
        The corruption's name (see ``fedsms.corruptions.CORRUPTIONS``).
    severity : int
        The severity, 1 to 5.

    Returns
    -------
    torch.Generator
        A fresh generator; the same arguments always give the same draws.
    """
    mixed = (int(seed) * 1_000_003 + zlib.crc32(name.encode()) * 8 + int(severity)) % (2**63)
    return torch.Generator().manual_seed(mixed)


def check_ood_data(data: DataSource) -> None:
    """Raise one sentence if ``data`` is an ``ArrayData`` whose inputs are not images
    (other sources are checked batch by batch).

    Parameters
    ----------
    data : DataSource
        The data about to be corrupted.

    Raises
    ------
    FedSMSError
        If ``data`` is an ``ArrayData`` whose inputs are not images (N, C, H, W).
    """
    if isinstance(data, ArrayData) and not data.is_image:
        _not_images(data.images)


def _not_images(x: torch.Tensor) -> None:
    raise FedSMSError(
        f"OOD evaluation applies image corruptions and needs image inputs (N, C, H, W), but the inputs have "
        f"shape {tuple(x.shape)} and dtype {str(x.dtype).removeprefix('torch.')}; turn ood off for non-image data"
    )


def predict(
    model: nn.Module,
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
    max_examples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs, labels): float32 CPU outputs of ``model`` (already on ``device``) on the
    first ``max_examples`` (all by default) of ``data``, and the labels they answer, in the
    order the data gave them. With ``corruption = (name, severity)`` every batch is
    corrupted first (image data only). The model runs in eval mode without gradients;
    each module's train/eval mode is restored after.

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset`` (a ``DataLoader`` keeps its own).
    device : torch.device or str, default "cpu"
        Where the batches go.
    corruption : tuple of (str, int), optional
        ``(name, severity)`` of the corruption to apply; None: clean data.
    seed : int, default 0
        Seed of the corruption draws (see ``corruption_generator``).
    max_examples : int, optional
        Use only the first ``max_examples`` examples; None: all.

    Returns
    -------
    tuple of (torch.Tensor, torch.Tensor)
        The outputs (float32, CPU, one row per example) and the labels (CPU, as the data
        gave them).

    Raises
    ------
    FedSMSError
        If there are no examples, the corruption or severity is unknown, or a corruption
        is asked of non-image inputs.
    """
    generator = None
    if corruption is not None:
        name, severity = corruption
        check_corruption(name, severity)
        check_ood_data(data)
        generator = corruption_generator(seed, name, severity)
    data = resident(data, device)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    outputs, labels = [], []
    try:
        with torch.no_grad():
            for x, y in iterate_batches(data, batch_size, device=device, limit=max_examples):
                if generator is not None:
                    if not is_image(x):
                        _not_images(x)
                    x = corrupt(x, name, severity, generator)
                outputs.append(model(x).float().cpu())
                labels.append(y.cpu())
    finally:
        for module, training in modes:
            module.training = training
    if not outputs:
        raise FedSMSError("there are no examples to evaluate; check the data set or shard size")
    return torch.cat(outputs), torch.cat(labels)


def predict_logits(
    model: nn.Module,
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """(N, classes) float32 CPU logits of ``model`` on ``data`` (see :func:`predict`).

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str, default "cpu"
        Where the batches go.
    corruption : tuple of (str, int), optional
        ``(name, severity)`` of the corruption to apply; None: clean data.
    seed : int, default 0
        Seed of the corruption draws.

    Returns
    -------
    torch.Tensor
        The model's outputs for every example of ``data``.

    Raises
    ------
    FedSMSError
        As :func:`predict`.
    """
    return predict(model, data, batch_size, device, corruption, seed)[0]


def evaluate(
    model: nn.Module,
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    task: Task | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``data``: the task's metrics (see ``fedsms.task``).

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str
        Where the batches go.
    loss_fn : callable, optional
        ``loss_fn(outputs, labels) -> scalar`` over all examples, reported as ``loss`` in
        place of the task's; without a task, outputs that are not classification outputs
        get ``{"loss"}`` alone.
    task : Task, optional
        What the metrics are (default: ``CLASSIFICATION``: accuracy, loss, ECE).

    Returns
    -------
    dict
        The task's metrics, e.g. ``{"accuracy", "loss", "ece"}`` for classification.

    Raises
    ------
    FedSMSError
        If there are no examples, or the outputs do not fit the task.
    """
    outputs, labels = predict(model, data, batch_size, device)
    if task is None and loss_fn is not None and not _is_classification(outputs, labels):
        return {"loss": float(loss_fn(outputs, labels))}
    metrics = (task or CLASSIFICATION).evaluate(outputs, labels)
    if loss_fn is not None:
        metrics["loss"] = float(loss_fn(outputs, labels if task else labels.to(torch.long)))
    return metrics


def _is_classification(logits: torch.Tensor, labels: torch.Tensor) -> bool:
    return logits.ndim == 2 and labels.ndim == 1 and not labels.is_floating_point() and not labels.is_complex()


def _ood(
    predict_of: Callable[[DataSource, tuple[str, int], int | None], tuple[torch.Tensor, torch.Tensor]],
    data: DataSource,
    corruptions: Iterable[str],
    severities: Iterable[int],
    max_examples: int | None,
) -> dict:
    corruptions, severities = tuple(corruptions), tuple(severities)
    if not corruptions or not severities:
        raise FedSMSError(f"OOD evaluation needs at least one corruption ({', '.join(CORRUPTIONS)}) and severity (1-5)")
    for name in corruptions:
        for severity in severities:
            check_corruption(name, severity)
    check_ood_data(data)
    if max_examples is not None and isinstance(data, ArrayData):
        data, max_examples = data.head(max_examples), None
    per_corruption: dict[str, dict[int, float]] = {}
    accuracies, eces = [], []
    for name in corruptions:
        per_corruption[name] = {}
        for severity in severities:
            logits, labels = predict_of(data, (name, severity), max_examples)
            metrics = metrics_from_logits(logits, data.labels if isinstance(data, ArrayData) else labels)
            per_corruption[name][int(severity)] = metrics["accuracy"]
            accuracies.append(metrics["accuracy"])
            eces.append(metrics["ece"])
    return {
        "ood_accuracy": sum(accuracies) / len(accuracies),
        "ood_ece": sum(eces) / len(eces),
        "per_corruption": per_corruption,
    }


def evaluate_ood(
    model: nn.Module,
    data: DataSource,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_examples: int | None = None,
) -> dict:
    """{"ood_accuracy": mean accuracy over all (corruption, severity), "ood_ece": mean ECE,
    "per_corruption": {name: {severity: accuracy}}} on the first ``max_examples`` of ``data``.

    Corruptions are image operations: data whose inputs are not images (N, C, H, W) raises
    :class:`FedSMSError` saying so.

    Parameters
    ----------
    model : torch.nn.Module
        The model, already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    corruptions : sequence of str, default CORRUPTIONS
        The corruptions to apply (at least one).
    severities : sequence of int, default SEVERITIES
        The severities, each 1 to 5 (at least one).
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``; with the seed it fixes the draws.
    device : torch.device or str, default "cpu"
        Where the batches go.
    seed : int, default 0
        Seed of the corruption draws; the same seed gives every model the same images.
    max_examples : int, optional
        Use only the first ``max_examples`` examples; None: all.

    Returns
    -------
    dict
        ``ood_accuracy`` and ``ood_ece`` (floats) and ``per_corruption``
        (``{name: {severity: accuracy}}``).

    Raises
    ------
    FedSMSError
        If no corruption or severity is given, one is unknown, the inputs are not images,
        or there are no examples.
    """
    return _ood(
        lambda d, c, limit: predict(model, d, batch_size, device, corruption=c, seed=seed, max_examples=limit),
        data,
        corruptions,
        severities,
        max_examples,
    )


def ensemble_predict(
    models: Sequence[nn.Module],
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
    max_examples: int | None = None,
    task: Task = CLASSIFICATION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ensemble's outputs, labels): the outputs of ``models`` combined as ``task``
    combines them (classification: log of the mean softmax probabilities); all models see
    the same (corrupted) inputs, so ``data`` must give its examples in the same order each pass.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        The ensemble's members (at least one), already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str, default "cpu"
        Where the batches go.
    corruption : tuple of (str, int), optional
        ``(name, severity)`` of the corruption to apply; None: clean data.
    seed : int, default 0
        Seed of the corruption draws (the same for every member).
    max_examples : int, optional
        Use only the first ``max_examples`` examples; None: all.
    task : Task, default CLASSIFICATION
        How the members' outputs combine (``Task.combine``).

    Returns
    -------
    tuple of (torch.Tensor, torch.Tensor)
        The combined outputs (classification: (N, classes) float32 log mean probabilities,
        usable as logits) and the labels.

    Raises
    ------
    FedSMSError
        If ``models`` is empty, the data gives its examples in another order for another
        member, or as :func:`predict`.
    """
    if not models:
        raise FedSMSError("the prediction ensemble needs at least one model")
    outputs, labels = [], None
    for m in models:
        logits, these = predict(
            m, data, batch_size, device, corruption=corruption, seed=seed, max_examples=max_examples
        )
        if labels is not None and not torch.equal(labels, these):
            raise FedSMSError(
                "the data gave its examples in another order for each model; evaluate an ensemble on "
                "data without shuffling"
            )
        labels = these
        outputs.append(logits)
    return task.combine(outputs), labels


def ensemble_logits(
    models: Sequence[nn.Module],
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    corruption: tuple[str, int] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """log of the mean softmax probabilities of ``models`` (all see the same corrupted images).

    Parameters
    ----------
    models : sequence of torch.nn.Module
        The ensemble's members (at least one), already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str, default "cpu"
        Where the batches go.
    corruption : tuple of (str, int), optional
        ``(name, severity)`` of the corruption to apply; None: clean data.
    seed : int, default 0
        Seed of the corruption draws.

    Returns
    -------
    torch.Tensor
        (N, classes) float32 log mean probabilities.

    Raises
    ------
    FedSMSError
        As :func:`ensemble_predict`.
    """
    return ensemble_predict(models, data, batch_size, device, corruption, seed)[0]


def ensemble_metrics(
    models: Sequence[nn.Module],
    data: DataSource,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    ood: bool = False,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    max_examples: int | None = None,
    task: Task = CLASSIFICATION,
) -> dict:
    """The prediction ensemble's metrics (``task``'s; classification: mean of softmax
    probabilities, {"accuracy", "loss", "ece"}) on clean ``data``, or with ``ood=True`` the
    ``evaluate_ood`` dict under corruptions (classification only).

    Parameters
    ----------
    models : sequence of torch.nn.Module
        The ensemble's members (at least one), already on ``device``.
    data : DataSource
        An ``ArrayData``, a ``Dataset`` of (x, y) pairs, a ``DataLoader`` or a callable
        returning an iterable of (x, y) batches.
    batch_size : int, default 512
        Batch size for an ``ArrayData`` or a ``Dataset``.
    device : torch.device or str, default "cpu"
        Where the batches go.
    ood : bool, default False
        Evaluate under corruptions instead of on clean data.
    corruptions : sequence of str, default CORRUPTIONS
        The corruptions, with ``ood``.
    severities : sequence of int, default SEVERITIES
        The severities (1 to 5), with ``ood``.
    seed : int, default 0
        Seed of the corruption draws, with ``ood``.
    max_examples : int, optional
        Use only the first ``max_examples`` examples, with ``ood`` (clean evaluation uses
        all of ``data``).
    task : Task, default CLASSIFICATION
        How the members' outputs combine and are scored.

    Returns
    -------
    dict
        The task's metrics, or with ``ood`` the dict :func:`evaluate_ood` returns.

    Raises
    ------
    FedSMSError
        As :func:`ensemble_predict` and :func:`evaluate_ood`.
    """
    if ood:
        return _ood(
            lambda d, c, limit: ensemble_predict(
                models, d, batch_size, device, corruption=c, seed=seed, max_examples=limit
            ),
            data,
            corruptions,
            severities,
            max_examples,
        )
    outputs, labels = ensemble_predict(models, data, batch_size, device, task=task)
    return task.evaluate(outputs, labels)
