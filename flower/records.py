"""The layout of every fedsms message, declared once for the server, the client and the toolkit.

A server message holds the soup (``SOUP_KEY``: the compact payload, or ``ARRAYS_KEY``: a
dense ``ArrayRecord`` for Flower's standard layout), the settings of this message
(``CONFIG_KEY``: phase, round, and in a train message the candidate's hyperparameters) and
every other job setting once (``JOB_KEY``). A reply holds the trained model (``UPDATE_KEY``,
or ``ARRAYS_KEY``), norm statistics (``STATS_KEY``) and its ``METRICS_KEY`` record.

The compact payload rides as one uint8 ``Array`` in an ``ArrayRecord`` rather than as bytes
in a ConfigRecord because Flower moves the arrays of an ArrayRecord in chunks through its
object store, so a large soup is not bound by the gRPC message size, and the payload stays
opaque to everything but ``fedsms.codec``.

A train message's ``group_id`` names its round, candidate and node (:func:`group_id`);
Flower copies it into the reply (the SuperLink too, when it answers for a client that went
away), so the server finds each reply's candidate and client from the reply itself
(:func:`origin_of`), whatever the ClientApp wrote.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from numpy.lib import format as npy

from fedsms.codec import PayloadError

# Records of a message's content.
SOUP_KEY = "soup"  # the soup (compact payload) in every server message
ARRAYS_KEY = "arrays"  # where Flower's strategies and quickstart ClientApps put a dense model
CONFIG_KEY = "config"  # this message's settings (ConfigRecord)
JOB_KEY = "job"  # every other job setting, under its run-config name (ConfigRecord)
UPDATE_KEY = "update"  # the trained model's compact payload in a train reply
STATS_KEY = "stats"  # norm statistics in a norm-statistics reply
METRICS_KEY = "metrics"  # a reply's MetricRecord
KEY = "payload"  # the one Array of a payload record (``record_of``)

# Entries of the CONFIG_KEY record.
PHASE = "phase"
SERVER_ROUND = "server-round"
CANDIDATE = "candidate"  # this client's candidate index in the round
LOCAL_EPOCHS = "local-epochs"  # epochs a client trains in this round (Flower's quickstart name)
NUM_CANDIDATES = "num-candidates"
LAST_ROUND = "last-round"  # true in the job's last round: fedsms-client exits after it
OUT_DIR = "out-dir"
FRACTION = "fraction"  # share of the training data a norm-statistics round forwards
OOD = "ood"
OOD_EXAMPLES = "ood-examples"

# Entries of a reply's METRICS_KEY record.
NUM_EXAMPLES = "num-examples"

NORM_STATS = "query.norm_stats"  # message type of the federated recalibration round
IDENTITY = "query.identity"  # message type asking a client for its node config's partition-id
PARTITION_ID = "partition-id"  # node-config key (Flower's simulation sets it) and identity reply metric


def wire_name(field: str) -> str:
    """The config-record name of a candidate hyperparameter: Flower's ``-`` spelling, and
    ``local-epochs`` (Flower's quickstart name) for ``epochs``."""
    return LOCAL_EPOCHS if field == "epochs" else field.replace("_", "-")


def group_id(server_round: int, candidate: int, node: int) -> str:
    """The group id of the train message of ``candidate`` in ``server_round``, sent to ``node``.

    Parameters
    ----------
    server_round : int
        The round, from 1.
    candidate : int
        The candidate index, from 0.
    node : int
        The node the message goes to.

    Returns
    -------
    str
        ``"<round>.<candidate>.<node>"``; Flower copies it into the reply.
    """
    return f"{server_round}.{candidate}.{node}"


def origin_of(reply: Message, server_round: int) -> tuple[int, int] | None:
    """The candidate index and node a reply answers for, read from its group id.

    Parameters
    ----------
    reply : Message
        A reply to a train message of ``server_round``.
    server_round : int
        The round the reply should belong to.

    Returns
    -------
    tuple of (int, int) or None
        ``(candidate, node)``, or None when the group id is not one of ``server_round``'s.
    """
    parts = reply.metadata.group_id.split(".")
    # Flower's node ids are unsigned 64-bit: up to 20 digits
    if len(parts) != 3 or parts[0] != str(server_round) or not all(p.isdecimal() and len(p) <= 20 for p in parts[1:]):
        return None
    return int(parts[1]), int(parts[2])


def record_of(payload: bytes) -> ArrayRecord:
    """Wrap an encoded payload for a Flower message.

    Parameters
    ----------
    payload : bytes
        A payload from ``fedsms.codec.encode``.

    Returns
    -------
    flwr.app.ArrayRecord
        One 1-D uint8 ``Array`` under ``KEY`` holding the payload's bytes.
    """
    return ArrayRecord({KEY: Array(np.frombuffer(payload, dtype=np.uint8))})


def payload_of(record: ArrayRecord) -> memoryview:
    """The payload bytes of a record made by :func:`record_of` (not yet decoded or checked),
    read in place: a read-only view of the record's own buffer past its ``.npy`` header,
    no copy (a payload in another ``.npy`` layout is copied out instead).

    Parameters
    ----------
    record : flwr.app.ArrayRecord
        The record from a message (anything else is refused).

    Returns
    -------
    memoryview
        The payload, for ``fedsms.codec.decode``; it keeps the record's buffer alive.

    Raises
    ------
    PayloadError
        If ``record`` is not an ``ArrayRecord`` with a 1-D uint8 array under ``KEY``, or the
        array cannot be read.
    """
    if not isinstance(record, ArrayRecord) or KEY not in record:
        raise PayloadError(f"the message carries no ArrayRecord with a {KEY!r} array")
    array = record[KEY]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise PayloadError(f"the {KEY!r} array is {array.dtype} of shape {array.shape}, not a 1-D uint8 array")
    offset = npy_data_offset(array)
    if offset is not None and len(array.data) - offset == array.shape[0]:
        return memoryview(array.data)[offset:]
    try:
        return memoryview(array.numpy().tobytes())
    except ValueError as error:
        raise PayloadError(f"the {KEY!r} array cannot be read: {error}") from None


def npy_data_offset(array: Array) -> int | None:
    """Where the elements start in an ``Array``'s bytes, when they open with exactly the
    ``.npy`` header ``np.save`` writes for the array's declared dtype and shape (C order),
    as Flower serialises every array: one comparison with a header made once per dtype and
    shape, instead of numpy's parse of it (``ast`` and ``tokenize``: tens of microseconds).

    Parameters
    ----------
    array : flwr.app.Array
        A record's array (its ``data``, ``dtype`` and ``shape`` as it arrived).

    Returns
    -------
    int or None
        The header's length; None when the bytes are laid out otherwise (another header
        version or spelling, a dtype numpy cannot name, not bytes): parse them to learn why.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or not isinstance(data, bytes):
        return None
    try:
        header = _npy_header(array.dtype, tuple(array.shape))
    except (TypeError, ValueError):  # a dtype or shape numpy cannot name
        return None
    return len(header) if header is not None and data.startswith(header) else None


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes | None:
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    out = io.BytesIO()
    npy.write_array_header_1_0(
        out, {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return out.getvalue()
