"""The dirty trackers' hold on a live process: ``agent.target`` (the agent samples dirty rates
with it too); kept here under its old name for callers of the library."""
from agent.target import TracedTarget

__all__ = ["TracedTarget"]
