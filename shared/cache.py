"""A site's preprocessed volumes cached on its own disk, so a fresh ClientApp process reads ready arrays.

Flower 1.41 starts a new ClientApp process for every message, so without this every round would
read, reorient and resample each NIfTI file again. :class:`SiteCache` keeps the deterministic
head of a MONAI transform chain (load, channel-first, RAS, spacing, ... up to the first random
transform, exactly what ``CacheDataset`` keeps in memory) as one ``.pt`` file per case under the
site's cache folder. The key is the content of the image and label files (SHA-256) plus the
preprocessing settings (the chain's transforms, the ``DataConfig`` fields that shape them, the
MONAI version and the code of ``shared/data.py``), so changing a file or a setting builds a new
entry and the stale one is deleted. Items read back are bit-identical to freshly computed ones.

Use::

    with use_site_cache(SiteCache("/site/.fedmri-cache")):
        loader = make_train_loader(cases, cfg)      # shared.data builds its datasets through the cache

Only ``CacheDataset``-style datasets (``DataConfig.cache``) use it. The cache never leaves the site.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

__all__ = ["SiteCache", "use_site_cache", "active_site_cache", "cached_dataset", "file_digest", "DEFAULT_CACHE_NAME"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_NAME = ".fedmri-cache"  # inside a site folder; hidden, so no site scan ever lists it
FORMAT = 1
# DataConfig fields that only steer sampling or caching, never the preprocessed arrays.
_SAMPLING_FIELDS = {"batch_size", "samples_per_volume", "val_fraction", "cache", "crop_ratios"}
_ACTIVE: contextvars.ContextVar[SiteCache | None] = contextvars.ContextVar("fedmri_site_cache", default=None)


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, sort_keys=True)
    os.replace(tmp, path)


class SiteCache:
    """Preprocessed cases of one site in ``root`` (created on first use).

    Content digests are remembered per file with its size, mtime and inode, so unchanged files
    are not re-read each round; any change to one of those re-hashes the file.
    ``stats`` counts ``hits`` (read from disk) and ``built`` (computed and written) in this process.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.entries = self.root / "preprocessed"
        self.stats = {"hits": 0, "built": 0}
        self._digests: dict[str, list] | None = None
        self._index: dict[str, str] | None = None

    # ---- availability ------------------------------------------------------------------
    def usable(self) -> bool:
        """True if the folder exists or can be made, and is writable (a read-only data mount is not)."""
        try:
            self.entries.mkdir(parents=True, exist_ok=True)
        except OSError:
            return False
        return os.access(self.entries, os.W_OK)

    # ---- keys --------------------------------------------------------------------------
    def digest(self, path: str | Path) -> str:
        """Content hash of ``path``, re-read only when its size, mtime or inode changed."""
        if self._digests is None:
            self._digests = self._read_json("digests.json")
        resolved = str(Path(path).resolve())
        st = os.stat(resolved)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        known = self._digests.get(resolved)
        if known and known[:3] == stamp:
            return known[3]
        value = file_digest(resolved)
        self._digests[resolved] = stamp + [value]
        self._write_json("digests.json", self._digests)
        return value

    def key(self, item: dict, settings: str) -> str:
        """Entry name of one case under one preprocessing: its files' content and the settings."""
        files = {k: self.digest(item[k]) for k in sorted(item) if isinstance(item[k], str) and k in ("image", "label")}
        text = json.dumps({"format": FORMAT, "files": files, "settings": settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    # ---- entries -----------------------------------------------------------------------
    def load(self, key: str):
        """The cached item, or None (missing or unreadable: it is then rebuilt)."""
        import torch

        path = self.entries / f"{key}.pt"
        if not path.is_file():
            return None
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                item = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file: rebuild it
            log.warning("site cache entry %s unreadable (%s); rebuilding it", path.name, exc)
            path.unlink(missing_ok=True)
            return None
        self.stats["hits"] += 1
        return item

    def store(self, key: str, item, slot: str) -> None:
        """Write ``item`` atomically; the entry ``slot`` (case x settings) held before is deleted."""
        import torch

        self.entries.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}", suffix=".tmp", dir=self.entries)
        os.close(fd)
        try:
            torch.save(item, tmp)
            os.replace(tmp, self.entries / f"{key}.pt")
        finally:
            Path(tmp).unlink(missing_ok=True)
        self.stats["built"] += 1
        if self._index is None:
            self._index = self._read_json("index.json")
        old = self._index.get(slot)
        if old and old != key:
            (self.entries / f"{old}.pt").unlink(missing_ok=True)
        self._index[slot] = key
        self._write_json("index.json", self._index)

    def _read_json(self, name: str) -> dict:
        try:
            return dict(json.loads((self.root / name).read_text()))
        except (OSError, ValueError, TypeError):
            return {}

    def _write_json(self, name: str, data: dict) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self.root / name, data)
        except OSError as exc:  # the entries still work; only the bookkeeping is lost
            log.warning("site cache: could not write %s: %s", self.root / name, exc)


def _safe_globals() -> list:
    """What a cached item holds besides tensors: MONAI's meta dicts (numpy arrays, dtypes, TraceKeys).
    Entries load with ``weights_only=True``, so a planted file cannot run code."""
    import numpy as np
    from monai.utils.enums import TraceKeys

    multiarray = getattr(np, "_core", None) or np.core
    dtypes = [t for t in vars(np.dtypes).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return [np.dtype, np.ndarray, multiarray.multiarray._reconstruct, multiarray.multiarray.scalar, TraceKeys, *dtypes]


def preprocessing_settings(transform, cfg) -> str:
    """Identity of a chain's deterministic head under ``cfg``: what the cached arrays depend on."""
    import monai
    from monai.transforms import RandomizableTrait, Transform

    head = []
    for t in transform.flatten().transforms:
        if isinstance(t, RandomizableTrait) or not isinstance(t, Transform):
            break
        head.append(type(t).__name__)
    data_py = Path(__file__).with_name("data.py")
    code = hashlib.sha256(data_py.read_bytes()).hexdigest() if data_py.is_file() else ""
    values = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in _SAMPLING_FIELDS}
    text = json.dumps({"head": head, "config": values, "monai": monai.__version__, "code": code}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def cached_dataset(data: list[dict], transform, cfg, cache: SiteCache):
    """A MONAI ``CacheDataset`` whose items come from ``cache`` when present (and are written to it when not)."""
    import monai.data as md

    settings = preprocessing_settings(transform, cfg)

    class _DiskCachedDataset(md.CacheDataset):
        def _load_cache_item(self, idx: int):
            item = self.data[idx]
            key = cache.key(item, settings)
            found = cache.load(key)
            if found is not None:
                return found
            result = super()._load_cache_item(idx)
            try:
                cache.store(key, result, slot=f"{settings}:{Path(str(item.get('image', idx))).resolve()}")
            except OSError as exc:  # full or read-only disk: train anyway, from memory
                log.warning("site cache: could not store a case (%s); continuing without it", exc)
            return result

    return _DiskCachedDataset(data, transform, cache_rate=1.0, num_workers=0, progress=False)


@contextmanager
def use_site_cache(cache: SiteCache | None) -> Iterator[SiteCache | None]:
    """Within this block, ``shared.data`` builds its cached datasets through ``cache`` (None: memory only)."""
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def active_site_cache() -> SiteCache | None:
    """The cache set by the innermost :func:`use_site_cache`, if any."""
    return _ACTIVE.get()
