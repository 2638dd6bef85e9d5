"""Checkpoint folders: written atomically, verified before a resume, newest good one found by name.

A checkpoint is `<output_dir>/checkpoints/step-NNNNNN`. It is written into a temporary folder that is
renamed when complete, and its manifest (`checkpoint.json`: every file with its size) is the last file
written, so a folder without a manifest, or whose files no longer match it (a full disk, a half-copied
folder, a truncated file), is damaged. `latest_checkpoint` skips damaged ones with a warning naming the
file and returns the newest good one.

Random states (Python, NumPy, torch CPU and every CUDA device) are saved per process by
`capture_rng_state` and put back by `restore_rng_state`, so a resumed run draws the same dropout masks
as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import random
import re
import sys

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "checkpoint.json"


def rng_file(process_index: int) -> str:
    return f"rng_state_{process_index}.pt"


def checkpoint_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "checkpoints", f"step-{step:06d}")


def snapshot_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "snapshots", f"step-{step:06d}")


def write_manifest(folder: str, state: dict) -> None:
    """Record every file of `folder` with its size, then the trainer state; written last, atomically."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    files.pop(MANIFEST_FILE, None)
    tmp = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"state": state, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST_FILE))


def damage(folder: str) -> str | None:
    """Why `folder` cannot be resumed from (naming the file), or None when it is complete and loadable:
    the manifest exists, every file it lists has its recorded size, and safetensors headers parse."""
    manifest_path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        return f"{manifest_path} is missing (the checkpoint was not completed)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files, state = manifest["files"], manifest["state"]
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{manifest_path} is unreadable ({type(err).__name__}: {err})"
    for name, size in sorted(files.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != size:
            return f"{path} has {os.path.getsize(path)} bytes, the manifest recorded {size}"
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                with safe_open(path, framework="pt") as handle:
                    handle.keys()
            except Exception as err:  # safetensors raises its own error type for a bad header
                return f"{path} cannot be read ({type(err).__name__}: {err})"
    return None


def read_state(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST_FILE)) as f:
        return json.load(f)["state"]


def checkpoint_folders(output_dir: str) -> list[str]:
    """Every `step-NNNNNN` folder under `<output_dir>/checkpoints`, newest first (damaged ones too)."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = sorted(((int(m.group(1)), name) for name in os.listdir(root)
                    if (m := CHECKPOINT_PATTERN.match(name)) and os.path.isdir(os.path.join(root, name))),
                   reverse=True)
    return [os.path.join(root, name) for _, name in found]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def latest_checkpoint(output_dir: str, *, warn=_warn) -> str | None:
    """The newest checkpoint that `damage` finds nothing wrong with; `warn(message)` is called for each
    newer damaged one (by default a line on stderr, which warning filters cannot hide). None when there is
    no checkpoint at all; ValueError when checkpoints exist but every one of them is damaged."""
    folders = checkpoint_folders(output_dir)
    reasons = []
    for folder in folders:
        reason = damage(folder)
        if reason is None:
            return folder
        reasons.append(reason)
        warn(f"skipping damaged checkpoint {folder}: {reason}")
    if reasons:
        raise ValueError(f"--resume: no usable checkpoint in {output_dir}/checkpoints; every one is damaged:\n  "
                         + "\n  ".join(reasons))
    return None


def capture_rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(folder: str, process_index: int) -> None:
    torch.save(capture_rng_state(), os.path.join(folder, rng_file(process_index)))


def load_rng_state(folder: str, process_index: int) -> dict:
    path = os.path.join(folder, rng_file(process_index))
    if not os.path.isfile(path):
        raise ValueError(f"--resume: {path} is missing; the checkpoint holds no random state for process "
                         f"{process_index}")
    # our own file of Python and NumPy state tuples: not loadable with weights_only
    return torch.load(path, weights_only=False)
