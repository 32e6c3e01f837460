"""Checkpoints that are either complete or ignored.

Each is written into a temp folder by every rank (Accelerate's state, this rank's loader position),
then the main process records every file's size and sha256 in COMPLETE.json and renames the folder to
`step-NNNNNNNNN`. Resuming takes the newest folder whose files still match their record; a damaged one
is skipped with a warning. A save that fails (a full disk) removes its temp folder and leaves the older
checkpoints as they were.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from accelerate import Accelerator

from base.files import disk_error, file_sha256

MARKER = "COMPLETE.json"


class Checkpointer:
    """Saves every `every` steps (0: only when asked) and keeps the newest `keep` (0: all); a disabled one
    saves nothing, so the training loop calls it unconditionally."""

    def __init__(self, accelerator: Accelerator, run: Path, keep: int, every: int = 0, enabled: bool = True):
        self.acc, self.dir, self.keep, self.every, self.enabled = accelerator, run / "checkpoints", keep, every, enabled

    def due(self, step: int) -> bool:
        return self.enabled and self.every > 0 and step % self.every == 0

    def save(self, step: int, trainer_state: dict, loader_state: dict) -> Path | None:
        if not self.enabled:
            return None
        final = self.dir / f"step-{step:09d}"
        tmp = self.dir / f".tmp-step-{step:09d}"
        try:
            self._write(tmp, trainer_state, loader_state)
        except BaseException as e:
            error = disk_error(e, self.dir) if isinstance(e, Exception) else None
            shutil.rmtree(tmp, ignore_errors=True)
            if error is None:
                raise
            raise error from e
        if self.acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.dir.glob("step-*"))[: -self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def _write(self, tmp: Path, trainer_state: dict, loader_state: dict) -> None:
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        (tmp / f"loader_{self.acc.process_index}.json").write_text(json.dumps(loader_state))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state))
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MARKER).write_text(json.dumps(files, indent=1))

    @staticmethod
    def complete(path: Path) -> bool:
        marker = path / MARKER
        if not marker.is_file():
            return False
        try:
            files = json.loads(marker.read_text())
        except json.JSONDecodeError:
            return False
        for name, rec in files.items():
            f = path / name
            if not f.is_file() or f.stat().st_size != rec["bytes"] or file_sha256(f) != rec["sha256"]:
                return False
        return True

    def find(self, resume: str) -> Path | None:
        """The checkpoint to resume from: `auto` picks the newest complete one, a path must be complete."""
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            if not self.complete(path):
                raise FileNotFoundError(f"--resume {path}: not a complete checkpoint (pass a checkpoints/step-* "
                                        "folder whose files match its COMPLETE.json, or --resume auto)")
            return path
        for path in sorted(self.dir.glob("step-*"), reverse=True):
            if self.complete(path):
                return path
            warnings.warn(f"skipping damaged or incomplete checkpoint {path}", stacklevel=2)
        return None

    @staticmethod
    def recorded(path: Path) -> dict:
        """The trainer state a checkpoint recorded (step, epoch, the resolved config it trained with)."""
        return json.loads((path / "trainer.json").read_text())

    def load(self, path: Path) -> tuple[dict, dict]:
        """Restore Accelerate's state; return (trainer state, this rank's loader state)."""
        self.acc.load_state(str(path))
        loader_file = path / f"loader_{self.acc.process_index}.json"
        if not loader_file.is_file():
            raise FileNotFoundError(f"{loader_file} missing: was this checkpoint written with another process count?")
        return self.recorded(path), json.loads(loader_file.read_text())
