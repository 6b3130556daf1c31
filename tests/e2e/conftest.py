"""End-to-end tests of the examples in ``examples/``: each drives one example through the
surface its users touch (HTTP, a WebSocket, the CLI), with real worker processes on the
broker its seed used. Fixtures one example needs live in that example's test module."""
