"""Training data: the synthetic task, row sources, chat prompts, collators and the data module."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_paths import FIXTURE_DATA, full_data_dir

from kat_research.data import (
    ArithmeticTaskConfig,
    PromptCollator,
    PromptDataModule,
    Row,
    SFTCollator,
    SourceSpec,
    drop_too_long,
    format_prompt,
    generate_problems,
    is_correct,
    load_rows,
    make_problem,
    solution_text,
    split_problems,
)
from kat_research.data import prompts as prompts_module
from kat_research.data.synthetic import is_heldout, problems_for_split
from kat_research.models import build_char_tokenizer

GSM8K_TRAIN = FIXTURE_DATA / "train" / "gsm8k_train.jsonl"  # the first 40 of 7473 records
GSM8K_SOURCE = {
    "kind": "file",
    "path": str(GSM8K_TRAIN),
    "problem_field": "question",
    "answer_transform": "gsm8k",
}
# the vendored slice, and the full file (slow: needs KAT_DATA_DIR or ../shared/data)
SLICE_AND_FULL = [False, pytest.param(True, marks=pytest.mark.slow)]


def train_file(name: str, full: bool) -> Path:
    return (full_data_dir() if full else FIXTURE_DATA) / "train" / name


STEP = re.compile(r"(-?\d+)([+\-*])(\d+)=(-?\d+)")


# --- synthetic task -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [ArithmeticTaskConfig(), ArithmeticTaskConfig(n_ops=3, allow_negative=True)],
    ids=["default", "3ops-negative"],
)
def test_worked_steps_are_arithmetically_right(cfg):
    for p in generate_problems(1000, seed=0, cfg=cfg):
        assert len(p.steps) == cfg.n_ops
        value = int(re.match(r"\(*(\d+)", p.problem).group(1))
        for step in p.steps:
            a, op, b, result = STEP.fullmatch(step).groups()
            assert int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert int(result) == value
        assert str(value) == p.answer
        assert eval(p.problem) == value  # parentheses make the usual precedence agree
        assert solution_text(p) == "\n".join(p.steps) + f"\n\\boxed{{{p.answer}}}"


def test_answers_stay_short_and_non_negative_by_default():
    problems = generate_problems(2000, seed=1, cfg=ArithmeticTaskConfig())
    answers = [int(p.answer) for p in problems]
    assert 0 <= min(answers) and max(answers) <= 9999
    assert max(len(solution_text(p)) for p in problems) <= 40
    assert {op for p in problems for op in "+-*" if op in p.problem} == set("+-*")
    signed = generate_problems(2000, 1, ArithmeticTaskConfig(n_ops=3, allow_negative=True))
    values = [int(STEP.fullmatch(s).group(4)) for p in signed for s in p.steps]
    assert min(values) < 0 and max(abs(v) for v in values) <= 9999


def test_generation_is_deterministic_per_seed():
    cfg = ArithmeticTaskConfig()
    assert generate_problems(50, 3, cfg) == generate_problems(50, 3, cfg)
    assert generate_problems(50, 3, cfg) != generate_problems(50, 4, cfg)
    assert make_problem(random.Random(7), cfg) == make_problem(random.Random(7), cfg)


def test_train_and_eval_splits_are_disjoint():
    cfg = ArithmeticTaskConfig()
    train, evals = split_problems(3000, 300, seed=0, cfg=cfg)
    eval_strings = {p.problem for p in evals}
    assert len(train) == 3000 and len(eval_strings) == 300  # eval problems are distinct
    assert not eval_strings & {p.problem for p in train}
    assert all(is_heldout(s, cfg) for s in eval_strings)
    other_seed_train = problems_for_split("train", 3000, seed=1, cfg=cfg)
    assert not eval_strings & {p.problem for p in other_seed_train}
    assert split_problems(10, 300, 0, cfg)[1] == evals  # eval does not depend on n_train


def test_bad_task_settings_are_rejected():
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTaskConfig(operators="+/")
    with pytest.raises(ValueError, match="split"):
        problems_for_split("test", 1, 0, ArithmeticTaskConfig())


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("28*5=140\n140-11=129\n\\boxed{129}", True),
        ("\\boxed{ 129 }", True),
        ("\\boxed{12}\n\\boxed{129}", True),
        ("\\boxed{128}", False),
        ("129", False),
        ("\\boxed{129", False),
        ("\\boxed{}", False),
        ("\\boxed{12a}", False),
        ("\\boxed{1.29e2}", False),
        ("<unk>}}{{\\\\boxed", False),
        ("", False),
    ],
)
def test_is_correct(completion, expected):
    assert is_correct(completion, "129") is expected


def test_is_correct_with_negative_answers():
    assert is_correct("\\boxed{-12}", "-12")
    assert not is_correct("\\boxed{12}", "-12")


def test_char_tokenizer_covers_the_synthetic_task(char_tokenizer):
    cfg = ArithmeticTaskConfig(n_ops=3, allow_negative=True)
    problems = generate_problems(500, 0, cfg)
    texts = [solution_text(p) for p in problems] + [p.problem for p in problems]
    for ids in char_tokenizer(texts, add_special_tokens=False).input_ids:
        assert char_tokenizer.unk_token_id not in ids


# --- sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("full", SLICE_AND_FULL, ids=["slice", "full"])
def test_gsm8k_train_file(full: bool):
    path = train_file("gsm8k_train.jsonl", full)
    rows, stats = load_rows({**GSM8K_SOURCE, "path": str(path), "solution_field": "answer"})
    n = 7473 if full else 40
    assert (len(rows), stats.n_read, stats.n_skipped_malformed) == (n, n, 0)
    assert rows[0].answer == "72" and rows[0].solution.endswith("#### 72")
    assert rows[0].problem.startswith("Natalia") and rows[0].problem_id == "gsm8k_train:0"
    assert len({r.problem_id for r in rows}) == n


@pytest.mark.parametrize("full", SLICE_AND_FULL, ids=["slice", "full"])
def test_math_train_file_skips_empty_answers(full: bool):
    path = train_file("math_train_rllm.jsonl", full)
    rows, stats = load_rows(SourceSpec(kind="file", path=str(path)))
    n = 7474 if full else 20  # the slice holds the 4 records without an answer
    assert (stats.n_read, stats.n_skipped_malformed, len(rows)) == (n, 4, n - 4)
    assert stats.reasons == {"missing_answer": 2, "empty_answer": 2}
    assert all(r.answer for r in rows)


DAPO_RECORDS = [
    {
        "prompt": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": f"What is {i}+{i}?"},
        ],
        "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
        "extra_info": {"index": f"id-{i}"},
    }
    for i in range(3)
]
DAPO_SOURCE = {
    "kind": "file",
    "problem_field": "prompt",
    "answer_field": "reward_model.ground_truth",
    "id_field": "extra_info.index",
}


def _write_jsonl(path: Path, lines: list) -> str:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_dotted_fields_and_message_lists(tmp_path, suffix):
    path = tmp_path / f"dapo.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(DAPO_RECORDS), path)
    else:
        _write_jsonl(path, DAPO_RECORDS)
    rows, stats = load_rows({**DAPO_SOURCE, "path": str(path)})
    assert stats.n_skipped_malformed == 0
    assert rows == [Row(f"id-{i}", f"What is {i}+{i}?", str(2 * i)) for i in range(3)]
    indexed, _ = load_rows({**DAPO_SOURCE, "path": str(path), "problem_field": "prompt.0.content"})
    assert indexed[0].problem == "be brief"


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    lines = [
        {"problem": "ok", "answer": "1"},
        "{not json",
        "",
        [1, 2],
        {"answer": "1"},
        {"problem": "  ", "answer": "1"},
        {"problem": 7, "answer": "1"},
        {"problem": "no answer"},
        {"problem": "null answer", "answer": None},
        {"problem": "blank answer", "answer": " "},
        {"problem": "list answer", "answer": ["1"]},
        {"problem": "float answer", "answer": 27.0},
        {"problem": [{"role": "assistant", "content": "no user turn"}], "answer": "1"},
    ]
    rows, stats = load_rows({"kind": "file", "path": _write_jsonl(tmp_path / "m.jsonl", lines)})
    assert [(r.problem, r.answer) for r in rows] == [("ok", "1"), ("float answer", "27")]
    assert stats.n_read == 12 and stats.n_skipped_malformed == 10
    assert stats.reasons == {
        "invalid_json": 1,
        "not_an_object": 1,
        "missing_problem": 2,
        "empty_problem": 1,
        "non_string_problem": 1,
        "missing_answer": 2,
        "empty_answer": 1,
        "non_string_answer": 1,
    }


def test_answer_transforms_and_limit(tmp_path):
    lines = [
        {"q": "a", "a": "so 2,125 in all\n#### 2,125"},
        {"q": "b", "a": "no marker"},
        {"q": "c", "a": "thus $\\boxed{\\frac{1}{2}}$."},
    ]
    path = _write_jsonl(tmp_path / "t.jsonl", lines)
    spec = {"kind": "file", "path": path, "problem_field": "q", "answer_field": "a"}
    rows, stats = load_rows({**spec, "answer_transform": "gsm8k"})
    assert [r.answer for r in rows] == ["2125"]
    assert stats.reasons == {"no_answer_after_gsm8k": 2}
    rows, _ = load_rows({**spec, "answer_transform": "last_boxed"})
    assert [r.answer for r in rows] == ["\\frac{1}{2}"]
    rows, stats = load_rows({**spec, "limit": 2})
    assert len(rows) == 2 and stats.n_read == 2


def test_missing_file_names_the_path_and_the_setting(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl.*data\.source\.path"):
        load_rows({"kind": "file", "path": str(missing)})


def test_hub_source_offline_error_and_success(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"BytedTsinghua-SIA/DAPO-Math-17k.*data\.source\.path"):
        load_rows({**DAPO_SOURCE, "kind": "hub", "hub_id": "BytedTsinghua-SIA/DAPO-Math-17k"})

    calls = []

    def fake(hub_id, config_name, split):
        calls.append((hub_id, config_name, split))
        return DAPO_RECORDS

    monkeypatch.setattr(datasets, "load_dataset", fake)
    spec = {**DAPO_SOURCE, "kind": "hub", "hub_id": "org/x", "config_name": "c", "split": "s"}
    rows, _ = load_rows(spec)
    assert calls == [("org/x", "c", "s")] and rows[1].answer == "2"


def test_source_spec_validation_and_synthetic_rows():
    with pytest.raises(ValueError, match="unknown data source keys"):
        load_rows({"kind": "file", "paht": "x.jsonl"})
    with pytest.raises(ValueError, match="data.path"):
        SourceSpec(kind="file")
    with pytest.raises(ValueError, match="answer_transform"):
        SourceSpec(answer_transform="boxed")
    spec = {"kind": "synthetic", "n": 20, "seed": 5, "task": {"n_ops": 1}}
    train, stats = load_rows(spec)
    evals, _ = load_rows({**spec, "split": "eval"})
    assert len(train) == stats.n_read == 20 and train[0].problem_id == "synthetic-train:0"
    assert all(r.solution.count("\n") == 1 and is_correct(r.solution, r.answer) for r in train)
    assert not {r.problem for r in train} & {r.problem for r in evals}


# --- prompts and collators -------------------------------------------------------------------


def test_format_prompt_uses_the_chat_template(char_tokenizer):
    assert format_prompt(char_tokenizer, "28*5-11", instruction="Solve.") == (
        "<|im_start|>user\n28*5-11\nSolve.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert format_prompt(char_tokenizer, "1+1", instruction="", system="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "1+1\nPlease reason step by step" in format_prompt(char_tokenizer, "1+1")


def test_format_prompt_without_a_template_warns_once(monkeypatch):
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    monkeypatch.setattr(prompts_module, "_warned_no_template", False)
    with pytest.warns(UserWarning, match="no chat template"):
        assert format_prompt(tokenizer, "1+1", instruction="Go.") == "1+1\nGo.\n"
    with prompts_module.warnings.catch_warnings():
        prompts_module.warnings.simplefilter("error")
        assert format_prompt(tokenizer, "2+2", instruction="") == "2+2\n"


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _rows(*problems: str) -> list[Row]:
    return [Row(f"p{i}", p, str(i), f"\\boxed{{{i}}}") for i, p in enumerate(problems)]


def test_prompt_collator_left_pads(char_tokenizer):
    rows = _rows("1+1", "12*3-4", "7")
    batch = PromptCollator(char_tokenizer, max_prompt_tokens=64, instruction="")(rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == 3
    for i, row in enumerate(rows):
        text = format_prompt(char_tokenizer, row.problem, instruction="")
        n = _n_tokens(char_tokenizer, text)
        assert mask[i].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert char_tokenizer.decode(ids[i, -n:]) == text
        assert (ids[i, : ids.shape[1] - n] == char_tokenizer.pad_token_id).all()
    assert batch["answers"] == ["0", "1", "2"] and batch["problem_ids"] == ["p0", "p1", "p2"]
    assert batch["problems"] == ["1+1", "12*3-4", "7"]
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        PromptCollator(char_tokenizer, max_prompt_tokens=10, instruction="")(rows)


def test_over_length_prompts_are_dropped_and_counted(char_tokenizer):
    rows = _rows("1", "1" * 10, "1" * 40)
    limit = _n_tokens(char_tokenizer, format_prompt(char_tokenizer, "1" * 10, instruction=""))
    kept, dropped = drop_too_long(rows, char_tokenizer, limit, instruction="")
    assert [r.problem_id for r in kept] == ["p0", "p1"] and dropped == 1
    kept, dropped = drop_too_long(rows, char_tokenizer, limit, "", max_length=limit + 1)
    assert [r.problem_id for r in kept] == ["p0"] and dropped == 2


def test_sft_labels_mask_the_prompt_and_end_with_eos(char_tokenizer):
    rows = [Row("a", "28*5-11", "129", "28*5=140\n140-11=129\n\\boxed{129}"), *_rows("1")]
    batch = SFTCollator(char_tokenizer, max_length=128, instruction="")(rows)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == labels.shape == mask.shape
    for i, row in enumerate(rows):
        n_prompt = _n_tokens(char_tokenizer, format_prompt(char_tokenizer, row.problem, ""))
        n_total = int(mask[i].sum())
        assert mask[i, :n_total].all() and not mask[i, n_total:].any()  # right padding
        assert (labels[i, :n_prompt] == -100).all() and (labels[i, n_total:] == -100).all()
        target = labels[i, n_prompt:n_total]
        assert (target == ids[i, n_prompt:n_total]).all()
        assert target[-1] == char_tokenizer.eos_token_id
        assert char_tokenizer.decode(target[:-1]) == row.solution
    with pytest.raises(ValueError, match="max_length"):
        SFTCollator(char_tokenizer, max_length=20, instruction="")(rows)


# --- data module -----------------------------------------------------------------------------


def _module(tokenizer, source, **kwargs) -> PromptDataModule:
    module = PromptDataModule(source, **kwargs)
    module.attach_tokenizer(tokenizer)
    module.setup("fit")
    return module


def test_datamodule_synthetic_prompts(char_tokenizer):
    source = {"kind": "synthetic", "n": 200, "seed": 0}
    module = _module(char_tokenizer, source, batch_size=16, max_prompt_tokens=128, val_size=32)
    stats = module.stats
    assert stats["n_rows"] == 200 and stats["n_dropped_too_long"] == 0
    assert stats["n_skipped_malformed"] == 0 and stats["val_n_rows"] == 32
    loader = module.train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 16 and len(batch["answers"]) == 16
    assert batch["attention_mask"][:, -1].all()  # left padded: every prompt ends at the right
    assert len(loader) == 200 // 16  # drop_last
    again = _module(char_tokenizer, source, batch_size=16, max_prompt_tokens=128, val_size=32)
    assert next(iter(again.train_dataloader()))["problem_ids"] == batch["problem_ids"]
    val_problems = {p for b in module.val_dataloader() for p in b["problems"]}
    assert len(val_problems) == 32
    assert not val_problems & {r.problem for r in module.train_rows}


def test_datamodule_synthetic_sft(char_tokenizer):
    module = _module(
        char_tokenizer,
        SourceSpec(kind="synthetic", n=64),
        mode="sft",
        batch_size=8,
        max_prompt_tokens=128,
        max_length=160,
        val_size=0,
    )
    batch = next(iter(module.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert (batch["labels"] != -100).any(dim=1).all()
    assert module.val_dataloader() == []


def test_datamodule_gsm8k_file(char_tokenizer):
    source = {**GSM8K_SOURCE, "limit": 30}  # of the 40 in the file
    module = _module(char_tokenizer, source, batch_size=8, max_prompt_tokens=350)
    stats = module.stats
    assert stats["n_read"] == 30 and stats["n_rows"] + stats["n_dropped_too_long"] == 30
    assert 0 < stats["n_dropped_too_long"] < 30 - 8
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 350
    assert all(re.fullmatch(r"-?[\d.]+", a) for a in batch["answers"])
    assert module.val_dataloader() == []
    with pytest.raises(ValueError, match=r"no rows left.*dropped 30 longer than"):
        _module(char_tokenizer, source, max_prompt_tokens=50)


def test_datamodule_misuse_is_reported(char_tokenizer, tmp_path):
    module = PromptDataModule({"kind": "synthetic", "n": 8})
    with pytest.raises(RuntimeError, match="attach_tokenizer"):
        module.setup()
    with pytest.raises(ValueError, match="mode"):
        PromptDataModule({"kind": "synthetic"}, mode="rl")
    path = _write_jsonl(tmp_path / "p.jsonl", [{"problem": "1+1", "answer": "2"}])
    with pytest.raises(ValueError, match="solution_field"):
        _module(char_tokenizer, {"kind": "file", "path": path}, mode="sft")
