"""The broker conformance suite: every broker passes these tests unchanged.

Broker-specific code lives only in ``conftest.py`` (the ``broker_url`` parameters and helpers
such as ``corrupt_payload``); a new broker is added by adding a parameter there.
"""
