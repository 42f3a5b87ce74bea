"""Row formats, column mapping, bad-row errors and the output-only loss mask."""
from __future__ import annotations

import pytest
from _tiny import CHATML, tiny_tokenizer

from lorakit.data import DataConfig, preview_example, tokenize_rows
from lorakit.data.chat import BUILTIN_CHAT_TEMPLATE
from lorakit.data.formats import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, FORMATS, detect_format
from lorakit.errors import ConfigError, DataError

IGNORE = -100


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(example):
    return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]


def one(rows, tok=None, **cfg):
    examples, stats = tokenize_rows(rows, tok or tiny_tokenizer(), DataConfig(**cfg))
    return examples, stats


def test_prompt_completion_ids_are_segments_concatenated_and_only_answer_plus_eos_trained():
    tok = tiny_tokenizer()
    [ex], _ = one([{"prompt": "Question: what is two plus two?", "completion": " Answer: four."}])
    prompt, answer = encode(tok, "Question: what is two plus two?"), encode(tok, " Answer: four.")
    assert ex["input_ids"] == [tok.bos_token_id, *prompt, *answer, tok.eos_token_id]
    assert ex["labels"] == [IGNORE] * (1 + len(prompt)) + answer + [tok.eos_token_id]


def test_boundary_is_exact_even_where_bpe_would_merge_across_it():
    tok = tiny_tokenizer()
    # "H" + "ello world" tokenized whole would merge across the boundary; separately it must not
    [ex], _ = one([{"prompt": "H", "completion": "ello world"}])
    assert ex["input_ids"][1:-1] == encode(tok, "H") + encode(tok, "ello world")
    assert encode(tok, "Hello world") != encode(tok, "H") + encode(tok, "ello world")
    assert trained(ex) == encode(tok, "ello world") + [tok.eos_token_id]


def test_prompt_template_wraps_the_prompt_only():
    tok = tiny_tokenizer()
    [ex], _ = one([{"prompt": "Linux", "completion": "ok"}], prompt_template="Act as {prompt}:\n")
    assert ex["input_ids"][1:-1] == encode(tok, "Act as Linux:\n") + encode(tok, "ok")


def test_alpaca_with_and_without_input():
    tok = tiny_tokenizer()
    rows = [{"instruction": "Add", "input": "2 and 2", "output": "4"},
            {"instruction": "Greet", "input": "", "output": "Hello"}]
    with_input, without_input = one(rows)[0]
    prompt = ALPACA_PROMPT.replace("{instruction}", "Add").replace("{input}", "2 and 2")
    assert with_input["input_ids"] == [1, *encode(tok, prompt), *encode(tok, "4"), 2]
    assert trained(with_input) == encode(tok, "4") + [2]
    prompt = ALPACA_PROMPT_NO_INPUT.replace("{instruction}", "Greet")
    assert without_input["input_ids"] == [1, *encode(tok, prompt), *encode(tok, "Hello"), 2]


def test_text_format_trains_every_token_and_the_eos():
    tok = tiny_tokenizer()
    [ex], stats = one([{"text": "The quick brown fox."}])
    body = encode(tok, "The quick brown fox.")
    assert ex["input_ids"] == [1, *body, 2]
    assert ex["labels"] == [IGNORE, *body, 2]
    assert stats.n_trained_tokens == len(body) + 1


CHAT = [{"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello world."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "four."},
]}]


def test_chat_with_tokenizer_template_trains_every_assistant_turn_and_its_end_of_turn():
    tok = tiny_tokenizer(CHATML)
    [ex], _ = one(CHAT, tok)
    full = tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert tok.decode(ex["input_ids"]) == full  # no BOS added: the template decides
    shown = preview_example(ex, tok)
    assert shown.count("[[") == 2
    assert "[[Hello world.<|im_end|>]]" in shown and "[[four.<|im_end|>]]" in shown
    assert "user\nHello<|im_end|>" in shown.replace("[[", "").replace("]]", "")
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert trained(ex).count(end_of_turn) == 2


def test_chat_without_template_uses_builtin_one_with_trained_eos():
    tok = tiny_tokenizer()
    assert tok.chat_template is None
    [ex], _ = one(CHAT, tok)
    assert ex["input_ids"][0] == tok.bos_token_id
    full = tok.apply_chat_template(CHAT[0]["messages"], chat_template=BUILTIN_CHAT_TEMPLATE, tokenize=False)
    assert tok.decode(ex["input_ids"]) == "<s>" + full
    assert preview_example(ex, tok) == (
        "<s><|system|>\nBe brief.\n<|user|>\nHello\n<|assistant|>\n[[Hello world.</s>]]\n"
        "<|user|>\nWhat is two plus two?\n<|assistant|>\n[[four.</s>]]\n")


def test_chat_system_prompt_sharegpt_spelling_and_train_on_prompt():
    tok = tiny_tokenizer(CHATML)
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    [ex], _ = one(rows, tok, columns={"messages": "conversations"}, system_prompt="Be kind.")
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi")
    assert preview_example(ex, tok).endswith("[[Hello<|im_end|>]]\n")
    [everything], _ = one(rows, tok, columns={"messages": "conversations"}, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"]


def test_sharegpt_conversations_are_detected_without_a_mapping_and_bot_is_the_assistant():
    tok = tiny_tokenizer(CHATML)
    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}]
    openai = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    assert detect_format(["conversations", "id"]).name == "chat"
    assert one(sharegpt, tok)[0] == one(openai, tok)[0]
    assert FORMATS["chat"].columns_text() == "messages or conversations"


def test_train_on_prompt_trains_prompt_tokens_too():
    [ex], stats = one([{"prompt": "Hello", "completion": " world"}], train_on_prompt=True)
    assert ex["labels"][1:] == ex["input_ids"][1:]
    assert stats.n_trained_tokens == len(ex["input_ids"]) - 1


def test_column_mapping_awesome_chatgpt_prompts_shape():
    tok = tiny_tokenizer()
    rows = [{"act": "Linux Terminal", "prompt": "I want you to act as a Linux terminal."}]
    [ex], _ = one(rows, columns={"prompt": "act", "completion": "prompt"}, prompt_template="{prompt}\n")
    assert ex["input_ids"] == [1, *encode(tok, "Linux Terminal\n"),
                               *encode(tok, "I want you to act as a Linux terminal."), 2]
    assert trained(ex) == encode(tok, "I want you to act as a Linux terminal.") + [2]
    [as_text], _ = one(rows, columns={"text": "prompt"})  # the lecture's way: the prompt as plain text
    assert as_text["input_ids"] == [1, *encode(tok, "I want you to act as a Linux terminal."), 2]


def test_auto_detection_follows_the_registry_order():
    assert detect_format(["messages", "text"]).name == "chat"
    assert detect_format(["instruction", "input", "output"]).name == "alpaca"
    assert detect_format(["prompt", "completion", "id"]).name == "prompt_completion"
    assert detect_format(["text"]).name == "text"
    assert list(FORMATS) == ["chat", "alpaca", "prompt_completion", "text", "preference"]
    with pytest.raises(DataError, match=r"cannot detect the row format from columns \(act, prompt\)"):
        one([{"act": "a", "prompt": "b"}])


@pytest.mark.parametrize("row, fmt, message", [
    ({"prompt": "p", "answer": "a"}, "prompt_completion",
     "row 2: field 'completion' is missing (columns: prompt, answer)"),
    ({"prompt": "p", "completion": 7}, "prompt_completion", "row 2: field 'completion' must be a string, got int 7"),
    ({"prompt": None, "completion": "c"}, "prompt_completion", "row 2: field 'prompt' is missing (columns: prompt, completion)"),
    ({"instruction": "i", "output": ["x"]}, "alpaca", "row 2: field 'output' must be a string, got list ['x']"),
    ({"text": 3.5}, "text", "row 2: field 'text' must be a string, got float 3.5"),
    ({"messages": "hi"}, "chat", "row 2: field 'messages' must be a list of {role, content} dicts, got str"),
    ({"messages": [{"role": "user", "text": "hi"}]}, "chat",
     "row 2: messages[0] has no 'content'; expected a string (keys: role, text)"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat", "row 2: field 'messages' has no assistant turn to train on"),
    ("not a dict", "text", "row 2: expected a dict of columns, got str"),
    ({"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "a"}]}, "chat",
     "row 2: messages[0] has unknown role 'usr' (known: system, user, assistant, and the aliases human, gpt, bot, "
     "developer)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "a"}]}, "chat",
     "row 2: conversations[1] has unknown role 'robot' (known: system, user, assistant, and the aliases human, gpt, "
     "bot, developer)"),
])
def test_bad_row_error_names_row_and_field(row, fmt, message):
    good = {"prompt_completion": {"prompt": "p", "completion": "c"}, "alpaca": {"instruction": "i", "output": "o"},
            "text": {"text": "t"}, "chat": CHAT[0]}[fmt]
    with pytest.raises(DataError) as error:
        one([good, row], tiny_tokenizer(), format=fmt)
    assert str(error.value) == message


def test_missing_mapped_column_is_named():
    with pytest.raises(DataError) as error:
        one([{"act": "a", "prompt": "b"}, {"act": "a"}], columns={"prompt": "act", "completion": "prompt"})
    assert str(error.value) == "row 2: column 'prompt' (mapped to field 'completion') is missing (columns: act)"


def test_skip_bad_rows_skips_and_counts():
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "a", "completion": 1},
            {"prompt": "c", "completion": "d"}]
    examples, stats = one(rows, skip_bad_rows=True)
    assert (stats.n_rows, stats.n_examples, stats.n_skipped_bad_rows) == (4, 2, 2)
    assert [len(ex["input_ids"]) for ex in examples] == [len(one([r])[0][0]["input_ids"]) for r in (rows[0], rows[3])]


def test_config_rejects_unknown_format_and_truncation():
    with pytest.raises(ConfigError, match=r"^data.format: must be one of auto, .*prompt_completion.* \(got 'sharegpt'\)$"):
        DataConfig(format="sharegpt")
    with pytest.raises(ConfigError, match=r"^data.truncation: must be one of prompt, end, drop \(got 'left'\)$"):
        DataConfig(truncation="left")
    with pytest.raises(ConfigError, match="^data.val_fraction: cannot be combined"):
        DataConfig(val_fraction=0.1, val_split="test")


def test_every_config_field_has_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(DataConfig))


def test_tokenizer_without_eos_is_refused():
    tok = tiny_tokenizer().__class__(tokenizer_object=tiny_tokenizer().backend_tokenizer, bos_token="<s>")
    with pytest.raises(DataError, match="the tokenizer has no eos_token"):
        one([{"text": "x"}], tok)


def test_sentencepiece_style_tokenizer_gets_no_dummy_space_inside_an_example():
    from _tiny import tiny_sp_tokenizer

    tok = tiny_sp_tokenizer()
    assert tok.convert_ids_to_tokens(encode(tok, "four."))[0].startswith("\u2581")  # the dummy prefix
    [ex], _ = one([{"prompt": "Question: what is two plus two?\n", "completion": "four."}], tok)
    whole = encode(tok, "Question: what is two plus two?\nfour.")
    assert ex["input_ids"] == [tok.bos_token_id, *whole, tok.eos_token_id]
    assert tok.decode(trained(ex)) == "four.</s>"
    [spaced], _ = one([{"prompt": "Question:", "completion": " four."}], tok)
    assert spaced["input_ids"][1:-1] == encode(tok, "Question: four.")
