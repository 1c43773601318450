"""Differentially private data soups: each client's update clipped, Gaussian noise added only
under the mask, and the ε spent accounted by Flower's own accountant.

Flower's DP wrappers (``flwr.serverapp.strategy.DifferentialPrivacy*Clipping``) add noise
to every entry of the aggregate, so around a sparse soup the pruned entries turn dense. Here
the same mechanism runs on the compact form of the merge (the values under the mask and the
dense extras), so the noise never reaches a pruned entry and the soup stays exactly at its
sparsity. The pieces are Flower's: the clipping (``fedsms_flower.privacy.clip_update``), the
noise and its standard deviation (``add_gaussian_noise_inplace``, ``compute_stdv``), the
adaptive clipping's noise split (``compute_adaptive_noise_params``, Andrew et al.) and the
RDP accountant (``flwr.serverapp.RdpAccountant``).

Per round: the server draws ``clients-per-round`` of the N connected clients; each update
(its trainable tensors minus the soup's) is clipped to the clipping norm C, on the server
(``server-*``) or on the client and again on the server (``client-*``: a no-op for an honest
client, so the bound holds whatever a client sends); the clipped sum plus noise of standard
deviation zC, over the n clients drawn, is the soup's update. ``without-replacement``
accounting (the sampler's fixed-size draw, replace-one neighbours: the sum's sensitivity is
2C) composes one event of noise multiplier z/2 and sampling n/N per round;
``no-amplification`` (add-or-remove-one, as Flower's wrappers) one of multiplier z.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from flwr.app import ConfigRecord
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_adaptive_noise_params, compute_stdv

from fedsms import FedSMSError
from fedsms.config import FederationConfig, RunConfig
from fedsms.masks import Mask
from fedsms.merge import Merge, State, values_under_mask
from fedsms_flower.privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT, clip_update, private_names

ACCOUNTED = (
    "the model updates: every training round's clipped, noised sum of the clients' trainable tensors "
    "under the mask (dense pretraining rounds included); the mask is magnitude (or seeded random) "
    "pruning of the noisy soup, so it costs nothing more"
)
NOT_ACCOUNTED = (
    "the clients' training and evaluation metrics and example counts (averaged in the clear), which "
    "clients answered a round, and the server's own data (central evaluation, norm-statistics "
    "recalibration); clients' norm statistics are never used; the server is trusted with the updates "
    "(central DP: the guarantee covers the soups it releases)"
)
ADAPTIVE_QUANTILE, ADAPTIVE_LR = 0.5, 0.2  # Andrew et al.'s (and Flower's default) target quantile and step
SAMPLING = {
    "without-replacement": (SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE, 0.5),
    "no-amplification": (SamplingMethod.NO_AMPLIFICATION, NeighboringRelation.ADD_OR_REMOVE_ONE, 1.0),
}  # dp-sampling -> Flower's sampling method, neighbouring relation, and z's factor (1 / the sum's sensitivity in C)


class BudgetSpent(FedSMSError):
    """The next round would spend more than ``dp-epsilon-budget``; the job stops before it."""


def check_job(run: RunConfig, fed: FederationConfig, *, federated_recalibration: bool, diagnostics: bool) -> None:
    """Refuse, in one sentence naming the fix, what a private job cannot account for.

    Parameters
    ----------
    run, fed : RunConfig, FederationConfig
        The job's settings.
    federated_recalibration : bool
        Whether the clients would recalibrate the soup's norm statistics.
    diagnostics : bool
        Whether the server would score each client's candidate (soup diagnostics).

    Raises
    ------
    FedSMSError
        With ``dp`` on: a hyperparameter soup, a merge other than ``uniform`` (weighted,
        greedy and the robust merges weigh, choose or drop clients by their data), an
        update-norm bound (it drops clients by the others' norms), a federated norm
        recalibration, soup diagnostics, or an ε budget without noise.
    """
    if fed.dp == "off":
        return
    rules = [
        (fed.mode == "data", "dp protects the clients' data shards: use mode data"),
        (
            run.merge == "uniform",
            f"dp accounts one clipped update per client in a uniform mean, but merge {run.merge!r} weighs, chooses "
            "or drops clients by their data: use merge uniform",
        ),
        (
            run.update_norm_bound == 0,
            "update-norm-bound drops clients by the other clients' norms, which dp does not account: "
            "set it to 0 (dp's clipping bounds every update)",
        ),
        (
            not federated_recalibration,
            "clients' norm statistics are not private: with dp, give the server data with recalibration server, "
            "or use a model without norm layers",
        ),
        (
            not diagnostics,
            "soup diagnostics score each client's own candidate, which dp does not: set diagnostics false",
        ),
        (
            fed.dp_epsilon_budget == 0 or fed.dp_noise_multiplier > 0,
            "an epsilon budget needs noise: set dp-noise-multiplier above 0",
        ),
    ]
    for ok, why in rules:
        if not ok:
            raise FedSMSError(why)


class PrivateMerge:
    """A round's merge under dp: every update clipped as it arrives, the mean's noise added
    under the mask when the merge is read.

    Parameters
    ----------
    merge : Merge
        The round's uniform, streaming merge.
    reference : dict of str to Tensor
        The soup the candidates retrained from, in the compact form (``values_under_mask``).
    clipping_norm : float
        The round's bound C.
    noise_std : float
        Standard deviation of the noise on the mean, ``compute_stdv(z, C, sampled)``.
    sampled : int
        The clients drawn for the round: the mean's denominator (a client that did not
        answer counts as an unchanged one).

    Attributes
    ----------
    clipped : int
        Updates the server's clipping scaled down.
    """

    def __init__(self, merge: Merge, reference: State, clipping_norm: float, noise_std: float, sampled: int) -> None:
        self.merge, self.reference = merge, reference
        self.clipping_norm, self.noise_std, self.sampled = clipping_norm, noise_std, sampled
        self.private = private_names(reference)
        self.clipped = 0

    @property
    def rule(self) -> str:
        """The inner merge's rule (``uniform``)."""
        return self.merge.rule

    @property
    def count(self) -> int:
        """Updates merged so far."""
        return self.merge.count

    @property
    def dropped(self) -> list[int]:
        """Always empty: dp refuses the merges that drop candidates."""
        return self.merge.dropped

    @property
    def candidates(self) -> list[State]:
        """Always empty: dp refuses the merges that keep candidates."""
        return self.merge.candidates

    def add_reply(self, reply, num_examples: int) -> None:
        """Add a reply read in place (``fedsms.codec.FlatReply``), clipped: see ``add``."""
        self.add(reply.to_values(), num_examples)

    def add(self, values: Mapping[str, torch.Tensor], num_examples: int) -> None:
        """Add one candidate, its update clipped to the bound; its other tensors (norm
        statistics, counters) are the soup's.

        Parameters
        ----------
        values : mapping of str to Tensor
            The candidate in the compact form.
        num_examples : int
            Examples it trained on (recorded; the mean is uniform).
        """
        clipped, scaled = clip_update(values, self.reference, self.clipping_norm)
        self.clipped += scaled
        self.merge.add({name: clipped.get(name, self.reference[name]) for name in self.reference}, num_examples)

    def flat_state(self, mask_digest: str) -> None:
        """None: the noisy mean is made by ``result``."""
        return None

    def result(self) -> State:
        """The soup plus the clipped updates' sum over the clients drawn, plus Gaussian noise
        on the private tensors' entries only: the values under the mask and the dense extras.

        Returns
        -------
        dict of str to Tensor
            The merged values in the compact form.
        """
        mean = self.merge.result()
        share = self.merge.count / self.sampled
        arrays = [(self.reference[name] + (mean[name] - self.reference[name]) * share).numpy() for name in self.private]
        add_gaussian_noise_inplace(arrays, self.noise_std)
        return {**mean, **{name: torch.from_numpy(array) for name, array in zip(self.private, arrays)}}


class Privacy:
    """The dp of one job: its per-round clipping and noise, its accountant and its budget.

    Parameters
    ----------
    fed : FederationConfig
        ``dp``, ``dp-noise-multiplier``, ``dp-clipping-norm``, ``dp-delta``, ``dp-sampling``,
        ``dp-epsilon-budget``.
    log : callable
        Receives a line per round.

    Attributes
    ----------
    on : bool
        Whether dp is on (``dp`` is not ``off``).
    clipping_norm : float
        The bound of the next round (adapted after each round under ``*-adaptive``).
    """

    def __init__(self, fed: FederationConfig, log: Callable[[str], None]) -> None:
        self.fed, self.log = fed, log
        self.on = fed.dp != "off"
        self.adaptive = fed.dp.endswith("adaptive")
        self.clipping_norm = fed.dp_clipping_norm
        self.population: int | None = None
        self.accountant: RdpAccountant | None = None
        self._round: dict = {}  # the open round: sampled, update noise multiplier, count noise

    def train_config(self, config: ConfigRecord) -> ConfigRecord:
        """``config`` with the bound clients clip to (``clipping_norm``, Flower's key) under ``client-*``."""
        if self.fed.dp.startswith("client"):
            config = ConfigRecord({**dict(config), KEY_CLIPPING_NORM: self.clipping_norm})
        return config

    def open_round(self, server_round: int, population: int, sampled: int) -> None:
        """Take the round's draw: ``sampled`` of ``population`` connected clients.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        population : int
            Clients connected when the round was drawn (fixed for the job's accounting).
        sampled : int
            Clients drawn.

        Raises
        ------
        BudgetSpent
            The round would spend more than ``dp-epsilon-budget``.
        FedSMSError
            The population changed, or adaptive clipping cannot split the noise.
        """
        if not self.on:
            return
        if self.population is None:
            self.population = population
        if population != self.population:
            raise FedSMSError(
                f"round {server_round} drew from {population} connected clients, but dp accounts a population of "
                f"{self.population}: keep the same clients connected, or start a new job"
            )
        z = self.fed.dp_noise_multiplier
        count_std, update_z = 0.0, z
        if self.adaptive:
            try:
                count_std, update_z = compute_adaptive_noise_params(z, sampled, None)
            except ValueError:
                raise FedSMSError(
                    f"adaptive clipping over {sampled} clients cannot reach dp-noise-multiplier {z:g} (Flower's "
                    f"clipped-count noise is {sampled / 20:g}, which needs it below {sampled / 10:g}): lower it or "
                    "sample more clients"
                ) from None
        self._round = {"sampled": sampled, "update_z": update_z, "count_std": count_std}
        event = self._event(sampled)
        if self.fed.dp_epsilon_budget and event is not None and self._accountant().would_exceed(event):
            raise BudgetSpent(
                f"the privacy budget is spent: round {server_round} would raise epsilon above dp-epsilon-budget "
                f"{self.fed.dp_epsilon_budget:g} (spent {self.epsilon():.4g} at delta {self.fed.dp_delta:g}); the "
                f"job stopped after round {server_round - 1}, checkpointed: raise the budget and rerun with --resume"
            )

    def wrap(self, merge: Merge, soup: State, mask: Mask) -> Merge | PrivateMerge:
        """The round's merge, private when dp is on.

        Parameters
        ----------
        merge : Merge
            The round's merge.
        soup : dict of str to Tensor
            The soup the candidates retrained from.
        mask : Mask
            Its mask.

        Returns
        -------
        Merge or PrivateMerge
            ``merge`` itself when dp is off.
        """
        if not self.on:
            return merge
        sampled = self._round["sampled"]
        std = compute_stdv(self._round["update_z"], self.clipping_norm, sampled)
        return PrivateMerge(merge, values_under_mask(soup, mask), self.clipping_norm, std, sampled)

    def release(self, server_round: int, merge: PrivateMerge, train: Mapping[str, float]) -> dict:
        """Account the round's released soup, adapt the bound, and say what was spent.

        Parameters
        ----------
        server_round : int
            The round, from 1.
        merge : PrivateMerge
            The round's merge, its result already the soup.
        train : mapping of str to float
            The round's mean training metrics (``client-adaptive``: the clients' ``norm_bit``).

        Returns
        -------
        dict
            The round's record for ``rounds.jsonl``: ε at δ after it (None without noise),
            releases, noise, bound, draw and the event composed; empty when dp is off.
        """
        if not self.on:
            return {}
        sampled = self._round["sampled"]
        event = self._event(sampled)
        if event is not None:
            self._accountant().compose(event)
        record = {
            "epsilon": self.epsilon(),
            "delta": self.fed.dp_delta,
            "releases": self.accountant.num_releases if self.accountant else 0,
            "noise_multiplier": self.fed.dp_noise_multiplier,
            "noise_std": merge.noise_std,
            "clipping_norm": self.clipping_norm,
            "sampled": sampled,
            "population": self.population,
            "event": event and {"noise_multiplier": event.noise_multiplier, "sample_size": sampled},
        }
        if self.adaptive:
            bits = (
                merge.clipped if self.fed.dp.startswith("server") else round(train.get(KEY_NORM_BIT, 0) * merge.count)
            )
            # Andrew et al.: the bound grows while fewer than the target quantile of updates fit under it.
            # (Flower 1.41's wrappers put the clipped fraction where the unclipped one belongs: their
            # bound shrinks when every update is clipped.)
            unclipped = 1 - float(np.random.normal(bits, self._round["count_std"])) / sampled
            self.clipping_norm *= math.exp(-ADAPTIVE_LR * (unclipped - ADAPTIVE_QUANTILE))
            record["next_clipping_norm"] = self.clipping_norm
        spent = f"epsilon {record['epsilon']:.4g} at delta {self.fed.dp_delta:g}" if event else "no noise, no privacy"
        self.log(
            f"round {server_round}: dp: {spent} after {record['releases']} releases (noise std {merge.noise_std:.3g} "
            f"under the mask, clipping norm {merge.clipping_norm:.3g}, {sampled} of {self.population} clients)"
        )
        return record

    def restore(self, records: list[dict]) -> None:
        """Replay the events of a resumed job's rounds (their ``privacy`` records) and take its last bound.

        Parameters
        ----------
        records : list of dict
            The completed rounds' ``privacy`` records, in order.
        """
        for record in records:
            if not record:
                continue
            self.population = record["population"]
            if record["event"]:
                self._accountant().compose(self._event(record["event"]["sample_size"]))
            self.clipping_norm = record.get("next_clipping_norm", self.clipping_norm)

    def epsilon(self) -> float | None:
        """ε spent at ``dp-delta`` so far (None without noise: no privacy; 0 before any release)."""
        if self.fed.dp_noise_multiplier == 0:
            return None
        return (
            self.accountant.get_epsilon(self.fed.dp_delta) if self.accountant and self.accountant.num_releases else 0.0
        )

    def summary(self) -> dict:
        """What ``summary.json`` says of the job's privacy (empty when dp is off)."""
        if not self.on:
            return {}
        return {
            "dp": self.fed.dp,
            "epsilon": self.epsilon(),
            "delta": self.fed.dp_delta,
            "releases": self.accountant.num_releases if self.accountant else 0,
            "noise_multiplier": self.fed.dp_noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "sampling": self.fed.dp_sampling,
            "population": self.population,
            "epsilon_budget": self.fed.dp_epsilon_budget or None,
            "accounted": ACCOUNTED,
            "not_accounted": NOT_ACCOUNTED,
        }

    def _event(self, sampled: int) -> GaussianPrivacyEvent | None:
        """One round's release as Flower's accountant composes it (None without noise)."""
        if self.fed.dp_noise_multiplier == 0:
            return None
        factor = SAMPLING[self.fed.dp_sampling][2]
        return GaussianPrivacyEvent(self.fed.dp_noise_multiplier * factor, sampled, self.population)

    def _accountant(self) -> RdpAccountant:
        if self.accountant is None:
            method, relation, _ = SAMPLING[self.fed.dp_sampling]
            self.accountant = RdpAccountant(
                PrivacyConfig(
                    target_delta=self.fed.dp_delta,
                    population_size=self.population,
                    neighboring_relation=relation,
                    sampling_method=method,
                    max_epsilon=self.fed.dp_epsilon_budget or None,
                )
            )
        return self.accountant
