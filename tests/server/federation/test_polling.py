"""The ServerApp's reply polling (server/federation/polling.py): short in the simulation, configurable deployed."""

from __future__ import annotations

import pytest
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server.federation.polling import IN_MEMORY_POLL_INTERVAL, PollingGrid, is_in_memory
from server.federation.strategy import resolve_eval_with_train


def _bare(cls):
    return cls.__new__(cls)  # the class is what matters here, not a connection


def test_simulation_grid_is_polled_briefly_and_a_superlinks_as_configured():
    simulation, deployed = _bare(InMemoryGrid), _bare(HttpGrid)
    assert is_in_memory(simulation) and not is_in_memory(deployed)
    assert PollingGrid(simulation, 0.2).interval == IN_MEMORY_POLL_INTERVAL
    assert PollingGrid(deployed, 0.2).interval == 0.2
    assert PollingGrid(deployed, 0.005).interval == 0.005
    # eval-with-train "auto" follows the same test: one message per round only where messages are expensive
    assert resolve_eval_with_train("auto", deployed) and not resolve_eval_with_train("auto", simulation)
    with pytest.raises(ValueError, match="positive"):
        PollingGrid(deployed, 0)
