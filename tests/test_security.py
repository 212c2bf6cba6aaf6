"""Roles on the bus, against real nats-servers in operator mode: every role
against every action it must not do (refused, and reported in one line naming
the subject and the role), each role doing its own job, components refused at
start exiting, `jetfleet creds`, and `jetfleet up --secure` end to end with no
secret in the process list, the logs, events or adverts."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from nats.js import api as js_api

from bus import codec, topology
from bus.connection import Bus, ConnectError, PermissionDenied, connect
from bus.control import request
from bus.credentials import FleetKeys, read_identity, write_creds
from bus.objects import ObjectStore, ObjectStoreUnavailable
from bus.pull import pull_now
from bus.security import Grant
from bus.server import EmbeddedServer
from bus.settings import Settings
from schemas.common import now
from schemas.telemetry import Heartbeat
from sdk import Client
from tests.conftest import ROOT
from tests.fleet_up import SEED, cli, env, up
from tests.helpers import eventually

NODE = "n1"
GRANTS = {
    "client": Grant("client"),
    "dispatcher": Grant("dispatcher"),
    "monitor": Grant("monitor"),
    "query": Grant("query"),
    "agent": Grant("agent", node=NODE),
    "worker": Grant("worker", node=NODE, capabilities=("echo",), worker_ids=("n1-worker",)),
    "evolver": Grant("evolver", node=NODE, capabilities=("kernel.evolve",),
                     worker_ids=("n1-evolver",)),
}


@dataclass
class Secured:
    server: EmbeddedServer
    keys: FleetKeys
    dir: Path

    def creds(self, grant: Grant, name: str | None = None) -> str:
        path = self.dir / f"{name or grant.name.replace('@', '-')}.creds"
        return str(write_creds(path, self.keys, grant))

    async def connect(self, grant: Grant, **kw: Any) -> Bus:
        settings = Settings(nats_creds=self.creds(grant), deny_exit_s=0.0, **kw)
        return await connect(settings, url=self.server.url, name=f"test-{grant.role}")


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """One secured server for the module, its topology declared by an admin."""
    d = tmp_path_factory.mktemp("secured")
    keys = FleetKeys.generate()
    server = EmbeddedServer(d / "nats", extra_config=keys.server_config()).start()
    sec = Secured(server, keys, d)

    async def declare() -> None:
        admin = await connect(Settings(nats_creds=sec.creds(Grant("admin"))), url=server.url)
        await admin.close()

    try:
        asyncio.run(declare())
        yield sec
    finally:
        server.stop()


# ---- what no role but its own may do ---------------------------------------------------

Action = Callable[[Bus], Awaitable[Any]]


async def _kv_put(bus: Bus, bucket: str, key: str) -> None:
    kv = await bus.kv(bucket)
    await kv.put(key, b"{}")


async def _publish(bus: Bus, subject: str) -> None:
    await bus.publish(subject, {"forged": True}, timeout=3.0)


async def _pull(bus: Bus, ctype: str) -> None:
    got = await pull_now(bus.nc, topology.WORK, topology.work_consumer(ctype, 1), 1, timeout=0.5)
    assert got == []


async def _declare_consumer(bus: Bus, ctype: str) -> None:
    await topology.ensure_consumer(bus.js, topology.WORK,
                                   topology.work_consumer_config(bus.settings, ctype, 1))


async def _repoint(bus: Bus) -> None:
    """A worker granted echo re-points its own consumer's filter at sleep's work."""
    cfg = topology.work_consumer_config(bus.settings, "echo", 1)
    cfg.filter_subject = topology.work_subject("sleep", 1)
    await bus.js.add_consumer(topology.WORK, cfg, timeout=3.0)


async def _durable_without_filter(bus: Bus) -> None:
    cfg = topology.work_consumer_config(bus.settings, "echo", 1)
    cfg.name = None
    await bus.js.add_consumer(topology.WORK, cfg, timeout=3.0)


async def _thief_consumer(bus: Bus) -> None:
    await bus.js.add_consumer(topology.WORK, js_api.ConsumerConfig(
        durable_name="thief", filter_subject=topology.work_subject("echo", 1),
        ack_policy=js_api.AckPolicy.EXPLICIT), timeout=3.0)


async def _subscribe(bus: Bus, subject: str) -> None:
    await bus.nc.subscribe(subject)
    await bus.nc.flush()


async def _drain(bus: Bus) -> None:
    await request(bus, "worker", "n1-worker", "drain", timeout=3.0)


async def _delete_stream(bus: Bus) -> None:
    await bus.js.delete_stream(topology.WORK)


async def _purge_stream(bus: Bus) -> None:
    await bus.js.purge_stream(topology.JOBS)


WORK = topology.work_subject("echo", 1)
CASES: list[tuple[str, str, Action, str]] = [
    # (role, what it must not do, the attempt, the subject the server refuses)
    ("client", "write KV jobs", lambda b: _kv_put(b, topology.KV_JOBS, "j-x"), "$KV.jobs.j-x"),
    ("client", "write an advert", lambda b: _kv_put(b, topology.KV_CAPABILITIES, "w1"),
     "$KV.capabilities.w1"),
    ("client", "write a resource", lambda b: _kv_put(b, topology.KV_RESOURCES, "r"),
     "$KV.resources.r"),
    ("client", "take work (a consumer of its own)", _thief_consumer,
     "$JS.API.CONSUMER.DURABLE.CREATE.WORK.thief"),
    ("client", "take work (pull)", lambda b: _pull(b, "echo"),
     "$JS.API.CONSUMER.MSG.NEXT.WORK.work-p1-echo"),
    ("client", "publish work", lambda b: _publish(b, WORK), WORK),
    ("client", "forge a job event", lambda b: _publish(b, topology.job_events("j-x")),
     "events.jobs.j-x"),
    ("client", "publish telemetry", lambda b: _publish(b, topology.telemetry(NODE, "heartbeat")),
     "telemetry.n1.heartbeat"),
    ("client", "delete a stream", _delete_stream, "$JS.API.STREAM.DELETE.WORK"),
    ("client", "purge a stream", _purge_stream, "$JS.API.STREAM.PURGE.JOBS"),
    ("client", "read others' replies", lambda b: _subscribe(b, "_INBOX.>"), "_INBOX.>"),
    ("client", "read work as it is routed", lambda b: _subscribe(b, "work.>"), "work.>"),
    ("client", "drain a worker", _drain, "jetfleet.worker.n1-worker.drain"),
    ("agent", "publish another node's telemetry",
     lambda b: _publish(b, topology.telemetry("n2", "heartbeat")), "telemetry.n2.heartbeat"),
    ("agent", "write another node's inventory", lambda b: _kv_put(b, topology.KV_NODES, "n2"),
     "$KV.nodes.n2"),
    ("agent", "publish another node's events", lambda b: _publish(b, topology.node_events("n2")),
     "events.nodes.n2"),
    ("agent", "publish work", lambda b: _publish(b, WORK), WORK),
    ("agent", "take work", lambda b: _pull(b, "echo"),
     "$JS.API.CONSUMER.MSG.NEXT.WORK.work-p1-echo"),
    ("agent", "hold a lease", lambda b: _kv_put(b, topology.KV_LEASES, "n1.gpu0"),
     "$KV.leases.n1.gpu0"),
    ("agent", "write an advert", lambda b: _kv_put(b, topology.KV_CAPABILITIES, "n1-worker"),
     "$KV.capabilities.n1-worker"),
    ("agent", "submit a job", lambda b: _publish(b, topology.SUBMIT), "jobs.submit"),
    ("agent", "drain a worker it did not start", _drain, "jetfleet.worker.n1-worker.drain"),
    ("worker", "take work of an ungranted capability", lambda b: _declare_consumer(b, "sleep"),
     "$JS.API.CONSUMER.CREATE.WORK.work-p1-sleep.work.p1.sleep"),
    ("worker", "pull work of an ungranted capability", lambda b: _pull(b, "sleep"),
     "$JS.API.CONSUMER.MSG.NEXT.WORK.work-p1-sleep"),
    ("worker", "re-point its consumer at other work", _repoint,
     "$JS.API.CONSUMER.CREATE.WORK.work-p1-echo.work.p1.sleep"),
    ("worker", "declare its consumer without the filter check", _durable_without_filter,
     "$JS.API.CONSUMER.DURABLE.CREATE.WORK.work-p1-echo"),
    ("worker", "hold another node's lease", lambda b: _kv_put(b, topology.KV_LEASES, "n2.gpu0"),
     "$KV.leases.n2.gpu0"),
    ("worker", "write another worker's advert",
     lambda b: _kv_put(b, topology.KV_CAPABILITIES, "n1-other"), "$KV.capabilities.n1-other"),
    ("worker", "route work itself", lambda b: _publish(b, WORK), WORK),
    ("worker", "publish telemetry", lambda b: _publish(b, topology.telemetry(NODE, "heartbeat")),
     "telemetry.n1.heartbeat"),
    ("worker", "write a node's inventory", lambda b: _kv_put(b, topology.KV_NODES, NODE),
     "$KV.nodes.n1"),
    ("worker", "write a resource", lambda b: _kv_put(b, topology.KV_RESOURCES, "r"),
     "$KV.resources.r"),
    ("worker", "answer as another worker",
     lambda b: _subscribe(b, topology.control_subject("worker", "n1-other", "cancel")),
     "jetfleet.worker.n1-other.cancel"),
    ("worker", "read others' replies", lambda b: _subscribe(b, "_INBOX.>"), "_INBOX.>"),
    ("worker", "purge a stream", _purge_stream, "$JS.API.STREAM.PURGE.JOBS"),
    ("evolver", "take echo work", lambda b: _declare_consumer(b, "echo"),
     "$JS.API.CONSUMER.CREATE.WORK.work-p1-echo.work.p1.echo"),
    ("evolver", "route work itself", lambda b: _publish(b, WORK), WORK),
    ("monitor", "publish work", lambda b: _publish(b, WORK), WORK),
    ("monitor", "submit a job", lambda b: _publish(b, topology.SUBMIT), "jobs.submit"),
    ("monitor", "take work", lambda b: _pull(b, "echo"),
     "$JS.API.CONSUMER.MSG.NEXT.WORK.work-p1-echo"),
    ("monitor", "write an advert", lambda b: _kv_put(b, topology.KV_CAPABILITIES, "w1"),
     "$KV.capabilities.w1"),
    ("query", "publish work", lambda b: _publish(b, WORK), WORK),
    ("query", "write KV jobs", lambda b: _kv_put(b, topology.KV_JOBS, "j-x"), "$KV.jobs.j-x"),
    ("query", "take work", lambda b: _pull(b, "echo"),
     "$JS.API.CONSUMER.MSG.NEXT.WORK.work-p1-echo"),
    ("query", "publish telemetry", lambda b: _publish(b, topology.telemetry(NODE, "gpu")),
     "telemetry.n1.gpu"),
    ("dispatcher", "publish telemetry",
     lambda b: _publish(b, topology.telemetry(NODE, "heartbeat")), "telemetry.n1.heartbeat"),
    ("dispatcher", "write a node's inventory", lambda b: _kv_put(b, topology.KV_NODES, NODE),
     "$KV.nodes.n1"),
    ("dispatcher", "hold a lease", lambda b: _kv_put(b, topology.KV_LEASES, "n1.gpu0"),
     "$KV.leases.n1.gpu0"),
    ("dispatcher", "take work", lambda b: _pull(b, "echo"),
     "$JS.API.CONSUMER.MSG.NEXT.WORK.work-p1-echo"),
    ("dispatcher", "write an advert", lambda b: _kv_put(b, topology.KV_CAPABILITIES, "w1"),
     "$KV.capabilities.w1"),
]


@pytest.mark.parametrize(("role", "what", "attempt", "subject"), CASES,
                         ids=[f"{r}-{w.replace(' ', '_')}" for r, w, _, _ in CASES])
async def test_a_role_may_not(secured: Secured, role: str, what: str, attempt: Action,
                              subject: str, caplog: pytest.LogCaptureFixture) -> None:
    bus = await secured.connect(GRANTS[role])
    try:
        raised = False
        try:
            await attempt(bus)
        except PermissionDenied as exc:
            refused, raised = exc, True  # a refused request fails at once, with the reason
        else:
            # A refused publish without a reply or a subscription: reported, not raised.
            await eventually(lambda: bus.denials.last, timeout=5, what="the refusal")
            assert bus.denials.last is not None
            refused = bus.denials.last
        assert refused.subject == subject
        assert f"role {role}" in str(refused) and repr(subject) in str(refused)
        assert bus.denials.count >= 1
        lines = [r.getMessage() for r in caplog.records if "permission denied" in r.getMessage()]
        if raised and role == "client":
            assert lines == []  # the exception says it: a CLI prints it once
        else:
            assert any(subject in ln and f"role {role}" in ln for ln in lines), lines
    finally:
        await bus.close()


async def test_each_role_does_its_own_job(secured: Secured) -> None:
    """The matrix above is not vacuous: each role can do exactly its own work."""
    client = await secured.connect(GRANTS["client"])
    agent = await secured.connect(GRANTS["agent"])
    worker = await secured.connect(GRANTS["worker"])
    dispatcher = await secured.connect(GRANTS["dispatcher"])
    try:
        job = await Client(client).submit("echo", {"hi": 1})
        assert await Client(client).status(job) is None  # nobody dispatched it: no record
        hb = Heartbeat(node=NODE, seq=1, started_at=now(), interval_s=5.0)
        await agent.publish(topology.telemetry(NODE, topology.HEARTBEAT), hb)
        await _kv_put(agent, topology.KV_NODES, NODE)
        await _declare_consumer(worker, "echo")
        await _pull(worker, "echo")
        await _kv_put(worker, topology.KV_LEASES, "n1.gpu0")
        await _kv_put(worker, topology.KV_CAPABILITIES, "n1-worker")
        got = await pull_now(dispatcher.nc, topology.JOBS, topology.DISPATCHER_CONSUMER, 10)
        assert job in [codec.decode(m.data, dict[str, Any])["job_id"] for m in got]
        for m in got:
            await m.nak()  # left for the dispatcher of a later test
        for b in (client, agent, worker, dispatcher):
            assert b.denials.count == 0, b.denials.last
    finally:
        for b in (client, agent, worker, dispatcher):
            await b.close()


async def test_an_objects_data_link_proves_the_same_identity(secured: Secured) -> None:
    """A large object's data link signs the server's nonce with the bus's own
    credentials: a client's put and get go over links (not the fallback), and
    the monitor, which may not write the object store, is refused on its link."""
    client = await secured.connect(GRANTS["client"])
    monitor = await secured.connect(GRANTS["monitor"])
    try:
        store = ObjectStore(client, link_min_bytes=0, stall_s=5)
        data = os.urandom(2 << 20)
        ref = await store.put(data, name="secured/blob")
        assert await store.get(ref) == data
        assert store.links_used == 2 and store.link_unavailable is None
        refused = ObjectStore(monitor, link_min_bytes=0, stall_s=5)
        with pytest.raises(ObjectStoreUnavailable, match=r"secured/other: .*Permissions"):
            await refused.put(data, name="secured/other")
        assert refused.links_used == 1
        assert await ObjectStore(client).get(ref) == data  # nothing of the refused put
    finally:
        await client.close()
        await monitor.close()


async def test_a_credential_of_another_fleet_is_refused_in_one_line(secured: Secured,
                                                                     tmp_path: Path) -> None:
    stranger = write_creds(tmp_path / "other.creds", FleetKeys.generate(), Grant("admin"))
    with pytest.raises(ConnectError, match="refused our credentials"):
        await connect(Settings(nats_creds=str(stranger)), url=secured.server.url,
                      connect_timeout=10)


async def test_the_query_role_submits_as_a_client_does(secured: Secured) -> None:
    """The API's write scope publishes submissions and cancels, nothing more."""
    query = await secured.connect(GRANTS["query"])
    try:
        await Client(query).submit("echo", {"via": "api"})
        await query.publish(topology.CANCEL, {"job_id": "j-x", "reason": "test"})
        assert query.denials.count == 0
        with pytest.raises(PermissionDenied):
            await _kv_put(query, topology.KV_JOBS, "j-x")
    finally:
        await query.close()


# ---- components refused at start exit, and say why ---------------------------------------


def _run(secured: Secured, creds: str, *args: str) -> subprocess.CompletedProcess[str]:
    e = env(JETFLEET_NATS_URL=secured.server.url, JETFLEET_NATS_CREDS=creds,
            JETFLEET_UVLOOP="0")
    return subprocess.run([sys.executable, "-m", "ops.cli", "run", *args], env=e,
                          capture_output=True, text=True, timeout=90, cwd=ROOT)


def test_a_worker_serving_an_ungranted_capability_exits_at_start(secured: Secured) -> None:
    creds = secured.creds(GRANTS["worker"], "w-echo-only")  # echo only; it serves echo, sleep
    out = _run(secured, creds, "worker", "--node", NODE, "--worker-id", "n1-worker",
               "--no-kernels")
    assert out.returncode == 77, out.stderr
    refused = [ln for ln in out.stderr.splitlines() if "permission denied" in ln]
    assert len(refused) == 1, out.stderr
    assert "role worker (worker@n1)" in refused[0] and "work-p0-sleep" in refused[0]
    assert "Traceback" not in out.stderr


def test_an_agent_reporting_as_another_node_exits_at_start(secured: Secured) -> None:
    creds = secured.creds(GRANTS["agent"], "agent-n1")
    out = _run(secured, creds, "agent", "--node", "n2", "--heartbeat", "0.5", "--no-nvml")
    assert out.returncode == 77, out.stderr
    refused = [ln for ln in out.stderr.splitlines() if "permission denied" in ln]
    assert len(refused) == 1, out.stderr
    assert "role agent (agent@n1)" in refused[0] and ".n2" in refused[0]


# ---- jetfleet creds ---------------------------------------------------------------------------


def test_creds_writes_a_private_file_for_one_role(tmp_path: Path) -> None:
    data = tmp_path / "fleet"
    missing = cli("creds", "worker", "--node", NODE, "--data-dir", str(data))
    assert missing.returncode == 2 and "jetfleet creds server" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    server = cli("creds", "server", "--data-dir", str(data))
    assert server.returncode == 0, server.stderr
    auth = (data / "creds" / "nats-auth.conf").read_text()
    assert "operator:" in auth and "resolver_preload" in auth and not SEED.search(auth)
    assert stat.S_IMODE((data / "creds" / "fleet-keys.json").stat().st_mode) == 0o600
    out_file = tmp_path / "remote" / "w.creds"
    made = cli("--json", "creds", "worker", "--node", NODE, "--capability", "kernel.verify",
               "--data-dir", str(data), "-o", str(out_file))
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert info["capabilities"] == ["kernel.verify"] and info["worker_ids"] == ["n1-worker"]
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    assert not SEED.search(made.stdout)  # the seed is in the file, never on the screen
    who = read_identity(out_file)
    assert (who.role, who.node, who.user) == ("worker", NODE, info["user"])
    for bad, says in ((["client", "--node", NODE], "--node is for"),
                      (["agent"], "bound to one node"),
                      (["worker", "--node", "a.b"], "one subject token"),
                      (["worker", "--node", NODE, "--capability", "Bad Type"], "capability")):
        refused = cli("creds", *bad, "--data-dir", str(data), "-o", str(tmp_path / "x.creds"))
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


async def test_a_remote_worker_runs_with_issued_credentials(secured: Secured,
                                                            tmp_path: Path) -> None:
    """`jetfleet creds` for a worker elsewhere: it serves exactly what it was granted."""
    sec_dir = tmp_path / "d" / "creds"
    secured.keys.save(sec_dir)
    creds = tmp_path / "w.creds"
    made = cli("creds", "worker", "--node", "n9", "--capability", "echo", "--capability",
               "sleep", "--data-dir", str(tmp_path / "d"), "-o", str(creds))
    assert made.returncode == 0, made.stderr
    e = env(JETFLEET_NATS_URL=secured.server.url, JETFLEET_NATS_CREDS=str(creds))
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "run", "worker", "--node", "n9", "--worker-id",
        "n9-worker", "--no-kernels", env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=ROOT)
    dispatcher = await secured.connect(GRANTS["dispatcher"])
    client = await secured.connect(GRANTS["client"])
    from services.dispatcher import Dispatcher

    d = Dispatcher(dispatcher)
    task = asyncio.create_task(d.run())
    try:
        job = await Client(client).submit("echo", {"remote": True})
        state = await Client(client).wait(job, timeout=60)
        assert state.state == "succeeded" and state.result == {"remote": True}
        assert state.worker_id == "n9-worker"
    finally:
        d.stop()
        await asyncio.wait_for(task, 15)
        worker.terminate()
        _, err = await asyncio.wait_for(worker.communicate(), 30)
        await client.close()
        await dispatcher.close()
    assert "permission denied" not in err.decode()


# ---- jetfleet up --secure -------------------------------------------------------------------


async def _published(admin: Bus) -> bytes:
    """Every event, telemetry message and KV value the fleet holds, as bytes."""
    out = bytearray()
    for stream in (topology.EVENTS, topology.TELEMETRY):
        info = await admin.js.stream_info(stream)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                out += (await admin.js.get_msg(stream, seq)).data or b""
            except Exception:
                continue
    for bucket in (topology.KV_CAPABILITIES, topology.KV_NODES, topology.KV_JOBS):
        kv = await admin.kv(bucket)
        try:
            keys = await kv.keys()
        except Exception:
            keys = []
        for key in keys:
            out += (await kv.get(key)).value or b""
    return bytes(out)


async def test_up_secure_runs_every_component_under_its_role(tmp_path: Path) -> None:
    data = tmp_path / "fleet"
    with up(data, "--secure", "--workers", "1") as fleet:
        creds = data / "creds"
        client_env = env(JETFLEET_NATS_URL=fleet.url,
                         JETFLEET_NATS_CREDS=str(creds / "client.creds"))
        ran = cli("submit", "echo", "--payload", '{"secure": 1}', "--wait",
                  environ=client_env, timeout=90)
        assert ran.returncode == 0, ran.stderr + fleet.text()
        assert '"secure": 1' in ran.stdout
        token = (creds / "api-token").read_text().strip()
        for _ in range(60):  # the API answers from its projection, a moment behind
            jobs = cli("--json", "jobs", environ={**client_env, "JETFLEET_API_TOKEN": token})
            assert jobs.returncode == 0, jobs.stderr
            # (the node agent also lists jobs it discovers on this host: other tests'
            # training scripts when the suite runs in parallel)
            submitted = [j for j in json.loads(jobs.stdout) if j["origin"] == "submitted"]
            if submitted:
                break
            await asyncio.sleep(0.5)
        assert [j["capability"]["type"] for j in submitted] == ["echo"]
        denied = cli("resources", "put", "r", "--value", "1", environ=client_env)
        assert denied.returncode == 2 and "role client may not publish to" in denied.stderr
        assert len(denied.stderr.strip().splitlines()) == 1, denied.stderr
        # Every secret file is its owner's alone.
        assert stat.S_IMODE(creds.stat().st_mode) == 0o700
        for f in creds.iterdir():
            if f.name != "nats-auth.conf":
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        roles = {read_identity(f).role for f in creds.glob("*.creds")}
        assert roles == {"admin", "client", "dispatcher", "worker", "agent", "monitor",
                         "query", "evolver"}
        # Each child runs under its own role, given by path.
        children = [p for p in fleet.descendants() if "ops.cli" in " ".join(p.cmdline())]
        by_component = {p.cmdline()[p.cmdline().index("run") + 1]:
                        Path(p.environ()["JETFLEET_NATS_CREDS"]).stem for p in children}
        assert by_component == {"dispatcher": "dispatcher", "worker": "worker",
                                "evolver": "evolver", "query": "query", "agent": "agent",
                                "monitor": "monitor"}
        # No secret on any command line (the launcher's own included).
        for p in [*fleet.descendants(), psutil.Process(fleet.proc.pid)]:
            line = " ".join(p.cmdline())
            assert not SEED.search(line) and token not in line and "eyJ" not in line, line
        admin = await connect(Settings(nats_creds=str(creds / "admin.creds")), url=fleet.url)
        try:
            said = await _published(admin)
        finally:
            await admin.close()
        assert b"secure" in said  # the job's events are there ...
        assert not SEED.search(said.decode(errors="replace")) and token.encode() not in said
    logs = "".join(f.read_text(errors="replace") for f in (data / "logs").iterdir())
    logs += (data / "nats" / "nats-server.log").read_text(errors="replace") + fleet.text()
    assert not SEED.search(logs) and token not in logs
    assert "permission denied" not in logs
    assert "all 6 components finished their work" in fleet.text()


def test_up_secure_refuses_to_configure_a_server_it_does_not_run(tmp_path: Path) -> None:
    out = cli("up", "--secure", "--nats", "nats://127.0.0.1:4222", "--data-dir",
              str(tmp_path / "d"))
    assert out.returncode == 2 and "--secure and --tls configure the embedded server" in out.stderr


def test_an_api_token_given_to_up_reaches_the_query_service_by_environment(tmp_path: Path
                                                                           ) -> None:
    from ops.launcher import Fleet

    fleet = Fleet(tmp_path, children=[("query", "query", ["--port", "0", "--api-token", "T0k"])])
    child = fleet._child("query", "query", fleet.specs[0][2])
    assert "T0k" not in child.argv and "--api-token" not in child.argv
    assert child.env["JETFLEET_API_TOKEN"] == "T0k"


async def test_up_secure_cluster_runs_a_job(tmp_path: Path) -> None:
    """`--secure` and `--cluster 3` combine: three routed servers trusting the
    fleet's accounts, everything R3, a job through client credentials."""
    data = tmp_path / "fleet"
    with up(data, "--secure", "--cluster", "3", "--workers", "1", "--no-api") as fleet:
        assert fleet.url.count(",") == 2
        ran = cli("submit", "echo", "--payload", '{"r3": 1}', "--wait", timeout=120,
                  environ=env(JETFLEET_NATS_URL=fleet.url,
                              JETFLEET_NATS_CREDS=str(data / "creds" / "client.creds")))
        assert ran.returncode == 0, ran.stderr + fleet.text()
        admin = await connect(replace(Settings(), nats_creds=str(data / "creds" /
                                                                   "admin.creds")),
                              url=fleet.url)
        try:
            info = await admin.js.stream_info(topology.WORK)
            assert info.config.num_replicas == 3
        finally:
            await admin.close()


async def test_an_nkey_seed_file_authenticates_too(tmp_path: Path) -> None:
    """A server configured with plain nkey users: JETFLEET_NATS_CREDS may name a seed file."""
    import nkeys

    from bus.credentials import write_secret

    user = nkeys.from_seed(bytearray(nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_USER)))
    seed = tmp_path / "user.nk"
    write_secret(seed, user.seed.decode() + "\n")
    config = f"authorization {{ users = [ {{ nkey: {user.public_key.decode()} }} ] }}\n"
    with EmbeddedServer(tmp_path / "nats", extra_config=config) as server:
        with pytest.raises(ConnectError, match="refused our credentials"):
            await connect(Settings(), url=server.url, connect_timeout=10)
        bus = await connect(Settings(nats_creds=str(seed)), url=server.url)
        try:
            assert bus.identity is not None and bus.identity.user == user.public_key.decode()
            assert await Client(bus).submit("echo", {"nkey": True})
        finally:
            await bus.close()


async def test_the_dispatcher_declares_the_topology_other_roles_wait_for_it(
        tmp_path: Path) -> None:
    """A real cluster has no launcher: the dispatcher (or an admin) declares streams,
    buckets and the object store; a role that may not says so in one line."""
    keys = FleetKeys.generate()
    with EmbeddedServer(tmp_path / "nats", extra_config=keys.server_config()) as server:
        sec = Secured(server, keys, tmp_path)
        with pytest.raises(ConnectError, match="start the dispatcher"):
            await connect(Settings(nats_creds=sec.creds(GRANTS["worker"])), url=server.url)
        dispatcher = await sec.connect(GRANTS["dispatcher"])
        worker = await sec.connect(GRANTS["worker"])
        try:
            assert dispatcher.denials.count == 0
            for bucket in (topology.KV_JOBS, topology.KV_LEASES, topology.KV_CAPABILITIES):
                assert await worker.kv(bucket) is not None
            await _declare_consumer(worker, "echo")
            assert worker.denials.count == 0
        finally:
            await worker.close()
            await dispatcher.close()
