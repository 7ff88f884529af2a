"""`saisa chat`: a multi-turn conversation in the terminal, with images added at any turn.

Commands typed at the prompt: `/image PATH` attaches an image to your next message, `/reset` starts over,
`/exit` (or end of input, Ctrl-D) quits. Every turn re-sends the whole conversation through the chat template, so
the model sees the same layout as in training (earlier answers end with the template's end-of-turn token).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from modeling_saisa.cli._common import (
    add_generation_arguments,
    add_model_arguments,
    add_visual_policy_argument,
    check_image_file,
    check_no_image_tags,
    fit_to_context,
    generation_kwargs,
    load_model_and_processor,
    make_streamer,
    model_inputs,
)
from modeling_saisa.image_kv import ImageKVStore, check_text_independent
from modeling_saisa.modeling_saisa import SaisaModel

__all__ = ["ChatSession", "register", "run"]

HELP = "Commands: /image PATH adds an image to your next message, /reset clears the conversation, /exit quits."


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="multi-turn chat in the terminal (/image PATH adds an image)",
        description="Chat with a saved SAISA model. " + HELP,
    )
    add_model_arguments(parser)
    add_visual_policy_argument(parser)
    parser.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image for the first message; repeatable"
    )
    add_generation_arguments(parser)
    parser.set_defaults(func=run)


CHAT_IMAGE_KV_BYTES = 1 << 30


def image_kv_store_for(model: Any) -> ImageKVStore | None:
    """A store for a chat session's images, if the model can use one (SAISA with text-independent visual K/V)."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, SaisaModel):
        return None
    try:
        check_text_independent(inner)
    except ValueError:
        return None
    return ImageKVStore(max_bytes=CHAT_IMAGE_KV_BYTES)


class ChatSession:
    """The conversation state, separate from the terminal loop so that it can be driven and tested directly."""

    def __init__(
        self, model: Any, processor: Any, generate_kwargs: dict[str, Any], stream: TextIO | None = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.generate_kwargs = generate_kwargs
        self.stream = stream  # where answers are streamed (None: the current sys.stdout)
        self.messages: list[dict[str, Any]] = []
        self.pending_images: list[str] = []
        # Every turn re-sends the conversation's images: with a per-session store, only the first turn that shows
        # an image runs the vision tower and projectors (policies whose visual K/V depend on text cannot use it).
        self.image_kv = image_kv_store_for(model)

    def add_image(self, path: str) -> None:
        """Attach `path` to the next user message (checked now, so a typo is reported at once)."""
        self.pending_images.append(check_image_file(path))

    def reset(self) -> None:
        self.messages.clear()
        self.pending_images.clear()

    def prepare(self, text: str, stderr: TextIO | None = None) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """Everything that can fail on the user's input, before anything is printed as the answer.

        Returns the user turn, the model inputs and the generate kwargs (`--max-new-tokens` lowered to what the
        context leaves, with a note on `stderr`).
        """
        check_no_image_tags(text, "Your message")
        content = [{"type": "image", "path": path} for path in self.pending_images]
        content.append({"type": "text", "text": text})
        turn = {"role": "user", "content": content}
        inputs = model_inputs(self.processor, self.model, [*self.messages, turn])
        kwargs = fit_to_context(self.model, inputs, self.generate_kwargs, stderr)
        return turn, inputs, kwargs

    def respond(self, turn: dict[str, Any], inputs: Any, kwargs: dict[str, Any]) -> str:
        """Stream the answer to a prepared turn, remember both and return the answer."""
        extra = {} if self.image_kv is None else {"image_kv": self.image_kv}
        output = self.model.generate(**inputs, streamer=make_streamer(self.processor, self.stream), **extra, **kwargs)
        new_tokens = output[0, inputs["input_ids"].shape[1] :]
        answer = self.processor.decode(new_tokens, skip_special_tokens=True).strip()
        self.messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.pending_images = []
        return answer

    def ask(self, text: str) -> str:
        """Send one user message (with the pending images), stream the answer, remember and return it."""
        return self.respond(*self.prepare(text))


def chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read lines until `/exit` or end of input; a bad image path or message is reported and the chat goes on.

    A message that fails is not sent: its pending images stay for the next message (`/reset` drops them), and
    "ASSISTANT: " is printed only once the input has been checked.
    """
    print(HELP, file=stderr)
    session.stream = stdout
    while True:
        stdout.write("USER: ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            stdout.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            session.reset()
            print("(conversation cleared)", file=stderr)
            continue
        if line == "/image" or line.startswith("/image "):
            path = line[len("/image") :].strip()
            try:
                if not path:
                    raise ValueError("usage: /image PATH")
                session.add_image(path)
            except (ValueError, OSError) as err:
                print(f"error: {err}", file=stderr)
            else:
                print(f"(image {path} will go with your next message)", file=stderr)
            continue
        if line.startswith("/"):
            print(f"error: unknown command {line.split()[0]!r}. {HELP}", file=stderr)
            continue
        try:
            prepared = session.prepare(line, stderr)
        except (ValueError, OSError) as err:
            print(f"error: {err}{_pending_note(session)}", file=stderr)
            continue
        stdout.write("ASSISTANT: ")
        stdout.flush()
        try:
            session.respond(*prepared)
        except (ValueError, OSError) as err:
            print(f"\nerror: {err}{_pending_note(session)}", file=stderr)


def _pending_note(session: ChatSession) -> str:
    if not session.pending_images:
        return ""
    return f" (still pending for your next message: {', '.join(session.pending_images)}; /reset drops them)"


def run(args: argparse.Namespace) -> int:
    kwargs = generation_kwargs(args)
    for path in args.image:
        check_image_file(path)
    model, processor = load_model_and_processor(args)
    session = ChatSession(model, processor, kwargs)
    for path in args.image:
        session.add_image(path)
    return chat_loop(session, sys.stdin, sys.stdout, sys.stderr)
