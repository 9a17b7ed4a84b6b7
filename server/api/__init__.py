"""REST inference service: upload a NIfTI volume, get its segmentation back (FastAPI)."""
