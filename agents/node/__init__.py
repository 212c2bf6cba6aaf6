"""The node agent: identity and inventory, heartbeats, GPU and process metrics,
and the jobs nobody submitted (see agent.py for the loop)."""

from agents.node.agent import AgentConfig, NodeAgent

__all__ = ["AgentConfig", "NodeAgent"]
