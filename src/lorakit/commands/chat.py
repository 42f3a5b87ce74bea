"""`lorakit chat --adapter PATH`: talk to a model turn by turn, in the prompt format it was trained on; streams.

A chat-format run (or --chat) keeps the conversation: every turn is rendered with the whole
history through the run's chat template (PromptFormat.messages_ids). Other formats have no turns,
so each message is a fresh question in the run's format. /reset starts over, /exit or Ctrl-D
ends. When stdin is not a terminal, each line is one message and each answer is printed on a line.
"""
from __future__ import annotations

import argparse
import sys

from lorakit.commands.inputs import (add_format_arguments, add_model_arguments, add_sampling_arguments,
                                     load_run_model, prompt_format_of, sampling_from_args)
from lorakit.data.prompting import run_name
from lorakit.errors import LorakitError

COMMANDS = "/reset starts over, /exit or Ctrl-D ends"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, adapter, system message, prompt format and decoding options."""
    parser.epilog = ("examples:\n  lorakit chat --adapter runs/my-run/adapter\n"
                     "  echo 'What is the capital of Peru?' | lorakit chat --adapter runs/my-run\n")
    parser.add_argument("--adapter", default=None,
                        help="an adapter folder to load onto the base model (or a run folder, or a full fine-tuning "
                             "model folder)")
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message opening the conversation (chat formats)")
    add_sampling_arguments(parser)
    add_format_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load, then answer message after message until /exit or the end of the input."""
    from lorakit.infer.generate import stop_token_ids

    sampling = sampling_from_args(args)
    model, tokenizer, target = load_run_model(args, args.adapter)
    prompt_format = prompt_format_of(args, target, tokenizer)
    turns = prompt_format is not None and prompt_format.format == "chat"
    if args.system is not None and not turns:
        raise LorakitError(f"--system needs a chat prompt format, and this one ({_described(prompt_format)}) has no "
                           "system turn; drop --system, or pass --chat to use the chat template")
    if not turns:
        print(f"each message is a fresh question: {_described(prompt_format)} prompts have no turns "
              "(a chat-format run, or --chat, keeps the conversation)", flush=True)
    session = Session(model, tokenizer, prompt_format, args, stops=stop_token_ids(tokenizer, model, [prompt_format]),
                      sampling=sampling, keep=turns)
    interactive = sys.stdin.isatty()
    name = run_name(args.adapter) if args.adapter else "base"
    if interactive:
        print(f"chatting with {name}: {COMMANDS}", flush=True)
    for message in _messages(interactive):
        if message == "/exit":
            break
        if message == "/reset":
            session.reset()
            print("(the conversation starts over)", flush=True)
            continue
        if message.startswith("/"):
            print(f"unknown command {message.split()[0]}: {COMMANDS}", flush=True)
            continue
        if interactive:
            print(f"{name}> ", end="", flush=True)
        session.answer(message)
        print(flush=True)
    return 0


def _described(prompt_format) -> str:
    return "as-typed" if prompt_format is None else prompt_format.describe()


def _messages(interactive: bool):
    """Non-empty lines typed (or piped) in, until /exit, Ctrl-D or the end of the input."""
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except EOFError:
            print(flush=True)
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.strip()


class Session:
    """The conversation so far and how it becomes the next prompt."""

    def __init__(self, model, tokenizer, prompt_format, args: argparse.Namespace, *, stops: set[int], sampling,
                 keep: bool) -> None:
        self.model, self.tokenizer, self.prompt_format = model, tokenizer, prompt_format
        self.stops, self.sampling, self.keep = stops, sampling, keep
        self.max_new_tokens, self.seed = args.max_new_tokens, args.seed
        self.opening = [{"role": "system", "content": args.system}] if args.system is not None else []
        self.context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.messages: list[dict[str, str]] = list(self.opening)

    def reset(self) -> None:
        self.messages = list(self.opening)

    def answer(self, text: str) -> str:
        """Stream the answer to `text` and, in a conversation, keep both."""
        from lorakit.infer.generate import generate_ids

        self.messages.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        if ids is None:
            self.messages.pop()
            print(f"(that message does not fit the model's context of {self.context} tokens with "
                  f"--max-new-tokens {self.max_new_tokens}; shorten it)", end="")
            return ""
        answer = generate_ids(self.model, self.tokenizer, [ids], stops=self.stops, sampling=self.sampling,
                              max_new_tokens=self.max_new_tokens, seed=self.seed,
                              on_text=lambda _row, piece: _write(piece))[0]
        if self.keep:
            self.messages.append({"role": "assistant", "content": answer.strip()})
        else:
            self.reset()
        return answer

    def _prompt_ids(self) -> list[int] | None:
        """The prompt for the conversation, dropping its oldest turns while it is longer than the context."""
        from lorakit.infer.generate import encode_prompt

        while True:
            if self.keep:
                ids = self.prompt_format.messages_ids(self.tokenizer, self.messages)
            else:
                ids = encode_prompt(self.tokenizer, self.messages[-1]["content"], prompt_format=self.prompt_format)
            if len(ids) + self.max_new_tokens <= self.context:
                return ids
            first = len(self.opening)
            if len(self.messages) - first <= 1:
                return None
            del self.messages[first:first + 2]  # the oldest user message and its answer
            print(f"(the oldest turn is dropped: the conversation outgrew the model's {self.context}-token "
                  "context)", flush=True)


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
