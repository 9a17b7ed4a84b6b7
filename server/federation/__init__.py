"""Federated training with Flower 1.41: the launcher and the ServerApp's rounds behind ``fedmri federate``.

Python: ``run_federation("data", "runs", run_config={"num-server-rounds": 5})``. Run-config keys:
``shared.runconfig.RunConfig``; run-log format: ``shared.runlog``.
"""

from server.federation.launcher import FederationError, LocalFederation
from server.federation.run import MODES, FederationResult, run_federation

__all__ = ["run_federation", "FederationResult", "FederationError", "LocalFederation", "MODES"]
