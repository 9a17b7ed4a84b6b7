"""Generate the per-site fairness report of one registered model: evaluate, assemble, write.

``generate_report`` is the entry point the CLI and the API call: load the model from the
registry, evaluate it on every site (``server.report.evaluation``), assemble fairness and
invariance summaries (``server.report.assemble``), add the federation's per-round history when a
run log is known, render (``server.report.render``) and write (``server.report.export``)::

    OUT/report.html   self-contained (inline CSS, base64 PNGs, no external resource)
    OUT/report.json   every number, NaN written as null
    OUT/report.csv    every number of report.json, one "key,value" row each
    OUT/sites.csv     one row per site (the main table)
    OUT/predictions/<site>/<case>.nii.gz   predicted label maps (model voxel grid)
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.report.assemble import ReportOptions, assemble_report, model_info
from server.report.evaluation import evaluate_sites
from server.report.export import write_report
from server.report.history import find_run_log, read_history
from shared.ood import read_ood

__all__ = ["ReportOptions", "ReportResult", "generate_report"]


@dataclass
class ReportResult:
    report: dict
    files: dict[str, Path] = field(default_factory=dict)


def generate_report(
    registry: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    version: str | None = None,
    options: ReportOptions | None = None,
) -> ReportResult:
    """Evaluate registered model ``version`` (default: the served one) and write its report.

    Files are written to a temporary sibling folder and moved into ``out_dir`` at the end, so a
    reader never sees half a report.

    Raises:
        FileNotFoundError: no such model, or the data folder has no site.
    """
    import torch

    from shared.errors import InvalidSiteError
    from shared.registry import data_config_from_meta, load_model

    options = options or ReportOptions()
    torch.manual_seed(options.seed)
    model, meta = load_model(registry, version)
    cfg = data_config_from_meta(meta)
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    try:
        evaluations, skipped = evaluate_sites(
            model,
            data_dir,
            cfg,
            sites=options.sites,
            k=options.k,
            gammas=options.gammas,
            bias_strengths=options.bias_strengths,
            seed=options.seed,
            hd95=options.hd95,
            predictions_dir=tmp / "predictions" if options.save_predictions else None,
        )
    except InvalidSiteError as exc:  # no site folder at all
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileNotFoundError(str(exc)) from None
    history, note = None, "No federation run log for this model (it was not trained by `fedmri federate`)."
    log_path = Path(options.run_log) if options.run_log else find_run_log(meta, registry)
    if log_path is not None:
        try:
            history = read_history(log_path)
            note = "" if history.rounds else f"run log {log_path} holds no round records"
        except (OSError, ValueError) as exc:
            note = f"run log {log_path} could not be read: {exc}"
    ood = read_ood(registry, meta["version"])  # the sites' intensity summaries the API's OOD check uses
    report, figs = assemble_report(
        evaluations, skipped, model_info(meta), options, history, note, str(data_dir), ood=ood
    )
    report["seconds"] = time.perf_counter() - start

    files = write_report(report, figs, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return ReportResult(report, {k: out / p.name for k, p in files.items()})
