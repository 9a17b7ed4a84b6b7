"""`fedmri pacs`: segment an MR series straight from a PACS over DICOMweb and store the DICOM SEG back."""

from __future__ import annotations

import argparse
import json
import logging

HELP = "fetch an MR series from a DICOMweb PACS (WADO-RS), segment it, store the DICOM SEG back (STOW-RS)"
log = logging.getLogger("fedmri.pacs")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="DICOMweb root of the PACS, e.g. http://127.0.0.1:8042/dicom-web")
    parser.add_argument("--study", required=True, help="StudyInstanceUID to read from and store the SEG into")
    parser.add_argument("--series", default=None, help="SeriesInstanceUID; none: the study's only MR series")
    parser.add_argument("--registry", default="runs/registry", help="model registry folder")
    parser.add_argument("--model", default=None, help="registry version; none: the served model")
    parser.add_argument(
        "--max-voxels", type=int, default=512**3, help="largest series accepted (checked from its metadata)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each PACS request")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.epilog = (
        "A PACS that needs a login: put the Authorization header value in FEDMRI_PACS_AUTHORIZATION "
        "(read from the environment only, so it never shows in the process list)."
    )


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from server.api.inference import ModelLoadError, ModelNotFoundError, ModelStore
    from server.pacs import PacsError, dicomweb_client, round_trip

    try:
        model = ModelStore(args.registry, args.model).load_default()
    except (ModelNotFoundError, ModelLoadError) as exc:
        print(f"fedmri pacs: error: {exc}", file=sys.stderr)
        return 2
    auth = os.environ.get("FEDMRI_PACS_AUTHORIZATION")
    client = dicomweb_client(args.url, args.timeout, {"Authorization": auth} if auth else None)
    try:
        result = round_trip(client, args.study, model, args.series, args.max_voxels)
    except PacsError as exc:
        print(f"fedmri pacs: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(vars(result), indent=2))
        return 0
    print(
        f"segmented series {result.series_uid} ({result.instances} instances, {'x'.join(map(str, result.shape))}) "
        f"with model {result.model_version}"
    )
    for row in result.labels:
        print(f"  {row['name']:<13} {row['ml']:10.2f} mL")
    print(
        f"stored DICOM SEG {result.seg_sop_instance_uid} (series {result.seg_series_uid}) in study {result.study_uid}"
    )
    return 0
