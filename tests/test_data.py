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
    exact_integer_match,
    format_prompt,
    load_rows,
    make_problem,
    solution_text,
)
from kat_research.data import prompts as prompts_module
from kat_research.data.synthetic import is_heldout, problems_for_split
from kat_research.models import build_char_tokenizer
from kat_research.text import last_boxed

GSM8K_TRAIN = FIXTURE_DATA / "train" / "gsm8k_train.jsonl"  # the first 40 of 7473 records
GSM8K_SOURCE = {
    "kind": "file",
    "path": str(GSM8K_TRAIN),
    "problem_field": "question",
    "answer_transform": "gsm8k",
}
# the vendored slice, and the full file (slow: needs KAT_DATA_DIR or <repo>/data)
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
    for p in problems_for_split("train", 1000, seed=0, cfg=cfg):
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
    problems = problems_for_split("train", 2000, seed=1, cfg=ArithmeticTaskConfig())
    answers = [int(p.answer) for p in problems]
    assert 0 <= min(answers) and max(answers) <= 9999
    assert max(len(solution_text(p)) for p in problems) <= 40
    assert {op for p in problems for op in "+-*" if op in p.problem} == set("+-*")
    signed = problems_for_split(
        "train", 2000, 1, ArithmeticTaskConfig(n_ops=3, allow_negative=True)
    )
    values = [int(STEP.fullmatch(s).group(4)) for p in signed for s in p.steps]
    assert min(values) < 0 and max(abs(v) for v in values) <= 9999


def test_generation_is_deterministic_per_seed():
    cfg = ArithmeticTaskConfig()
    assert problems_for_split("train", 50, 3, cfg) == problems_for_split("train", 50, 3, cfg)
    assert problems_for_split("train", 50, 3, cfg) != problems_for_split("train", 50, 4, cfg)
    assert make_problem(random.Random(7), cfg) == make_problem(random.Random(7), cfg)


def test_train_and_eval_splits_are_disjoint():
    cfg = ArithmeticTaskConfig()
    train = problems_for_split("train", 3000, seed=0, cfg=cfg)
    evals = problems_for_split("eval", 300, seed=0, cfg=cfg)
    eval_strings = {p.problem for p in evals}
    assert len(train) == 3000 and len(eval_strings) == 300  # eval problems are distinct
    assert not eval_strings & {p.problem for p in train}
    assert all(is_heldout(s, cfg) for s in eval_strings)
    other_seed_train = problems_for_split("train", 3000, seed=1, cfg=cfg)
    assert not eval_strings & {p.problem for p in other_seed_train}


def test_bad_task_settings_are_rejected():
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTaskConfig(operators="+/")
    with pytest.raises(ValueError, match="split"):
        problems_for_split("test", 1, 0, ArithmeticTaskConfig())


# Hand-graded completions against the gold 129 (the answer is the content of the last box).
GRADED_COMPLETIONS = [
    ("28*5=140\n140-11=129\n\\boxed{129}", True),
    ("\\boxed{ 129 }", True),  # whitespace inside the box is stripped
    ("\\boxed{129.}", True),  # one trailing period is stripped
    ("\\boxed 129", True),
    ("\\boxed{12}\n\\boxed{129}", True),  # several boxes: the last one counts
    ("\\boxed{129}\n\\boxed{12}", False),
    ("\\boxed{129} then \\boxed{12", True),  # an unclosed last box is ignored
    ("\\boxed{128}", False),
    ("\\boxed{+129}", False),
    ("\\boxed{0129}", False),
    ("\\boxed{129.0}", False),
    ("\\boxed{1 29}", False),
    ("\\boxed{1_29}", False),  # int() would read 129
    ("\\boxed{\u0661\u0662\u0669}", False),  # Arabic-Indic digits; int() would read 129
    ("\\boxed{1.29e2}", False),
    ("\\boxed{12a}", False),
    ("\\boxed{}", False),
    ("#### 129", False),  # only a box counts
    ("129", False),
    ("\\boxed{129", False),
    ("<unk>}}{{\\\\boxed", False),
    ("", False),
]


@pytest.mark.parametrize(("completion", "expected"), GRADED_COMPLETIONS)
def test_exact_integer_match(completion, expected):
    assert exact_integer_match(last_boxed(completion), "129") is expected


def test_exact_integer_match_negatives_zero_and_bad_golds():
    assert exact_integer_match("-12", "-12")
    assert not exact_integer_match("12", "-12")
    assert not exact_integer_match("-12", "12")
    assert exact_integer_match("0", "0")
    assert not exact_integer_match("-0", "0")
    assert not exact_integer_match(None, "0")
    for gold in ("+7", "07", "7.0", " 7", "", "-0"):
        with pytest.raises(ValueError, match="not an integer"):
            exact_integer_match("7", gold)


def test_char_tokenizer_covers_the_synthetic_task(char_tokenizer):
    cfg = ArithmeticTaskConfig(n_ops=3, allow_negative=True)
    problems = problems_for_split("train", 500, 0, cfg)
    texts = [solution_text(p) for p in problems] + [p.problem for p in problems]
    for ids in char_tokenizer(texts, add_special_tokens=False).input_ids:
        assert char_tokenizer.unk_token_id not in ids


# --- sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("full", SLICE_AND_FULL, ids=["slice", "full"])
def test_gsm8k_train_file(full: bool):
    path = train_file("gsm8k_train.jsonl", full)
    rows, stats = load_rows({**GSM8K_SOURCE, "path": str(path), "solution_field": "answer"})
    n = 7473 if full else 40
    assert (len(rows), stats.n_read, stats.n_skipped) == (n, n, 0)
    assert rows[0].answer == "72" and rows[0].solution.endswith("#### 72")
    assert rows[0].problem.startswith("Natalia") and rows[0].problem_id == "gsm8k_train:0"
    assert len({r.problem_id for r in rows}) == n


@pytest.mark.parametrize("full", SLICE_AND_FULL, ids=["slice", "full"])
def test_math_train_file_skips_empty_answers(full: bool):
    path = train_file("math_train_rllm.jsonl", full)
    rows, stats = load_rows(SourceSpec(kind="file", path=str(path)))
    n = 7474 if full else 20  # the slice holds the 4 records without an answer
    assert (stats.n_read, stats.n_skipped, len(rows)) == (n, 4, n - 4)
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
    assert stats.n_skipped == 0
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
    assert stats.n_read == 12 and stats.n_skipped == 10
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


def test_non_utf8_line_is_skipped_and_counted_with_its_place(tmp_path):
    good = json.dumps({"problem": "p" * 2000, "answer": "1"}).encode()
    bad = json.dumps({"problem": "p" * 2000 + "X", "answer": "2"}).encode().replace(b"X", b"\xff")
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b"\n".join([good, bad, b"", good.replace(b'"1"', b'"3"')]) + b"\n")
    rows, stats = load_rows({"kind": "file", "path": str(path)})
    assert [r.answer for r in rows] == ["1", "3"]
    assert [r.problem_id for r in rows] == ["bytes:0", "bytes:2"]  # line 2 keeps its index
    assert (stats.n_read, stats.n_skipped, stats.reasons) == (3, 1, {"invalid_utf8": 1})
    # the bad byte is the 2014th character of line 2: '{"problem": "' is 13 characters
    assert str(stats) == (
        f"skipped 1 of 3 records of {path}: "
        "invalid_utf8 1 (line 2: byte 0xff at column 2014 is not UTF-8)"
    )


def test_non_utf8_json_array_element_is_skipped(tmp_path):
    path = tmp_path / "array.json"
    records = [{"problem": "a", "answer": "1"}, {"problem": "bX", "answer": "2"}]
    path.write_bytes(json.dumps(records).encode().replace(b"X", b"\xe9"))
    rows, stats = load_rows({"kind": "file", "path": str(path)})
    assert [r.problem for r in rows] == ["a"]
    assert stats.reasons == {"invalid_utf8": 1} and "row 2" in str(stats)
    path.write_text("[{]")
    with pytest.raises(ValueError, match=r"array\.json is not valid JSON \(line 1, column 3"):
        load_rows({"kind": "file", "path": str(path)})


def test_non_utf8_parquet_value_is_skipped(tmp_path):
    path = tmp_path / "bytes.parquet"
    problems = pa.array([b"ok", b"caf\xe9", b"fine"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"problem": problems, "answer": ["1", "2", "3"]}), path)
    rows, stats = load_rows({"kind": "file", "path": str(path)})
    assert [r.problem for r in rows] == ["ok", "fine"]
    assert str(stats).endswith(
        "invalid_utf8 1 (row 2: in a string value, byte 0xe9 at column 4 is not UTF-8)"
    )


def test_wrong_columns_name_the_field_asked_for_and_those_found(tmp_path, char_tokenizer):
    path = tmp_path / "columns.parquet"
    table = {"question": [f"q{i}" for i in range(16)], "solution": ["s"] * 16}
    pq.write_table(pa.Table.from_pydict(table), path)
    rows, stats = load_rows({"kind": "file", "path": str(path), "answer_field": None})
    assert rows == [] and stats.reasons == {"missing_problem": 16}
    expected = (
        f"skipped 16 of 16 records of {path}: missing_problem 16 (row 1, row 2, row 3, ...; "
        "asked for data.source.problem_field='problem'; those records have fields: question, "
        "solution)"
    )
    assert str(stats) == expected
    with pytest.raises(ValueError, match=re.escape(f"no rows left for train: {expected}")):
        _module(char_tokenizer, {"kind": "file", "path": str(path), "answer_field": None})
    rows, stats = load_rows({"kind": "file", "path": str(path), "problem_field": "question"})
    assert "asked for data.source.answer_field='answer'" in str(stats)


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
    with pytest.raises(ValueError, match=r"data\.source\.path"):
        SourceSpec(kind="file")
    with pytest.raises(ValueError, match=r"data\.source\.dedup=false"):
        SourceSpec(kind="synthetic", dedup=True)
    with pytest.raises(ValueError, match="answer_transform"):
        SourceSpec(answer_transform="boxed")
    spec = {"kind": "synthetic", "n": 20, "seed": 5, "task": {"n_ops": 1}}
    train, stats = load_rows(spec)
    evals, _ = load_rows({**spec, "split": "eval"})
    assert len(train) == stats.n_read == 20 and train[0].problem_id == "synthetic-train:0"
    assert all(
        r.solution.count("\n") == 1 and exact_integer_match(last_boxed(r.solution), r.answer)
        for r in train
    )
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
    assert stats["n_skipped"] == 0 and stats["val_n_rows"] == 32
    loader = module.train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 16 and len(batch["answers"]) == 16
    assert batch["attention_mask"][:, -1].all()  # left padded: every prompt ends at the right
    assert len(loader) == 200 // 16  # drop_last
    again = _module(char_tokenizer, source, batch_size=16, max_prompt_tokens=128, val_size=32)
    assert next(iter(again.train_dataloader()))["problem_ids"] == batch["problem_ids"]
    val_problems = {r.problem for r in module.val_rows}
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
    assert module.val_rows == []


def test_datamodule_gsm8k_file(char_tokenizer):
    source = {**GSM8K_SOURCE, "limit": 30}  # of the 40 in the file
    module = _module(char_tokenizer, source, batch_size=8, max_prompt_tokens=350)
    stats = module.stats
    assert stats["n_read"] == 30 and stats["n_rows"] + stats["n_dropped_too_long"] == 30
    assert 0 < stats["n_dropped_too_long"] < 30 - 8
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 350
    assert all(re.fullmatch(r"-?[\d.]+", a) for a in batch["answers"])
    assert module.val_rows == []
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


def test_datamodule_logs_one_line_per_source_with_what_was_skipped(
    char_tokenizer, tmp_path, caplog
):
    path = tmp_path / "mixed.jsonl"
    lines = [{"problem": "1+1", "answer": "2"}, {"problem": "1" * 600, "answer": "1"}]
    _write_jsonl(path, lines)
    with path.open("ab") as file:
        file.write(b'{"problem": "\xff"}\n')
    with caplog.at_level("INFO", logger="kat_research.data.datamodule"):
        _module(char_tokenizer, {"kind": "file", "path": str(path)}, instruction="")
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        f"train data: 3 rows read, 1 kept (1 unique prompts); skipped 1 of 3 records of {path}: "
        "invalid_utf8 1 (line 3: byte 0xff at column 14 is not UTF-8); dropped 1 longer than "
        "max_prompt_tokens=512"
    )
    caplog.clear()
    with caplog.at_level("INFO", logger="kat_research.data.datamodule"):
        _module(char_tokenizer, {"kind": "synthetic", "n": 8}, val_size=0)
    (record,) = caplog.records
    assert record.levelname == "INFO" and record.getMessage().startswith("train data: 8 rows")


# --- de-duplication, on a local copy in DAPO-Math-17k's exact format --------------------------

DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
    '\n\n{}\n\nRemember to put your answer on its own line after "Answer:".'
)
DAPO_PROBLEMS = [("What is $2+3$?", "5"), ("Find $x$ if $2x=8$.", "4"), ("Compute $7^2$.", "49")]


def _dapo_record(problem: str, answer: str, index: str) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_INSTRUCTION.format(problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


@pytest.fixture
def dapo_parquet(tmp_path) -> Path:
    """3 unique prompts x 100 copies (as the hub copy repeats its 17,917), then one prompt
    repeated with a different answer: 301 rows, 4 distinct (problem, answer) pairs."""
    uniques = [_dapo_record(p, a, f"uuid-{i}") for i, (p, a) in enumerate(DAPO_PROBLEMS)]
    near = _dapo_record(DAPO_PROBLEMS[0][0], "6", "uuid-3")
    path = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(uniques * 100 + [near]), path)
    return path


def test_dedup_keeps_the_first_of_each_problem_and_answer(dapo_parquet):
    spec = {
        "kind": "file",
        "path": str(dapo_parquet),
        "problem_field": "prompt",
        "answer_field": "reward_model.ground_truth",
    }
    rows, stats = load_rows({**spec, "dedup": True})
    expected = [*DAPO_PROBLEMS, (DAPO_PROBLEMS[0][0], "6")]
    assert [(r.problem, r.answer) for r in rows] == [
        (DAPO_INSTRUCTION.format(p), a) for p, a in expected
    ]
    name = "dapo-math-17k"
    assert [r.problem_id for r in rows] == [f"{name}:0", f"{name}:1", f"{name}:2", f"{name}:300"]
    assert (stats.n_read, stats.n_skipped, stats.reasons) == (301, 297, {"duplicate": 297})
    assert "duplicate 297 (row 4, row 5, row 6, ...)" in str(stats)
    all_rows, stats = load_rows(spec)
    assert len(all_rows) == 301 and stats.n_skipped == 0
    capped, stats = load_rows({**spec, "dedup": True, "limit": 2})
    assert len(capped) == 2 and stats.n_read == 2  # limit counts rows kept


def test_dapo_preset_deduplicates_and_reports_unique_prompts(dapo_parquet, char_tokenizer, caplog):
    from hydra.utils import instantiate

    from kat_research.config import compose

    local = ["data=dapo_math", "data.source.kind=file", f"+data.source.path={dapo_parquet}"]
    cfg = compose(local)
    assert cfg.data.source.dedup is True
    module = instantiate(cfg.data)
    module.attach_tokenizer(char_tokenizer)
    with caplog.at_level("INFO", logger="kat_research.data.datamodule"):
        module.setup("fit")
    assert module.stats == {
        "n_read": 301,
        "n_skipped": 297,
        "n_skipped_duplicate": 297,
        "n_dropped_too_long": 0,
        "n_rows": 4,
        "n_unique_prompts": 4,
    }
    (record,) = caplog.records
    assert record.levelname == "INFO"
    assert record.getMessage().startswith("train data: 301 rows read, 4 kept (4 unique prompts)")
    module = instantiate(compose([*local, "data.source.dedup=false"]).data)
    module.attach_tokenizer(char_tokenizer)
    with caplog.at_level("INFO", logger="kat_research.data.datamodule"):
        module.setup("fit")
    assert (module.stats["n_rows"], module.stats["n_unique_prompts"]) == (301, 4)
    assert caplog.records[-1].levelname == "WARNING"
    assert "repeated prompts kept (set data.source.dedup=true" in caplog.records[-1].getMessage()
