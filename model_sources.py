"""Any model source -> a GPTModel: the one loader train.py, generate.py and evaluate.py share.

    load_model("model_weights/trained_gpt2.pth")    a checkpoint of ours   (model.load_checkpoint)
    load_model("my-hf-folder")                      save_pretrained output (download_weights_hf)
    load_model("openai-community/gpt2")             a Hugging Face Hub id  (downloaded once)
    load_model("my-model.gguf")                     a GGUF file: ours, or llama.cpp's converter's
                                                    (download_weights_hf.load_gguf)
    load_model("124M") / "gpt2-small (124M)"        OpenAI's weights, through the Hub, or with
                                                    openai_tf=True their TF checkpoint
                                                    (download_weights)

Before fine-tuning, ``crop_context`` shortens the context (nanoGPT's crop_block_size) and
``set_dropout`` sets the dropout rate; neither changes what the model computes on a sequence
that fits.
"""

import torch.nn as nn

from dataset import get_tokenizer
from download_weights import download_and_save_gpt2
from download_weights_hf import SOURCES_HELP, load_source  # noqa: F401 (the CLIs import it)
from model import GPT_CONFIG_124M, MODEL_CONFIGS, OPENAI_SIZES, load_checkpoint, validate_config


def load_model(source, device=None, dtype=None, cfg=None, cache_dir="model_weights",
               openai_tf=False):
    """A GPTModel in eval mode on ``device`` from ``source`` (see the module docstring).

    ``cfg`` is only for a .pth that holds a bare state dict. ``dtype`` ("bf16", ...) converts
    the weights. Hub ids and size names download into ``cache_dir`` once; ``openai_tf``
    takes OpenAI's original TensorFlow checkpoint for a size name instead of the Hub's copy
    (the same weights; it needs tensorflow). Every other source is
    download_weights_hf.load_source's, which download_weights_hf.py --export shares.
    """
    if openai_tf and str(source) not in OPENAI_SIZES and str(source) not in MODEL_CONFIGS:
        raise ValueError(f"--init-from-tf (openai_tf=True) takes one of OpenAI's sizes "
                         f"{list(OPENAI_SIZES)}, not {str(source)!r}: a .pth, a folder or a Hub "
                         f"id loads as it is, without it")
    if openai_tf and cfg is None:
        pth = download_and_save_gpt2(str(source), target_dir=cache_dir)
        return load_checkpoint(pth, device=device, dtype=dtype)
    return load_source(source, device=device, dtype=dtype, cfg=cfg, cache_dir=cache_dir)


def load_model_and_tokenizer(source, classifier=False, **options):
    """``(load_model(source, **options), the tokenizer it reads)``: GPT-2's, or the run's own
    vocabulary that a checkpoint or export carries (dataset.get_tokenizer); generate.py,
    evaluate.py and chat.py need no tokenizer flag. A model whose embedding has another
    number of rows than its own tokenizer has tokens is refused, and so is a classifier
    (classify.py) where a language model is wanted, or the other way round (``classifier``)."""
    model = load_model(source, **options)
    labels = model.cfg.get("labels")
    if classifier and labels is None:
        raise ValueError(f"{source} is a language model, not a classifier; make one with "
                         f"python train.py --task classify --init-from {source} --data FILE")
    if labels is not None and not classifier:
        raise ValueError(f"{source} is a classifier (classes {labels}), not a language model: "
                         f"use it with classify.py or evaluate.py --task classify")
    tokenizer = get_tokenizer(source)
    own, vocab = tokenizer.name != "gpt2", model.cfg["vocab_size"]
    if vocab < tokenizer.n_vocab or (own and vocab != tokenizer.n_vocab):
        raise ValueError(f"{source}: the model has {vocab} token embeddings but its tokenizer "
                         f"({tokenizer.name}) has {tokenizer.n_vocab} tokens, so they do not "
                         f"belong together; pass the checkpoint its training run saved")
    return model, tokenizer


def crop_context(model, context_length):
    """Keep only the first ``context_length`` positions (in place; returns the model).

    A model trained on 1024 positions computes exactly the same for shorter sequences, so
    cropping the position embedding changes nothing but what fits: attention and the
    activations of fine-tuning then cost what the shorter context costs.
    """
    have = model.cfg["context_length"]
    if isinstance(context_length, bool) or not isinstance(context_length, int) or not (
            1 <= context_length <= have):
        raise ValueError(f"context_length must be an int in 1..{have} (the model's), got "
                         f"{context_length!r}: position embeddings beyond the trained ones "
                         f"do not exist")
    if context_length < have:
        weight = model.pos_emb.weight
        model.pos_emb.weight = nn.Parameter(weight.detach()[:context_length].clone(),
                                            requires_grad=weight.requires_grad)
        model.pos_emb.num_embeddings = context_length
        model.cfg["context_length"] = context_length
    return model


def set_dropout(model, rate):
    """Set every dropout of ``model`` (embeddings, attention, residual branches) to ``rate``;
    ours keeps it in its config too. Any nn.Module goes (bench/ sets HF's and nanoGPT's)."""
    cfg = validate_config({**getattr(model, "cfg", GPT_CONFIG_124M), "drop_rate": rate})
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = rate
        elif hasattr(m, "dropout") and isinstance(m.dropout, float):   # MultiHeadAttention
            m.dropout = rate
    if hasattr(model, "cfg"):
        model.cfg = cfg
    return model
