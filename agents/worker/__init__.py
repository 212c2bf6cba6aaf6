"""The worker runtime: declare capabilities on an App, run them on the fleet."""

from agents.worker.app import App, CapabilitySpec
from agents.worker.context import Delegate, JobContext, JobError

__all__ = ["App", "CapabilitySpec", "Delegate", "JobContext", "JobError"]
