"""One training reply, from its Message to the values a merge takes.

``unpack_reply`` passes the reply through the gate; ``UpdateDecoder`` reads its model in
either layout (the compact payload, read in place when it is canonical, or Flower's
standard ``ArrayRecord``) against the round's mask into one layout (``codec.FlatReply``),
ready for ``fedsms.merge.Merge.add_reply``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, Message

from fedsms import codec
from fedsms.masks import Mask
from fedsms_flower.records import NUM_EXAMPLES
from fedsms_server import gate
from fedsms_server.flower_layout import read_update, record_bytes


@dataclass
class Update:
    """One client's training reply, unpacked from its Message."""

    node: int
    candidate: int | None = None  # the candidate the reply answers for (from its group id)
    payload: bytes | memoryview = b""  # a compact reply (fedsms clients), read in place from its record
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # why the reply is unusable, before decoding
    arrays: ArrayRecord | None = None  # a reply in Flower's standard layout (unchanged ClientApps)

    @property
    def nbytes(self) -> int:
        """Bytes of the model data the reply carried."""
        return record_bytes(self.arrays) if self.arrays is not None else len(self.payload)


def unpack_reply(reply: Message, node: int, candidate: int | None = None) -> Update:
    """Unpack one training reply through the gate into an ``Update``.

    A reply the gate rejects becomes an ``Update`` carrying its reason in ``error``, so the
    strategy can log it and leave the soup untouched.

    Parameters
    ----------
    reply : Message
        A client's reply to a train message.
    node : int
        The client the reply answers for.
    candidate : int, optional
        The candidate index the reply answers for.

    Returns
    -------
    Update
        The compact payload or, for Flower's standard layout, the ``ArrayRecord``, with the
        checked metrics; or an ``Update`` with only ``error`` set.
    """
    try:
        model, metrics = gate.train_reply(reply)
    except gate.Rejected as error:
        return Update(node, candidate, error=str(error))
    if isinstance(model, ArrayRecord):  # Flower's standard layout
        return Update(node, candidate, metrics=metrics, arrays=model)
    return Update(node, candidate, model, metrics)


class UpdateDecoder:
    """Reads updates against the current mask and soup; the compact reader is built once
    per mask (its metadata signature and the soup's scatter plan), then re-stamped per round.
    """

    def __init__(self) -> None:
        self._reader: codec.UpdateReader | None = None

    def decode(
        self, update: Update, soup: Mapping[str, torch.Tensor], mask: Mask, digest: str, phase: int, server_round: int
    ) -> tuple[codec.FlatReply, int]:
        """The update read into the round's one layout (``codec.FlatReply``: the compact
        reader's blocks), whichever layout it travelled in, and its example count: replies
        of both layouts then merge alike, in any mix.

        Parameters
        ----------
        update : Update
            An unpacked reply.
        soup : mapping of str to Tensor
            The soup the round sent (names, shapes, dtypes).
        mask : Mask
            The round's mask.
        digest : str
            Its digest, which a compact reply must name.
        phase, server_round : int
            What a compact reply's header must name.

        Returns
        -------
        tuple of (codec.FlatReply, int)
            The values (read in place when the payload is canonical) and the example count.

        Raises
        ------
        codec.PayloadError
            The reply is unusable (the gate's reason, or what decoding found).
        """
        if update.error is not None:
            raise codec.PayloadError(update.error)
        reader = self._reader_for(soup, mask, digest, phase, server_round)
        if update.arrays is not None:  # Flower's standard layout: the gate checked num-examples in the metrics
            examples = int(update.metrics[NUM_EXAMPLES])
            values = reader.flat(read_update(update.arrays, soup, mask), examples, update.nbytes)
        else:
            values = reader.read(update.payload)
            examples = values.num_examples
        if not 0 < examples <= gate.MAX_EXAMPLES:
            raise codec.PayloadError(f"the reply claims {examples} training examples")
        return values, examples

    def _reader_for(self, soup, mask: Mask, digest: str, phase: int, server_round: int) -> codec.UpdateReader:
        if self._reader is None or self._reader.digest != digest or self._reader.mask is not mask:
            self._reader = codec.UpdateReader(mask, soup, digest=digest, phase=phase, round=server_round)
        return self._reader.at(phase=phase, round=server_round)
