"""The app of T16's ``taskmill scheduler`` processes (``faults.cron_app:app``; URL from
``TASKMILL_URL``): an every-second schedule, three every-3-seconds ones and a minutely cron,
all of one no-op task."""

from __future__ import annotations

import os

from taskmill import App

EVERY_S = {"sec": 1, "tri-a": 3, "tri-b": 3, "tri-c": 3, "minutely": 60}
"""Each schedule's period in seconds (``minutely`` is the cron ``* * * * *``)."""

app = App(os.environ.get("TASKMILL_URL", "memory://"))


@app.periodic(cron="* * * * *", name="minutely")
@app.periodic(every=3, name="tri-c")
@app.periodic(every=3, name="tri-b")
@app.periodic(every=3, name="tri-a")
@app.periodic(every=1, name="sec")
@app.task(name="faults.tick")
def tick() -> None: ...
