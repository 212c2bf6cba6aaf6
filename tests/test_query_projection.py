"""The query projection over a real bus and a real DuckDB file, read over real HTTP."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from bus import topology
from bus.jobtable import emit
from schemas import events as ev
from schemas.common import ErrorInfo
from schemas.telemetry import (
    GpuMetrics,
    GpuProcessSample,
    GpuSample,
    Heartbeat,
    ProcessInfo,
    ProcessMetrics,
    ProcessSample,
)
from services.query.service import rebuild_file
from services.query.writer import Projection
from tests.conftest import eventually
from tests.query_helpers import dump, http, publish, query_service


async def test_submitted_jobs_appear_with_totals_and_details(settings, client, components,
                                                             tmp_path: Path) -> None:
    await components.dispatcher()
    await components.worker()
    async with query_service(settings, tmp_path / "q.duckdb") as svc, http(svc) as api:
        ids = [await client.submit("echo", {"n": i}, user="ann" if i % 3 else "bob")
               for i in range(23)]
        for job_id in ids:
            await client.wait(job_id, timeout=30)
        assert await svc.caught_up()
        # Both streams are followed over data links (bus.follow), not nats-py.
        assert svc.ingest.readers == {"EVENTS": "link", "TELEMETRY": "link"}

        page = (await api.get("/api/v1/jobs", params={"limit": 50})).json()
        assert page["total"] == 23 and len(page["items"]) == 23
        assert {j["job_id"] for j in page["items"]} == set(ids)
        assert all(j["state"] == "succeeded" for j in page["items"])
        # Newest first.
        submitted = [j["submitted_at"] for j in page["items"]]
        assert submitted == sorted(submitted, reverse=True)

        # Filters: by user, by state, by capability; totals count every match.
        bob = (await api.get("/api/v1/jobs", params={"user": "bob"})).json()
        assert bob["total"] == 8 and {j["user"] for j in bob["items"]} == {"bob"}
        none = (await api.get("/api/v1/jobs", params={"status": "failed"})).json()
        assert none["total"] == 0 and none["items"] == []
        both = (await api.get("/api/v1/jobs", params=[("status", "failed"),
                                                      ("status", "succeeded")])).json()
        assert both["total"] == 23
        assert (await api.get("/api/v1/jobs", params={"capability": "sleep"})).json()["total"] == 0

        # Pages of 5 cover every job exactly once.
        seen: list[str] = []
        for offset in range(0, 25, 5):
            p = (await api.get("/api/v1/jobs", params={"limit": 5, "offset": offset})).json()
            assert p["total"] == 23 and p["limit"] == 5 and p["offset"] == offset
            seen += [j["job_id"] for j in p["items"]]
        assert seen == [j["job_id"] for j in page["items"]]  # deep pages read backwards
        oldest = (await api.get("/api/v1/jobs", params={"limit": 5, "order": "asc"})).json()
        assert [j["job_id"] for j in oldest["items"]] == seen[::-1][:5]
        far = (await api.get("/api/v1/jobs", params={"offset": 10**15})).json()
        assert far["items"] == [] and far["total"] == 23

        # One job in detail: attempts, events in order, the result.
        detail = (await api.get(f"/api/v1/jobs/{ids[4]}")).json()
        assert detail["result"] == {"n": 4}
        assert detail["capability"] == {"type": "echo"}
        assert [a["attempt"] for a in detail["attempts"]] == [1]
        attempt = detail["attempts"][0]
        assert attempt["outcome"] == "succeeded" and attempt["worker_id"]
        assert attempt["ended_at"] >= attempt["started_at"]
        kinds = [e["kind"] for e in detail["events"]]
        assert kinds[0] == "submitted" and kinds[-1] == "succeeded" and "running" in kinds
        assert detail["events_total"] == len(kinds)
        assert [e["seq"] for e in detail["events"]] == sorted(e["seq"] for e in detail["events"])
        state = await client.status(ids[4])
        assert state is not None and detail["worker_id"] == state.worker_id

        missing = await api.get("/api/v1/jobs/nope")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        assert "nope" in missing.json()["detail"]

        stats = (await api.get("/api/v1/stats/cluster")).json()
        assert stats["jobs_by_state"] == {"succeeded": 23} and stats["jobs_total"] == 23
        workers = (await api.get("/api/v1/workers")).json()
        assert workers["total"] == 1
        caps = (await api.get("/api/v1/capabilities")).json()["items"]
        assert {"echo", "sleep"} <= {c["type"] for c in caps}


async def test_submit_and_cancel_through_the_api(settings, client, components,
                                                 tmp_path: Path) -> None:
    await components.dispatcher()
    await components.worker()
    async with query_service(settings, tmp_path / "q.duckdb") as svc, http(svc) as api:
        r = await api.post("/api/v1/jobs", json={"capability": {"type": "echo"},
                                                 "payload": {"hello": "api"}, "user": "cy"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        state = await client.wait(job_id, timeout=30)
        assert state.state == "succeeded" and state.result == {"hello": "api"}

        r = await api.post("/api/v1/jobs", json={"capability": {"type": "sleep"},
                                                 "payload": {"seconds": 30}})
        sleeper = r.json()["job_id"]
        await eventually(lambda: _state(client, sleeper, "running"), what="sleep running")
        r = await api.post(f"/api/v1/jobs/{sleeper}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested"] is True
        assert (await client.wait(sleeper, timeout=30)).state == "cancelled"
        again = await api.post(f"/api/v1/jobs/{sleeper}/cancel")
        assert again.status_code == 409 and "already ended" in again.json()["detail"]
        assert (await api.post("/api/v1/jobs/unknown-job/cancel")).status_code == 404

        assert await svc.caught_up()
        cancelled = (await api.get(f"/api/v1/jobs/{sleeper}")).json()
        assert cancelled["state"] == "cancelled"
        assert cancelled["attempts"][0]["outcome"] == "cancelled"

        # Bad bodies: 4xx with the reason, nothing published.
        bad = await api.post("/api/v1/jobs", json={"capability": {"type": "Not A Type"}})
        assert bad.status_code == 400 and "capability.type" in bad.json()["detail"]
        typo = await api.post("/api/v1/jobs", json={"capability": {"type": "echo"}, "prio": 1})
        assert typo.status_code == 400 and "prio" in typo.json()["detail"]
        text = await api.post("/api/v1/jobs", content=b"hi", headers={"content-type": "text/plain"})
        assert text.status_code == 415
        junk = await api.post("/api/v1/jobs", content=b"{not json",
                              headers={"content-type": "application/json"})
        assert junk.status_code == 400
        assert await svc.caught_up()
        total = (await api.get("/api/v1/jobs")).json()["total"]
        assert total == 2


async def _state(client, job_id: str, want: str) -> bool:
    s = await client.status(job_id)
    return s is not None and s.state == want


async def test_bad_queries_are_4xx_with_a_reason(settings, tmp_path: Path) -> None:
    async with query_service(settings, tmp_path / "q.duckdb") as svc, http(svc) as api:
        cases = {
            "/api/v1/jobs?bogus=1": ("unknown query parameter", 400),
            "/api/v1/jobs?limit=0": ("limit", 400),
            "/api/v1/jobs?limit=100000": ("limit", 400),
            "/api/v1/jobs?offset=-1": ("offset", 400),
            "/api/v1/jobs?offset=99999999999999999999999": ("offset", 400),
            "/api/v1/jobs?since=yesterday": ("not a time", 400),
            "/api/v1/jobs?until=2024-13-45": ("not a time", 400),
            "/api/v1/jobs?status=sleeping": ("status", 400),
            "/api/v1/metrics/gpu?bucket=0": ("bucket", 400),
            "/api/v1/metrics/gpu?bucket=nan": ("bucket", 400),
            "/api/v1/metrics/gpu?since=-1h&until=-2h": ("after since", 400),
            "/api/v1/metrics/gpu?since=-30d&bucket=1": ("buckets", 400),
            "/api/v1/metrics/gpu?fields=bogus": ("fields", 400),
            "/api/v1/metrics/process?source=gpu&fields=rss_mb": ("not gpu process", 400),
            "/api/v1/metrics/gpu?job=missing": ("no job", 404),
            "/api/v1/nodes/nowhere": ("no node", 404),
            "/api/v1/nothing": ("nothing at", 404),
        }
        for path, (words, status) in cases.items():
            r = await api.get(path)
            assert r.status_code == status, (path, r.status_code, r.text)
            body = r.json()
            assert body["status"] == status and words in body["detail"], (path, body)
        assert (await api.delete("/api/v1/jobs")).status_code == 405


async def test_metrics_bucketing_and_gpu_hours_match_hand_computed_values(
        settings, bus, tmp_path: Path) -> None:
    t0 = (time.time() // 3600 - 3) * 3600  # three hours ago, on the hour
    async with query_service(settings, tmp_path / "q.duckdb") as svc, http(svc) as api:
        # Two simulated nodes, two GPUs each, a sample every 10 s for 3 minutes:
        # node a GPU 0 runs at i % 6 * 10 %, GPU 1 at 50 %; node b idles at 2 %.
        for i in range(18):
            ts = t0 + 10 * i
            await publish(bus, "a", "gpu", GpuMetrics(node="a", ts=ts, simulated=True, gpus=[
                GpuSample(index=0, gpu_util_pct=float(i % 6 * 10), fb_used_mb=1000.0 + i,
                          simulated=True),
                GpuSample(index=1, gpu_util_pct=50.0, simulated=True)],
                processes=[GpuProcessSample(pid=7, gpu_index=0, job_id="ja", sm_util_pct=40.0)]))
            await publish(bus, "b", "gpu", GpuMetrics(node="b", ts=ts, simulated=True, gpus=[
                GpuSample(index=0, gpu_util_pct=2.0, simulated=True),
                GpuSample(index=1, gpu_util_pct=2.0, simulated=True)]))
            await publish(bus, "a", "procs", ProcessMetrics(node="a", ts=ts, simulated=True,
                          processes=[ProcessSample(pid=7, job_id="ja", cpu_percent=float(i),
                                                   rss_mb=100.0)]))
        # Jobs with known attempt windows: ja 2 GPUs for 2 h (ann, train); jb 1 GPU
        # for 30 min (ann, infer); jc 1 GPU for 1 h (bob, train), retried once
        # after a 15-minute first attempt; a discovered job on one GPU for 45 min.
        await _job(bus, "ja", "ann", "train", [(t0, t0 + 7200, ["a.gpu0", "a.gpu1"])])
        await _job(bus, "jb", "ann", "infer", [(t0, t0 + 1800, ["b.gpu0.s1"])])
        await _job(bus, "jc", "bob", "train", [(t0, t0 + 900, ["b.gpu1"]),
                                               (t0 + 1000, t0 + 4600, ["b.gpu1"])])
        await emit(bus, ev.Discovered(job_id="jd", node="b", ts=t0, devices=["GPU-1234"],
                                      process=ProcessInfo(pid=9, create_time=t0,
                                                          username="cy",
                                                          parameters={"lr": "0.1"})))
        await emit(bus, ev.Ended(job_id="jd", node="b", ts=t0 + 2700, exit_code=0))
        assert await svc.caught_up()

        r = (await api.get("/api/v1/metrics/gpu", params={
            "node": "a", "gpu": 0, "since": str(t0), "until": str(t0 + 180), "bucket": 60,
            "fields": "gpu_util_pct"})).json()
        (series,) = r["series"]
        # Each minute holds six samples: 0,10,20,30,40,50 -> mean 25.
        assert [p["ts"] for p in series["points"]] == [t0, t0 + 60, t0 + 120]
        assert [p["samples"] for p in series["points"]] == [6, 6, 6]
        assert [p["values"]["gpu_util_pct"] for p in series["points"]] == [25.0, 25.0, 25.0]
        peak = (await api.get("/api/v1/metrics/gpu", params={
            "node": "a", "since": str(t0), "until": str(t0 + 180), "bucket": 90, "agg": "max",
            "fields": ["gpu_util_pct", "fb_used_mb"]})).json()
        assert [(s["node"], s["gpu"]) for s in peak["series"]] == [("a", 0), ("a", 1)]
        g0 = peak["series"][0]["points"]
        assert [p["values"]["gpu_util_pct"] for p in g0] == [50.0, 50.0]
        assert [p["values"]["fb_used_mb"] for p in g0] == [1008.0, 1017.0]
        # A job's GPU metrics are those of the devices its attempts held.
        of_ja = (await api.get("/api/v1/metrics/gpu", params={
            "job": "ja", "since": str(t0), "until": str(t0 + 180), "bucket": 180})).json()
        assert [(s["node"], s["gpu"]) for s in of_ja["series"]] == [("a", 0), ("a", 1)]
        procs = (await api.get("/api/v1/metrics/process", params={
            "job": "ja", "since": str(t0), "until": str(t0 + 180), "bucket": 60,
            "agg": "sum", "fields": "cpu_percent"})).json()
        assert [p["values"]["cpu_percent"] for p in procs["series"][0]["points"]] == [
            15.0, 51.0, 87.0]  # 0+..+5, 6+..+11, 12+..+17
        gproc = (await api.get("/api/v1/metrics/process", params={
            "source": "gpu", "since": str(t0), "until": str(t0 + 180), "bucket": 180})).json()
        assert gproc["series"][0]["points"][0]["values"]["sm_util_pct"] == 40.0

        stats = (await api.get("/api/v1/stats/cluster",
                               params={"until": str(t0 + 7200)})).json()
        by_user = {g["key"]: g["gpu_hours"] for g in stats["gpu_hours_by_user"]}
        # ann: 2 GPUs x 2 h + 1 x 0.5 h; bob: 0.25 h + 1 h; cy: 0.75 h.
        assert by_user == {"ann": 4.5, "bob": 1.25, "cy": 0.75}
        by_cap = {g["key"]: g["gpu_hours"] for g in stats["gpu_hours_by_capability"]}
        assert by_cap == {"train": 5.25, "infer": 0.5, "discovered": 0.75}
        assert stats["gpu_hours_total"] == 6.5
        # Clipped to a window: the first hour only.
        first = (await api.get("/api/v1/stats/cluster", params={
            "since": str(t0), "until": str(t0 + 3600)})).json()
        assert {g["key"]: g["gpu_hours"] for g in first["gpu_hours_by_user"]} == pytest.approx(
            {"ann": 2.5, "bob": (900 + 2600) / 3600, "cy": 0.75})

        detail = (await api.get("/api/v1/jobs/jc")).json()
        assert [(a["attempt"], a["outcome"]) for a in detail["attempts"]] == [
            (1, "failed"), (2, "succeeded")]
        jd = (await api.get("/api/v1/jobs/jd")).json()
        assert jd["origin"] == "discovered" and jd["state"] == "ended"
        assert jd["parameters"] == {"lr": "0.1"} and jd["user"] == "cy"


async def _job(bus, job_id: str, user: str, ctype: str,
               attempts: list[tuple[float, float, list[str]]]) -> None:
    t = attempts[0][0]
    await emit(bus, ev.Submitted(job_id=job_id, ts=t, capability={"type": ctype}, user=user))
    await emit(bus, ev.Queued(job_id=job_id, ts=t))
    for n, (start, end, devices) in enumerate(attempts, 1):
        node = devices[0].split(".")[0]
        await emit(bus, ev.Running(job_id=job_id, attempt=n, ts=start, worker_id="w",
                                   node=node, devices=devices))
        if n < len(attempts):
            await emit(bus, ev.Retrying(job_id=job_id, attempt=n, ts=end, worker_id="w",
                                        error=ErrorInfo(code="boom", message="boom")))
        else:
            await emit(bus, ev.Succeeded(job_id=job_id, attempt=n, ts=end, worker_id="w"))


async def test_idle_leased_gpus_and_lost_nodes(settings, bus, tmp_path: Path) -> None:
    from schemas.fleet import LeaseRecord
    from schemas.telemetry import NodeLost

    now = time.time()
    async with query_service(settings, tmp_path / "q.duckdb") as svc, http(svc) as api:
        for i in range(10):
            ts = now - 300 + 30 * i
            await publish(bus, "n1", "gpu", GpuMetrics(node="n1", ts=ts, simulated=True, gpus=[
                GpuSample(index=0, gpu_util_pct=1.0, simulated=True),
                GpuSample(index=1, gpu_util_pct=80.0, simulated=True)]))
        await publish(bus, "n1", "heartbeat", Heartbeat(node="n1", interval_s=5.0))
        await publish(bus, "n2", "heartbeat", Heartbeat(node="n2", ts=now - 600, interval_s=5.0))
        await bus.publish(topology.node_events("n3"), NodeLost(node="n3", ts=now - 60, silent_s=30))
        leases = await bus.kv("leases")
        for idx in (0, 1):
            await leases.put(f"n1.gpu{idx}", msgspec.json.encode(LeaseRecord(
                device=f"n1.gpu{idx}", holder="w1", job_id=f"j{idx}", node="n1",
                acquired_at=now - 400, renewed_at=now)))
        await svc.poller.poll()
        assert await svc.caught_up()
        stats = (await api.get("/api/v1/stats/cluster", params={"window": 600})).json()
        idle = stats["idle_leased_gpus"]
        assert [(i["device"], i["job_id"], i["util_pct"], i["samples"]) for i in idle] == [
            ("n1.gpu0", "j0", 1.0, 10)]
        assert stats["gpu_util_window_pct"] == 40.5
        lost = {n["node"]: n["status"] for n in stats["lost_nodes"]}
        assert lost == {"n2": "silent", "n3": "lost"}
        nodes = {n["node"]: n["status"] for n in (await api.get("/api/v1/nodes")).json()["items"]}
        assert nodes == {"n1": "up", "n2": "silent", "n3": "lost"}
        n1 = (await api.get("/api/v1/nodes/n1")).json()
        assert [(d["gpu"], d["gpu_util_pct"]) for d in n1["devices"]] == [(0, 1.0), (1, 80.0)]
        held = (await api.get("/api/v1/leases")).json()
        assert held["total"] == 2
        await leases.delete("n1.gpu0")
        await svc.poller.poll()
        assert await svc.caught_up()
        after = (await api.get("/api/v1/leases", params={"all": "true"})).json()["items"]
        assert {(i["device"], i["live"]) for i in after} == {("n1.gpu0", False),
                                                             ("n1.gpu1", True)}
        released = next(i for i in after if i["device"] == "n1.gpu0")
        assert released["released_at"] is not None


async def test_rebuild_by_replay_equals_the_incremental_projection(
        settings, client, bus, components, tmp_path: Path) -> None:
    await components.dispatcher()
    await components.worker()
    live = tmp_path / "live.duckdb"
    async with query_service(settings, live, max_rows=7) as svc:
        ids = [await client.submit("echo", {"i": i}) for i in range(12)]
        for i in range(40):
            await publish(bus, f"n{i % 3}", "gpu", GpuMetrics(node=f"n{i % 3}", simulated=True,
                          gpus=[GpuSample(index=0, gpu_util_pct=float(i), simulated=True)]))
            await publish(bus, f"n{i % 3}", "heartbeat", Heartbeat(node=f"n{i % 3}", seq=i))
        await emit(bus, ev.Discovered(job_id="disc-1", node="n1",
                                      process=ProcessInfo(pid=1, cmdline=["python", "x.py"])))
        for job_id in ids:
            await client.wait(job_id, timeout=30)
        # One job whose events land in three different batches.
        for event in (ev.Submitted(job_id="split", capability={"type": "echo"}, user="dee"),
                      ev.Running(job_id="split", attempt=1, worker_id="w", node="n1",
                                 devices=["n1.gpu0"]),
                      ev.Succeeded(job_id="split", attempt=1, worker_id="w", result=[1])):
            await emit(bus, event)
            assert await svc.caught_up()
        assert svc.ingest.stats.batches >= 4
        cur = svc.projection.reader()
        incremental = {t: dump(cur, t, ("inventory_at",)) for t in _REPLAYED}
        # Rebuild a copy offline, and the live one in place: both equal what was built.
        copy = tmp_path / "copy.duckdb"
        applied = await rebuild_file(bus, copy, instance="rebuild-test")
        assert applied == {s: p.seq for s, p in svc.projection.positions().items()}
        await svc.ingest.rebuild()
        assert await svc.caught_up()
        in_place = {t: dump(svc.projection.reader(), t, ("inventory_at",)) for t in _REPLAYED}
    rebuilt = Projection(copy)
    try:
        offline = {t: dump(rebuilt.reader(), t, ("inventory_at",)) for t in _REPLAYED}
    finally:
        rebuilt.close()
    assert incremental["jobs"] and len(incremental["job_events"]) >= 12 * 4
    assert len(incremental["gpu_metrics"]) == 40
    for table in _REPLAYED:
        assert offline[table] == incremental[table], table
        assert in_place[table] == incremental[table], table


_REPLAYED = ("jobs", "attempts", "job_events", "node_events", "nodes", "devices", "gpu_metrics",
             "gpu_process_metrics", "process_metrics", "kernel_results", "kernel_candidates",
             "applied")


async def test_downsampling_keeps_averages_and_drops_what_is_past_retention(tmp_path: Path
                                                                           ) -> None:
    from services.query.rows import Batch
    from services.query.writer import Retention

    p = Projection(tmp_path / "q.duckdb")
    try:
        now = 1_000_800.0
        batch = Batch()
        # 4 h of samples every 15 s at alternating 0 / 100 %; one sample 40 days old.
        def add(seq: int, ts: float, util: float) -> None:
            batch.add(topology.TELEMETRY, seq, topology.telemetry("n", "gpu"),
                      msgspec.json.encode(GpuMetrics(node="n", ts=ts, gpus=[
                          GpuSample(index=0, gpu_util_pct=util)])), None)

        for i in range(4 * 240):
            add(i + 1, now - 4 * 3600 + 15 * i, 100.0 * (i % 2))
        add(10_000, now - 40 * 86400, 5.0)
        p.apply(batch)
        cur = p.reader()
        before = cur.execute("SELECT count(*), avg(gpu_util_pct) FROM gpu_metrics "
                             "WHERE ts >= ?", [now - 4 * 3600]).fetchone()
        assert before == (960, 50.0)
        folded = p.downsample(Retention(full_resolution_s=3600, bucket_s=60,
                                        keep_s=30 * 86400), now=now)
        assert folded == 3 * 240 + 1
        rows = cur.execute("SELECT count(*), sum(n), sum(gpu_util_pct * n) / sum(n) "
                           "FROM gpu_metrics").fetchone()
        # 3 h folded into 180 one-minute rows of n=4, the last hour untouched (240 rows),
        # the 40-day-old sample dropped; the mean is unchanged.
        assert rows == (180 + 240, 960, 50.0)
        assert cur.execute("SELECT min(n), max(n) FROM gpu_metrics WHERE ts < ?",
                           [now - 3600]).fetchone() == (4, 4)
        # Run again: nothing is folded twice.
        assert p.downsample(Retention(full_resolution_s=3600, bucket_s=60,
                                      keep_s=30 * 86400), now=now) == 0
        assert cur.execute("SELECT count(*) FROM gpu_metrics").fetchone() == (420,)
    finally:
        p.close()


async def test_a_server_restart_loses_and_doubles_nothing(settings, bus, nats_server,
                                                          tmp_path: Path) -> None:
    from schemas.telemetry import NodeInventory

    async with query_service(settings, tmp_path / "q.duckdb") as svc, http(svc) as api:
        for i in range(50):
            await emit(bus, ev.Submitted(job_id=f"r{i}", capability={"type": "echo"}))
        assert await svc.caught_up()
        nats_server.stop()
        nats_server.start()
        # Both connections come back by themselves; then more of everything.
        async def sent() -> bool:
            try:
                for i in range(50, 100):
                    await emit(bus, ev.Submitted(job_id=f"r{i}", capability={"type": "echo"}))
                await publish(bus, "n1", "heartbeat", Heartbeat(node="n1"))
                inventory = await bus.kv(topology.KV_NODES)
                await inventory.put("n1", msgspec.json.encode(NodeInventory(
                    node="n1", hostname="host-one", simulated=True)))
                return True
            except Exception:
                return False

        await eventually(sent, timeout=30, what="publishing after the restart")

        async def complete() -> bool:
            try:
                await svc.poller.poll()
                await svc.ingest.flush()
                page = (await api.get("/api/v1/jobs", params={"limit": 1})).json()
                nodes = (await api.get("/api/v1/nodes")).json()["items"]
            except Exception:
                return False
            return page["total"] == 100 and [(n["node"], n["hostname"], n["status"])
                                             for n in nodes] == [("n1", "host-one", "up")]

        await eventually(complete, timeout=60, what="the projection after the restart")
        cur = svc.projection.reader()
        assert cur.execute("SELECT count(*), count(DISTINCT seq) FROM job_events").fetchone() \
            == (100, 100)
        assert svc.ingest.readers["EVENTS"] == "link"
        assert sum(f.rounds for f in svc.ingest._followers.values()) >= 3, \
            "the followers did not start again after the restart"


async def test_without_a_data_link_the_projection_reads_through_the_bus(tmp_path: Path) -> None:
    """A server that takes no more connections than the bus's own: the query
    service reads both streams through nats-py instead, and misses nothing."""
    from bus.connection import connect
    from bus.server import EmbeddedServer
    from bus.settings import Settings

    with EmbeddedServer(tmp_path / "nats", extra_config="max_connections: 2") as server:
        settings = Settings(nats_url=server.url)
        bus = await connect(settings, name="publisher")
        try:
            async with query_service(settings, tmp_path / "q.duckdb") as svc, \
                    http(svc) as api:
                for i in range(30):
                    await emit(bus, ev.Submitted(job_id=f"n{i}", capability={"type": "echo"}))
                assert await svc.caught_up()
                await svc.ingest.flush()
                page = (await api.get("/api/v1/jobs", params={"limit": 1})).json()
                assert page["total"] == 30
                assert svc.ingest.readers == {"EVENTS": "nats", "TELEMETRY": "nats"}
        finally:
            await bus.close()


async def test_kernel_outcomes_and_evolve_candidates(settings, bus, tmp_path: Path) -> None:
    from schemas.kernels import KernelOutcome, KernelTimings

    outcome = KernelOutcome(kind="profile", outcome="pass", correct=True, trials=3,
                            interpreted=True, device="cpu", flags=["interpreted"],
                            timings=KernelTimings(candidate_ms=2.0, reference_ms=3.0,
                                                  candidate_p10_ms=1.9, candidate_p90_ms=2.1,
                                                  reference_p10_ms=2.9, reference_p90_ms=3.1,
                                                  runs=3, warmup=1, speedup=1.5,
                                                  method="perf_counter", l2_flush=False,
                                                  representative=False))
    evolve = {"candidates": [
        {"id": "c1", "job_id": "p1", "round": 1, "island": 0, "origin": "seed", "hash": "h1",
         "outcome": "pass", "correct": True, "speedup": 1.5, "params": {"BLOCK": 64},
         "timings": {"candidate_ms": 2.0, "reference_ms": 3.0}, "source": "def k(): ..."},
        {"id": "c2", "job_id": "p2", "round": 2, "island": 1, "origin": "mutation",
         "parent": "c1", "outcome": "mismatch", "correct": False, "speedup": None},
        {"no": "id"}]}
    async with query_service(settings, tmp_path / "q.duckdb") as svc, http(svc) as api:
        for job_id, ctype, result, parent in (
                ("p1", "kernel.profile", msgspec.to_builtins(outcome), "evo"),
                ("p2", "kernel.verify", {"not": "an outcome"}, "evo"),
                ("evo", "kernel.evolve", evolve, None)):
            await emit(bus, ev.Submitted(job_id=job_id, capability={"type": ctype},
                                         parent_job_id=parent))
            await emit(bus, ev.Running(job_id=job_id, attempt=1, worker_id="w", node="n1"))
            await emit(bus, ev.Succeeded(job_id=job_id, attempt=1, worker_id="w", result=result))
        assert await svc.caught_up()
        results = (await api.get("/api/v1/kernels/results")).json()
        assert [(r["job_id"], r["kind"], r["outcome"], r["speedup"], r["parent_job_id"])
                for r in results["items"]] == [("p1", "profile", "pass", 1.5, "evo")]
        assert results["items"][0]["flags"] == ["interpreted"]
        assert (await api.get("/api/v1/kernels/results",
                              params={"outcome": "mismatch"})).json()["total"] == 0
        cands = (await api.get("/api/v1/kernels/evolve/evo", params={"source": "true"})).json()
        assert [(c["candidate_id"], c["correct"], c["speedup"], c["parent"])
                for c in cands["items"]] == [("c1", True, 1.5, None), ("c2", False, None, "c1")]
        assert cands["items"][0]["params"] == {"BLOCK": 64}
        assert cands["items"][0]["source"] == "def k(): ..."
        assert cands["items"][0]["candidate_ms"] == 2.0
        best = (await api.get("/api/v1/kernels/candidates", params={"correct": "true"})).json()
        assert [c["candidate_id"] for c in best["items"]] == ["c1"]
        assert best["items"][0]["source"] is None
        assert (await api.get("/api/v1/kernels/evolve/none")).status_code == 404
