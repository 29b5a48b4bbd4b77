"""chat.py: the prompt is the training template, replies end at <|endoftext|>, the history
fits the context; --message; the interactive mode driven through a pseudo-terminal."""

import itertools
import os
import pty
import select
import sys
import time

import pytest
import torch

import chat
import train_utils
from conftest import ROOT, TINY_CFG
from dataset import (
    IGNORE_INDEX,
    create_instruction_dataloader,
    fit_conversation,
    get_tokenizer,
    render_conversation,
    split_records,
)
from generate import generate_text
from model import GPTModel, save_checkpoint

EOT = 50256


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(a random tiny GPT-2 with a 96-token context, its checkpoint path)."""
    torch.manual_seed(0)
    model = GPTModel(dict(TINY_CFG, context_length=96)).eval()
    return model, save_checkpoint(tmp_path_factory.mktemp("chat") / "tiny.pth", model)


def _greedy_reply(model, messages, n):
    """What the model answers to ``messages`` by hand: the template's prompt, greedy
    generate_text, the new tokens up to <|endoftext|>."""
    ids, _ = render_conversation(messages, reply_open=True)
    out = generate_text(model, torch.tensor([ids]), n, temperature=0.0, eos_id=EOT)
    new = out[0, len(ids):].tolist()
    return get_tokenizer().decode(new[:new.index(EOT)] if EOT in new else new)


def _user(text):
    return {"role": "user", "content": text}


def test_message_prints_the_reply_generate_text_gives_for_the_rendered_prompt(tiny, capsys):
    model, path = tiny
    reply = chat.main(["--weights", str(path), "--message", "Name a colour.", "--device",
                       "cpu", "--temperature", "0", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    expected = _greedy_reply(model, [_user("Name a colour.")], 8)
    assert expected and reply == expected
    assert out == expected + "\n"          # the reply alone on stdout
    assert err == ""


def test_message_with_a_system_text_puts_it_first(tiny, capsys):
    model, path = tiny
    reply = chat.main(["--weights", str(path), "--message", "Hi", "--system", "Be brief.",
                       "--device", "cpu", "--temperature", "0", "--max-new-tokens", "6"])
    messages = [{"role": "system", "content": "Be brief."}, _user("Hi")]
    assert reply == _greedy_reply(model, messages, 6)
    assert reply != _greedy_reply(model, [_user("Hi")], 6)     # the system text matters


@pytest.mark.parametrize("argv, message", [
    (["--message", ""], "error: --message is empty: give the text to send\n"),
    (["--message", "  "], "error: --message is empty: give the text to send\n"),
    (["--message", "x", "--top-p", "2"], "error: --top-p must be in (0, 1], got 2.0\n"),
    (["--message", "x", "--temperature", "-1"],
     "error: --temperature must be 0 (greedy) or a finite number >= 1e-30, got -1.0\n"),
    (["--message", "x", "--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1, got 0\n"),
])
def test_bad_flags_get_one_line_before_any_loading(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        chat.main(["--weights", "no/such/file.pth", *argv])
    assert e.value.code == 2
    assert capsys.readouterr().err == message


def test_missing_weights_get_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        chat.main(["--weights", str(tmp_path / "none.pth"), "--message", "hi"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "none.pth" in err


def test_each_turn_sees_the_conversation_so_far_and_reset_forgets_it(tiny):
    model, _ = tiny
    talk = chat.Chat(model, max_new_tokens=3, temperature=0.0)
    first = talk.reply("Hi")
    assert first == _greedy_reply(model, [_user("Hi")], 3)
    history = [_user("Hi"), {"role": "assistant", "content": first}]
    assert talk.history == history
    # the second prompt is the template of the whole conversation, reply open
    expected, _ = render_conversation(history + [_user("More")], reply_open=True)
    assert talk.prompt("More")[0].tolist() == expected
    talk.reset()
    assert talk.history == [] and talk.prompt("More")[0].tolist() == render_conversation(
        [_user("More")], reply_open=True)[0]


def test_the_oldest_exchanges_are_dropped_to_fit_the_context(tiny):
    model, _ = tiny
    notes = []

    class Notes:
        def write(self, text):
            notes.append(text)

    # 96-token context, 4 tokens of room for the reply: 92 for the prompt
    talk = chat.Chat(model, max_new_tokens=4, temperature=0.0, notices=Notes())
    words = "one two three four five six seven eight nine ten eleven twelve".split()
    exchanges = [(" ".join(words[i:]), " ".join(words[:i])) for i in (2, 4, 6, 8)]
    talk.history = [m for u, a in exchanges for m in (_user(u), {"role": "assistant",
                                                                 "content": a})]
    ids = talk.prompt("nine ten")[0].tolist()
    full = talk.history  # what is left after the drop
    kept = len(full) // 2
    assert kept < len(exchanges)            # something had to go, the oldest first
    assert full == [m for u, a in exchanges[len(exchanges) - kept:]
                    for m in (_user(u), {"role": "assistant", "content": a})]
    assert ids == render_conversation(full + [_user("nine ten")], reply_open=True)[0]
    assert len(ids) <= 92 < len(render_conversation(
        [m for u, a in exchanges[len(exchanges) - kept - 1:] for m in (
            _user(u), {"role": "assistant", "content": a})] + [_user("nine ten")],
        reply_open=True)[0])                 # one exchange more would not have fitted
    assert "".join(notes).startswith(f"(the oldest {len(exchanges) - kept} exchange(s) no "
                                     f"longer fit the 96-token context: forgotten)")


def test_a_message_longer_than_the_context_keeps_its_start_and_the_cue(tiny):
    model, _ = tiny
    talk = chat.Chat(model, max_new_tokens=4, temperature=0.0, notices=open(os.devnull, "w"))
    long = " ".join(["word"] * 200)
    ids = talk.prompt(long)[0].tolist()
    expected, _, dropped, cut = fit_conversation([_user(long)], 92, reply_open=True)
    assert ids == expected and len(ids) == 92 and cut and not dropped
    tokenizer = get_tokenizer()
    assert tokenizer.decode(ids).startswith("### User:\nword")
    assert tokenizer.decode(ids).endswith("word\n\n### Assistant:\n")


# ---- the interactive mode, in a pseudo-terminal ----------------------------------------

def _spawn(path):
    """chat.py on a pseudo-terminal, greedy, 5-token replies: (pid, fd of the terminal)."""
    pid, fd = pty.fork()
    if pid == 0:        # the child: its stdin, stdout and stderr are the terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "chat.py", "--weights", str(path),
                                  "--device", "cpu", "--temperature", "0",
                                  "--max-new-tokens", "5"])
    return pid, fd


def _read_until(fd, text, seen, timeout=120):
    """Read the terminal until ``text`` appears after position ``len(seen[0])``; returns all
    read so far (newlines as \\n)."""
    start = len(seen[0])
    deadline = time.time() + timeout
    while text not in seen[0][start:]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            raise AssertionError(f"no {text!r} after {timeout} s; the terminal shows "
                                 f"{seen[0]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:             # EIO: the program ended
            chunk = b""
        if not chunk:
            raise AssertionError(f"chat.py ended before {text!r}; it showed {seen[0]!r}")
        seen[0] += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
    return seen[0]


def _finish(pid, fd, seen, timeout=120):
    """The exit code, after reading everything the program still prints."""
    deadline = time.time() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        if not ready:
            os.kill(pid, 9)
            raise AssertionError(f"chat.py did not end within {timeout} s; the terminal "
                                 f"shows {seen[0]!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen[0] += chunk.decode("utf-8", errors="replace").replace("\r\n", "\n")
    os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.fixture(scope="module")
def sessions(tiny):
    """Three chats started at once (each spends seconds importing torch): the tests then
    each drive one. Any still running at the end is killed."""
    started = {name: _spawn(tiny[1]) for name in ("talk", "ctrl_d", "ctrl_c")}
    yield started
    for pid, _ in started.values():
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_turn_then_reset_then_quit(sessions, tiny):
    model, _ = tiny
    pid, fd = sessions["talk"]
    seen = [""]
    _read_until(fd, "you> ", seen)
    assert "/reset forgets the conversation, /quit or Ctrl-D leaves." in seen[0]
    os.write(fd, b"Hi\n")
    _read_until(fd, "you> ", seen)
    first = _greedy_reply(model, [_user("Hi")], 5)
    assert f"gpt> {first}\n" in seen[0]
    # the second turn is asked with the first in the prompt
    os.write(fd, b"More\n")
    _read_until(fd, "you> ", seen)
    second = _greedy_reply(model, [_user("Hi"), {"role": "assistant", "content": first},
                                   _user("More")], 5)
    assert f"gpt> {second}\n" in seen[0]
    os.write(fd, b"/reset\n")
    _read_until(fd, "(conversation forgotten)\nyou> ", seen)    # the notice, then the prompt
    os.write(fd, b"More\n")
    mark = len(seen[0])
    _read_until(fd, "you> ", seen)
    assert f"gpt> {_greedy_reply(model, [_user('More')], 5)}\n" in seen[0][mark:]
    os.write(fd, b"/bogus\n")
    _read_until(fd, "(unknown command /bogus", seen)
    os.write(fd, b"/quit\n")
    assert _finish(pid, fd, seen) == 0
    assert "Traceback" not in seen[0]


def test_ctrl_d_leaves_quietly(sessions):
    pid, fd = sessions["ctrl_d"]
    seen = [""]
    _read_until(fd, "you> ", seen)
    os.write(fd, b"\x04")
    assert _finish(pid, fd, seen) == 0
    assert "Traceback" not in seen[0] and "interrupted" not in seen[0]


def test_ctrl_c_ends_with_one_line_and_130(sessions):
    pid, fd = sessions["ctrl_c"]
    seen = [""]
    _read_until(fd, "you> ", seen)
    mark = len(seen[0])
    os.write(fd, b"\x03")
    assert _finish(pid, fd, seen) == 130
    assert seen[0][mark:].strip().splitlines()[-1] == "interrupted"
    assert "Traceback" not in seen[0]


# ---- a tiny model learns to follow an instruction, and chat.py asks it -------------------

def _response_loss(model, loader):
    """Mean loss per scored token (the answers and their <|endoftext|>), in eval mode."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            n = int((y != IGNORE_INDEX).sum())
            total, count = total + model(x, targets=y).item() * n, count + n
    return total / count


@pytest.fixture
def one_thread():
    """One CPU thread: a tiny model's matrices are too small to share out, and on a busy
    2-core machine a second thread made each training step 2.5x slower (it waits its turn)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_tiny_model_learns_to_reverse_and_answers_held_out_instructions(tmp_path, capsys,
                                                                           one_thread):
    """"Reverse: a b c" -> "c b a": the answer depends only on the instruction, so a model
    that learned it answers instructions it never saw. All records render to the same
    length, so train_model's own collate (torch.stack) batches them as it is today."""
    records = [{"instruction": "Reverse: " + " ".join(s), "output": " ".join(reversed(s))}
               for s in itertools.product("abcde", repeat=3)]
    train, held = split_records(records, 0.1, seed=0)
    torch.manual_seed(0)
    model = GPTModel(dict(TINY_CFG, emb_dim=64, n_heads=4))
    train_loader = create_instruction_dataloader(train, batch_size=8, max_length=32)
    held_loader = create_instruction_dataloader(held, batch_size=len(held), max_length=32,
                                                shuffle=False)
    before = _response_loss(model, held_loader)
    path = tmp_path / "instruct.pth"
    train_utils.train_model(model, train_loader, held_loader, device="cpu", max_steps=150,
                            num_epochs=100, learning_rate=3e-3, warmup_steps=10,
                            weight_decay=0.0, eval_freq=1000, eval_iter=1, seed=0,
                            progress=False, checkpoint_path=str(path))
    model.eval()
    after = _response_loss(model, held_loader)
    with capsys.disabled():         # the figures, for `pytest -s`
        print(f"\nresponse loss on {len(held)} held-out records: {before:.3f} -> {after:.4f}")
    assert before > 9 and after < 0.1
    capsys.readouterr()
    for record in held:
        reply = chat.main(["--weights", str(path), "--message", record["instruction"],
                           "--temperature", "0", "--device", "cpu", "--max-new-tokens", "8"])
        assert reply == record["output"]
        assert capsys.readouterr().out == record["output"] + "\n"
