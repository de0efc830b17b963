"""python -m llm.chat source=sft: talk to a model in the terminal.

Interactive by default: multi-turn, the reply streams as it is sampled; type `clear` to start over
and `quit` (or Ctrl-D) to leave. With prompt="..." it answers that one message and exits, which is
handy in scripts. The assistant's turns are kept as tokens-level parts, so a tool call the model made
is re-rendered exactly in the next turn's prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

import hydra
import torch
from omegaconf import DictConfig

from llm.artifact import load_artifact, resolve_artifact
from llm.config import absolute
from llm.errors import one_line_errors
from llm.generate.engine import Generator
from llm.generate.prepare import for_inference
from llm.generate.sampling import Sampling, fit_to_context
from llm.generate.text_stream import TextStream


class ChatSession:
    """A conversation with one model: reply(user_text) streams the answer and remembers both turns."""

    def __init__(self, generator: Generator, sampling: Sampling, system: str | None = None):
        self.gen, self.sampling, self.system = generator, sampling, system
        self.messages: list[dict] = []
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str, write: Callable[[str], None]) -> str:
        """Stream the answer to `user_text` through write(); return its full display text."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        prompt = self.gen.tokenizer.render_for_completion({"messages": messages})
        max_tokens = fit_to_context(self.sampling.max_tokens, len(prompt), self.gen.context)
        if max_tokens < 1:
            raise ValueError(f"the conversation is {len(prompt)} tokens, the model's context is {self.gen.context}: "
                             f"type 'clear' to start a new one")
        text = TextStream(self.gen.pieces)
        tokens: list[int] = []
        shown: list[str] = []
        # a long chat gets shorter answers, not an error
        for step in self.gen.generate([prompt], replace(self.sampling, max_tokens=max_tokens)):
            for t in step:
                tokens.append(t.token)
                text.push(t.token)
                if t.finish:
                    text.finish()
            piece = text.take()
            if piece:
                write(piece)
                shown.append(piece)
        self.messages = [*messages, {"role": "assistant", "content": self.gen.to_parts(tokens) or ""}]
        return "".join(shown)


def sampling(cfg: DictConfig) -> Sampling:
    return Sampling(max_tokens=cfg.max_tokens, temperature=float(cfg.temperature), top_k=cfg.top_k, top_p=cfg.top_p,
                    seed=cfg.seed)


def load_generator(cfg: DictConfig) -> Generator:
    folder = resolve_artifact(cfg.source, absolute(cfg.paths.artifacts))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, _ = load_artifact(folder, device=device)
    return Generator(for_inference(model, cfg.precision), tokenizer)


def write_out(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def interactive(session: ChatSession) -> None:
    print("Chatting with the model. 'clear' starts over, 'quit' or Ctrl-D leaves.")
    while True:
        try:
            user = input("\nYou: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        command = user.strip().lower()
        if command in ("quit", "exit"):
            return
        if command == "clear":
            session.clear()
            print("(new conversation)")
            continue
        if not user.strip():
            continue
        write_out("Assistant: ")
        try:
            session.reply(user, write_out)
        except ValueError as e:
            print(f"\n[{e}]")
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n[interrupted]")
        print()


@hydra.main(version_base="1.3", config_path="../conf", config_name="chat")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        generator = load_generator(cfg)
    session = ChatSession(generator, sampling(cfg), cfg.system)
    if cfg.prompt is not None:
        session.reply(str(cfg.prompt), write_out)
        print()
        return
    interactive(session)


if __name__ == "__main__":
    main()
