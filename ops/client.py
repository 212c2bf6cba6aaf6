"""Moved: the SDK lives in `sdk` (below services and the CLI), and the kernel
client's `submit_job` in `agents.kernels.sdk`. These names stay for scripts
written against earlier versions."""

from agents.kernels.sdk import KernelClient as SyncClient
from sdk.client import Client, JobFailed, JobNotFound, JobUnschedulable

__all__ = ["Client", "JobFailed", "JobNotFound", "JobUnschedulable", "SyncClient"]
