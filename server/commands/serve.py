"""`fedmri serve`: the REST inference service (FastAPI under uvicorn)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

HELP = "serve registered models over HTTP: upload a NIfTI volume, get its segmentation (web page at /)"
log = logging.getLogger("fedmri.serve")

# Flags left out keep their FEDMRI_* environment value or the ApiSettings default.
_OVERRIDES = {
    "registry": "registry_dir",
    "data": "data_dir",
    "reports": "reports_dir",
    "model": "default_model",
    "max_upload_mb": "max_upload_bytes",
    "max_voxels": "max_voxels",
    "max_model_voxels": "max_model_voxels",
    "max_concurrent": "max_concurrent_inferences",
    "max_queued": "max_queued_requests",
    "torch_threads": "torch_threads",
    "device": "device",
    "inference_precision": "inference_precision",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    # Not 8000: that is Flower's SuperLink default.
    parser.add_argument("--port", type=int, default=8080, help="TCP port")
    s = argparse.SUPPRESS
    parser.add_argument("--registry", default=s, help="model registry (env FEDMRI_REGISTRY_DIR; default runs/registry)")
    parser.add_argument("--data", default=s,
                        help="site data folder, for the report route (env FEDMRI_DATA_DIR; default data)")
    parser.add_argument("--reports", default=s, help="reports folder (env FEDMRI_REPORTS_DIR; default runs/reports)")
    parser.add_argument("--model", default=s,
                        help="version to serve (env FEDMRI_DEFAULT_MODEL; default: the registry's served one)")
    parser.add_argument("--max-upload-mb", type=float, default=s,
                        help="upload limit in MiB (env FEDMRI_MAX_UPLOAD_BYTES in bytes; default 256)")
    parser.add_argument("--max-voxels", type=int, default=s,
                        help="largest volume accepted (env FEDMRI_MAX_VOXELS; default 512**3)")
    parser.add_argument("--max-model-voxels", type=int, default=s,
                        help="largest volume after resampling to the model's spacing "
                             "(env FEDMRI_MAX_MODEL_VOXELS; default 256**3)")
    parser.add_argument("--max-concurrent", type=int, default=s,
                        help="volumes segmented at once (env FEDMRI_MAX_CONCURRENT_INFERENCES; default 2)")
    parser.add_argument("--max-queued", type=int, default=s,
                        help="requests admitted beyond those running; more get 503 "
                             "(env FEDMRI_MAX_QUEUED_REQUESTS; default 8)")
    parser.add_argument("--torch-threads", type=int, default=s,
                        help="torch intra-op threads (env FEDMRI_TORCH_THREADS)")
    parser.add_argument("--device", default=s, help="auto (CUDA when available), cpu, cuda[:N] (env FEDMRI_DEVICE)")
    parser.add_argument("--inference-precision", default=s, choices=("fp32", "bf16", "auto"),
                        help="fp32 (MONAI's result) or bf16 body (env FEDMRI_INFERENCE_PRECISION; default fp32)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host without FEDMRI_API_KEY "
                             "(anyone who reaches the port can use the API)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.epilog = "The API key is read from FEDMRI_API_KEY only (a flag would show in the process list)."


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``; any other name or address counts as reachable from outside."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from server.api.config import ApiSettings
    from server.api.main import create_app

    overrides = {field: getattr(args, flag) for flag, field in _OVERRIDES.items() if hasattr(args, flag)}
    if "max_upload_bytes" in overrides:
        overrides["max_upload_bytes"] = int(overrides["max_upload_bytes"] * 1024**2)
    settings = ApiSettings(**overrides)
    if not is_loopback(args.host) and settings.api_key is None:
        if not args.insecure:
            print(f"fedmri serve: refusing to listen on {args.host} without an API key: anyone who can reach the port "
                  "could use the API. Set FEDMRI_API_KEY (clients send it as X-API-Key), listen on 127.0.0.1, "
                  "or pass --insecure to do it anyway.", file=sys.stderr)
            return 2
        log.warning("listening on %s WITHOUT an API key (--insecure): anyone who reaches the port can use the API",
                    args.host)
    log.info("fedmri API on http://%s:%d (docs at /docs, API key %s)", args.host, args.port,
             "required" if settings.api_key else "not required")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level, log_config=None)
    return 0
