"""Talk to a GPT-2 in the terminal, in the template it was instruction-tuned with.

    python chat.py --weights model_weights/instruct.pth                       a conversation
    python chat.py --weights model_weights/instruct.pth --message "Hi!"       one reply, then exit

One turn of the conversation:

    the conversation so far + the new message
      --dataset.fit_conversation--> prompt ids, ending in "### Assistant:\\n"
                                    (the oldest exchanges dropped when they no longer fit)
      --generate.generate_text--> the reply, printed as it comes, ending at <|endoftext|>
      --> the reply joins the conversation

The prompt is rendered by the function that renders the training records
(dataset.render_conversation), so a model tuned with train.py is asked in the format it
learned to answer. A model never tuned (OpenAI's GPT-2) just continues the text, as it would
any document, until --max-new-tokens.

In the terminal: /reset forgets the conversation; /quit or Ctrl-D leaves (exit 0); Ctrl-C
stops at once, as in every script of this project (one line, exit 130).
"""

import argparse
import contextlib
import sys

import torch

from dataset import fit_conversation, get_tokenizer
from generate import (
    SAMPLING_FLAGS,
    TextStreamer,
    add_sampling_flags,
    check_sampling_args,
    generate_text,
)
from model import DTYPES, unwrap_model


class Chat:
    """A conversation with ``model``: ``reply(text)`` answers and remembers, ``reset()``
    forgets. ``sampling``: generate_text's keywords (temperature, top_k, top_p, ...)."""

    def __init__(self, model, tokenizer=None, system=None, max_new_tokens=256, notices=None,
                 **sampling):
        self.model, self.tokenizer = model, tokenizer or get_tokenizer()
        self.system, self.max_new_tokens, self.sampling = system, max_new_tokens, sampling
        self.notices = notices or sys.stderr        # where "forgotten" notes go
        self.history = []       # the user's and the assistant's messages, oldest first

    def reset(self):
        self.history = []

    def prompt(self, text):
        """Token ids (1, T) that ask for a reply to ``text``, after the conversation so far.

        The prompt leaves room for the reply (``max_new_tokens``, at most half the context);
        what does not fit goes as fit_conversation drops it, the oldest exchanges first, and
        those are forgotten for good.
        """
        system = [{"role": "system", "content": self.system}] if self.system else []
        messages = system + self.history + [{"role": "user", "content": text}]
        context = unwrap_model(self.model).cfg["context_length"]
        room = min(self.max_new_tokens, context // 2)
        ids, _, dropped, cut = fit_conversation(messages, context - room, self.tokenizer,
                                                reply_open=True)
        if dropped:
            self.history = self.history[2 * dropped:]
            print(f"(the oldest {dropped} exchange(s) no longer fit the {context}-token "
                  f"context: forgotten)", file=self.notices)
        encode = self.tokenizer.encode_ordinary
        if cut and len(encode(self.system or "")) > len(encode(text)):    # the system's fault
            print(f"(the system message is longer than the {context - room} tokens the "
                  f"context leaves the prompt: the prompt's middle was left out; shorten "
                  f"the system message (--system))", file=self.notices)
        elif cut:
            print(f"(the message is longer than the {context - room} tokens the context "
                  f"leaves it: its middle was left out)", file=self.notices)
        device = next(self.model.parameters()).device
        return torch.tensor([ids], device=device)                              # (1, T)

    def reply(self, text, stream=None, prefix=""):
        """The model's answer to ``text``, printed to ``stream`` as it comes (when given,
        after ``prefix``); both join the conversation."""
        idx = self.prompt(text)
        eot = self.tokenizer.eot_token
        streamer = TextStreamer(self.tokenizer, file=stream, eos_id=eot) if stream else None
        if stream:
            print(prefix, end="", file=stream, flush=True)
        out = generate_text(self.model, idx, self.max_new_tokens, eos_id=eot,
                            callback=streamer, **self.sampling)             # (1, T + n)
        if streamer:
            streamer.finish()
        new = out[0, idx.shape[1]:].tolist()
        answer = self.tokenizer.decode(new[:new.index(eot)] if eot in new else new)
        self.history += [{"role": "user", "content": text},
                         {"role": "assistant", "content": answer}]
        return answer


def chat_loop(chat, out=None):
    """Read a line, answer it, until /quit or end of input (Ctrl-D)."""
    out = out or sys.stdout
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() then edits lines and remembers them)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:        # Ctrl-D
            print(file=out)
            return
        if line == "/quit":
            return
        if line == "/reset":
            chat.reset()
            print("(conversation forgotten)", file=out)
        elif line.startswith("/"):
            print(f"(unknown command {line.split()[0]}: /reset forgets the conversation, "
                  f"/quit leaves)", file=out)
        elif line:
            chat.reply(line, stream=out, prefix="gpt> ")
            print(file=out)


# ---------------------------------------------------------------------------------------
# The command line

def main(argv=None):
    """Run the chat (or answer --message and return the reply)."""
    from model_sources import SOURCES_HELP

    parser = argparse.ArgumentParser(description="Chat with an instruction-tuned GPT-2 in the "
                                                 "terminal.")
    parser.add_argument("--weights", default="model_weights/instruct.pth", metavar="SOURCE",
                        help=SOURCES_HELP)
    parser.add_argument("--message", metavar="TEXT", default=None,
                        help="print the reply to this one message (alone on stdout) and exit")
    parser.add_argument("--system", metavar="TEXT", default=None,
                        help="a system message: how the assistant should behave")
    add_sampling_flags(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="the longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best there)")
    parser.add_argument("--config", metavar="NAME_OR_JSON", default=None,
                        help="only for a .pth that holds a bare state dict (see generate.py)")
    parser.add_argument("--dtype", choices=[*DTYPES, "int8"], default="fp32",
                        help="weights' precision (default fp32)")
    args = parser.parse_args(argv)

    def fail(message):      # one line, no usage, no traceback
        parser.exit(2, f"error: {message}\n")

    if args.top_k == 0:
        args.top_k = None
    sampling = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    try:
        check_sampling_args(**sampling)
    except ValueError as e:
        message = str(e).replace(" or None", "")
        for name in SAMPLING_FLAGS:
            message = message.replace(name, "--" + name.replace("_", "-"), 1)
        fail(message)
    if args.message is not None and not args.message.strip():
        fail("--message is empty: give the text to send")
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")

    from engine.devices import get_device
    from model_sources import load_model_and_tokenizer

    torch.manual_seed(args.seed)
    try:
        model, tokenizer = load_model_and_tokenizer(args.weights, device=get_device(args.device),
                                                    dtype=args.dtype, cfg=args.config)
    except (OSError, ValueError) as e:
        fail(e)
    chat = Chat(model, tokenizer, args.system, args.max_new_tokens, **sampling)
    if args.message is not None:
        answer = chat.reply(args.message, stream=sys.stdout)
        print()
        return answer
    print(f"Chatting with {args.weights} ({model.cfg['context_length']}-token context). "
          f"/reset forgets the conversation, /quit or Ctrl-D leaves.", file=sys.stderr)
    chat_loop(chat)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:       # Ctrl-C: the chat ends here
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
