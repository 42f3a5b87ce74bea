"""GRPO rewards (train/rewards.py): each built-in on handmade completions, user rewards from 'module:function',
weighted scores, and the one-line errors for every mistake in the list or in a reward's answer."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from lorakit.errors import ConfigError, LorakitError
from lorakit.infer import metrics
from lorakit.train.rewards import exact_match, load_rewards, overlong_penalty, score

ROWS = [{"answer": "Paris"}, {"answer": "Paris"}, {"answer": "Port of Spain"}, {"answer": 42}]
COMPLETIONS = [" paris ", "Paris is the capital.", "  Port   of\nSPAIN", "42"]
PROMPTS = ["Q"] * len(COMPLETIONS)


def values(spec, completions=COMPLETIONS, rows=ROWS) -> list[float]:
    ((name, weight, reward),) = load_rewards([spec])
    return reward(["Q"] * len(completions), completions, rows)


def test_exact_match_compares_the_whole_completion_trimmed_whitespace_collapsed_and_case_folded():
    assert values("exact_match") == [1.0, 0.0, 1.0, 1.0]  # a number answer compares as its text
    assert values({"name": "exact_match", "normalize": False}) == [0.0, 0.0, 0.0, 1.0]
    assert values({"name": "exact_match", "normalize": False}, [" Paris", "Paris", "x", "42"]) == [0, 1, 0, 1]
    # nothing is cut at a newline: a second line makes the completion differ
    assert values("exact_match", ["Paris\nQuestion: what?", "Paris", "", " 42 "]) == [0.0, 1.0, 0.0, 1.0]


def test_exact_match_is_the_evaluation_comparison():
    """One definition: `lorakit evaluate` scores with the same functions the reward uses."""
    assert metrics.exact_match is exact_match and metrics.normalize("  A\tB ") == "a b"


def test_contains_finds_the_normalised_answer_inside_the_completion():
    assert values("contains") == [1.0, 1.0, 1.0, 1.0]
    assert values("contains", ["Lyon", "It is PARIS", "Port of Spain.", "4 2"]) == [0.0, 1.0, 1.0, 0.0]
    assert values({"name": "contains", "normalize": False}, ["Lyon", "It is PARIS", "Port of Spain.", "142"]) \
        == [0.0, 0.0, 1.0, 1.0]


def test_field_names_the_row_field_holding_the_answer():
    rows = [{"completion": " Kabul"}, {"completion": " Asia"}]
    assert values({"name": "exact_match", "field": "completion"}, ["Kabul", "Europe"], rows) == [1.0, 0.0]


def test_regex_searches_the_raw_completion():
    spec = {"name": "regex", "pattern": r"^\s*[A-Z][a-z]+$"}
    assert values(spec, ["Paris", " Kabul", "paris", "Port of Spain"]) == [1.0, 1.0, 0.0, 0.0]
    assert values({"name": "regex", "pattern": r"(?i)spain"}) == [0.0, 0.0, 1.0, 0.0]


def test_length_penalty_is_zero_up_to_the_target_then_falls_linearly_to_minus_one_at_max_length():
    texts = ["a" * n for n in (0, 10, 11, 15, 20, 21, 100)]
    rows = [{}] * len(texts)
    assert values({"name": "length_penalty", "target_length": 10, "max_length": 20}, texts, rows) == \
        [0.0, 0.0, -0.1, -0.5, -1.0, -1.0, -1.0]
    assert values({"name": "length_penalty", "target_length": 10}, texts, rows) == [0, 0, -1, -1, -1, -1, -1]
    assert overlong_penalty(12, 10, 14) == -0.5


def test_a_user_reward_module_function_is_imported_and_called_with_prompts_completions_and_rows(tmp_path,
                                                                                              monkeypatch):
    (tmp_path / "my_rewards_ok.py").write_text(textwrap.dedent("""
        def score(prompts, completions, rows):
            return [len(c) + len(p) + row["bonus"] for p, c, row in zip(prompts, completions, rows)]

        class Holder:
            @staticmethod
            def half(prompts, completions, rows):
                return [0.5 for _ in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_rewards(["my_rewards_ok:score", {"name": "my_rewards_ok:Holder.half", "weight": -2},
                           {"name": "exact_match", "weight": 0.5}])
    assert [(name, weight) for name, weight, _ in loaded] == [("my_rewards_ok:score", 1.0),
                                                             ("my_rewards_ok:Holder.half", -2.0),
                                                             ("exact_match", 0.5)]
    rows = [{"answer": "ab", "bonus": 10}, {"answer": "x", "bonus": 0}]
    total, each = score(loaded, ["p", "pq"], ["ab", "xyz"], rows)
    assert each["my_rewards_ok:score"].tolist() == [13.0, 5.0]
    assert each["my_rewards_ok:Holder.half"].tolist() == [0.5, 0.5]
    assert each["exact_match"].tolist() == [1.0, 0.0]
    assert total.dtype == torch.float32 and total.tolist() == [13.0 - 1.0 + 0.5, 5.0 - 1.0]


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_cwd.py").write_text("def one(prompts, completions, rows):\n    return [1] * len(rows)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    ((_, _, reward),) = load_rewards(["my_rewards_cwd:one"])
    assert reward(["a"], ["b"], [{}]) == [1]
    assert str(tmp_path) not in sys.path  # the directory was on sys.path for the import only


def test_repeated_names_are_made_unique():
    loaded = load_rewards([{"name": "regex", "pattern": "a"}, {"name": "regex", "pattern": "b"}, "contains"])
    assert [name for name, _, _ in loaded] == ["regex", "regex_2", "contains"]


# ----------------------------------------------------------------------------- errors in the list


@pytest.fixture
def bad_modules(tmp_path, monkeypatch):
    (tmp_path / "rw_broken.py").write_text("import not_a_module_anywhere_xyz\n")
    (tmp_path / "rw_raises.py").write_text("raise RuntimeError('no config file')\n")
    (tmp_path / "rw_funcs.py").write_text(textwrap.dedent("""
        LIMIT = 3

        def two_args(prompts, completions):
            return [0.0] * len(completions)

        def flaky(prompts, completions, rows):
            return [1.0 / (len(c) - 3) for c in completions]

        def none_for_b(prompts, completions, rows):
            return [None if c == "b" else 1.0 for c in completions]

        def text(prompts, completions, rows):
            return ["abc" if i == 2 else 0.5 for i, _ in enumerate(completions)]

        def nan_at_1(prompts, completions, rows):
            return [float("nan") if i == 1 else 0.0 for i, _ in enumerate(completions)]

        def one_short(prompts, completions, rows):
            return [0.0] * (len(completions) - 1)

        def scalar(prompts, completions, rows):
            return 1.0

        def batch_only(prompts, completions, rows):
            if len(completions) > 1:
                raise MemoryError("batch too big")
            return [0.0]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("specs, message", [
    (["exact"], "train.rewards[0]: unknown reward 'exact'; built-ins: contains, exact_match, length_penalty, regex, "
                "or 'module:function' for your own"),
    (["contains", "no_such_module_xyz:f"], "train.rewards[1]: reward 'no_such_module_xyz:f': no module named "
                                           "'no_such_module_xyz' (looked in the current directory and on sys.path)"),
    (["rw_broken:f"], "train.rewards[0]: reward 'rw_broken:f': module 'rw_broken' fails to import: "
                      "ModuleNotFoundError: No module named 'not_a_module_anywhere_xyz'"),
    (["rw_raises:f"], "train.rewards[0]: reward 'rw_raises:f': module 'rw_raises' fails to import: "
                      "RuntimeError: no config file"),
    (["rw_funcs:missing"], "train.rewards[0]: reward 'rw_funcs:missing': module 'rw_funcs' has no 'missing'"),
    (["rw_funcs:LIMIT"], "train.rewards[0]: reward 'rw_funcs:LIMIT': 'LIMIT' is not callable: 3"),
    (["rw_funcs:two_args"], "train.rewards[0]: reward 'rw_funcs:two_args' takes (prompts, completions), but a "
                            "reward is called as two_args(prompts, completions, rows)"),
    (["rw_funcs:"], "train.rewards[0]: 'rw_funcs:' is not 'module:function'"),
    ([{"name": "regex", "pattern": "(unclosed"}], "train.rewards[0]: reward 'regex': pattern '(unclosed' does not "
                                                  "compile: missing ), unterminated subpattern at position 0"),
    (["regex"], "train.rewards[0]: reward 'regex' needs 'pattern' (write it as {name: regex, pattern: ...})"),
    ([{"name": "contains", "patern": "x"}], "train.rewards[0]: reward 'contains' has no option 'patern'; its keys: "
                                            "name, weight, field, normalize"),
    ([{"name": "length_penalty", "target_length": 10, "max_length": 5}],
     "train.rewards[0]: reward 'length_penalty': max_length 5 is below target_length 10"),
    ([{"name": "length_penalty", "target_length": "10"}],
     "train.rewards[0]: reward 'length_penalty' option 'target_length' must be of type int, not '10'"),
    ([{"name": "exact_match", "weight": "high"}], "train.rewards[0]: weight must be a finite number, not 'high'"),
    ([{"weight": 1}], "train.rewards[0]: a reward mapping needs 'name' (a built-in or 'module:function'), "
                      "got {'weight': 1}"),
    ([{"name": "rw_funcs:flaky", "field": "x"}], "train.rewards[0]: reward 'rw_funcs:flaky' takes no options "
                                                 "(only 'name' and 'weight'), got 'field'"),
    ([3], "train.rewards[0]: a reward is a name, 'module:function' or a mapping with 'name', not 3"),
    ([], "train.rewards is empty: name at least one reward (built-ins: contains, exact_match, length_penalty, "
         "regex, or 'module:function')"),
])
def test_a_mistake_in_the_reward_list_is_a_config_error_naming_the_entry(bad_modules, specs, message):
    with pytest.raises(ConfigError) as error:
        load_rewards(specs)
    assert str(error.value) == message


# ----------------------------------------------------------------------------- errors while scoring


@pytest.mark.parametrize("spec, completions, message", [
    ("rw_funcs:flaky", ["aaaa", "bbbbb", "ccc", "d"],
     "reward rw_funcs:flaky raised ZeroDivisionError on completion 2: float division by zero"),
    ("rw_funcs:batch_only", ["a", "b"], "reward rw_funcs:batch_only raised MemoryError on a batch of 2 completions "
                                        "(each alone scores without error): batch too big"),
    ("rw_funcs:none_for_b", ["a", "b", "c"], "reward rw_funcs:none_for_b returned None for completion 1: rewards "
                                             "must be numbers"),
    ("rw_funcs:text", ["a", "b", "c"], "reward rw_funcs:text returned 'abc' for completion 2: rewards must be "
                                       "numbers"),
    ("rw_funcs:nan_at_1", ["a", "b"], "reward rw_funcs:nan_at_1 returned nan for completion 1: rewards must be "
                                      "finite numbers"),
    ("rw_funcs:one_short", ["a", "b", "c"], "reward rw_funcs:one_short returned 2 values for 3 completions: a "
                                            "reward returns one number per completion"),
    ("rw_funcs:scalar", ["a", "b"], "reward rw_funcs:scalar returned 1.0: a reward returns a list of 2 numbers, "
                                    "one per completion"),
    ("exact_match", ["a", "b"], "reward exact_match: the row of completion 1 has no field 'answer', which holds "
                                "the answer this reward compares with (a string or number; the reward's 'field' "
                                "option names another field)"),
])
def test_a_failing_reward_is_an_error_naming_the_function_and_the_completion(bad_modules, spec, completions,
                                                                            message):
    rows = [{"answer": "a"}, {"question": "?"}, {"answer": "c"}, {"answer": "d"}][:len(completions)]
    loaded = load_rewards([spec])
    with pytest.raises(LorakitError) as error:
        score(loaded, ["p"] * len(completions), completions, rows)
    assert str(error.value) == message


def test_rewards_may_be_bools_numpy_numbers_or_a_tensor(tmp_path, monkeypatch):
    pytest.importorskip("numpy")
    (tmp_path / "rw_kinds.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch

        def kinds(prompts, completions, rows):
            return [True, np.float32(0.25), torch.tensor(2.0), 3][:len(completions)]

        def as_tensor(prompts, completions, rows):
            return torch.arange(len(completions), dtype=torch.float64)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    total, each = score(load_rewards(["rw_kinds:kinds", "rw_kinds:as_tensor"]), PROMPTS, COMPLETIONS, ROWS)
    assert each["rw_kinds:kinds"].tolist() == [1.0, 0.25, 2.0, 3.0]
    assert total.tolist() == [1.0, 1.25, 4.0, 6.0]
