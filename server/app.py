"""fedmri ServerApp: read the run config, run the configured strategy, checkpoint and serve the model."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation.rounds import run_rounds
from shared.supernode import patch_object_pulls

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Federated training over every connected site (see ``server.federation`` for the config keys)."""
    # A reply's header reaches the SuperLink before its objects: start Flower's retries at 0.05 s, not 1 s.
    patch_object_pulls()
    run_rounds(grid, context.run_config)
