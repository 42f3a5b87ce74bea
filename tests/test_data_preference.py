"""Preference rows: formats, implicit prompts, column maps, row errors, pair truncation, pair batches, preview."""
from __future__ import annotations

import json

import pytest
import torch
from _tiny import CHATML, tiny_sp_tokenizer, tiny_tokenizer
from _tol import TINY, tol
from conftest import tiny_bloom, tiny_gpt2, tiny_llama

from lorakit.data import DataConfig, load_rows, tokenize_rows
from lorakit.data.batching import epoch_order, shift_labels
from lorakit.data.formats import FORMATS, detect_format
from lorakit.data.packing import packed_forward
from lorakit.data.preference import (make_pair_batches, preview_pair, prompt_format_name, tokenize_preference_rows,
                                     truncate_pair)
from lorakit.data.prompting import PromptFormat
from lorakit.data.shared_prompt import (collate_shared_prompt, make_shared_prompt_batches, shared_prompt_note,
                                        shared_prompt_problem)
from lorakit.errors import ConfigError, DataError

IGNORE = -100
PROMPT = "Question: what is two plus two?"
TEXT_ROW = {"prompt": PROMPT, "chosen": " four.", "rejected": " five hundred."}
CHAT_PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
               {"role": "assistant", "content": "Hello world."}, {"role": "user", "content": "What is two plus two?"}]
CHAT_ROW = {"prompt": CHAT_PROMPT, "chosen": [{"role": "assistant", "content": "four."}],
            "rejected": [{"role": "assistant", "content": "five."}]}


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def pairs_of(rows, tok=None, **cfg):
    return tokenize_preference_rows(rows, tok or tiny_tokenizer(), DataConfig(**cfg))


def test_text_rows_share_the_prompt_ids_and_train_each_answer_and_its_eos():
    tok = tiny_tokenizer()
    [pair], stats = pairs_of([TEXT_ROW])
    prompt = [tok.bos_token_id, *encode(tok, PROMPT)]
    for side, answer in (("chosen", " four."), ("rejected", " five hundred.")):
        ids = encode(tok, answer) + [tok.eos_token_id]
        assert pair[side]["input_ids"] == prompt + ids
        assert pair[side]["labels"] == [IGNORE] * len(prompt) + ids
    assert pair["prompt_length"] == len(prompt)
    chosen_trained = len(encode(tok, " four.")) + 1
    rejected_trained = len(encode(tok, " five hundred.")) + 1
    assert (stats.n_rows, stats.n_examples, stats.n_trained_tokens) == (1, 1, chosen_trained + rejected_trained)
    assert stats.n_tokens == 2 * len(prompt) + chosen_trained + rejected_trained


def test_text_prompt_goes_through_the_prompt_template_as_for_sft_rows():
    tok = tiny_tokenizer()
    [pair], _ = pairs_of([TEXT_ROW], prompt_template="{prompt}\n")
    [sft], _ = tokenize_rows([{"prompt": PROMPT, "completion": " four."}], tok, DataConfig(prompt_template="{prompt}\n"))
    assert pair["chosen"] == sft


def test_sentencepiece_style_tokenizers_get_each_answer_encoded_as_the_sft_rows_answer():
    tok = tiny_sp_tokenizer()
    [pair], _ = pairs_of([TEXT_ROW], tok)
    sft, _ = tokenize_rows([{"prompt": PROMPT, "completion": answer} for answer in (" four.", " five hundred.")], tok,
                           DataConfig())
    assert [pair["chosen"], pair["rejected"]] == sft


def test_chat_rows_train_only_the_answer_turn_and_prompt_ids_are_what_inference_prompts_with():
    tok = tiny_tokenizer(CHATML)
    [pair], _ = pairs_of([CHAT_ROW], tok)
    prompt_text = tok.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
    assert tok.decode(pair["chosen"]["input_ids"][:pair["prompt_length"]]) == prompt_text
    assert pair["chosen"]["labels"][:pair["prompt_length"]] == [IGNORE] * pair["prompt_length"]  # earlier turn too
    for side, answer in (("chosen", "four."), ("rejected", "five.")):
        ids, labels = pair[side]["input_ids"], pair[side]["labels"]
        answer_ids = encode(tok, answer + "<|im_end|>")
        assert ids[pair["prompt_length"]:] == answer_ids + encode(tok, "\n")
        assert labels[pair["prompt_length"]:] == answer_ids + [IGNORE] * len(encode(tok, "\n"))
    assert pair["chosen"]["input_ids"][:pair["prompt_length"]] == PromptFormat("chat").messages_ids(tok, CHAT_PROMPT)


def test_chat_strings_are_one_user_prompt_and_one_assistant_answer():
    tok = tiny_tokenizer(CHATML)
    messages = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
                "rejected": [{"role": "assistant", "content": "Bye"}]}
    mixed = [{"prompt": "Hi", "chosen": messages["chosen"], "rejected": "Bye"},
             {"prompt": messages["prompt"], "chosen": "Hello", "rejected": messages["rejected"]}]
    expected, _ = pairs_of([messages], tok)
    assert pairs_of(mixed, tok)[0] == expected * 2


def test_chat_without_a_template_uses_the_builtin_one_with_bos_and_the_system_prompt():
    tok = tiny_tokenizer()
    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "Bye"}
    [pair], _ = pairs_of([row], tok, system_prompt="Be kind.")
    assert preview_pair(pair, tok) == (
        f"prompt (shared, {pair['prompt_length']} tokens): <s><|system|>\nBe kind.\n<|user|>\nHi\n<|assistant|>\n\n"
        f"chosen ({len(encode(tok, 'Hello')) + 1} tokens trained): [[Hello</s>]]\n\n"
        f"rejected ({len(encode(tok, 'Bye')) + 1} tokens trained): [[Bye</s>]]\n")


def test_implicit_prompt_conversations_split_at_their_longest_common_prefix():
    tok = tiny_tokenizer(CHATML)
    implicit = {"chosen": CHAT_PROMPT + CHAT_ROW["chosen"], "rejected": CHAT_PROMPT + CHAT_ROW["rejected"]}
    assert pairs_of([implicit], tok)[0] == pairs_of([CHAT_ROW], tok)[0]
    sharegpt = {side: [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]),
                        "value": m["content"]} for m in implicit[side]] for side in implicit}
    assert pairs_of([sharegpt], tok)[0] == pairs_of([CHAT_ROW], tok)[0]


def test_implicit_prompt_texts_split_at_the_start_of_the_word_where_they_differ():
    row = {"chosen": "Question: what is two? Answer: four.", "rejected": "Question: what is two? Answer: fox."}
    explicit = {"prompt": "Question: what is two? Answer:", "chosen": " four.", "rejected": " fox."}
    assert pairs_of([row])[0] == pairs_of([explicit])[0]
    longer = {"chosen": "Answer: four", "rejected": "Answer: four and more"}  # one goes on after the other
    assert pairs_of([longer])[0] == pairs_of([{"prompt": "Answer:", "chosen": " four",
                                               "rejected": " four and more"}])[0]


def test_column_maps_apply_to_preference_rows_and_auto_detects_them():
    rows = [{"question": PROMPT, "good": " four.", "bad": " five hundred.", "id": 7}]
    mapped = pairs_of(rows, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert mapped[0] == pairs_of([TEXT_ROW])[0]
    assert detect_format(["prompt", "chosen", "rejected"], pairs=True).name == "preference"
    assert detect_format(["chosen", "rejected", "score"], pairs=True).name == "preference"
    # rows with an SFT conversation beside the pair (as some preference sets have) suit either objective
    assert detect_format(["messages", "prompt", "chosen", "rejected"]).name == "chat"
    assert detect_format(["messages", "prompt", "chosen", "rejected"], pairs=True).name == "preference"
    assert FORMATS["preference"].pairs and not FORMATS["chat"].pairs


def test_rows_of_the_other_objective_are_one_clear_line():
    tok = tiny_tokenizer()
    with pytest.raises(DataError) as error:
        tokenize_rows([TEXT_ROW], tok, DataConfig())
    assert str(error.value) == (
        "the rows are preference rows (prompt+chosen+rejected or chosen+rejected), which train.objective dpo, ipo, "
        "simpo or orpo trains on, not sft: set train.objective, or give SFT rows (e.g. prompt+completion, messages)")
    with pytest.raises(DataError) as again:  # data.format set explicitly: the error names the setting
        tokenize_rows([TEXT_ROW], tok, DataConfig(format="preference"))
    assert str(again.value) == (
        "data.format is preference, but train.objective sft trains on SFT rows: set data.format to an SFT format "
        "such as prompt_completion or messages (or auto), or train.objective to dpo, ipo, simpo or orpo")
    with pytest.raises(DataError) as error:
        pairs_of([{"prompt": "p", "completion": "c"}])
    assert str(error.value) == (
        "train.objective dpo, ipo, simpo or orpo trains on preference rows (prompt+chosen+rejected, or "
        "chosen+rejected sharing their prompt; map other column names with data.columns), not "
        "prompt_completion rows, which train.objective sft trains on")
    with pytest.raises(DataError) as error:
        pairs_of([{"prompt": "p", "completion": "c"}], format="prompt_completion")
    assert str(error.value) == (
        "data.format is prompt_completion, but train.objective dpo, ipo, simpo or orpo trains on preference rows: "
        "set data.format to preference (or auto), or train.objective to sft")
    with pytest.raises(DataError, match=r"cannot detect the row format from columns \(answer, prompt\); expected one "
                                        r"of: prompt\+chosen\+rejected or chosen\+rejected \(preference\)"):
        pairs_of([{"prompt": "p", "answer": "a"}])


BAD_ROWS = [
    ({"prompt": "p", "rejected": "r"}, "row 2: field 'chosen' is missing (columns: prompt, rejected)"),
    ({"prompt": "p", "chosen": "c", "rejected": "  "}, "row 2: field 'rejected' is empty"),
    ({"prompt": "p", "chosen": [], "rejected": "r"}, "row 2: field 'chosen' is an empty list"),
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "row 2: field 'chosen' must be a string or a list of messages, "
                                                    "got int 5"),
    ({"prompt": [{"role": "usr", "content": "hi"}], "chosen": "c", "rejected": "r"},
     "row 2: prompt[0] has unknown role 'usr' (known: system, user, assistant, and the aliases human, gpt, bot, "
     "developer)"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
     "row 2: chosen[0] is a user message; chosen holds the answer: assistant messages only (the conversation "
     "before it goes in 'prompt')"),
    ({"chosen": "Paris", "rejected": "Lyon"},
     "row 2: fields 'chosen' and 'rejected' share no prefix to take as the prompt (no 'prompt' column: the prompt "
     "is the text both begin with); add a 'prompt' column"),
    ({"chosen": "A: x", "rejected": "A: x"},
     "row 2: fields 'chosen' and 'rejected' are the same text: no prompt to split off, nothing to prefer"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "x"}]},
     "row 2: fields 'chosen' and 'rejected' share no prefix: with no 'prompt' column the prompt is the messages "
     "both conversations begin with, and their first messages differ"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"},
                 {"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "z"},
                   {"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
     "row 2: fields 'chosen' and 'rejected' differ before the last assistant turn: after their 1 shared messages, "
     "chosen[2] is a user message (only the final assistant answer may differ)"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "a"}]},
     "row 2: field 'rejected' has no answer after the prompt it shares with the other side (it ends where the "
     "other goes on)"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_bad_row_error_names_the_row_and_field(row, message):
    tok = tiny_tokenizer(CHATML)
    with pytest.raises(DataError) as error:
        pairs_of([TEXT_ROW, row], tok, format="preference")
    assert str(error.value) == message


def test_bad_rows_in_a_file_are_named_by_line_and_can_be_skipped(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [TEXT_ROW, TEXT_ROW, BAD_ROWS[1][0], TEXT_ROW]))
    cfg = DataConfig(source=str(path))
    rows, _ = load_rows(cfg)
    with pytest.raises(DataError) as error:
        tokenize_preference_rows(rows, tiny_tokenizer(), cfg)
    assert str(error.value) == f"{path} line 3: field 'rejected' is empty"
    pairs, stats = tokenize_preference_rows(rows, tiny_tokenizer(), DataConfig(source=str(path), skip_bad_rows=True))
    assert (len(pairs), stats.n_skipped_bad_rows, stats.n_examples) == (3, 1, 3)


def test_train_on_prompt_is_refused_for_pairs():
    with pytest.raises(DataError, match="data.train_on_prompt does not apply to preference rows"):
        pairs_of([TEXT_ROW], train_on_prompt=True)


# -- truncation --------------------------------------------------------------------------------------------------

def test_prompt_truncation_cuts_the_prompt_from_the_left_the_same_on_both_sides():
    [whole], _ = pairs_of([TEXT_ROW])
    rejected_answer = len(whole["rejected"]["input_ids"]) - whole["prompt_length"]
    max_length = 1 + 3 + rejected_answer  # BOS, 3 prompt tokens, the longer answer
    [pair], stats = pairs_of([TEXT_ROW], max_length=max_length)
    kept_prompt = whole["chosen"]["input_ids"][:1] + whole["chosen"]["input_ids"][whole["prompt_length"] - 3:
                                                                                   whole["prompt_length"]]
    assert pair["prompt_length"] == 4
    for side in ("chosen", "rejected"):
        assert pair[side]["input_ids"] == kept_prompt + whole[side]["input_ids"][whole["prompt_length"]:]
        assert pair[side]["labels"][4:] == whole[side]["labels"][whole["prompt_length"]:]
    assert len(pair["rejected"]["input_ids"]) == max_length and len(pair["chosen"]["input_ids"]) < max_length
    assert (stats.n_truncated, stats.n_answers_cut, stats.n_dropped) == (1, 0, 0)


def test_an_answer_longer_than_max_length_is_cut_at_its_end_and_counted():
    chosen = ([1, 5, 6, 7, 8], [IGNORE, IGNORE, IGNORE, 7, 8])
    rejected = ([1, 5, 6, 9, 10, 11, 12], [IGNORE, IGNORE, IGNORE, 9, 10, 11, 12])
    assert truncate_pair(chosen, rejected, 3, 1, 4, "prompt") == (
        ([1, 7, 8], [IGNORE, 7, 8]), ([1, 9, 10, 11], [IGNORE, 9, 10, 11]), 1, "answer_cut")
    assert truncate_pair(chosen, rejected, 3, 1, 6, "prompt") == (
        ([1, 6, 7, 8], [IGNORE, IGNORE, 7, 8]), ([1, 6, 9, 10, 11, 12], [IGNORE, IGNORE, 9, 10, 11, 12]), 2, "truncated")
    assert truncate_pair(chosen, rejected, 3, 1, 6, "end") == (chosen, (rejected[0][:6], rejected[1][:6]), 3,
                                                              "answer_cut")
    assert truncate_pair(chosen, rejected, 3, 1, 6, "drop")[3] == "dropped"
    assert truncate_pair(chosen, rejected, 3, 1, 7, "drop") == (chosen, rejected, 3, "fit")


def test_a_pair_left_without_a_trained_token_is_an_error_naming_the_row_and_side():
    [whole], _ = pairs_of([TEXT_ROW])
    prompt_length = whole["prompt_length"]
    with pytest.raises(DataError) as error:
        pairs_of([TEXT_ROW], max_length=prompt_length, truncation="end")
    assert str(error.value) == (f"row 1: no trained token left in 'chosen' (max_length={prompt_length}, preference "
                                "format, truncation 'end'); raise data.max_length, use truncation 'prompt', or set "
                                "data.drop_untrained")


def test_drop_mode_drops_the_whole_pair_and_counts_it():
    rows = [TEXT_ROW, {"prompt": PROMPT, "chosen": " four.", "rejected": " five hundred and more than that."}]
    [whole], _ = pairs_of(rows[:1])
    pairs, stats = pairs_of(rows, max_length=len(whole["rejected"]["input_ids"]), truncation="drop")
    assert pairs == [whole] and (stats.n_dropped, stats.n_examples, stats.n_rows) == (1, 1, 2)
    with pytest.raises(DataError, match=r"none of the 1 rows gave a pair \(rows=1, examples=0"):
        pairs_of(rows[1:], max_length=len(whole["rejected"]["input_ids"]), truncation="drop")


def test_drop_untrained_drops_and_counts_the_pair():
    [whole], _ = pairs_of([TEXT_ROW])
    rows = [TEXT_ROW, {"prompt": PROMPT + " and" * 40, "chosen": " four.", "rejected": " five."}]
    pairs, stats = pairs_of(rows, max_length=len(whole["rejected"]["input_ids"]), truncation="end",
                            drop_untrained=True)
    assert pairs == [whole] and stats.n_dropped == 1


# -- batches -----------------------------------------------------------------------------------------------------

def numbered_pairs(n):
    """Pairs whose chosen answer length is 1 + their index (so each pair can be told apart)."""
    rows = [{"prompt": PROMPT, "chosen": " four" * (i + 1), "rejected": " five."} for i in range(n)]
    return pairs_of(rows)[0]


def test_pair_batches_put_chosen_rows_first_then_rejected_in_the_same_pair_order():
    pairs = numbered_pairs(5)
    batches = make_pair_batches(pairs, 2, max_length=64, pad_id=0, seed=3, epoch=1)
    order = epoch_order(5, 3, 1, True)
    assert len(batches) == 3 and [b["pairs"] for b in batches] == [2, 2, 1]
    for k, batch in enumerate(batches):
        chunk = [pairs[i] for i in order[2 * k:2 * k + 2]]
        sides = [p["chosen"] for p in chunk] + [p["rejected"] for p in chunk]
        width = max(len(s["input_ids"]) for s in sides)
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2 * len(chunk),
                                                                                                        width)
        for row, side in enumerate(sides):
            n = len(side["input_ids"])
            assert batch["input_ids"][row].tolist() == side["input_ids"] + [0] * (width - n)
            assert batch["labels"][row].tolist() == shift_labels(side["labels"]) + [IGNORE] * (width - n)
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert batches.row_lengths() == [[len(b["attention_mask"][r].nonzero()) for r in range(2 * b["pairs"])]
                                     for b in batches]


def test_pair_order_is_deterministic_per_seed_and_epoch_and_unshuffled_keeps_the_given_order():
    pairs = numbered_pairs(6)

    def firsts(**kw):
        return [b["input_ids"][0].tolist() for b in make_pair_batches(pairs, 1, max_length=64, pad_id=0, **kw)]

    assert firsts(seed=0, epoch=0) == firsts(seed=0, epoch=0)
    assert firsts(seed=0, epoch=0) != firsts(seed=0, epoch=1)
    assert firsts(seed=0, epoch=0) != firsts(seed=1, epoch=0)
    in_order = firsts(seed=5, epoch=2, shuffle=False)
    assert [row[:len(p["chosen"]["input_ids"])] for row, p in zip(in_order, pairs)] == [p["chosen"]["input_ids"]
                                                                                        for p in pairs]


def test_pair_batches_check_lengths_and_batch_size():
    pairs = numbered_pairs(2)
    with pytest.raises(DataError, match="batch_size must be at least 1"):
        make_pair_batches(pairs, 0, max_length=64, pad_id=0, seed=0)
    with pytest.raises(DataError) as error:
        make_pair_batches(pairs, 1, max_length=8, pad_id=0, seed=0)
    assert str(error.value) == (f"pair 0: its chosen side has {len(pairs[0]['chosen']['input_ids'])} tokens; each side "
                                "must have 1 to max_length=8 tokens (tokenize_preference_rows truncates them)")


def test_prompt_format_name_is_the_sft_format_whose_prompts_the_pairs_use():
    cfg = DataConfig()
    assert prompt_format_name([TEXT_ROW], cfg) == "prompt_completion"
    assert prompt_format_name([CHAT_ROW], cfg) == "chat"
    assert prompt_format_name([{"chosen": CHAT_PROMPT + CHAT_ROW["chosen"],
                                "rejected": CHAT_PROMPT + CHAT_ROW["rejected"]}], cfg) == "chat"
    with pytest.raises(ConfigError):
        DataConfig(format="pairs")


# -- the shared-prompt layout ------------------------------------------------------------------------------------

def row_logps(logits, labels):
    """Each label row's summed log-prob of its trained targets; logits (R, T, V), labels (R, T) shifted."""
    scores = torch.log_softmax(logits.float(), -1)
    picked = scores.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (picked * (labels != IGNORE)).sum(-1)


def test_shared_prompt_rows_hold_the_prompt_once_and_both_branches_after_it():
    [pair], _ = pairs_of([TEXT_ROW])
    batch = collate_shared_prompt([pair], pad_id=0)
    prompt_length, chosen, rejected = pair["prompt_length"], pair["chosen"], pair["rejected"]
    shared = prompt_length - 1
    rc, rr = len(chosen["input_ids"]) - shared, len(rejected["input_ids"]) - shared  # each branch opens with a token
    assert batch["input_ids"][0].tolist() == chosen["input_ids"] + rejected["input_ids"][shared:]
    assert batch["position_ids"][0].tolist() == [*range(shared + rc), *range(shared, shared + rr)]
    assert batch["labels"].shape == (2, shared + rc + rr) and batch["pairs"] == 1
    assert batch["labels"][0].tolist() == shift_labels(chosen["labels"]) + [IGNORE] * rr
    assert batch["labels"][1].tolist() == [IGNORE] * (shared + rc) + shift_labels(rejected["labels"])[shared:]
    allowed = batch["attention_mask"][0, 0] == 0
    rejected_start = shared + rc
    assert allowed[rejected_start, :shared].all() and not allowed[rejected_start:, shared:rejected_start].any()
    assert allowed[shared + rc - 1, :shared + rc].all()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bloom])
def test_shared_prompt_layout_gives_each_answer_its_padded_rows_log_prob(build):
    tok = tiny_tokenizer(CHATML)
    model = build(vocab_size=len(tok))
    assert shared_prompt_problem(model, max_length=64) is None
    rows = [CHAT_ROW, TEXT_ROW, {"prompt": "H", "chosen": "ello world", "rejected": "i"}]
    pairs, stats = pairs_of(rows, tok, max_length=64)  # the tiny models' positions
    assert stats.n_truncated == 1
    padded = make_pair_batches(pairs, 3, max_length=64, pad_id=0, seed=1)[0]
    shared = make_shared_prompt_batches(pairs, 3, max_length=64, pad_id=0, seed=1)[0]
    with torch.no_grad(), packed_forward(model):
        expected = row_logps(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                             padded["labels"])
        logits = model(input_ids=shared["input_ids"], position_ids=shared["position_ids"],
                       attention_mask=shared["attention_mask"]).logits
    found = row_logps(torch.cat([logits, logits]), shared["labels"])
    torch.testing.assert_close(found, expected, **tol(torch.float32, reduction=TINY, scale=expected.abs().max().item()))
    assert shared["input_ids"].numel() < padded["input_ids"].numel()


class MaskIgnoring(torch.nn.Module):
    """A model that drops the attention mask and positions it is given (as a broken attention path would)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.inner(input_ids=input_ids)


def test_shared_prompt_probe_refuses_a_model_that_lets_the_branches_see_each_other():
    found = shared_prompt_problem(MaskIgnoring(tiny_llama()), max_length=64)
    assert found is not None and "the shared-prompt layout is not exact for model type 'llama'" in found.reason
    use, line = shared_prompt_note(MaskIgnoring(tiny_llama()), 64)
    assert not use and line.startswith("pair layout: padded pairs (auto: the shared-prompt layout is not exact")
    assert shared_prompt_note(tiny_llama(), 64)[0]
