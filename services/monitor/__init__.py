"""The monitor: lost, recovered and joined nodes, lost jobs on lost nodes,
lease reclamation, stale jobs (see monitor.py)."""

from services.monitor.monitor import Monitor

__all__ = ["Monitor"]
