"""dataset.py's instruction data: the template and its mask token by token, the loss against
Hugging Face's labels, padded batches, the split by record, truncation, bad files."""

import functools
import http.server
import json
import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import cfg_from_hf, make_hf_model
from dataset import (
    IGNORE_INDEX,
    InstructionDataset,
    as_conversation,
    create_instruction_dataloader,
    fetch_records,
    fit_conversation,
    get_tokenizer,
    pad_batch,
    read_records,
    render_conversation,
    split_records,
)
from download_weights_hf import load_weights_into_gpt
from engine import fused_loss
from engine.records import group_by_length
from model import GPTModel

EOT = 50256
ALPACA = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
CONVERSATION = {"messages": [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another?"},
    {"role": "assistant", "content": "Blue."}]}


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def enc(tok, text):
    return tok.encode_ordinary(text)


# ---- the template and its mask, token by token ------------------------------------------

def test_an_alpaca_record_renders_as_one_exchange_with_only_the_answer_scored(tok):
    ids, scored = render_conversation(as_conversation(ALPACA))
    prompt = enc(tok, "### User:\nTranslate to French.\n\nGood morning\n\n### Assistant:\n")
    answer = enc(tok, "Bonjour") + [EOT]
    assert ids == prompt + answer
    assert scored == [False] * len(prompt) + [True] * len(answer)
    # the ids themselves, so that a change of the template cannot pass unnoticed
    assert ids[:4] == [21017, 11787, 25, 198] and ids[-1] == EOT        # "###", " User", ":"
    # the dataset's pair: the input is ids[:-1], the target ids[1:] with the prompt -100
    x, y = InstructionDataset([ALPACA], max_length=64)[0]
    assert x.tolist() == ids[:-1]
    assert y.tolist() == [IGNORE_INDEX] * (len(prompt) - 1) + answer
    assert tok.decode([t for t in y.tolist() if t != IGNORE_INDEX]) == "Bonjour<|endoftext|>"


def test_no_input_means_the_instruction_alone(tok):
    ids, _ = render_conversation(as_conversation({"instruction": "Say hi.", "input": "",
                                                  "output": "Hi!"}))
    assert tok.decode(ids) == "### User:\nSay hi.\n\n### Assistant:\nHi!<|endoftext|>"


def test_dolly_field_names_are_read_as_alpaca_ones():
    dolly = {"instruction": "Summarise.", "context": "A long text.", "response": "Short.",
             "category": "summarization"}
    assert as_conversation(dolly) == as_conversation(
        {"instruction": "Summarise.", "input": "A long text.", "output": "Short."})


def test_a_conversation_scores_every_assistant_turn_and_nothing_else(tok):
    ids, scored = render_conversation(as_conversation(CONVERSATION))
    # exactly the text render_conversation's docstring shows
    assert tok.decode(ids) == ("### System:\nAnswer in one word.\n\n"
                               "### User:\nName a primary colour.\n\n### Assistant:\n"
                               "Red.<|endoftext|>"
                               "### User:\nAnd another?\n\n### Assistant:\n"
                               "Blue.<|endoftext|>")
    pieces = [(enc(tok, "### System:\nAnswer in one word.\n\n"), False),
              (enc(tok, "### User:\nName a primary colour.\n\n### Assistant:\n"), False),
              (enc(tok, "Red.") + [EOT], True),
              (enc(tok, "### User:\nAnd another?\n\n### Assistant:\n"), False),
              (enc(tok, "Blue.") + [EOT], True)]
    assert ids == [t for piece, _ in pieces for t in piece]
    assert scored == [s for piece, s in pieces for _ in piece]
    assert tok.decode([t for t, s in zip(ids, scored) if s]) == \
        "Red.<|endoftext|>Blue.<|endoftext|>"


def test_the_chat_prompt_is_the_training_text_up_to_the_answer():
    messages = as_conversation(CONVERSATION)
    ids, scored = render_conversation(messages)
    prompt, prompt_scored = render_conversation(messages[:-1], reply_open=True)
    assert prompt == ids[:len(prompt)] and prompt_scored == scored[:len(prompt)]
    assert scored[len(prompt)] and not scored[len(prompt) - 1]     # the answer comes next
    with pytest.raises(ValueError, match="must end with a user"):
        render_conversation(messages, reply_open=True)
    with pytest.raises(ValueError, match="must end with a assistant"):
        render_conversation(messages[:-1])


def test_an_end_of_text_typed_in_a_message_stays_text(tok):
    record = {"instruction": "Print <|endoftext|> please.", "output": "<|endoftext|>"}
    ids, scored = render_conversation(as_conversation(record))
    assert ids.count(EOT) == 1 and ids[-1] == EOT       # only the real end of the turn


# ---- the loss: response-only, as Hugging Face computes it with -100 labels ----------------

@pytest.fixture(scope="module")
def hf_and_ours():
    """A random GPT2LMHeadModel with GPT-2's vocabulary (the records are real tokens) and
    our GPTModel holding the same weights."""
    hf = make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                       seed=3)
    ours = GPTModel(cfg_from_hf(hf))
    load_weights_into_gpt(ours, hf)
    return hf, ours.eval()


@pytest.mark.parametrize("record", [ALPACA, CONVERSATION], ids=["alpaca", "messages"])
def test_response_only_loss_equals_hugging_face_labels_and_a_hand_computation(
        hf_and_ours, record):
    hf, ours = hf_and_ours
    ids, scored = render_conversation(as_conversation(record))
    full = torch.tensor([ids])                                                   # (1, n)
    labels = torch.where(torch.tensor([scored]), full, IGNORE_INDEX)             # (1, n)
    with torch.no_grad():
        out = hf(input_ids=full, labels=labels)
        # by hand: -log p(token t+1 | tokens <= t), averaged over the scored tokens only
        logp = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)           # (n-1, V)
        picked = [-logp[t, ids[t + 1]] for t in range(len(ids) - 1) if scored[t + 1]]
        by_hand = torch.stack(picked).mean()
        x, y = InstructionDataset([record], max_length=64)[0]
        mine = ours(x[None], targets=y[None])                   # the fused path
        with fused_loss.disabled():
            plain = ours(x[None], targets=y[None])              # logits + F.cross_entropy
        everything = ours(x[None], targets=full[:, 1:])         # the whole sequence scored
    assert len(picked) == sum(scored)
    torch.testing.assert_close(out.loss.double(), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.double(), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.double(), by_hand, rtol=1e-5, atol=1e-5)
    assert abs(everything.item() - by_hand.item()) > 1e-3      # the mask changes the number


def _records_of_three_lengths():
    return [{"instruction": "Hi", "output": "Hello there, how are you today?"},
            {"instruction": "Count to five, please, slowly and with commas.",
             "output": "1, 2, 3, 4, 5"},
            {"messages": [{"role": "user", "content": "a"},
                          {"role": "assistant", "content": "b"}]}]


def test_a_padded_batch_gives_each_record_the_loss_it_has_alone(hf_and_ours):
    _, ours = hf_and_ours
    dataset = InstructionDataset(_records_of_three_lengths(), max_length=64)
    assert len(set(dataset.lengths)) == 3
    x, y = pad_batch([dataset[i] for i in range(3)])                            # (3, L)
    width = max(dataset.lengths)
    assert x.shape == y.shape == (3, width)
    with torch.no_grad():
        logits = ours(x)                                                         # (3, L, V)
        sums, counts = [], []
        for i in range(3):
            xi, yi = dataset[i]
            n = len(xi)
            # padding: EOT ids in the input, -100 in the target, after the record
            assert x[i, n:].eq(EOT).all() and y[i, n:].eq(IGNORE_INDEX).all()
            alone = ours(xi[None])                                               # (1, n, V)
            torch.testing.assert_close(logits[i, :n], alone[0], rtol=1e-4, atol=1e-4)
            loss_alone = F.cross_entropy(alone[0], yi, reduction="sum")
            loss_in_batch = F.cross_entropy(logits[i], y[i], reduction="sum")
            torch.testing.assert_close(loss_in_batch, loss_alone, rtol=1e-5, atol=1e-5)
            sums.append(loss_alone)
            counts.append(int((yi != IGNORE_INDEX).sum()))
        # the batch's loss: the mean over all scored tokens of the batch, padding nowhere
        torch.testing.assert_close(ours(x, targets=y), sum(sums) / sum(counts), rtol=1e-5,
                                   atol=1e-5)


def test_the_dataloader_pads_each_batch_to_its_longest():
    loader = create_instruction_dataloader(_records_of_three_lengths(), batch_size=2,
                                           max_length=64, shuffle=False)
    lengths = loader.dataset.lengths
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(2, max(lengths[:2])), (1, lengths[2])]
    assert not loader.drop_last and loader.dataset.truncated == 0


def test_group_by_length_batches_similar_lengths_and_keeps_every_record():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47, 9, 46, 10, 45]
    order = list(range(12))
    batches = group_by_length(order, lengths, 2, torch.Generator().manual_seed(0), window=6)
    assert sorted(i for b in batches for i in b) == order
    # within each window of 6 records the batches pair neighbours in length
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == [
        [5, 6], [7, 8], [9, 10], [45, 46], [47, 48], [49, 50]]
    again = group_by_length(order, lengths, 2, torch.Generator().manual_seed(0), window=6)
    assert again == batches                                 # the generator decides the order
    loader = create_instruction_dataloader(
        [{"instruction": "x " * n, "output": "y"} for n in lengths], batch_size=2,
        max_length=64, group_by_length=True, generator=torch.Generator().manual_seed(1))
    padding = sum(int((y == IGNORE_INDEX).sum()) for _, y in loader)
    plain = create_instruction_dataloader(
        [{"instruction": "x " * n, "output": "y"} for n in lengths], batch_size=2,
        max_length=64, shuffle=False)
    assert padding < sum(int((y == IGNORE_INDEX).sum()) for _, y in plain)


# ---- records longer than the context ------------------------------------------------------

def test_a_long_prompt_loses_its_middle_and_the_answer_stays_whole(tok):
    record = {"instruction": "Summarise this text.", "input": " ".join(["word"] * 100),
              "output": "A short answer."}
    dataset = InstructionDataset([record], max_length=31)
    ids, scored = (a.tolist() for a in dataset.examples[0])
    answer = enc(tok, "A short answer.") + [EOT]
    assert len(ids) == 32 and dataset.truncated == 1
    assert ids[-len(answer):] == answer and scored == [False] * (32 - len(answer)) + [True] * (
        len(answer))
    text = tok.decode(ids)
    assert text.startswith("### User:\nSummarise")
    assert "word word\n\n### Assistant:\nA short" in text


def test_a_long_answer_keeps_a_quarter_of_the_context_for_the_prompt_and_loses_its_end(tok):
    record = {"instruction": "Count.", "output": " ".join(str(i) for i in range(100))}
    prompt = enc(tok, "### User:\nCount.\n\n### Assistant:\n")
    assert len(prompt) == 12
    ids, scored, dropped, cut = fit_conversation(as_conversation(record), 48)
    assert cut and not dropped and len(ids) == 48
    assert ids[:12] == prompt                       # a quarter of 48: the prompt stays whole
    assert ids[12:] == enc(tok, record["output"])[:36]
    assert EOT not in ids and scored == [False] * 12 + [True] * 36
    # a prompt longer than a quarter of the context keeps exactly a quarter
    record = {"instruction": "Count " * 60, "output": " ".join(str(i) for i in range(100))}
    ids, scored, _, cut = fit_conversation(as_conversation(record), 40)
    assert cut and len(ids) == 40 and scored == [False] * 10 + [True] * 30


def test_a_long_conversation_drops_its_oldest_exchanges_first(tok):
    messages = as_conversation(CONVERSATION)
    full, _ = render_conversation(messages)
    last_only, last_scored = render_conversation(messages[:1] + messages[3:])
    ids, scored, dropped, cut = fit_conversation(messages, len(full) - 1)
    assert (ids, scored, dropped, cut) == (last_only, last_scored, 1, False)
    assert tok.decode(ids).startswith("### System:\nAnswer in one word.")   # system stays
    dataset = InstructionDataset([CONVERSATION, ALPACA], max_length=len(full) - 2)
    assert dataset.truncated == 1


def test_everything_fits_when_the_context_allows(tok):
    dataset = InstructionDataset([ALPACA, CONVERSATION], max_length=1024)
    assert dataset.truncated == 0


# ---- the split by record ----------------------------------------------------------------

RECORDS = [{"instruction": f"Add {a} and {b}.", "output": str(a + b)}
           for a in range(20) for b in range(10)]


def test_the_split_is_by_whole_record_and_the_same_every_time():
    train, valid = split_records(RECORDS, 0.1, seed=123)
    assert sorted(map(json.dumps, train + valid)) == sorted(map(json.dumps, RECORDS))
    assert [r for r in RECORDS if r in valid] == valid            # file order kept
    assert 10 <= len(valid) <= 30                                 # about a tenth of 200
    assert split_records(RECORDS, 0.1, seed=123) == (train, valid)
    assert split_records(RECORDS, 0.1, seed=7)[1] != valid        # the seed decides
    # a record's side depends on itself, not on its neighbours or the file's order
    shuffled = RECORDS[::-1] + [{"instruction": "New.", "output": "x"}]
    assert all(r in split_records(shuffled, 0.1, seed=123)[1] for r in valid)
    twice = split_records(RECORDS + RECORDS, 0.1, seed=123)[1]    # duplicates: same side
    assert twice == valid + valid


def test_the_split_never_leaves_a_side_empty():
    two = RECORDS[:2]
    assert [len(side) for side in split_records(two, 0.01)] == [1, 1]
    with pytest.raises(ValueError, match="1 record"):
        split_records(RECORDS[:1])
    with pytest.raises(ValueError, match="valid_fraction"):
        split_records(RECORDS, 1.5)


# ---- reading files, and their one-line errors -------------------------------------------

def test_json_and_jsonl_files_read_alike(tmp_path):
    records = [ALPACA, CONVERSATION]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "a.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n\n")
    (tmp_path / "bom.jsonl").write_text("\ufeff" + json.dumps(ALPACA), encoding="utf-8")
    # CRLF line ends, and a line separator (U+2028) that JSON lets a string hold as it is
    odd = {"instruction": "a\u2028b", "output": "c"}
    (tmp_path / "odd.jsonl").write_bytes(
        (json.dumps(odd, ensure_ascii=False) + "\r\n" + json.dumps(ALPACA) + "\r\n").encode())
    assert read_records(tmp_path / "a.json") == records
    assert read_records(tmp_path / "a.jsonl") == records
    assert read_records(tmp_path / "bom.jsonl") == [ALPACA]
    assert read_records(tmp_path / "odd.jsonl") == [odd, ALPACA]
    with pytest.raises(FileNotFoundError, match="no instruction file at .*none.jsonl"):
        read_records(tmp_path / "none.jsonl")
    loader = create_instruction_dataloader(str(tmp_path / "a.jsonl"), batch_size=2,
                                           max_length=64, shuffle=False)
    assert len(loader.dataset) == 2


@pytest.mark.parametrize("name, text, message", [
    ("e.jsonl", "", "e.jsonl is empty: put records in it"),
    ("e.json", "[]", "e.json holds no records"),
    ("e.jsonl", "\n  \n", "e.jsonl holds no records"),
    ("b.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n',
     'b.jsonl line 3: it has no "output"'),
    ("b.jsonl", '{"instruction": "a", "output": "b"}\n{"prompt": "a"}\n',
     "b.jsonl line 2: neither an Alpaca record"),
    ("b.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n',
     "b.jsonl line 2 is not valid JSON"),
    ("b.json", '[{"instruction": "a", "output": "b"}, {"instruction": "", "output": "b"}]',
     'b.json record 1 (counting from 0): "instruction" must be a non-empty string'),
    ("b.json", '{"instruction": "a", "output": "b"}', "b.json holds a JSON dict, not a list"),
    ("b.json", '[{"instruction": "a", "output": 3}]', '"output" must be a string, got 3'),
    ("b.jsonl", '{"messages": []}', '"messages" must be a non-empty list'),
    ("b.jsonl", '{"messages": [{"role": "user", "content": "a"}]}',
     "the last message must be the assistant's"),
    ("b.jsonl", '{"messages": [{"role": "user", "content": "a"}, '
                '{"role": "bot", "content": "b"}]}', "message 1 has role 'bot'"),
    ("b.jsonl", '{"messages": [{"role": "user", "content": "a"}, '
                '{"role": "system", "content": "b"}]}', "message 1 is 'system' where "
                                                        "'assistant' was due"),
    ("b.jsonl", '{"messages": [{"role": "assistant", "content": "a"}]}',
     "message 0 is 'assistant' where 'user' was due"),
    ("b.jsonl", '{"messages": [{"role": "user"}]}',
     'message 0 must be an object with "role" and "content"'),
    ("b.jsonl", '["a list"]', "a record must be a JSON object, got list"),
])
def test_bad_files_get_one_line_naming_the_record(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        read_records(path)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(path))


def test_a_format_can_be_insisted_on(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(CONVERSATION) + "\n")
    assert len(read_records(path)) == 2                     # detected record by record
    with pytest.raises(ValueError, match="line 2: a messages record where format='alpaca'"):
        read_records(path, format="alpaca")
    with pytest.raises(ValueError, match="line 1: a alpaca record where format='messages'"):
        read_records(path, format="messages")
    with pytest.raises(ValueError, match="format must be one of"):
        read_records(path, format="sharegpt")
    with pytest.raises(ValueError, match="records record 0"):
        InstructionDataset([{"text": "a"}])


def test_the_shipped_instruction_set_reads_and_fits():
    from conftest import ROOT
    records = read_records(ROOT / "data" / "instructions.jsonl")
    assert len(records) >= 300 and len({json.dumps(r) for r in records}) == len(records)
    dataset = InstructionDataset(records, max_length=128)
    assert dataset.truncated == 0


def test_fetch_records_downloads_once_then_uses_the_file(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "set.jsonl").write_text(json.dumps(ALPACA) + "\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=served)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/set.jsonl"
    try:
        path = fetch_records(url, tmp_path / "data")
    finally:
        server.shutdown()
        server.server_close()
    assert path == tmp_path / "data" / "set.jsonl" and read_records(path) == [ALPACA]
    assert fetch_records(url, tmp_path / "data") == path     # the server is gone: no request
    with pytest.raises(ValueError, match="names no file"):
        fetch_records("http://127.0.0.1:1/", tmp_path / "data")
