"""The copies of the data layer's outputs that are safe to log: split manifests and quarantine lists with
hashed IDs (:mod:`medtricks.data.hashed_ids`), and messages with every path under the data root redacted.

File names often carry the dataset's own patient IDs (Kermany ``person123_...``, RSNA ``<patientId>.dcm``),
so nothing that names a file leaves the data layer unhashed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import pandas as pd

from medtricks.data.errors import ManifestError
from medtricks.data.hashed_ids import content_id, image_id, patient_salt

__all__ = ["export_manifest", "export_quarantine", "redact_paths", "REDACTED_ROOT"]


def _relative(path, root: Path) -> Optional[str]:
    """``path`` as a POSIX path relative to ``root`` (the link path first, then its target), or ``None``."""
    # The link path, not its target: a symlinked file or folder under the root may point anywhere.
    for candidate in (Path(os.path.abspath(os.path.expanduser(str(path)))), Path(path).expanduser().resolve()):
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            continue
    return None


def export_manifest(manifest: pd.DataFrame, root, *, keep_paths: bool = False) -> pd.DataFrame:
    """The copy of a manifest that is safe to log: hashed image IDs, hashed patients, label and split.

    File names often carry the dataset's own patient IDs (Kermany ``person123_...``, RSNA
    ``<patientId>.dcm``), so by default the relative path is replaced by ``image_id``, a salted
    hash of it (same salt as the patient hashes: the same file gets the same ID on this machine).
    ``keep_paths=True`` keeps the relative paths, for data whose names are known to be safe. A
    manifest with a complete ``content_hash`` column (after the image scan) also gets ``content_id``
    (:func:`content_id`): what ``medtricks evaluate`` compares to find training images in its data.
    """
    root = Path(root).expanduser().resolve()
    salt = patient_salt()
    rel = []
    for p in manifest["path"]:
        r = _relative(p, root)
        if r is None:
            raise ManifestError(f"{p} is not under the data root {root}; cannot export a relative path") from None
        rel.append(r)
    first = ("path", rel) if keep_paths else ("image_id", [image_id(r, salt) for r in rel])
    out = pd.DataFrame(
        {
            first[0]: first[1],
            "label": manifest["label"].to_numpy(),
            "target": manifest["target"].to_numpy(),
            "patient": manifest["patient"].to_numpy(),
            "split": manifest["split"].to_numpy(),
        }
    )
    if "content_hash" in manifest.columns and manifest["content_hash"].notna().all():
        out["content_id"] = [content_id(d, salt) for d in manifest["content_hash"]]
    if "labeled" in manifest.columns:  # data.label_fraction / label_count: which training rows kept their label
        out["labeled"] = manifest["labeled"].to_numpy()
    bad = [p for p in out["patient"] if not re.fullmatch(r"p_[0-9a-f]{16}", str(p))]
    if bad:  # never export what could be a raw ID
        raise ManifestError(f"export_manifest: patient column holds {len(bad)} value(s) that are not salted hashes")
    return out


# ------------------------------------------------------------------------------------- redaction
REDACTED_ROOT = "<data root>"
_TOKEN = re.compile(r"[^\s'\"`<>|,;()\[\]{}]+")
_STOP = " \t:,;)]}>'\""  # where a path in a message may end (it may hold spaces)
_FILE_NAME = re.compile(r"[^/]+\.[A-Za-z][A-Za-z0-9]{1,4}")  # a bare name such as MRN123_1.png
_MAX_INDEXED = 500_000


class _Redactor:
    """Replaces paths under one data root in texts; the file-name index is built once, when needed."""

    def __init__(self, root) -> None:
        given = os.path.expanduser(str(root))
        self.root = Path(given).resolve()
        self.salt = patient_salt()
        forms = {given, os.path.abspath(given), str(self.root), os.path.realpath(given)}
        forms = sorted({f.rstrip("/") for f in forms if f.rstrip("/") not in ("", ".", "..")}, key=len, reverse=True)
        self.prefixed = (
            re.compile(r"(?<![\w.~/-])(?:" + "|".join(re.escape(f) for f in forms) + r")(/[^\n'\"`<>|]*)")
            if forms
            else None
        )
        self._names: Optional[dict[str, list[str]]] = None

    def hashed(self, rel: str) -> str:
        return f"{REDACTED_ROOT}/{image_id(rel.strip('/'), self.salt)}"

    def names(self) -> dict[str, list[str]]:
        """File name -> relative paths of every file under the root with that name."""
        if self._names is None:
            self._names = {}
            n = 0
            for dirpath, _, filenames in os.walk(self.root):  # a missing root lists nothing
                for name in filenames:
                    rel = Path(dirpath, name).relative_to(self.root).as_posix()
                    self._names.setdefault(name, []).append(rel)
                n += len(filenames)
                if n >= _MAX_INDEXED:
                    break
        return self._names

    def _under_root(self, rel: str) -> bool:
        """Whether ``rel`` names an existing file or folder under the root (not the root itself)."""
        if not rel.strip("/"):
            return False
        try:
            full = os.path.normpath(self.root / rel)
            return full.startswith(str(self.root).rstrip("/") + "/") and os.path.lexists(full)
        except (OSError, ValueError):
            return False

    def _prefixed(self, match: re.Match) -> str:
        tail = match.group(1)
        # The longest stretch that names an existing path (file names may hold spaces), else up to the first stop.
        cuts = sorted({i for i, c in enumerate(tail) if c in _STOP} | {len(tail)}, reverse=True)
        end = next((cut for cut in cuts if self._under_root(tail[:cut].rstrip(".").lstrip("/"))), cuts[-1])
        path = tail[:end].rstrip(".")
        if not path.strip("/"):  # the root itself: not patient data, and logged as a param anyway
            return match.group(0)[: len(match.group(0)) - len(tail)] + self._sub_prefixed(tail)
        return self.hashed(path.lstrip("/")) + self._sub_prefixed(tail[len(path) :])

    def _sub_prefixed(self, text: str) -> str:
        return self.prefixed.sub(self._prefixed, text) if self.prefixed is not None else text

    def _relative(self, match: re.Match) -> str:
        token = match.group(0)
        if token.startswith(("i_", "p_", "c_")):  # already a hash
            return token
        stripped = token.rstrip(".:")
        rest = token[len(stripped) :]
        if ("/" in stripped or "." in stripped) and not stripped.startswith("/") and self._under_root(stripped):
            return self.hashed(stripped) + rest
        if "/" not in stripped and _FILE_NAME.fullmatch(stripped):
            found = self.names().get(stripped)
            if found:
                return self.hashed(found[0] if len(found) == 1 else stripped) + rest
        return token

    def __call__(self, text) -> str:
        if text is None:
            return text
        text = str(text)
        return _TOKEN.sub(self._relative, self._sub_prefixed(text))


def redact_paths(text: str, root) -> str:
    """``text`` with every path under the data ``root`` replaced by ``<data root>/i_<hash>`` (the file's
    :func:`image_id`, as in the logged split manifest and quarantine list).

    Absolute paths (the root as given, absolute or resolved), paths relative to the root and bare
    file names of files under the root are replaced; the root itself and other paths are kept. For
    messages that are logged (the ``medtricks.error`` tag, ``state.json``): file names often hold
    patient IDs. Example::

        redact_paths("BadImageError: /data/cxr/NORMAL/MRN123_1.png: truncated", "/data/cxr")
        # 'BadImageError: <data root>/i_3f0c9a6b1d2e4f70: truncated'

    Fails closed: if the text cannot be checked (no salt, an unreadable root) the whole text is withheld.
    """
    try:
        return _Redactor(root)(text)
    except Exception as err:  # noqa: BLE001 - called while reporting another error: never raise, never leak
        return f"[message withheld: its paths could not be redacted ({type(err).__name__})]"


def export_quarantine(quarantine: pd.DataFrame, root) -> pd.DataFrame:
    """The copy of a quarantine list (``path``, ``label``, ``reason``) that is safe to log: ``image_id``
    (:func:`image_id`, as in the split manifest), ``label`` and ``reason`` with paths redacted
    (:func:`redact_paths`). A path outside the root gets the hash of its absolute path."""
    redact = _Redactor(root)
    ids = []
    for p in quarantine["path"]:
        rel = _relative(p, redact.root)
        ids.append(image_id(rel if rel is not None else os.path.abspath(str(p)), redact.salt))
    out = pd.DataFrame({"image_id": ids})
    if "label" in quarantine.columns:
        out["label"] = quarantine["label"].to_numpy()
    out["reason"] = [redact(r) for r in quarantine["reason"]] if "reason" in quarantine.columns else ""
    return out
