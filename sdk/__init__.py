"""The client SDK: submit, follow, wait, cancel and call, below every service and the CLI.

    from sdk import Client

    async with await Client.connect() as fleet:     # JETFLEET_NATS_URL
        job_id = await fleet.submit("echo", {"a": 1})
        state = await fleet.wait(job_id, timeout=30)
"""

from sdk.client import Client, JobFailed, JobNotFound, JobUnschedulable
from sdk.objects import Objects
from sdk.resources import Resources
from sdk.sync import SyncClient

__all__ = ["Client", "JobFailed", "JobNotFound", "JobUnschedulable", "Objects", "Resources",
           "SyncClient"]
