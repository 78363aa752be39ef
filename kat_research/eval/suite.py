"""Math benchmark suites as evaluators: sample with the rollout engine, grade with math-verify,
report avg@k / pass@k per benchmark and the paper's macro average."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kat_research.data.prompts import DEFAULT_INSTRUCTION, format_prompt
from kat_research.eval.benchmarks import LoadStats, Problem, get_spec, load_benchmark
from kat_research.eval.grading import AnswerBudget, Grader
from kat_research.eval.metrics import METRICS, PAPER_BENCHMARKS, macro_average, summarize
from kat_research.eval.runner import SampleRecord, generate_completions, grade_completions
from kat_research.eval.tasks import EvalResult
from kat_research.rollout import BACKENDS, SamplingConfig, build_backend
from kat_research.text.answers import extract_answer

if TYPE_CHECKING:
    from kat_research.rollout.backends.vllm import VLLMBackend

log = logging.getLogger(__name__)

PAPER_AVG = "paper_avg"
# Table columns reported as `<benchmark>/<column>` metrics (the paper_avg row has only METRICS).
BENCHMARK_METRICS = (*METRICS, "n_problems", "problems_per_s", "tokens_per_s")
_SAMPLING_FIELDS = ("limit", "n_samples", "temperature", "top_p", "max_new_tokens")


@dataclass(frozen=True)
class BenchmarkSettings:
    """One benchmark of a suite. ``None`` fields fall back to the suite's defaults, then to the
    registry's ``BenchmarkSpec`` (``limit=None``: every problem).

    Source: ``path`` (a JSONL/Parquet file), else ``data_dir/<name>/test.jsonl``, else the hub.
    """

    name: str
    path: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    n_samples: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None

    def resolve(self, defaults: BenchmarkSettings) -> BenchmarkSettings:
        """Fill unset fields from ``defaults`` (same fields, any name), then from the registry."""
        spec = get_spec(self.name)
        filled = {
            name: getattr(defaults, name) if getattr(self, name) is None else getattr(self, name)
            for name in ("data_dir", *_SAMPLING_FIELDS)
        }
        for name in ("n_samples", "temperature", "top_p", "max_new_tokens"):
            if filled[name] is None:
                filled[name] = getattr(spec, name)
        if filled["n_samples"] < 1 or (filled["limit"] is not None and filled["limit"] < 1):
            raise ValueError(f"{self.name}: n_samples and limit must be >= 1, got {filled}")
        return dataclasses.replace(self, **filled)

    def sampling(self, stop_token_ids: tuple[int, ...]) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens, stop_token_ids)


@dataclass
class SuiteResult(EvalResult):
    """An ``EvalResult`` plus the per-benchmark table behind its metrics.

    ``table`` is ``metrics.summarize``'s output joined with load and throughput columns
    (``n_skipped``, ``generation_s``, ``problems_per_s``, ``tokens_per_s``, ``grading_s``), and a
    ``paper_avg`` row (avg@k, pass@k, mean_length) when all of ``PAPER_BENCHMARKS`` ran;
    otherwise ``paper_missing`` names the ones that did not.
    """

    table: pd.DataFrame = field(default_factory=pd.DataFrame)
    paper_missing: tuple[str, ...] = ()


def _as_settings(benchmarks: Any) -> list[BenchmarkSettings]:
    """Settings from ``{name: overrides or None}`` (Hydra) or a list of names / settings."""
    if isinstance(benchmarks, Mapping):
        return [BenchmarkSettings(str(name), **(kw or {})) for name, kw in benchmarks.items()]
    return [
        b if isinstance(b, BenchmarkSettings) else BenchmarkSettings(str(b)) for b in benchmarks
    ]


def stop_token_ids(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, stop_tokens: Sequence[str]
) -> tuple[int, ...]:
    """The tokenizer's eos, the model's generation-config eos ids and ``stop_tokens``' ids."""
    ids = [tokenizer.eos_token_id]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += config_eos if isinstance(config_eos, list) else [config_eos]
    vocab = tokenizer.get_vocab()
    for token in stop_tokens:
        if token not in vocab:
            raise ValueError(f"stop token {token!r} is not in the tokenizer's vocabulary")
        ids.append(vocab[token])
    return tuple(dict.fromkeys(i for i in ids if i is not None))


class BenchmarkEvaluator:
    """Evaluates a model on math benchmarks: ``evaluator(model, tokenizer) -> SuiteResult``.

    Problems are loaded once, here. Each call samples ``n_samples`` completions per problem
    (chat template + ``instruction``) with the ``backend``: ``hf`` (the rollout engine decodes
    with the model) or ``vllm`` (one request per problem for its k samples, on the model's
    vLLM engine: the training rollouts' engine when they use vLLM, else one the evaluator
    starts at its first call and updates with the model's current weights at every call).
    Both give the same records, so grading and metrics are the same code. It grades with a
    ``Grader`` (``num_workers`` processes, 0 = main thread; ``timeout_s`` per answer; answers
    over ``max_answer_chars`` / ``max_answer_terms`` are wrong unparsed) whose cache lives as
    long as the evaluator, and reports, per benchmark, ``<name>/avg@k``,
    ``/pass@k``, ``/mean_length``, ``/n_problems``, ``/problems_per_s``, ``/tokens_per_s``;
    ``paper_avg/*`` when all four paper benchmarks ran; ``grading_s_per_sample`` and the
    grader's ``grading_timeouts`` / ``grading_too_long`` / ``grading_parse_errors`` /
    ``grading_crashes`` of the call.

    Args:
        benchmarks: ``{name: {setting: value} or None}`` or a list of names / settings.
        data_dir, limit, n_samples, temperature, top_p, max_new_tokens: defaults for every
            benchmark (see ``BenchmarkSettings``).
        stop_tokens: tokens that end a completion besides eos (e.g. ``<|im_end|>``).
        batch_size: sequences per generation batch (problems x samples are mixed; ``hf``
            only, vLLM schedules its requests itself).
        seed: sampling seed (the same for every benchmark and call).
        backend: ``hf`` or ``vllm`` (``eval.backend``).
        vllm: settings of the evaluator's own vLLM engine (``VLLMSettings`` fields).
    """

    def __init__(
        self,
        benchmarks: Mapping[str, Mapping[str, Any] | None] | Sequence[str | BenchmarkSettings],
        *,
        data_dir: str | None = None,
        limit: int | None = None,
        n_samples: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = None,
        stop_tokens: Sequence[str] = (),
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        timeout_s: float = 5.0,
        max_answer_chars: int = AnswerBudget.max_chars,
        max_answer_terms: int = AnswerBudget.max_terms,
        backend: str = "hf",
        vllm: Mapping[str, Any] | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"unknown eval.backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self.backend, self.vllm_settings = backend, dict(vllm or {})
        self._vllm: VLLMBackend | None = None
        defaults = BenchmarkSettings(
            "*",
            data_dir=data_dir,
            limit=limit,
            n_samples=n_samples,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        self.settings = [s.resolve(defaults) for s in _as_settings(benchmarks)]
        names = [s.name for s in self.settings]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"need at least one benchmark, each once; got {names}")
        self.instruction, self.system = instruction, system
        self.stop_tokens = tuple(stop_tokens)
        self.batch_size, self.seed = batch_size, seed
        self.grader = Grader(
            num_workers=num_workers,
            timeout_s=timeout_s,
            max_answer_chars=max_answer_chars,
            max_answer_terms=max_answer_terms,
        )
        self.problems: dict[str, list[Problem]] = {}
        self.load_stats: dict[str, LoadStats] = {}
        for s in self.settings:
            problems, stats = load_benchmark(s.name, s.path, s.data_dir, s.limit)
            if not problems:
                raise ValueError(f"{s.name}: no usable problems ({stats})")
            self.problems[s.name], self.load_stats[s.name] = problems, stats

    def _grader_counts(self) -> dict[str, int]:
        g = self.grader
        return {
            "timeouts": g.n_timeouts,
            "too_long": g.n_too_long,
            "parse_errors": g.n_parse_errors,
            "crashes": g.n_crashes,
        }

    def _run_one(
        self,
        settings: BenchmarkSettings,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: tuple[int, ...],
    ) -> tuple[list[SampleRecord], dict[str, float]]:
        """Generate and grade one benchmark: its records and its load / timing columns."""
        problems = self.problems[settings.name]
        prompts = [
            format_prompt(tokenizer, p.problem, self.instruction, self.system) for p in problems
        ]
        start = time.perf_counter()
        completions = generate_completions(
            model,
            tokenizer,
            prompts,
            sampling=settings.sampling(stop_ids),
            n_samples=settings.n_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            vllm=self._vllm,
        )
        generation_s = time.perf_counter() - start
        start = time.perf_counter()
        records = grade_completions(
            settings.name,
            [p.problem_id for p in problems],
            [p.gold for p in problems],
            completions,
            extract=extract_answer,
            grade_many=self.grader.grade_many,
        )
        grading_s = time.perf_counter() - start
        tokens = sum(r.length for r in records)
        log.info(
            "%s: %d problems x %d samples, %d tokens in %.1f s, graded in %.1f s",
            settings.name,
            len(problems),
            settings.n_samples,
            tokens,
            generation_s,
            grading_s,
        )
        columns = {
            "n_skipped": self.load_stats[settings.name].n_skipped,
            "generation_s": generation_s,
            "problems_per_s": len(problems) / generation_s,
            "tokens_per_s": tokens / generation_s,
            "grading_s": grading_s,
        }
        return records, columns

    def _attach_vllm(self, model: PreTrainedModel) -> None:
        """Hold ``model``'s vLLM backend and bring its engine to the model's current weights
        (as the rollouts do after an optimizer step; a no-op before the engine starts)."""
        if self._vllm is None or self._vllm.student is not model:
            self._vllm = build_backend("vllm", model, self.vllm_settings)
        self._vllm.sync_weights()

    def __call__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> SuiteResult:
        if self.backend == "vllm":
            self._attach_vllm(model)
        stop_ids = stop_token_ids(model, tokenizer, self.stop_tokens)
        counts_before = self._grader_counts()
        records: list[SampleRecord] = []
        columns: dict[str, dict[str, float]] = {}
        try:
            for settings in self.settings:
                bench_records, columns[settings.name] = self._run_one(
                    settings, model, tokenizer, stop_ids
                )
                records += bench_records
        finally:
            self.grader.close()  # no idle workers between calls; the cache stays
        table = summarize([r.to_dict() for r in records]).join(
            pd.DataFrame.from_dict(columns, "index")
        )
        table, missing = with_paper_average(table)
        metrics = table_metrics(table)
        metrics["grading_s_per_sample"] = float(table["grading_s"].sum()) / len(records)
        counts_after = self._grader_counts()
        for name, value in counts_after.items():
            metrics[f"grading_{name}"] = float(value - counts_before[name])
        return SuiteResult(metrics, records, table, missing)


def with_paper_average(table: pd.DataFrame) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """``table`` plus a ``paper_avg`` row (macro average of ``METRICS`` over the paper's four
    benchmarks) when all four are rows; otherwise ``table`` unchanged and the missing names."""
    missing = tuple(name for name in PAPER_BENCHMARKS if name not in table.index)
    if missing:
        log.info("no %s: benchmarks %s were not evaluated", PAPER_AVG, list(missing))
        return table, missing
    macro = macro_average(table)
    row = pd.DataFrame([{metric: float(macro[metric]) for metric in METRICS}], index=[PAPER_AVG])
    row.index.name = table.index.name
    counts = {c: "Int64" for c in ("k", "n_problems", "n_samples", "n_skipped") if c in table}
    return pd.concat([table.astype(counts), row]), ()


def table_metrics(table: pd.DataFrame) -> dict[str, float]:
    """``<row>/<column>`` scalars of ``BENCHMARK_METRICS`` (empty cells left out)."""
    return {
        f"{row}/{column}": float(table.at[row, column])
        for row in table.index
        for column in BENCHMARK_METRICS
        if column in table and pd.notna(table.at[row, column])
    }
