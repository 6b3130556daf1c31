"""What the Redis broker's Lua scripts must agree on with the Python side."""

from __future__ import annotations

import re
from importlib import resources

from taskmill.job import Job


def test_a_claim_of_a_long_payload_names_every_field_of_a_job_but_the_payload() -> None:
    # claimed_fields (lua/_common.lua) reads such a job's hash by a list of field names: a
    # field missing from it would be dropped from the claimed job without a word
    common = resources.files("taskmill.brokers").joinpath("lua/_common.lua").read_text("utf-8")
    found = re.search(r"local JOB_FIELDS_BUT_PAYLOAD = \{(.*?)\}", common, re.S)
    assert found is not None
    named = re.findall(r"'([a-z_]+)'", found.group(1))
    assert named == [f for f in Job.__struct_fields__ if f != "payload"]
