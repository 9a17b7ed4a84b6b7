"""Domain errors. Messages name the file or field at fault, never patient data."""

__all__ = ["InvalidVolumeError", "InvalidSiteError"]


class InvalidVolumeError(ValueError):
    """A NIfTI volume that cannot be used: unreadable, wrong shape, bad affine, non-finite values."""


class InvalidSiteError(ValueError):
    """A site folder that is not a usable dataset: missing, empty, unpaired or mismatched files."""
