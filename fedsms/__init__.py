"""fedsms: Sparse Model Soups, on one machine or federated with Flower.

The library half (this package) is plain PyTorch: masks, masked retraining, soups,
evaluation, data, models, checkpoints and the single-machine driver. Flower lives in
``fedsms_server`` and ``fedsms_client``.
"""

__version__ = "0.1.0"


class FedSMSError(Exception):
    """An error the user can fix; its message is one sentence naming the fix."""
