"""``fedsms_flower``: what the fedsms ServerApp side and ClientApp side both need from Flower.

- :mod:`fedsms_flower.records`: how a fedsms payload rides in a Flower message.
- :mod:`fedsms_flower.deployment`: driving Flower's own processes (SuperLink, SuperNode, the
  ``flwr`` CLI) for ``fedsms-server`` and ``fedsms-client``.
- :mod:`fedsms_flower.simulation`: ``fedsms simulate`` through Flower's simulation runtime.

Layering: ``fedsms`` (no Flower) <- ``fedsms_flower`` <- ``fedsms_server`` / ``fedsms_client``.
This package imports neither app package at module level, and the two app packages never
import each other (``tests/test_layering.py`` checks it).
"""
