"""Checks of the files a training run reads back — model weights, checkpoints, caches — before
any of them is loaded, so a damaged file is named in one line instead of failing deep inside a
loader (or, for a pickle, running code).

    check_safetensors(path)   the header parses and the data it describes fits in the file
    check_torch_file(path)    a torch.save zip archive whose directory is intact (truncation and
                              random bytes show here without reading the data)
    check_checkpoint(folder)  every file of a Hugging Face Trainer checkpoint
    resolve_resume(out, log)  ``--resume`` (latest): the newest *complete* checkpoint, saying which
                              newer ones were skipped (a run killed while writing leaves one half-made)
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

__all__ = ["CheckpointError", "check_safetensors", "check_torch_file", "check_checkpoint", "resolve_resume"]

_STEP = re.compile(r"^checkpoint-(\d+)$")
_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt")


class CheckpointError(ValueError):
    """A damaged or incomplete file; the message names it."""


def check_safetensors(path: Path) -> None:
    """The 8-byte header length, the JSON header and the data extent of a ``.safetensors`` file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {length} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: damaged safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: damaged safetensors header")
    end = max((entry["data_offsets"][1] for name, entry in header.items()
               if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry), default=0)
    if 8 + length + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes; its header describes {8 + length + end})")


def check_torch_file(path: Path) -> None:
    """A ``torch.save`` file (a zip archive): its central directory opens and lists a data.pkl."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError):
        raise CheckpointError(f"{path}: damaged or not a torch.save file (truncated, or other bytes)") from None
    if not any(name.endswith("data.pkl") for name in names):
        raise CheckpointError(f"{path}: not a torch.save file (no data.pkl inside)")


def check_model_folder(folder: Path) -> None:
    """Every ``*.safetensors`` weight file of a model folder."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(path)


def check_checkpoint(folder: Path) -> None:
    """Every file a resume reads: ``trainer_state.json``, the weights, and the torch files present."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no trainer_state.json; a run stopped while "
                              "writing it?)")
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{state}: damaged (not valid JSON)") from None
    weights = list(folder.glob("*.safetensors")) + list(folder.glob("pytorch_model*.bin"))
    if not weights:
        raise CheckpointError(f"{folder}: incomplete checkpoint (no model weights)")
    check_model_folder(folder)
    for name in _TORCH_FILES:
        if (folder / name).exists():
            check_torch_file(folder / name)


def _step(folder: Path) -> int:
    return int(_STEP.match(folder.name).group(1))


def resolve_resume(out: Path, resume: str, log=print) -> Path:
    """The checkpoint folder to resume from: ``resume`` itself (checked), or for ``"latest"`` the
    newest complete ``checkpoint-N`` in ``out``, logging each newer one that was skipped and why."""
    if resume != "latest":
        folder = Path(resume)
        if not folder.is_dir():
            raise FileNotFoundError(f"--resume: checkpoint folder not found: {resume}")
        check_checkpoint(folder)
        return folder
    found = sorted((p for p in Path(out).glob("checkpoint-*") if p.is_dir() and _STEP.match(p.name)),
                   key=_step, reverse=True)
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint-N folder in {out}")
    for folder in found:
        try:
            check_checkpoint(folder)
        except CheckpointError as err:
            log(f"robalign: skipping {folder.name}: {err}")
            continue
        return folder
    raise CheckpointError(f"--resume: no complete checkpoint in {out} (all {len(found)} are damaged)")
