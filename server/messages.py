"""The messages the server sends: the soup in the clients' layout, each setting once.

Every message carries the soup (the compact payload, or for ``client-protocol = flower``
the dense ``ArrayRecord`` that unchanged Flower ClientApps read), its own settings in the
config record and the job's other settings in the job record, so a client needs no run
config of its own. A train message's candidate hyperparameters travel once, in its config.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import MessageType

from fedsms import codec
from fedsms.config import FederationConfig, RunConfig
from fedsms.masks import Mask
from fedsms.schedule import Round, round_candidate
from fedsms.schema import declared
from fedsms_flower.records import (
    ARRAYS_KEY,
    CANDIDATE,
    CONFIG_KEY,
    JOB_KEY,
    LAST_ROUND,
    NUM_CANDIDATES,
    OOD,
    OOD_EXAMPLES,
    OUT_DIR,
    PHASE,
    SERVER_ROUND,
    SOUP_KEY,
    group_id,
    record_of,
    wire_name,
)
from fedsms_server.flower_layout import record_bytes, soup_record


def _candidate_keys() -> frozenset[str]:
    """Run keys a candidate's hyperparameters carry (the job's base ``seed`` stays: clients
    shard data with it), and the pretraining keys that set phase 0's candidates."""
    keys = {f.name for f, spec in declared(RunConfig) if spec.candidate and f.name != "seed"}
    return frozenset(keys | {"pretrain_lr", "pretrain_epochs"})


CANDIDATE_KEYS = _candidate_keys()


class Outbox:
    """Builds a job's train, evaluate and norm-statistics messages.

    Parameters
    ----------
    run : RunConfig
        The soup's settings (candidates, OOD evaluation).
    federation : FederationConfig
        The federation's settings (soup mode, value dtype, client protocol).
    settings : dict
        Every job setting (``_`` spelling), for the job record.
    schedule : list of Round
        The job's rounds.
    out_dir : str
        The job's folder, which clients are told (``fedsms-client`` reports it).
    """

    def __init__(
        self, run: RunConfig, federation: FederationConfig, settings: dict, schedule: list[Round], out_dir: str
    ) -> None:
        self.run, self.fed, self.schedule, self.out_dir = run, federation, schedule, out_dir
        self.job = ConfigRecord({k.replace("_", "-"): v for k, v in settings.items()})
        self.train_job = ConfigRecord({k.replace("_", "-"): v for k, v in settings.items() if k not in CANDIDATE_KEYS})

    def payload(self, soup: Mapping[str, torch.Tensor], mask: Mask, server_round: int) -> bytes:
        """The compact soup of ``server_round``: values under the mask and the mask bits."""
        return codec.encode(
            soup,
            mask,
            phase=self.schedule[server_round - 1].phase,
            round=server_round,
            kind="soup",
            value_dtype=self.fed.value_dtype,
        )

    def soup_entry(self, soup: Mapping[str, torch.Tensor], mask: Mask, server_round: int) -> tuple[dict, int]:
        """The soup under its record key, as the clients read it, and its bytes.

        Parameters
        ----------
        soup : mapping of str to Tensor
            The soup.
        mask : Mask
            Its mask.
        server_round : int
            The round the payload is stamped with.

        Returns
        -------
        tuple of (dict, int)
            ``{SOUP_KEY: compact payload}`` or, under ``client-protocol = flower``,
            ``{ARRAYS_KEY: dense ArrayRecord}``; and the bytes of one copy.
        """
        if self.fed.client_protocol == "flower":
            record = soup_record(soup)
            return {ARRAYS_KEY: record}, record_bytes(record)
        payload = self.payload(soup, mask, server_round)
        return {SOUP_KEY: record_of(payload)}, len(payload)

    def train(self, soup_entry: dict, nodes: list[int], server_round: int, config: ConfigRecord) -> list[Message]:
        """One train message per node, in candidate order: node i retrains candidate i.

        Parameters
        ----------
        soup_entry : dict
            What ``soup_entry`` returned for the round.
        nodes : list of int
            The round's clients.
        server_round : int
            The round, from 1.
        config : ConfigRecord
            Extra entries added to every message's config.

        Returns
        -------
        list of Message
            Each with the candidate's hyperparameters, phase, round, candidate index, the
            job flags, the job record, and a group id naming round, candidate and node.
        """
        phase = self.schedule[server_round - 1].phase
        messages = []
        for i, node in enumerate(nodes):
            candidate = round_candidate(self.run, self.fed.mode, i, phase, server_round)
            hyperparameters = {wire_name(k): v for k, v in candidate.to_dict().items()}
            settings = {**dict(config), **hyperparameters, PHASE: phase, SERVER_ROUND: server_round}
            settings.update({CANDIDATE: i, NUM_CANDIDATES: len(nodes), **self.flags(server_round)})
            content = RecordDict({**soup_entry, CONFIG_KEY: ConfigRecord(settings), JOB_KEY: self.train_job})
            messages.append(
                Message(
                    content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=group_id(server_round, i, node)
                )
            )
        return messages

    def evaluate(self, soup_entry: dict, nodes: list[int], server_round: int, config: ConfigRecord) -> list[Message]:
        """One evaluate message per node: the soup, phase, round and the OOD settings.

        Parameters
        ----------
        soup_entry : dict
            What ``soup_entry`` returned for the round.
        nodes : list of int
            The clients that evaluate.
        server_round : int
            The round, from 1.
        config : ConfigRecord
            Extra entries added to every message's config.

        Returns
        -------
        list of Message
            One evaluate message per node.
        """
        settings = {**dict(config), PHASE: self.schedule[server_round - 1].phase, SERVER_ROUND: server_round}
        settings.update({OOD: self.run.ood, OOD_EXAMPLES: self.run.ood_examples, **self.flags(server_round)})
        content = RecordDict({**soup_entry, CONFIG_KEY: ConfigRecord(settings), JOB_KEY: self.job})
        return [Message(content, dst_node_id=node, message_type=MessageType.EVALUATE) for node in nodes]

    def soup_content(self, soup: Mapping[str, torch.Tensor], mask: Mask, server_round: int) -> dict:
        """The compact soup and the job record, as a norm-statistics message carries them."""
        return {SOUP_KEY: record_of(self.payload(soup, mask, server_round)), JOB_KEY: self.job}

    def flags(self, server_round: int) -> dict:
        """Lets clients tell when the job is over (``fedsms-client`` exits then)."""
        return {LAST_ROUND: server_round == len(self.schedule), OUT_DIR: self.out_dir}
