"""The reply gate: every message a client sends the server is read here, once, before use.

Three reply kinds reach the server: training (``update`` payload + ``metrics``), evaluation
(``metrics``) and norm statistics (``stats`` arrays + ``metrics``). Each entry point below
checks what the strategy will use — types, finiteness and ranges of every number, bounded
sizes, Array headers against their bytes — and returns plain values, or raises
``Rejected`` with a short, escaped reason. Nothing downstream sees an unchecked field.

The payload itself is validated by ``fedsms.codec.decode`` (its own staged gate).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from numpy.lib import format as npy

from fedsms import FedSMSError, codec
from fedsms_flower.records import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    STATS_KEY,
    UPDATE_KEY,
    npy_data_offset,
    payload_of,
)

MAX_EXAMPLES = codec.MAX_EXAMPLES  # a reply claiming more is not believed
MAX_METRICS = 64  # metric entries in one reply
MAX_KEY = 128  # characters of a metric name
MAX_METRIC = codec.MAX_MAGNITUDE  # |value| of a metric: the one numeric contract of every value
MAX_REASON = 240  # characters of a logged reason
MAX_ARRAY_BYTES = 1 << 32  # bytes one Array may declare


class Rejected(FedSMSError):
    """A reply the gate refuses; ``str(error)`` is its short reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(short(reason))


def short(text: object, limit: int = MAX_REASON) -> str:
    """``text`` on one line, control characters escaped, at most ``limit`` characters.

    Parameters
    ----------
    text : object
        What to show; ``str(text)`` is used.
    limit : int, optional
        Characters at most (default ``MAX_REASON``); a longer text ends with "…".

    Returns
    -------
    str
        The escaped, truncated text.
    """
    text = str(text)[: limit * 4]  # escaping at most quadruples a character
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return escaped if len(escaped) <= limit else escaped[: limit - 1] + "…"


def client_error(reply: Message) -> str | None:
    """The reason of an error reply, as the client's own exception (escaped, truncated), or None.

    Parameters
    ----------
    reply : Message
        Any reply.

    Returns
    -------
    str or None
        "the client failed: <its exception type>: <its message>" for an error reply (the
        wrappers Flower and Ray put around it removed; see ``client_exception``); None otherwise.
    """
    if not reply.has_error():
        return None
    return short(f"the client failed: {client_exception(reply.error.reason)}")


_FLOWER_REASON = re.compile(r"<class '([^']*)'>:<'(.*)'>", re.S)  # how Flower reports a ClientApp's exception
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning)): (.*)$")
_CAUSE = "The above exception was the direct cause of the following exception"


def client_exception(reason: str) -> str:
    """The client's own exception in an error reply's reason: ``"ValueError: shard 3 is empty"``.

    A SuperNode reports ``<class 'ValueError'>:<'shard 3 is empty'>``; a simulated client's
    exception arrives inside Ray's ``RayTaskError(ClientAppException)``, whose traceback
    names the original exception before Flower's wrapper. Other reasons are returned as they are.

    Parameters
    ----------
    reason : str
        ``Message.error.reason`` of an error reply.

    Returns
    -------
    str
        ``"<type>: <message>"`` of the first exception raised, or ``reason`` unchanged.
    """
    match = _FLOWER_REASON.fullmatch(reason.strip())
    if match is None:
        return reason
    kind, text = match[1].rsplit(".", 1)[-1], match[2]
    if "ClientAppException" not in kind and "ClientAppException" not in text:
        return f"{kind}: {text}"
    original = text.split(_CAUSE, 1)[0] if _CAUSE in text else ""
    for line in reversed(original.splitlines()):  # the last exception line before Flower wrapped it
        found = _EXCEPTION_LINE.match(line.strip())
        if found and "ClientAppException" not in found[1]:
            return f"{found[1].rsplit('.', 1)[-1]}: {found[2]}"
    wrapped = text.rsplit("occurred. Message:", 1)
    return wrapped[1].strip() if len(wrapped) == 2 else text


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(f"metric {key!r} is a {type(value).__name__}, not a number")
    if isinstance(value, int) and abs(value) > MAX_METRIC:
        raise Rejected(f"metric {key!r} is out of range")
    if not math.isfinite(value) or abs(value) > MAX_METRIC:
        raise Rejected(f"metric {key!r} is {value!r}, not a finite number of sensible size")
    return value


def metrics(reply: Message, *, examples: bool) -> tuple[dict[str, float], int | None]:
    """The reply's ``metrics`` record as {name: number}; with ``examples``, also its
    ``num-examples`` as an int in [1, MAX_EXAMPLES] (it stays among the metrics).

    Parameters
    ----------
    reply : Message
        A client's reply.
    examples : bool
        Whether the metrics must hold ``num-examples``.

    Returns
    -------
    tuple of (dict of str to float, int or None)
        The metrics, and the example count (None without ``examples``).

    Raises
    ------
    Rejected
        No metrics record, more than ``MAX_METRICS`` entries, a name that is not a string
        of 1 to ``MAX_KEY`` characters, a value that is not a finite number within
        ``MAX_METRIC``, or (with ``examples``) a missing or unbelievable ``num-examples``.
    """
    try:
        record = reply.content[METRICS_KEY]
    except (KeyError, TypeError):
        raise Rejected("the reply has no metrics record") from None
    if not isinstance(record, (MetricRecord, Mapping)):
        raise Rejected(f"the reply's metrics are a {type(record).__name__}, not a MetricRecord")
    if len(record) > MAX_METRICS:
        raise Rejected(f"the reply has {len(record)} metrics (at most {MAX_METRICS})")
    out = {}
    for key, value in record.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
            raise Rejected(f"a metric name is not a string of 1 to {MAX_KEY} characters: {key!r}")
        out[key] = _number(key, value)
    count = None
    if examples:
        if NUM_EXAMPLES not in out:
            raise Rejected("the reply's metrics lack 'num-examples'")
        n = out[NUM_EXAMPLES]
        if n != int(n) or not 0 < n <= MAX_EXAMPLES:
            raise Rejected(f"the reply claims {n!r} examples (1 to {MAX_EXAMPLES:.0e} are believed)")
        count = int(n)
    return out, count


def room_for(totals: Mapping[str, object], key: str) -> bool:
    """Whether a round's metric totals may take ``key``: one already there, or a new one
    while fewer than ``MAX_METRICS`` names are (each reply's own names are capped in number
    and length; this caps a round's, so its history line stays bounded however many clients
    send names of their own).

    Parameters
    ----------
    totals : mapping of str to object
        The round's totals so far, by metric name.
    key : str
        A metric name a reply reports.

    Returns
    -------
    bool
        True when the metric joins the totals.
    """
    return key in totals or len(totals) < MAX_METRICS


def array_fits(name: str, array: object) -> None:
    """An ``Array`` whose header (dtype, shape) and the ``.npy`` header inside its bytes
    agree with the bytes it carries, within bounds, so reading it allocates no more than
    the reply holds and unpickles nothing.

    Parameters
    ----------
    name : str
        The entry's name, for the reason.
    array : object
        The record entry to check.

    Raises
    ------
    Rejected
        Not an ``Array`` of a serialised numpy array, an unreadable ``.npy`` header, an
        object, empty-item or Fortran-ordered dtype, a shape that disagrees with the header
        or has more than 8 or negative dimensions, or a data size that is not what the header
        declares (or above ``MAX_ARRAY_BYTES``).
    """
    if not isinstance(array, Array):
        raise Rejected(f"entry {name!r} is a {type(array).__name__}, not an Array")
    data, shape = array.data, array.shape
    if not isinstance(data, bytes) or array.stype != "numpy.ndarray":
        raise Rejected(f"array {name!r} is not a serialised numpy array")
    offset = npy_data_offset(array)  # the header np.save writes for the declared dtype and shape
    if offset is not None:
        declared, fortran, dtype = tuple(shape), False, np.dtype(array.dtype)
    else:
        try:
            stream = io.BytesIO(data)
            version = npy.read_magic(stream)
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            declared, fortran, dtype = read(stream, max_header_size=1024)
            offset = stream.tell()
        except Exception:  # numpy raises several types for a damaged header
            raise Rejected(f"array {name!r} has no readable .npy header") from None
    if dtype.hasobject or dtype.itemsize == 0 or fortran or tuple(declared) != tuple(shape):
        raise Rejected(f"array {name!r} declares {short(shape, 60)} but holds {short(declared, 60)} of {dtype}")
    if len(declared) > 8 or any(d < 0 for d in declared):
        raise Rejected(f"array {name!r} declares the shape {short(declared, 60)}")
    size = math.prod(declared) * dtype.itemsize
    if size > MAX_ARRAY_BYTES or len(data) - offset != size:
        raise Rejected(
            f"array {name!r} declares {short(declared, 60)} of {dtype} but carries {len(data) - offset} bytes"
        )


def train_reply(reply: Message) -> tuple[memoryview | ArrayRecord, dict[str, float]]:
    """A training reply's model and checked metrics.

    The model is the compact payload's bytes, read in place (``payload_of``: a view of the
    record's buffer, for ``codec.decode``) or, for a reply in
    Flower's standard layout (``arrays`` and no ``update``: an unchanged ClientApp), the
    ``ArrayRecord`` of its state dict (for ``flower_layout.read_update``), whose example
    count must then come with the metrics as ``num-examples``.

    Parameters
    ----------
    reply : Message
        A client's reply to a train message.

    Returns
    -------
    tuple of (memoryview or ArrayRecord, dict of str to float)
        The model (payload bytes or ``ArrayRecord``) and the checked metrics.

    Raises
    ------
    Rejected
        An error reply, no update, an array whose header disagrees with its bytes, an
        unreadable payload record, or metrics the gate refuses (see ``metrics``).
    """
    if (reason := client_error(reply)) is not None:
        raise Rejected(reason)
    content = reply.content
    standard = ARRAYS_KEY in content and UPDATE_KEY not in content
    try:
        record = content[ARRAYS_KEY if standard else UPDATE_KEY]
    except (KeyError, TypeError):
        raise Rejected("the reply has no update") from None
    if isinstance(record, ArrayRecord):
        for name, array in record.items():
            array_fits(name, array)
    if standard:
        if not isinstance(record, ArrayRecord):
            raise Rejected(f"the reply's {ARRAYS_KEY!r} is a {type(record).__name__}, not an ArrayRecord")
        values, _ = metrics(reply, examples=True)
        return record, values
    try:
        payload = payload_of(record)
    except codec.PayloadError as error:
        raise Rejected(f"the reply has no readable update ({error})") from None
    values, _ = metrics(reply, examples=False)
    return payload, values


def evaluate_reply(reply: Message) -> tuple[dict[str, float], int]:
    """An evaluation reply's metrics and example count.

    Parameters
    ----------
    reply : Message
        A client's reply to an evaluate message.

    Returns
    -------
    tuple of (dict of str to float, int)
        The checked metrics (``num-examples`` among them) and the example count.

    Raises
    ------
    Rejected
        An error reply, or metrics the gate refuses (see ``metrics``).
    """
    if (reason := client_error(reply)) is not None:
        raise Rejected(reason)
    values, count = metrics(reply, examples=True)
    return values, count


def norm_stats_reply(reply: Message, template: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """A norm-statistics reply's tensors (named, shaped and typed as ``template``, finite,
    variances non-negative) and example count.

    Parameters
    ----------
    reply : Message
        A client's reply to a norm-statistics query.
    template : mapping of str to Tensor
        The model's norm statistics: the names (in order), shapes and dtypes expected.

    Returns
    -------
    tuple of (dict of str to Tensor, int)
        The statistics and the example count they were estimated on.

    Raises
    ------
    Rejected
        An error reply, refused metrics, no ``stats`` ``ArrayRecord``, other names than the
        template's, or a tensor of the wrong shape or dtype, unreadable, non-finite or absurd,
        with negative variances, or (integer counters) out of range.
    """
    if (reason := client_error(reply)) is not None:
        raise Rejected(reason)
    _, count = metrics(reply, examples=True)
    try:
        record = reply.content[STATS_KEY]
    except (KeyError, TypeError):
        raise Rejected("the reply has no norm statistics") from None
    if not isinstance(record, ArrayRecord):
        raise Rejected(f"the norm statistics are a {type(record).__name__}, not an ArrayRecord")
    if list(record.keys()) != list(template):
        raise Rejected("the norm statistics name other tensors than the model's norm layers")
    stats = {}
    for name, like in template.items():
        array = record[name]
        array_fits(name, array)
        if tuple(array.shape) != tuple(like.shape):
            raise Rejected(f"norm statistic {name!r} has shape {tuple(array.shape)}, not {tuple(like.shape)}")
        try:
            tensor = torch.from_numpy(array.numpy().copy())
        except (TypeError, ValueError) as error:
            raise Rejected(f"norm statistic {name!r} cannot be read ({error})") from None
        if tensor.dtype != like.dtype:
            raise Rejected(f"norm statistic {name!r} is {tensor.dtype}, not {like.dtype}")
        if tensor.is_floating_point():
            if not codec.in_range(tensor):
                raise Rejected(f"norm statistic {name!r} has NaN or Inf values or values beyond ±{MAX_METRIC:g}")
            if name.endswith("running_var") and bool((tensor < 0).any()):
                raise Rejected(f"norm statistic {name!r} has negative variances")
        elif bool((tensor < 0).any()) or bool((tensor > MAX_EXAMPLES * 1000).any()):
            raise Rejected(f"norm statistic {name!r} is out of range")
        stats[name] = tensor
    return stats, count
