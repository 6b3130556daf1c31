"""Runnable example applications (``python -m examples.demo``)."""
