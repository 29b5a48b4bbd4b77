"""GPT-2 as a classifier: "is this message spam?" (Raschka's chapter 6; Hugging Face's
GPT2ForSequenceClassification).

    python classify.py --weights model_weights/classifier.pth --text "You won a prize! Call now"

A language model's output head turns each position's final vector (C numbers) into one score
per token of the vocabulary: what comes next. A classifier keeps everything below the head and
replaces the head with a small one that scores the classes instead (make_classifier):

    token ids (B, T)  -> GPT-2 up to its final LayerNorm -> final vectors      (B, T, C)
      -> Linear(C, num_classes), the new head, at every position           (B, T, classes)
      -> the scores at each text's last real token (last_token_index)       (B, classes)

Why the last token: attention is causal, so the vector at position t has read tokens 0..t and
nothing after them. Only the last token's vector has read the whole text (the first token's
has read one word). In a batch, texts of different lengths are padded; "last" is then the
last real token: before the padding when it is on the right (causal attention keeps the real
tokens from seeing it), the last position when it is on the left (where an attention mask
keeps every token from seeing the padding and restarts the positions at each text's first
token, as generation does).

What trains (set_trainable): the new head alone; the last N blocks, the final LayerNorm and
the head (the book's choice, N = 1: the pretrained features stay, the top of the network
adapts to the task, and a step costs little); every weight; or LoRA adapters in every block
plus the head (lora.py). The class names travel in the model's config (``config["labels"]``,
model.validate_config), so a checkpoint, an export (download_weights_hf.py) and every loader
know them; train.py --task classify trains one through train_utils.train_model, the one loop,
with classification_loss as its objective.
"""

import argparse
import functools
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dataset import get_tokenizer
from engine.devices import get_device
from engine.records import (  # noqa: F401  (a classifier's data, re-exported: train.py, notebooks)
    check_batch_size,
    fetch_sms_spam,
    label_names,
    read_labelled,
    split_labelled,
)
from lora import lora_config
from model import DTYPES, unwrap_model, validate_config
from model_sources import SOURCES_HELP, load_model_and_tokenizer

# ---------------------------------------------------------------------------------------
# The classifier: a new head, read at the last real token


def make_classifier(model, labels):
    """Replace ``model``'s output head (in place) by a new Linear(C, len(labels)) without a
    bias (GPT2ForSequenceClassification's ``score``), initialised as GPTModel initialises its
    linear layers; the class names go into the config. Returns the model."""
    gpt = unwrap_model(model)
    cfg = validate_config({**gpt.cfg, "labels": list(labels),
                           "tie_embeddings": False})       # a head of its own, not the embedding
    like = gpt.final_norm.weight
    head = nn.Linear(cfg["emb_dim"], len(labels), bias=False, device=like.device,
                     dtype=like.dtype)                                      # (classes, C)
    nn.init.normal_(head.weight, mean=0.0, std=0.02)
    gpt.out_head, gpt.cfg = head, cfg
    return model


def last_token_index(idx, pad_id=None, attention_mask=None):
    """The position of each row's last real token (B,): the last 1 of ``attention_mask`` when
    given, else the last token that is not ``pad_id`` (transformers' rule for
    GPT2ForSequenceClassification), else the last position."""
    B, T = idx.shape
    if attention_mask is None and pad_id is None:
        return torch.full((B,), T - 1, dtype=torch.long, device=idx.device)
    real = attention_mask.bool() if attention_mask is not None else idx != pad_id   # (B, T)
    positions = torch.arange(T, device=idx.device)                                  # (T,)
    return (positions * real).argmax(dim=-1)           # the largest real position    (B,)


def classify_logits(model, idx, pad_id=None, attention_mask=None):
    """Class scores (B, classes) of each row of token ids ``idx`` (B, T). Right padding needs
    only ``pad_id``; left padding needs the ``attention_mask`` (1 for tokens, 0 for padding)."""
    logits = model(idx, attention_mask=attention_mask)            # (B, T, classes)
    last = last_token_index(idx, pad_id, attention_mask)          # (B,)
    return logits[torch.arange(len(idx), device=idx.device), last]  # (B, classes)


def set_trainable(model, what="last:1"):
    """Choose what trains, in place; returns the number of trainable weights.

        "head"      the new head alone, on the features as they are
        "last:N"    the last N blocks, the final LayerNorm and the head (the book: last:1)
        "all"       every weight
        "lora"      a model with LoRA adapters (lora.add_lora): the adapters and the head

    Everything else is frozen (requires_grad False): the optimizer never sees it, so it stays
    bit for bit as it was.
    """
    gpt = unwrap_model(model)
    n_blocks = len(gpt.trf_blocks)
    kind, _, count = what.partition(":")
    if not (what in ("head", "all", "lora") or kind == "last" and count.isdigit()
            and 1 <= int(count) <= n_blocks):
        raise ValueError(f"what trains must be head, last:N (N in 1..{n_blocks}, the "
                         f"model's blocks), all or lora, got {what!r}")
    adapted = lora_config(gpt) is not None
    if adapted != (what == "lora"):
        raise ValueError("LoRA adapters train with the head alone (what='lora'), and 'lora' "
                         "needs a model with adapters (lora.add_lora; train.py --lora-rank R)")
    for name, p in gpt.named_parameters():
        p.requires_grad_(what == "all" or (what == "lora" and name.endswith((".A", ".B"))))
    trained = [gpt.out_head]
    if kind == "last":
        trained += [*gpt.trf_blocks[-int(count):], gpt.final_norm]
    for part in trained:
        part.requires_grad_(True)
    return sum(p.numel() for p in gpt.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------
# Data: each text a row of token ids, its label a class index. Files: read_labelled (CSV,
# TSV, JSONL), label_names (the classes, in order), split_labelled (stratified by class).


class ClassificationDataset(Dataset):
    """One ``(token ids, class index)`` pair per labelled record (``{"text", "label"}``, as
    dataset.read_labelled reads them), ``labels`` giving the class order. Texts longer than
    ``max_length`` tokens keep their first ``max_length`` (``truncated`` counts them)."""

    def __init__(self, records, labels, tokenizer=None, max_length=1024, *, name="the data"):
        tokenizer, index = tokenizer or get_tokenizer(), {n: i for i, n in enumerate(labels)}
        unknown = sorted({r["label"] for r in records} - set(index))
        if unknown:
            raise ValueError(f"{name} has labels {unknown} that are not the classifier's "
                             f"classes {list(labels)}")
        ids = [tokenizer.encode_ordinary(r["text"]) for r in records]
        if [] in ids:
            raise ValueError(f"{name}: text {ids.index([])} (counting from 0) is empty; every "
                             f"text needs at least one token")
        self.truncated = sum(len(x) > max_length for x in ids)
        self.examples = [(torch.tensor(x[:max_length]), index[r["label"]])
                         for x, r in zip(ids, records)]

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]                  # (ids (n,), class index)


def pad_texts(samples, pad_id=50256):
    """[(ids, class), ...] -> (inputs (B, longest) padded on the right with ``pad_id``,
    classes (B,)). No mask is needed: no real token sees the padding after it."""
    inputs = torch.full((len(samples), max(len(x) for x, _ in samples)), pad_id)   # (B, L)
    for row, (x, _) in enumerate(samples):
        inputs[row, :len(x)] = x
    return inputs, torch.tensor([y for _, y in samples])                          # (B,)


def create_classification_dataloader(records, labels, batch_size=8, max_length=1024,
                                     shuffle=True, drop_last=False, tokenizer=None,
                                     generator=None, *, name="the data"):
    """Batches ``(inputs (B, longest), classes (B,))`` of labelled records (pad_texts)."""
    check_batch_size(batch_size)
    dataset = ClassificationDataset(records, labels, tokenizer, max_length, name=name)
    pad = functools.partial(pad_texts, pad_id=(tokenizer or get_tokenizer()).eot_token)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=generator, collate_fn=pad)


def classification_loss(model, batch, device, pad_id=50256):
    """The objective of a classifier's training run (train_utils.Objective): the mean
    cross-entropy of the class scores, and the batch's right answers (its accuracy's sum)."""
    inputs, classes = (t.to(device) for t in batch)
    logits = classify_logits(model, inputs, pad_id)                         # (B, classes)
    loss = F.cross_entropy(logits.float(), classes)
    return loss, {"accuracy": float((logits.argmax(dim=-1) == classes).sum())}


# ---------------------------------------------------------------------------------------
# Using a trained classifier


def load_classifier(source, device=None, dtype=None):
    """``(classifier, tokenizer)`` from any model source that holds one: a checkpoint of
    train.py --task classify, or a GPT2ForSequenceClassification folder."""
    return load_model_and_tokenizer(source, device=device, dtype=dtype, classifier=True)


@torch.no_grad()
def class_probabilities(model, texts, tokenizer=None, batch_size=16):
    """Softmax of the class scores (len(texts), classes), texts cut to the model's context
    and batched (padded on the right), in eval mode."""
    tokenizer = tokenizer or get_tokenizer()
    gpt = unwrap_model(model)
    was_training = gpt.training
    gpt.eval()
    device = next(gpt.parameters()).device
    dataset = ClassificationDataset([{"text": t, "label": gpt.cfg["labels"][0]} for t in texts],
                                    gpt.cfg["labels"], tokenizer, gpt.cfg["context_length"])
    probs = []
    for start in range(0, len(dataset), batch_size):
        inputs, _ = pad_texts(dataset.examples[start:start + batch_size], tokenizer.eot_token)
        logits = classify_logits(gpt, inputs.to(device), tokenizer.eot_token)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    gpt.train(was_training)
    return torch.cat(probs)


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the class a trained classifier gives each "
                                            "text, with the probabilities of all classes.")
    p.add_argument("--weights", required=True, metavar="SOURCE",
                   help=f"a classifier: {SOURCES_HELP} holding one (train.py --task classify)")
    p.add_argument("--text", action="append", default=None,
                   help="a text to classify (repeat for several); none: one text a line "
                        "from the standard input")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best there)")
    args = p.parse_args(argv)
    texts = args.text if args.text is not None else [t for t in sys.stdin.read().split("\n")
                                                     if t.strip()]
    if not texts or not all(t.strip() for t in texts):
        p.error("give a non-empty --text (or texts on the standard input, one a line)")
    model, tokenizer = load_classifier(args.weights, get_device(args.device), args.dtype)
    labels = model.cfg["labels"]
    for text, row in zip(texts, class_probabilities(model, texts, tokenizer)):
        shown = ", ".join(f"{name} {p:.3f}" for name, p in zip(labels, row.tolist()))
        print(f"{labels[int(row.argmax())]}\t({shown})\t{text}")
    return texts


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
