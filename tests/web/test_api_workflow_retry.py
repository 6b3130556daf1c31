"""``POST /api/v1/jobs/{id}/retry`` on a failed workflow step resumes the workflow: the HTTP
API goes through ``App.aretry_jobs``, as the dashboard and the CLI do (the semantics, on
every broker: tests/conformance/test_workflow_retry.py)."""

from __future__ import annotations

import httpx
import pytest

from taskmill import App, WorkflowFailedError, chain
from taskmill.workflows import step_job_id


@pytest.mark.timeout(60)
def test_retrying_a_failed_step_through_the_api_finishes_its_workflow(
    api: httpx.Client, web_app: App
) -> None:
    down = {"pricing": True}

    @web_app.task(name="shop.price", retries=0)
    def price(total: int) -> int:
        if down["pricing"]:
            raise ConnectionError("pricing service unreachable")
        return total * 2

    add = web_app.registry.get_task("math.add")
    handle = chain(add.s(1, 2), price.s(), add.s(100)).send(web_app)
    web_app.run_until_idle()
    with pytest.raises(WorkflowFailedError, match="pricing service unreachable"):
        handle.result(timeout=10)

    down["pricing"] = False
    response = api.post(f"/api/v1/jobs/{step_job_id(handle.id, '1')}/retry")
    assert response.status_code == 200, response.text
    assert handle.status() == "running"
    web_app.run_until_idle()
    assert handle.result(timeout=10) == 106
    assert handle.status() == "succeeded"
