"""Shared fixtures: the test hosts (network + mount namespaces with sshd) and compiled workloads."""
from tests._hosts import testbed  # noqa: F401  (pytest fixtures)
from tests._workloads import reap_started  # noqa: F401  (ends what each test started)
