"""Salted IDs: what the data layer logs instead of patient IDs, file paths, folders and content hashes.

One secret salt per machine (or ``$MEDTRICKS_PATIENT_SALT``) keys every hash, so the same patient,
file or folder gets the same ID on this machine while the log cannot be checked against IDs found
elsewhere. Prefixes say what was hashed: ``p_`` patient, ``i_`` image path, ``r_`` data folder,
``c_`` image content.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Optional

from medtricks.errors import ResourceError

__all__ = ["patient_salt", "hash_patient", "image_id", "folder_id", "content_id"]


def _cache_root() -> Path:
    return Path(os.environ.get("MEDTRICKS_CACHE") or Path.home() / ".cache" / "medtricks").expanduser()


def patient_salt() -> bytes:
    """Secret salt of patient hashes: ``$MEDTRICKS_PATIENT_SALT``, else one random salt per machine.

    The per-machine salt lives in ``$MEDTRICKS_CACHE/patient_salt`` (default ``~/.cache/medtricks``),
    so hashes are stable across runs on one machine but cannot be reversed by guessing IDs elsewhere.
    Set ``MEDTRICKS_PATIENT_SALT`` to share hashes between machines.
    """
    env = os.environ.get("MEDTRICKS_PATIENT_SALT")
    if env:
        return env.encode()
    path = _cache_root() / "patient_salt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes starting at once agree on the first salt written
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(16))
        except FileExistsError:
            pass
    salt = path.read_text().strip()
    if not salt:
        raise ResourceError(
            f"patient salt file {path} is empty; delete it (a new one is made) or set MEDTRICKS_PATIENT_SALT"
        )
    return salt.encode()


def hash_patient(raw_id: str, card_name: str, salt: Optional[bytes] = None) -> str:
    """Salted, keyed BLAKE2b hash of a raw patient ID (``p_`` + 16 hex characters)."""
    key = (salt if salt is not None else patient_salt())[:64]
    digest = hashlib.blake2b(f"{card_name}\x00{raw_id}".encode(), key=key, digest_size=8).hexdigest()
    return f"p_{digest}"


def image_id(rel_path: str, salt: Optional[bytes] = None) -> str:
    """The logged name of a file: ``i_`` + a salted hash of its POSIX path relative to the data root
    (same salt as the patient hashes: the same file gets the same ID on this machine)."""
    return hash_patient(rel_path, "image", salt).replace("p_", "i_", 1)


def folder_id(folder, salt: Optional[bytes] = None) -> str:
    """The logged form of a data folder (``data.root``, ``evaluate --root``): ``r_`` + a salted hash of its
    absolute path. Folder names can hold patient names; the same folder gets the same ID on this machine,
    so runs on one data set still group together in the MLflow UI."""
    path = os.path.abspath(os.path.expanduser(str(folder)))
    return hash_patient(path, "folder", salt).replace("p_", "r_", 1)


def content_id(digest: str, salt: Optional[bytes] = None) -> str:
    """The logged form of a file's content hash (``content_hash`` of :func:`~medtricks.data.scan_images`):
    ``c_`` + a salted hash of it, so identical bytes can be matched on this machine (``evaluate`` finds
    training images in its data) while the log cannot be checked against an image found elsewhere."""
    return hash_patient(str(digest), "bytes", salt).replace("p_", "c_", 1)
