"""How a fedsms payload rides in a Flower message: one uint8 ``Array`` in an ``ArrayRecord``.

An ArrayRecord rather than a bytes value in a ConfigRecord because Flower moves the arrays
of an ArrayRecord in chunks through its object store, so a large soup is not bound by
the gRPC message size, and the payload stays opaque to everything but ``fedsms.codec``.
Server and client both import this module, so the layout is defined once.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from fedsms.codec import PayloadError

KEY = "payload"
JOB_KEY = "job"  # the ConfigRecord of every job setting, in every message the server sends


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


def payload_of(record: ArrayRecord) -> bytes:
    """The payload bytes of a record made by :func:`record_of` (not yet decoded or checked).

    Parameters
    ----------
    record : flwr.app.ArrayRecord
        The record from a message (anything else is refused).

    Returns
    -------
    bytes
        The payload, for ``fedsms.codec.decode``.

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
    try:
        return array.numpy().tobytes()
    except ValueError as error:
        raise PayloadError(f"the {KEY!r} array cannot be read: {error}") from None
