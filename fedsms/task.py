"""What a model is for: the loss it trains on, the metrics it is reported by, and the one
score that choosing between models maximises.

Every part of fedsms that scores a model goes through one ``Task``: the built-in trainer
(``loss``), central and client evaluation and the per-phase tables (``metrics``), best-of-m,
the greedy soup and the diagnostics (``score``), and the prediction ensemble of the
diagnostics (``combine``). ``CLASSIFICATION`` (cross-entropy; accuracy, loss, ECE) is the
default; ``REGRESSION`` (mean squared error; MSE, MAE, R²) ships beside it; your own task is
a ``Task`` of your own callables:

>>> import torch
>>> def metrics(outputs, targets):
...     return {"loss": float(torch.nn.functional.l1_loss(outputs, targets)), "neg_mae": 0.0}
>>> mine = Task("my-task", loss=torch.nn.functional.l1_loss, metrics=metrics, score="neg_mae")
>>> mine.evaluate(torch.zeros(3, 1), torch.ones(3, 1))["loss"]
1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedsms import FedSMSError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
CombineFn = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def mean_outputs(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of several models' outputs (a regression ensemble).

    Parameters
    ----------
    outputs : sequence of torch.Tensor
        One output tensor per model, all of one shape.

    Returns
    -------
    torch.Tensor
        Their mean.
    """
    return torch.stack(list(outputs)).mean(dim=0)


def mean_probabilities(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log of the mean softmax probabilities of several models' logits: the classification
    ensemble, as logits that the classification metrics take.

    Parameters
    ----------
    outputs : sequence of torch.Tensor
        (N, classes) logits, one tensor per model.

    Returns
    -------
    torch.Tensor
        (N, classes) log mean probabilities.
    """
    log_probs = torch.stack([o.log_softmax(dim=1) for o in outputs])
    return torch.logsumexp(log_probs, dim=0) - math.log(len(outputs))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict[str, float]:
    """accuracy, loss (mean cross-entropy) and ece: expected calibration error over
    ``num_bins`` equal-width bins of confidence (max softmax probability), bins (i/B, (i+1)/B]:
    sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|.

    Parameters
    ----------
    logits : torch.Tensor
        (N, classes) outputs (logits or log-probabilities; any float dtype).
    labels : torch.Tensor
        (N,) integer class labels.
    num_bins : int, default 15
        Number of confidence bins of the ECE.

    Returns
    -------
    dict of str to float
        ``{"accuracy", "loss", "ece"}``; accuracy and ece in [0, 1].

    Raises
    ------
    FedSMSError
        If there are no examples, or the outputs are not (N, classes) with (N,) integer labels.
    """
    _check_examples(logits)
    if not (logits.ndim == 2 and labels.ndim == 1 and not labels.is_floating_point() and not labels.is_complex()):
        raise FedSMSError(
            f"classification needs (N, classes) outputs and (N,) integer labels, got outputs {tuple(logits.shape)} "
            f"and labels {tuple(labels.shape)} of {str(labels.dtype).removeprefix('torch.')}; "
            "pass task=REGRESSION or a Task of your own for other targets"
        )
    logits = logits.float()
    labels = labels.to(logits.device, torch.long)
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    correct = (predicted == labels).float()
    bins = (confidence * num_bins).ceil().long().sub(1).clamp(0, num_bins - 1)
    count = torch.bincount(bins, minlength=num_bins).float()
    gap = torch.bincount(bins, weights=correct - confidence, minlength=num_bins)  # sum(acc - conf) per bin
    ece = gap.abs().sum() / count.sum()
    return {
        "accuracy": correct.mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "ece": ece.item(),
    }


def regression_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error, with (N, 1) outputs matched to (N,) targets.

    Parameters
    ----------
    outputs : torch.Tensor
        The model's outputs, of the targets' shape or (N, 1) for (N,) targets.
    targets : torch.Tensor
        The float targets.

    Returns
    -------
    torch.Tensor
        The scalar mean squared error.
    """
    return F.mse_loss(outputs.reshape(targets.shape).float(), targets.float())


def regression_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """mse (= loss), mae and r2: 1 − SSE / SST over all target entries (SST about the mean
    of each target column), so 1 is perfect and 0 is predicting the mean.

    Parameters
    ----------
    outputs : torch.Tensor
        The model's outputs, of the targets' shape or (N, 1) for (N,) targets.
    targets : torch.Tensor
        The float targets (N,) or (N, ...).

    Returns
    -------
    dict of str to float
        ``{"loss", "mse", "mae", "r2"}``.

    Raises
    ------
    FedSMSError
        If there are no examples or the outputs cannot take the targets' shape.
    """
    _check_examples(outputs)
    if outputs.numel() != targets.numel():
        raise FedSMSError(
            f"regression needs one output per target value, got outputs {tuple(outputs.shape)} for targets "
            f"{tuple(targets.shape)}; give the model's head the targets' width"
        )
    y = targets.double().reshape(len(targets), -1)
    error = outputs.double().reshape(y.shape) - y
    sse = error.square().sum()
    sst = (y - y.mean(dim=0)).square().sum()
    mse = float(error.square().mean())
    return {"loss": mse, "mse": mse, "mae": float(error.abs().mean()), "r2": float(1 - sse / sst) if sst > 0 else 0.0}


def _check_examples(outputs: torch.Tensor) -> None:
    if outputs.shape[0] == 0:
        raise FedSMSError("there are no examples to evaluate; check the data set or shard size")


@dataclass(frozen=True)
class Task:
    """A model's task: its training loss, its metrics and the score that choices maximise.

    Parameters
    ----------
    name : str
        The task's name, recorded in the outputs.
    loss : callable or None
        ``loss(outputs, targets) -> scalar tensor``: what the built-in trainer minimises.
        None: cross-entropy with the candidate's label smoothing (classification).
    metrics : callable
        ``metrics(outputs, targets) -> dict of str to float`` over all examples of a split;
        the dict holds ``loss`` and ``score``.
    score : str
        The metric that best-of-m, the greedy soup and the diagnostics compare.
    maximize : bool, default True
        Whether a larger ``score`` is better (False for an error such as ``mse``).
    combine : callable, default mean_outputs
        ``combine(outputs of several models) -> outputs``: the prediction ensemble.
    images : bool, default False
        Whether the task's inputs are images, so corruptions (OOD evaluation) apply.
    """

    name: str
    loss: LossFn | None
    metrics: MetricsFn
    score: str
    maximize: bool = True
    combine: CombineFn = mean_outputs
    images: bool = False

    def evaluate(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """The task's metrics of ``outputs`` against ``targets``, checked to hold the score.

        Parameters
        ----------
        outputs : torch.Tensor
            A model's outputs on a split, one row per example.
        targets : torch.Tensor
            The split's targets.

        Returns
        -------
        dict of str to float
            The metrics, ``loss`` and the score included.

        Raises
        ------
        FedSMSError
            If the metrics miss ``loss`` or the score, or a value is not a number.
        """
        metrics = self.metrics(outputs, targets)
        missing = [key for key in ("loss", self.score) if key not in metrics]
        if missing:
            raise FedSMSError(
                f"the {self.name} task's metrics gave {sorted(metrics)} without {missing}; "
                "return the loss and the score from metrics(outputs, targets)"
            )
        try:
            return {str(key): float(value) for key, value in metrics.items()}
        except (TypeError, ValueError):
            raise FedSMSError(
                f"the {self.name} task's metrics must be numbers, got {metrics!r:.200}; return floats"
            ) from None

    def better(self, value: float) -> float:
        """``value`` signed so that larger is better (what a choice maximises)."""
        return value if self.maximize else -value


CLASSIFICATION = Task(
    "classification", None, classification_metrics, "accuracy", combine=mean_probabilities, images=True
)
REGRESSION = Task("regression", regression_loss, regression_metrics, "r2")
