"""Shared fixtures: the test hosts (network + mount namespaces with sshd) and compiled workloads."""
from tests._hosts import reap_started, testbed  # noqa: F401  (pytest fixtures)
