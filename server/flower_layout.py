"""Flower's standard message layout, for ClientApps that know nothing of fedsms.

A typical Flower PyTorch ClientApp (the layout of Flower's quickstart) reads the model from
``content["arrays"]`` and its settings from ``content["config"]``, trains, and replies with
``ArrayRecord(model.state_dict())`` and a ``MetricRecord`` holding ``num-examples``. Under
``client-protocol = flower`` the strategy sends the soup in that layout: dense, zeros
outside the mask. A reply in that layout passes the same checks as a compact one (names,
shapes, dtypes, the numeric contract of ``codec.in_range``, example count) and only its values under the mask are kept,
so the soup stays exactly as sparse whatever the client did to its pruned weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from fedsms import FedSMSError
from fedsms.codec import MAX_MAGNITUDE, PayloadError, in_range
from fedsms.masks import Mask, outside_mask_nonzeros
from fedsms.merge import State, values_under_mask
from fedsms_flower.records import ARRAYS_KEY


def soup_record(soup: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The soup as a dense ``ArrayRecord`` (pruned weights are zeros).

    Parameters
    ----------
    soup : mapping of str to Tensor
        The soup's full state dict.

    Returns
    -------
    ArrayRecord
        What ``message.content["arrays"]`` holds for a standard Flower ClientApp.
    """
    return ArrayRecord({name: tensor.detach().cpu() for name, tensor in soup.items()})


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the array data an ``ArrayRecord`` carries (what the transport moves).

    Parameters
    ----------
    record : ArrayRecord
        Any array record.

    Returns
    -------
    int
        The summed length of its arrays' serialised data.
    """
    return sum(len(array.data) for array in record.values())


def read_update(record: ArrayRecord, template: Mapping[str, torch.Tensor], mask: Mask) -> State:
    """The values under the mask (and the dense extras) of a standard reply.

    Parameters
    ----------
    record : ArrayRecord
        The reply's ``"arrays"`` record: the client's whole state dict.
    template : mapping of str to Tensor
        The soup: the names, shapes and dtypes the reply must have.
    mask : Mask
        The round's mask; values outside it are dropped.

    Returns
    -------
    dict of str to Tensor
        The compact form the engine's merge takes (see ``fedsms.merge.values_under_mask``).

    Raises
    ------
    PayloadError
        The record is not an ``ArrayRecord`` of the soup's tensors, or a value breaks the
        numeric contract (NaN, Inf, beyond ``codec.MAX_MAGNITUDE``), checked in its own dtype.
    """
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"the reply's {ARRAYS_KEY!r} is a {type(record).__name__}, not an ArrayRecord")
    names = set(record.keys())
    if names != set(template):
        missing, extra = sorted(set(template) - names)[:3], sorted(names - set(template))[:3]
        raise PayloadError(f"the reply's arrays are not the soup's tensors (missing {missing}, extra {extra})")
    state = {}
    for name, like in template.items():
        array = record[name]
        if tuple(array.shape) != tuple(like.shape):
            raise PayloadError(f"tensor {name!r} has shape {tuple(array.shape)}, the soup's is {tuple(like.shape)}")
        try:
            value = torch.from_numpy(array.numpy().copy())
        except (TypeError, ValueError) as error:
            raise PayloadError(f"tensor {name!r} cannot be read ({error})") from None
        if value.is_floating_point() != like.is_floating_point():
            raise PayloadError(f"tensor {name!r} is {value.dtype}, the soup's is {like.dtype}")
        if value.is_floating_point() and not in_range(value):  # in the reply's own dtype, before the cast
            raise PayloadError(f"tensor {name!r} has NaN or Inf values or values beyond ±{MAX_MAGNITUDE:g}")
        state[name] = value.to(like.dtype)
    return values_under_mask(state, mask)


def read_arrays(arrays: ArrayRecord, template: Mapping[str, torch.Tensor], mask: Mask, model_name: str) -> State:
    """A global model handed to the strategy (``initial_arrays``, or ``arrays`` in Flower's
    loop), checked to fit the soup: the same names, shapes and dtypes, zero where the mask prunes.

    Parameters
    ----------
    arrays : ArrayRecord
        The model, e.g. ``ArrayRecord(model.state_dict())``.
    template : mapping of str to Tensor
        The soup.
    mask : Mask
        The job's mask.
    model_name : str
        The model's class name, for the message.

    Returns
    -------
    dict of str to Tensor
        The state dict, in the template's order.

    Raises
    ------
    FedSMSError
        The arrays cannot be read as tensors, do not fit the template, break the numeric
        contract of every soup value (``codec.in_range``), or are nonzero where the mask
        prunes; one sentence naming the fix.
    """
    try:
        state = arrays.to_torch_state_dict()
    except Exception as error:  # a record that is not a model
        raise FedSMSError(f"the arrays given to the strategy cannot be read as tensors ({error})") from None

    def fits(name: str) -> bool:
        return name in state and state[name].shape == template[name].shape and state[name].dtype == template[name].dtype

    misfit = next((k for k in template if not fits(k)), None) or next((k for k in state if k not in template), None)
    if misfit is not None:
        raise FedSMSError(
            f"the arrays given to the strategy do not fit its model ({model_name}): tensor {misfit!r} is missing, "
            "extra, or of another shape or dtype; pass ArrayRecord(model.state_dict()) of the strategy's architecture"
        )
    beyond = next((k for k, v in state.items() if v.is_floating_point() and not in_range(v)), None)
    if beyond is not None:
        raise FedSMSError(
            f"the arrays given to the strategy have NaN or Inf values or values beyond ±{MAX_MAGNITUDE:g} in tensor "
            f"{beyond!r}; pass a model whose weights are finite numbers of sensible size"
        )
    outside = outside_mask_nonzeros(state, mask)
    if outside:
        raise FedSMSError(
            f"the arrays given to the strategy have {sum(outside.values())} nonzero weights the job's mask "
            "prunes; pass the ArrayRecord aggregate_train returned"
        )
    return {name: state[name] for name in template}  # the model's order, in which payloads list tensors
