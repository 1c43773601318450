"""Decentralized SMS: one phase as three steps that need no coordinator.

::

    fedsms prune SOUP_OR_DENSE --phase p -o PRUNED         # the phase's mask
    fedsms retrain PRUNED --candidate i -o CANDIDATE_i     # m of these, anywhere, in parallel
    fedsms soup CANDIDATE_0 ... CANDIDATE_m-1 -o SOUP      # the merge that closes the phase

Each step reads the job's configuration from the checkpoint it is given (the soup-shaping
keys that the step before recorded; options on its command line override them) and writes
it into the checkpoint it makes, so a candidate job needs only the pruned checkpoint and its
index. The steps hold no phase logic of their own: they drive the same ``SoupEngine``
(prune, merge, end of phase), the same schedule (``prune_steps``, ``step_candidate``) and the
same ``CandidateTrainer`` as ``fedsms local``, so the same seeds give the same soup, bit for
bit on CPU with the same number of threads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedsms import FedSMSError
from fedsms.candidates import CandidateTrainer, train_one
from fedsms.checkpoint import check_compatible, has_mask, load_checkpoint, save_checkpoint
from fedsms.codec import MAX_EXAMPLES
from fedsms.config import RunConfig
from fedsms.engine import SoupEngine, values_under_mask
from fedsms.local import job_hooks, job_splits
from fedsms.masks import dense_mask, mask_digest, prunable_names
from fedsms.models import build_for
from fedsms.schedule import PruneStep, prune_steps, step_candidate
from fedsms.schema import MERGE_RULES, PRUNING_SCHEDULES, declared
from fedsms.soup import SoupError, check_shares_mask
from fedsms.training import resolve_device

Log = Callable[[str], None]

_INHERITED = tuple(f.name for f, spec in declared(RunConfig) if spec.shapes_soup)


def job_config(metadata: Mapping[str, Any], overrides: Mapping[str, Any]) -> RunConfig:
    """The job's config: the soup-shaping keys a checkpoint recorded, then ``overrides``.

    Keys that do not shape the soup (where data lives, the device) are never inherited: the
    machine that runs a step sets them. A checkpoint without a recorded config (an exported
    model) may still name its ``model`` and ``dataset``.

    Parameters
    ----------
    metadata : mapping
        The checkpoint's metadata.
    overrides : mapping
        Config values (run-config names) set on the step's command line; they win.

    Returns
    -------
    RunConfig
        The config the step runs with.
    """
    saved = metadata.get("config")
    saved = saved if isinstance(saved, Mapping) else {}
    values = {k: saved[k] for k in _INHERITED if k in saved}
    for name in ("model", "dataset"):
        if name not in values and isinstance(metadata.get(name), str):
            values[name] = metadata[name]
    return RunConfig.from_mapping({**values, **overrides})


def _state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state's names, dtypes, shapes and bytes: the same weights give the same digest."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _step(config: RunConfig, schedule: str, phase: int) -> tuple[PruneStep, int]:
    steps = prune_steps(config, schedule)
    if not 1 <= phase <= len(steps):
        raise FedSMSError(
            f"phase {phase} is outside the {schedule} schedule's steps 1..{len(steps)}; "
            "pass a phase in that range or other --phases/--gmp-updates"
        )
    return steps[phase - 1], len(steps)


def _step_record(step: PruneStep, count: int) -> dict:
    return {**asdict(step), "of": count}


def prune_checkpoint(
    path: str | Path,
    phase: int,
    output: str | Path,
    *,
    schedule: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    log: Log = print,
) -> Path:
    """Prune a dense model or the soup of phase ``phase - 1`` for phase ``phase``.

    Parameters
    ----------
    path : str or Path
        A fedsms checkpoint, or a model without a mask file (dense: the mask is all ones
        over the job's prunable tensors).
    phase : int
        The prune step (1-based): the IMP phase or the GMP mask update.
    output : str or Path
        Where the pruned checkpoint goes.
    schedule : str, optional
        ``imp`` or ``gmp``; by default the input's schedule, else ``imp``.
    overrides : mapping, optional
        Run keys that replace the ones the input recorded.
    log : callable
        Receives one line per prune.

    Returns
    -------
    Path
        The pruned checkpoint's ``.safetensors`` file. Its metadata records the stage
        (``pruned``), phase, schedule, the step (index, sparsity, epochs), the parent mask's
        digest and the job's config.
    """
    checkpoint = load_checkpoint(path, dense_ok=True)
    meta = checkpoint.metadata
    previous = _int(meta.get("phase"))
    recorded = meta.get("schedule") if previous else None
    if schedule and recorded in PRUNING_SCHEDULES and recorded != schedule:
        raise FedSMSError(
            f"{path} comes from the {recorded} schedule; pass --schedule {recorded} or start from a dense model"
        )
    schedule = schedule or (recorded if recorded in PRUNING_SCHEDULES else "imp")
    if previous is not None and previous != phase - 1:
        raise FedSMSError(
            f"{path} closes phase {previous}, so it starts phase {previous + 1}, not {phase}; "
            f"pass --phase {previous + 1} or the soup of phase {phase - 1}"
        )
    config = job_config(meta, overrides or {})
    step, count = _step(config, schedule, phase)
    mask = checkpoint.mask
    if not mask or all(bool(m.all()) for m in mask.values()):
        # Dense: the prunable tensors are the job's (keep-first/last-dense apply), as in fedsms local.
        model = build_for(config.model, job_splits(config))
        check_compatible(checkpoint, model)
        mask = dense_mask(
            model,
            prunable_names(model, **config.prune_options()),
        )
    engine = SoupEngine(
        checkpoint.state, mask, pruning=config.pruning, seed=config.seed, log=lambda line: log(f"[prune] {line}")
    )
    parent = engine.digest
    engine.prune(step)
    return save_checkpoint(
        output,
        engine.state,
        engine.mask,
        {
            "stage": "pruned",
            "phase": phase,
            "schedule": schedule,
            "step": _step_record(step, count),
            "parent_digest": parent,
            "pruned_from": str(path),
            "model": config.model,
            "dataset": config.dataset,
            "config": config.to_dict(),
        },
    )


def retrain_checkpoint(
    path: str | Path,
    candidate: int,
    output: str | Path,
    *,
    overrides: Mapping[str, Any] | None = None,
    log: Log = print,
) -> Path:
    """Retrain candidate ``candidate`` of a pruned checkpoint's phase under its mask.

    Candidate i is the i-th config of the recipe, with the phase's seed and epochs
    (``step_candidate``), trained by the same ``CandidateTrainer`` as in ``fedsms local``.

    Parameters
    ----------
    path : str or Path
        A checkpoint written by ``fedsms prune`` (``prune_checkpoint``), with its mask.
    candidate : int
        The candidate's index in the recipe, in ``[0, candidates)``.
    output : str or Path
        Where the candidate checkpoint goes.
    overrides : mapping, optional
        Config values that override those the checkpoint recorded.
    log : callable, optional
        Receives progress lines (default: ``print``).

    Returns
    -------
    Path
        The candidate checkpoint's ``.safetensors`` file. Its metadata names the stage
        (``candidate``), phase, schedule, candidate index, hyperparameters, model, data
        set, ``num_examples``, training metrics and the job's config; the mask (and so its
        digest) is the pruned checkpoint's.

    Raises
    ------
    FedSMSError
        ``path`` has no mask or is not a ``fedsms prune`` output, its phase or sparsity does
        not fit the schedule, ``candidate`` is out of range, or the checkpoint does not fit
        the model.
    """
    if not has_mask(path):
        raise FedSMSError(
            f"{path} has no mask file, and a candidate retrains under a mask; run fedsms prune on it first"
        )
    checkpoint = load_checkpoint(path)  # refuses nonzeros outside the mask
    meta = checkpoint.metadata
    phase, schedule = _int(meta.get("phase")), meta.get("schedule")
    if meta.get("stage") != "pruned" or not phase or schedule not in PRUNING_SCHEDULES:
        raise FedSMSError(
            f"{path} is not the output of fedsms prune (its metadata names no prune step); run fedsms prune on it first"
        )
    config = job_config(meta, overrides or {})
    step, count = _step(config, schedule, phase)
    pruned_to = meta.get("step", {}).get("sparsity") if isinstance(meta.get("step"), Mapping) else None
    if not isinstance(pruned_to, float) or abs(pruned_to - step.sparsity) > 1e-12:
        raise FedSMSError(
            f"{path} was pruned to sparsity {pruned_to!r} but phase {phase} of this {schedule} schedule "
            f"prunes to {step.sparsity!r}; retrain with the schedule the checkpoint was pruned with"
        )
    configs = config.candidate_configs()
    if not 0 <= candidate < len(configs):
        raise FedSMSError(
            f"candidate {candidate} is outside 0..{len(configs) - 1} (candidates m = {config.candidates}); "
            "pass a smaller --candidate or a larger --candidates"
        )
    hyper = step_candidate(configs[candidate], step)
    device = resolve_device(config.device)
    with CandidateTrainer(config.model, job_splits(config), device, 1, log) as trainer:
        check_compatible(checkpoint, trainer.model)
        state, metrics = train_one(
            trainer.model,
            checkpoint.state,
            checkpoint.mask,
            trainer.splits,
            hyper,
            device,
            log,
            f"[retrain] phase {phase}/{count} candidate {candidate}",
            precision=config.precision,
            channels_last=config.channels_last,
        )
    return save_checkpoint(
        output,
        state,
        checkpoint.mask,
        {
            "stage": "candidate",
            "phase": phase,
            "schedule": schedule,
            "step": _step_record(step, count),
            "candidate": candidate,
            "hyperparameters": hyper.to_dict(),
            "model": config.model,
            "dataset": config.dataset,
            "num_examples": int(metrics["num_examples"]),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "retrained_from": str(path),
            "device": str(device),
            "config": config.to_dict(),
        },
    )


def soup_checkpoints(
    paths: Sequence[str | Path],
    output: str | Path,
    *,
    rule: str = "uniform",
    recalibrate: bool = False,
    overrides: Mapping[str, Any] | None = None,
    log: Log = print,
) -> tuple[Path, list[int]]:
    """Merge candidates that share a mask and a phase: the end of a phase.

    Parameters
    ----------
    paths : sequence of str or Path
        Candidate checkpoints. When every one names its candidate index they are merged in
        index order (the order ``fedsms local`` adds them), whatever the order given.
    output : str or Path
        Where the soup goes.
    rule : str
        ``uniform``, ``weighted`` (by each checkpoint's ``num_examples``) or ``greedy``
        (held-out accuracy on the split of the data set the metadata names).
    recalibrate : bool
        Re-estimate norm statistics of the average on that data set's training split.
    overrides : mapping, optional
        Run keys over the candidates' recorded config (data folder, fractions, device).

    Returns
    -------
    (Path, list of int)
        The soup's ``.safetensors`` file and the candidates in it: their candidate indices
        when every checkpoint names one, else their positions in ``paths``.
    """
    if rule not in MERGE_RULES:
        raise FedSMSError(f"unknown merge rule {rule!r}; use one of {', '.join(MERGE_RULES)}")
    items = [(str(p), load_checkpoint(p)) for p in paths]
    for path, checkpoint in items:
        if checkpoint.metadata.get("stage") == "pruned":
            raise SoupError(
                f"{path} is a pruned checkpoint (a phase's start), not a retrained candidate; soup only candidates"
            )
    first_path, first = items[0]
    digest = mask_digest(first.mask)
    for path, checkpoint in items:
        other = mask_digest(checkpoint.mask)
        if other != digest:
            raise SoupError(
                f"{path} has mask {other[:12]} but {first_path} has {digest[:12]}; "
                "soup only candidates retrained under the same mask"
            )
    phases = {path: _int(c.metadata.get("phase")) for path, c in items}
    known = {path: p for path, p in phases.items() if p is not None}
    if known:
        ref_path, ref = next(iter(known.items()))
        for path, p in known.items():
            if p != ref:
                raise SoupError(
                    f"{path} is a candidate of phase {p} but {ref_path} is of phase {ref}; "
                    "soup only candidates of one phase"
                )
    indices = [_int(c.metadata.get("candidate")) for _, c in items]
    if all(i is not None for i in indices):
        seen: dict[int, str] = {}
        for (path, _), i in zip(items, indices):
            if i in seen:
                raise SoupError(f"{seen[i]} and {path} are both candidate {i}; pass each candidate once")
            seen[i] = path
        items = [item for _, item in sorted(zip(indices, items), key=lambda pair: pair[0])]
        indices = sorted(indices)
        first_path, first = items[0]
    seen_states: dict[str, str] = {}  # a candidate given twice, whatever its metadata says
    for path, checkpoint in items:
        digest = _state_digest(checkpoint.state)
        if digest in seen_states:
            raise SoupError(f"{seen_states[digest]} and {path} hold the same weights; pass each candidate once")
        seen_states[digest] = path
    meta = first.metadata
    config = job_config(meta, overrides or {})
    hooks = None
    if recalibrate or rule == "greedy":
        if "model" not in meta or "dataset" not in meta:
            raise FedSMSError(
                "--recalibrate and --merge greedy need checkpoints whose metadata names the model and "
                "dataset; drop them"
            )
        splits = job_splits(config)
        device = resolve_device(config.device)
        hooks = job_hooks(config, build_for(config.model, splits).to(device), splits, device)
    engine = SoupEngine(first.state, first.mask, hooks=hooks, log=lambda line: log(f"[soup] {line}"))
    merge = engine.merge(rule)
    for path, checkpoint in items:
        check_shares_mask(checkpoint.state, engine.mask, path)
        examples = checkpoint.metadata.get("num_examples", 1)
        if rule == "weighted" and not (_int(examples) and 0 < examples <= MAX_EXAMPLES):
            shown = (
                repr(examples)
                if len(repr(examples)) < 40
                else f"{repr(examples)[:20]}… ({len(repr(examples))} characters)"
            )
            raise SoupError(
                f"{path} has num_examples {shown} in its metadata (1 to {MAX_EXAMPLES:.0e} are believed); "
                "use another merge rule or fix the metadata"
            )
        merge.add(values_under_mask(checkpoint.state, engine.mask), examples if rule == "weighted" else 1)
    engine.end_round(merge)
    phase = next(iter(known.values()), None)
    # The phase seeds the recalibration subset, as the step index does in fedsms local.
    chosen = engine.end_phase(phase or 0, merge, recalibrate=recalibrate)
    metadata = {k: v for k, v in meta.items() if k in ("model", "dataset", "phase", "schedule", "step", "config")}
    named = all(i is not None for i in indices)
    metadata.update(
        stage="soup",
        merge=rule,
        soup_of=[p for p, _ in items],
        chosen=[indices[c] for c in chosen] if named else chosen,
    )
    return save_checkpoint(output, engine.state, engine.mask, metadata), metadata["chosen"]
