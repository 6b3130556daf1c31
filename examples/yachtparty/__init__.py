"""Yachtparty's agent task processor (seed 003) on taskmill and PostgreSQL.

``config`` (settings from the environment), ``db`` (the app's own tables), ``services`` (a
local fake of the external services, with injected faults), ``handlers`` (one per task type),
``tasks`` (the taskmill app: one task per type, the 1/2/4-minute retries, the action-log
hooks), ``worker`` (the app the ``taskmill worker`` command loads), ``web`` (the HTTP
service) and ``__main__`` (the one-command demo). The throwaway PostgreSQL and the serving on a
thread are shared with the other examples (``examples._support``).
"""
