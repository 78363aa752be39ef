"""The checks a composed config must pass before any model is loaded: override syntax, keys
each consumer accepts, every value's range, the termination rule's settings and data files.
Each failure is a :class:`~kat_research.config.ConfigError` naming the key to change."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from kat_research.config import CONFIG_DIR, ConfigError

if TYPE_CHECKING:
    from kat_research.termination.base import Terminator

_ABSENT = object()


def _rules(terminator: Terminator) -> list[Terminator]:
    from kat_research.termination import CompositeTerminator

    if isinstance(terminator, CompositeTerminator):
        return [r for child in terminator.terminators for r in _rules(child)]
    return [terminator]


def _integer(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _number(low: float, high: float = math.inf, low_open: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return (v > low if low_open else v >= low) and v <= high

    return check


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _one_of(*values: str) -> Callable[[Any], bool]:
    return lambda v: v in values


# (key, check, what the key must be). Keys absent from a config are not checked.
VALUE_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", _integer(0), "an integer >= 0"),
    ("threads", _optional(_integer(1)), "null or an integer >= 1"),
    ("data.batch_size", _integer(1), "an integer >= 1 (prompts per optimizer step)"),
    ("data.max_prompt_tokens", _integer(1), "an integer >= 1"),
    ("rollout.group_size", _integer(1), "an integer >= 1"),
    ("rollout.max_new_tokens", _integer(1), "an integer >= 1"),
    ("rollout.score_every", _optional(_integer(1)), "null or an integer >= 1"),
    ("rollout.temperature", _number(0), "a number >= 0 (0 = greedy)"),
    ("rollout.top_p", _number(0, 1, low_open=True), "a number in (0, 1]"),
    ("rollout.backend", _one_of("hf", "vllm"), "hf or vllm"),
    ("rollout.mode", _one_of("sync", "partial"), "sync or partial"),
    ("rollout.max_staleness", _integer(0), "an integer >= 0 (optimizer steps)"),
    ("rollout.teacher_keep", _one_of("auto", "hidden", "topk", "none"), "auto|hidden|topk|none"),
    ("teacher.backend", _one_of("hf", "vllm"), "hf or vllm"),
    ("teacher.topk", _optional(_integer(1)), "null or an integer >= 1"),
    ("teacher.vllm.timeout_s", _number(0, low_open=True), "a number > 0 (seconds)"),
    ("teacher.vllm.retries", _integer(0), "an integer >= 0 (0 = no retry)"),
    ("teacher.vllm.retry_wait_s", _number(0), "a number >= 0 (seconds)"),
    ("loss.chunk_size", _integer(1), "an integer >= 1"),
    ("loss.length_buckets", _integer(1), "an integer >= 1 (1 = one padded training forward)"),
    ("loss.k", _optional(_integer(1)), "null or an integer >= 1"),
    ("optimizer.lr", _number(0, low_open=True), "a finite number > 0"),
    ("trainer.max_steps", lambda v: v == -1 or _integer(1)(v), "-1 or an integer >= 1"),
    ("trainer.devices", _integer(1), "an integer >= 1 (devices per node)"),
    ("trainer.num_nodes", _integer(1), "an integer >= 1"),
    ("trainer.gradient_clip_val", _optional(_number(0)), "null or a number >= 0"),
    ("eval.every_n_steps", _integer(0), "an integer >= 0 (0 = never)"),
    ("eval.evaluator.temperature", _number(0), "a number >= 0 (0 = greedy)"),
    ("eval.evaluator.top_p", _number(0, 1, low_open=True), "a number in (0, 1]"),
    ("eval.evaluator.n_samples", _optional(_integer(1)), "null or an integer >= 1"),
    ("eval.evaluator.max_new_tokens", _integer(1), "an integer >= 1"),
    ("eval.evaluator.batch_size", _integer(1), "an integer >= 1"),
)


def check_values(cfg: DictConfig) -> None:
    """Every value of :data:`VALUE_RULES` present in ``cfg``, and the choices that depend on
    other packages (loss kinds), checked with the offending key named."""
    from kat_research.losses import LOSS_KINDS

    rules = (*VALUE_RULES, ("loss.kind", _one_of(*LOSS_KINDS), " | ".join(LOSS_KINDS)))
    for key, check, requirement in rules:
        node = OmegaConf.select(cfg, key, default=_ABSENT)
        if node is _ABSENT:
            continue
        if not check(node):
            raise ConfigError(f"{key}={node!r} is invalid: it must be {requirement}")
    ranks = cfg.trainer.devices * cfg.trainer.get("num_nodes", 1)
    if cfg.data.batch_size % ranks:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (the global batch) must be divisible by the "
            f"{ranks} data-parallel ranks (trainer.devices x trainer.num_nodes)"
        )


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse ``<group>=null`` for a config group without a ``null`` option (``logger=null``,
    ``callbacks=null``), which Hydra rejects with a traceback, naming ``~<group>``."""
    for override in overrides:
        match = re.fullmatch(r"([\w/]+)=(null|none|None)", override)
        if match is None:
            continue
        group = match.group(1)
        folder = Path(CONFIG_DIR) / group
        if folder.is_dir() and not (folder / f"{match.group(2)}.yaml").exists():
            raise ConfigError(
                f"{override}: {group} is a config group, not a value; write ~{group} to leave "
                f"the whole group out, or {group}.<name>=null to disable one entry"
            )


def _walk(node: Any, key: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every mapping of a resolved config (lists included) with its dotted key."""
    if isinstance(node, dict):
        yield key, node
        children = ((str(k), v) for k, v in node.items() if not str(k).startswith("_"))
    elif isinstance(node, list):
        children = ((str(i), value) for i, value in enumerate(node))
    else:
        return
    for child_key, child in children:
        yield from _walk(child, f"{key}.{child_key}" if key else child_key)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` with every interpolation resolved; an interpolation that cannot be is a
    :class:`ConfigError` naming the key (an evaluation that reads settings the chosen data does
    not have names ``eval=``)."""
    probe = cfg.copy()
    if "paths" in probe and OmegaConf.is_missing(probe.paths, "output_dir"):
        probe.paths.output_dir = "<run folder>"  # set at run time (Hydra's job folder)
    try:
        return OmegaConf.to_container(probe, resolve=True)  # type: ignore[return-value]
    except InterpolationResolutionError as error:
        key = getattr(error, "full_key", "") or "?"
        message = f"{key} cannot be resolved: {str(error).splitlines()[0]}"
        if key.startswith("eval."):
            choices = sorted(p.stem for p in (Path(CONFIG_DIR) / "eval").glob("*.yaml"))
            message += (
                ". The evaluation does not fit this data: choose one that does with eval= "
                f"({' | '.join(choices)}; eval=none to train without one)"
            )
        raise ConfigError(message) from None


def _accepted(target: str) -> set[str] | None:
    """The keyword arguments ``target`` accepts (None: any, or the target cannot be read)."""
    try:
        obj = get_object(target)
        parameters = inspect.signature(obj).parameters.values()
    except Exception:  # a missing module is reported when the object is built
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def _refuse_unknown(key: str, given: Sequence[str], accepted: set[str]) -> None:
    for name in given:
        if name not in accepted and not name.startswith("_"):
            close = difflib.get_close_matches(name, sorted(accepted), n=1)
            hint = f" (did you mean {key}.{close[0]}?)" if close else ""
            raise ConfigError(
                f"{key}.{name} is not a setting{hint}; valid keys of {key}: "
                f"{', '.join(sorted(accepted))}"
            )


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys that no code reads: a key of ``rollout`` / ``loss`` that their settings do
    not have, or a key of any ``_target_`` node that its target does not take (a typo such as
    ``+rollout.scor_every=8``), naming the nearest valid key. Imports the targets, loads no
    model."""
    from kat_research.lit import LossSettings, RolloutSettings

    values = resolved(cfg)
    for key, settings in (("rollout", RolloutSettings), ("loss", LossSettings)):
        if isinstance(values.get(key), dict):
            fields = {f.name for f in dataclasses.fields(settings)}
            _refuse_unknown(key, list(values[key]), fields)
    for key, node in _walk(values):
        target = node.get("_target_")
        accepted = _accepted(target) if isinstance(target, str) else None
        if accepted is not None:
            _refuse_unknown(key, [str(k) for k in node], accepted)


def _rule_keys(cfg: DictConfig) -> list[str]:
    """The ``termination.<name>`` nodes ``method.terminator`` uses (``method.terminator``
    itself when it names none)."""
    raw = OmegaConf.to_yaml(OmegaConf.masked_copy(cfg.method, ["terminator"]))
    return re.findall(r"\$\{(termination\.\w+)\}", raw) or ["method.terminator"]


def configured_terminator(cfg: DictConfig) -> Terminator:
    """The termination rule of ``method.terminator``; a bad setting is a :class:`ConfigError`
    naming the key as the user writes it (``termination.kat.quantile=1.5``)."""
    try:
        return instantiate(cfg.method.terminator)
    except InstantiationException as error:
        cause = error.__cause__ or error
    for key in _rule_keys(cfg):
        node = OmegaConf.select(cfg, key)
        try:
            instantiate(node)
        except InstantiationException as inner:
            reason = inner.__cause__ or inner
            named = [k for k in node if re.search(rf"\b{re.escape(str(k))}\b", str(reason))]
            shown = ", ".join(f"{key}.{k}={node[k]}" for k in named) or key
            raise ConfigError(f"{shown} is invalid: {reason}") from None
    raise ConfigError(f"method.terminator ({cfg.method.name}): {cause}") from None


def check_runnable(cfg: DictConfig) -> Terminator:
    """Fail with a :class:`ConfigError` naming the key to change if ``cfg`` cannot run; return
    the configured termination rule. Loads no model."""
    from kat_research.termination import KATTerminator

    check_keys(cfg)  # resolves every interpolation first
    check_values(cfg)
    terminator = configured_terminator(cfg)
    cap = cfg.rollout.max_new_tokens
    kat = next((k for k in _rule_keys(cfg) if k.endswith(".kat")), "method.terminator")
    for rule in _rules(terminator):
        if isinstance(rule, KATTerminator) and rule.rule.window + rule.rule.exempt > cap:
            raise ConfigError(
                f"KAT window {rule.rule.window} (+ exempt {rule.rule.exempt}) exceeds "
                f"rollout.max_new_tokens={cap}: no window could ever be evaluated. Lower "
                f"{kat}.window or raise rollout.max_new_tokens."
            )
    check_teacher_backend(cfg)
    _check_partial(cfg, terminator)
    source = cfg.data.source
    if source.kind == "file" and not Path(source.path).exists():
        raise ConfigError(
            f"data file {source.path} does not exist: set data.source.path, or point "
            f"paths.data_dir (now {cfg.paths.data_dir}; env KAT_DATA_DIR) at the folder of the "
            "offline data copies (layout: tests/fixtures/data/README.md)"
        )
    return terminator


def served_topk(cfg: DictConfig) -> int:
    """Log-probs per position a served teacher returns: ``teacher.topk``, else the loss's K
    (``loss.k``, else its kind's default; ``sampled_token``: ``topk_tail``'s default)."""
    from kat_research.losses import DEFAULT_K

    kind = cfg.loss.kind
    return cfg.teacher.topk or cfg.loss.get("k") or DEFAULT_K.get(kind, DEFAULT_K["topk_tail"])


def check_teacher_backend(cfg: DictConfig) -> None:
    """A served teacher (``teacher.backend=vllm``) returns top-k log-probs only: the losses and
    settings that need its full distribution are refused, naming what to use instead."""
    if OmegaConf.select(cfg, "teacher.backend", default="hf") != "vllm":
        return
    kind, support = cfg.loss.kind, cfg.loss.get("support")
    if kind == "full":
        raise ConfigError(
            "loss=full needs the teacher's whole distribution, which a served teacher "
            "(teacher.backend=vllm) does not return (only its top-k log-probs): use "
            "loss=topk_tail loss.support=teacher, loss=topk_lsm or loss=sampled_token, or keep "
            "the teacher on the training ranks (teacher.backend=hf)"
        )
    if kind == "topk_tail" and support != "teacher":
        raise ConfigError(
            f"loss=topk_tail with loss.support={support} needs the teacher's log-probs on the "
            "student's top-k tokens, which a served teacher (teacher.backend=vllm) does not "
            "return: set loss.support=teacher (its own top-k, plus one tail bucket)"
        )
    if cfg.rollout.teacher_keep == "hidden":
        raise ConfigError(
            "rollout.teacher_keep=hidden needs the teacher's hidden states, which a served "
            "teacher (teacher.backend=vllm) does not return: use rollout.teacher_keep=auto"
        )
    k, topk = cfg.loss.get("k"), served_topk(cfg)
    if kind in ("topk_tail", "topk_lsm") and k is not None and k > topk:
        raise ConfigError(
            f"loss.k={k} exceeds teacher.topk={topk}, the log-probs per position the served "
            "teacher returns: raise teacher.topk or lower loss.k"
        )


def _check_partial(cfg: DictConfig, terminator: Terminator) -> None:
    """What ``rollout.mode=partial`` cannot run with, named before any model loads."""
    if cfg.rollout.get("mode", "sync") != "partial":
        return
    if OmegaConf.select(cfg, "teacher.backend", default="hf") != "hf":
        raise ConfigError(
            "rollout.mode=partial keeps the teacher's KV cache of carried rows on the training "
            "ranks, so it needs teacher.backend=hf: set teacher.backend=hf or rollout.mode=sync"
        )
    if cfg.loss.kind == "sampled_token":
        raise ConfigError(
            "loss.kind=sampled_token is refused with rollout.mode=partial: a carried row's "
            "prefix was sampled by older weights and this loss has no importance weights for "
            "it. Use loss=full, topk_tail or topk_lsm (recomputed by the current student), or "
            "rollout.mode=sync"
        )
    if not terminator.supports_partial:
        raise ConfigError(
            f"method={cfg.method.name}: its rule {terminator!r} has no per-row state for "
            "partial rollouts; use rollout.mode=sync"
        )
