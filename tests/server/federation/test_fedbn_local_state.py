"""FedBN's local layers live on each site's disk: a killed run, resumed, continues with them (real Flower processes).

Site-conditional instance norm (``norm-affine`` + ``fedbn``): every site keeps its own gamma, beta. The run
is killed once round 1 is logged (every Flower process stopped; it may have got a round or two further),
the sites' saved layers are marked (beta = 7), and the resumed run must train two more rounds from the
marked layers read back from disk, not from the server's.
"""

from __future__ import annotations

import pytest
import torch

from server.federation import run_federation
from shared.registry import load_model, resume_point
from shared.site_state import load_local_state, local_state_path

from .helpers import Tracker, tiny_config

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b", "site-c"]
RUN = "fedbn-state"
MARK = 7.0


def _config(**extra) -> dict:
    return tiny_config(
        **{"num-server-rounds": 50, "fedbn": True, "norm-affine": True, "max-steps": 2, "lr": 0.001, **extra}
    )


def test_local_layers_are_saved_every_round_and_survive_a_killed_and_resumed_run(tiny_data_dir, tmp_path):
    out = tmp_path / "runs"
    tracker = Tracker()
    killed = {}

    def kill_after_round_1(record):
        if record.get("event") == "round" and record.get("round") == 1 and not killed:
            killed["round"] = 1
            tracker.cleanup()  # every Flower process of the run, as a crash would

    try:
        with pytest.raises(Exception):  # noqa: B017  (FederationError or a lost-connection error)
            run_federation(
                tiny_data_dir,
                out,
                run_config=_config(),
                run_name=RUN,
                on_start=tracker,
                on_record=kill_after_round_1,
                timeout=600,
            )
    finally:
        tracker.cleanup()
    assert killed and not tracker.leftovers()
    last = resume_point(out / "registry", RUN, True)  # (round, version) of the last checkpoint
    done = last[0] if last else 0
    assert 1 <= done < 50

    paths = {s: local_state_path(tiny_data_dir / s, RUN) for s in SITES}
    saved = {s: load_local_state(p) for s, p in paths.items()}
    assert all(v is not None and v[0] in (done, done + 1) for v in saved.values()), {
        s: v and v[0] for s, v in saved.items()
    }
    keys = set(next(iter(saved.values()))[1])
    assert keys and all(k.endswith((".weight", ".bias")) for k in keys)
    for s, (round_, state) in saved.items():  # mark them: only a restore from disk brings these back
        marked = {k: torch.full_like(v, MARK) if k.endswith(".bias") else v for k, v in state.items()}
        torch.save({"run": RUN, "round": round_, "state": marked}, paths[s])

    tracker = Tracker()
    try:
        result = run_federation(
            tiny_data_dir,
            out,
            run_config=_config(resume=True, **{"num-server-rounds": done + 2}),
            run_name=RUN,
            on_start=tracker,
            timeout=600,
        )
    finally:
        tracker.cleanup()
    assert result.version == f"{RUN}-r{done + 2}"
    after = {s: load_local_state(p) for s, p in paths.items()}
    assert all(v[0] == done + 2 for v in after.values())
    for s, (_, state) in after.items():
        biases = torch.cat([v.flatten() for k, v in state.items() if k.endswith(".bias")])
        # 2 rounds x 2 Adam steps at lr 1e-3 move a parameter by at most ~4e-3.
        assert (biases - MARK).abs().max() < 0.05, f"{s}: local layers were not restored from disk"
    # The checkpoint (the new-site model) holds the server's average of the sites' norm layers.
    model, _ = load_model(result.registry, result.version)
    global_biases = torch.cat([v.flatten() for k, v in model.state_dict().items() if k in keys and k.endswith(".bias")])
    assert global_biases.numel() and torch.isfinite(global_biases).all()
