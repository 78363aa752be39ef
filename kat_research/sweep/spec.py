"""What a reproduction target runs: the spec in experiments/<name>.yaml, expanded into jobs.

A spec names the Hydra experiment its jobs apply (``experiment``), other specs whose jobs it
also aggregates (``include``), job entries (``jobs``: one job per combination of an entry's
axes), the table layout (``table``), an optional figure and the paper's reference numbers.
``${scale.*}`` values resolve against the training config composed at the chosen scale.

An axis is a list of values (job override ``<axis>=<value>``, label ``str(value)``) or a
mapping ``label -> overrides`` / ``label -> {title, overrides}`` (named variants, e.g.
students). An entry with ``evaluate: teacher|student`` makes evaluation-only jobs.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kat_research.config import compose

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
TRAIN, EVALUATE = "train", "evaluate"  # job kinds
ROLES = ("teacher", "student")  # models an evaluation job can evaluate


@dataclass(frozen=True)
class ExperimentSpec:
    """One experiments/<name>.yaml file, unresolved (``entries`` may hold ``${scale.*}``)."""

    name: str
    title: str
    experiment: str | None
    include: tuple[str, ...]
    entries: tuple[dict[str, Any], ...]
    table: dict[str, Any]
    figure: dict[str, Any] | None
    reference: dict[str, Any]


@dataclass(frozen=True)
class Job:
    """One run of a sweep: a training job or the evaluation of one model of the config."""

    experiment: str  # the spec it belongs to (its folder)
    scale: str  # conf/scale option
    name: str  # folder name, e.g. student=small,method=kat,seed=0
    kind: str  # train | evaluate
    role: str | None  # evaluate jobs: the model evaluated (teacher | student)
    axes: dict[str, str]  # axis -> label
    titles: dict[str, str] = field(default_factory=dict)  # axis -> display title, if any
    overrides: tuple[str, ...] = ()  # everything composed on top of conf/train.yaml
    order: int = 0  # position in its spec's expansion (tables list jobs in this order)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overrides": list(self.overrides)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Job:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**{**fields, "overrides": tuple(fields.get("overrides", ()))})


def spec_names(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    """Names of every spec in ``directory``."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_spec(name: str, directory: Path = EXPERIMENTS_DIR) -> ExperimentSpec:
    """Read experiments/<name>.yaml (interpolations left unresolved)."""
    path = directory / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no spec {path}; known: {', '.join(spec_names(directory))}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return ExperimentSpec(
        name=name,
        title=raw.get("title", name),
        experiment=raw.get("experiment"),
        include=tuple(raw.get("include", ())),
        entries=tuple(raw.get("jobs") or ()),
        table=raw["table"],
        figure=raw.get("figure"),
        reference=raw.get("reference") or {},
    )


def with_includes(spec: ExperimentSpec, directory: Path = EXPERIMENTS_DIR) -> list[ExperimentSpec]:
    """``spec`` and every spec it includes (recursively), each once, includes first."""
    seen: dict[str, ExperimentSpec] = {}

    def visit(s: ExperimentSpec) -> None:
        for name in s.include:
            if name not in seen:
                visit(load_spec(name, directory))
        seen.setdefault(s.name, s)

    visit(spec)
    return list(seen.values())


def spec_jobs(spec: ExperimentSpec, scale: str, extra: Sequence[str] = ()) -> list[Job]:
    """Every job ``spec`` aggregates at ``scale``: those of its includes, then its own."""
    return [job for s in with_includes(spec) for job in expand_jobs(s, scale, extra)]


def base_overrides(spec: ExperimentSpec, scale: str) -> list[str]:
    """The overrides every job of ``spec`` starts with."""
    experiment = [f"experiment={spec.experiment}"] if spec.experiment else []
    return [*experiment, f"scale={scale}"]


def _variants(axis: str, values: Any) -> list[tuple[str, str | None, list[str]]]:
    """(label, title, overrides) of each value of an axis."""
    if isinstance(values, Mapping):
        out = []
        for label, value in values.items():
            if isinstance(value, Mapping):
                out.append((str(label), value.get("title"), list(value.get("overrides", ()))))
            else:
                out.append((str(label), None, list(value)))
        return out
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"axis {axis!r}: expected a list or a mapping, got {values!r}")
    return [(str(v), None, [f"{axis}={v}"]) for v in values]


def job_name(axes: Mapping[str, str]) -> str:
    """Folder name of a job: ``<last part of axis>=<label>`` joined by commas."""
    parts = [f"{axis.rsplit('.', 1)[-1]}={label}" for axis, label in axes.items()]
    return ",".join(parts).replace("/", "_") or "job"


def expand_jobs(spec: ExperimentSpec, scale: str, extra: Sequence[str] = ()) -> list[Job]:
    """Every job of ``spec`` (not its includes) at ``scale``, in spec order."""
    base = base_overrides(spec, scale)
    if not spec.entries:
        return []
    cfg = compose([*base, *extra])
    root = OmegaConf.create({"scale": cfg.scale, "jobs": list(spec.entries)})
    entries = OmegaConf.to_container(root.jobs, resolve=True)
    jobs: list[Job] = []
    for entry in entries:
        role = entry.get("evaluate")
        if role not in (None, *ROLES):
            raise ValueError(f"{spec.name}: evaluate must be one of {ROLES}, got {role!r}")
        axes = list(entry["axes"])
        variants = [_variants(axis, values) for axis, values in entry["axes"].items()]
        for combo in itertools.product(*variants):
            labels = {axis: label for axis, (label, _, _) in zip(axes, combo, strict=True)}
            titles = {a: t for a, (_, t, _) in zip(axes, combo, strict=True) if t is not None}
            overrides = [o for _, _, ovr in combo for o in ovr]
            jobs.append(
                Job(
                    experiment=spec.name,
                    scale=scale,
                    name=job_name(labels),
                    kind=EVALUATE if role else TRAIN,
                    role=role,
                    axes=labels,
                    titles=titles,
                    overrides=(*base, *overrides, *extra),
                    order=len(jobs),
                )
            )
    names = [j.name for j in jobs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{spec.name}: several jobs share a folder name: {duplicates}")
    return jobs
