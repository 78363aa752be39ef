"""A checkpoint written when the served teacher fails mid-rollout, so the steps since the last
periodic checkpoint are not lost: the run resumes from it (``resume=auto`` picks the newest)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from kat_research.rollout.teachers import TeacherServerFailed


class TeacherFailureCheckpoint(L.Callback):
    """On :class:`TeacherServerFailed`, save the state after the last completed optimizer step
    to ``<dirpath>/teacher-failure-step<N>.ckpt`` (N = completed steps); other exceptions
    pass through untouched."""

    def __init__(self, dirpath: Path):
        self.dirpath = Path(dirpath)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, TeacherServerFailed):
            return
        path = self.dirpath / f"teacher-failure-step{trainer.global_step:06d}.ckpt"
        trainer.save_checkpoint(path)
        exception.add_note(f"the state after step {trainer.global_step} is saved in {path}")
