"""POST /api/v1/call: request/response over the bus, through the real query API."""

from __future__ import annotations

from pathlib import Path

from tests.query_helpers import http, query_service


async def test_call_returns_the_result_or_says_why_not(settings, components, tmp_path: Path):
    await components.dispatcher(unschedulable_after_s=0.5)
    await components.worker()
    async with query_service(settings, tmp_path / "q.duckdb") as svc, http(svc) as api:
        r = await api.post("/api/v1/call", json={"capability": {"type": "echo"},
                                                 "payload": {"x": 1}})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "succeeded" and r.json()["result"] == {"x": 1}
        # anyserve's form: the capability in headers, the body is the payload.
        r = await api.post("/api/v1/call", json={"y": 2},
                           headers={"X-Capability-Type": "echo"})
        assert r.status_code == 200 and r.json()["result"] == {"y": 2}
        # Nobody serves it: 422 with the reason, not a hang.
        r = await api.post("/api/v1/call", json={"capability": {"type": "nobody.home"}})
        assert r.status_code == 422 and r.json()["state"] == "unschedulable"
        assert "no live worker advertises" in r.json()["reason"]
        # Still running at the timeout: 504 with the job id to follow.
        r = await api.post("/api/v1/call", params={"timeout": 1},
                           json={"capability": {"type": "sleep"}, "payload": {"seconds": 5}})
        assert r.status_code == 504 and r.json()["job_id"]
        # Bad input is a 4xx problem.
        r = await api.post("/api/v1/call", json={"capability": "echo"})
        assert r.status_code == 400, r.text
