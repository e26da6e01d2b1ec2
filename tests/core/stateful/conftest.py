"""The stateful tests' photos fixture, from the probes module that other packages' tests
share."""

from tests.core.stateful.probes import photos  # noqa: F401 (a fixture)
