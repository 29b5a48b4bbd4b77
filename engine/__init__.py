"""The engine: what runs GPT-2 fast and safely, and what a learner may skip on a first read.

The textbook modules at the top of the repository (model.py, dataset.py, generate.py,
train_utils.py, ...) say *what* is computed; the modules here only change *how*: faster
kernels, less memory, files that survive a crash, several processes. Each is reached from
the textbook through one small, named call, and none of them imports a textbook module
(what they need, a model or a tokenizer, is passed in).

    cpu_kernels   x86 CPU fast paths behind model.py (oneDNN products, packed decoding,
                  one-row fp32 and bf16 products through decode_kernel.c)
    decoder       batch-1 decoding: a new token through every block in one C call
    fused_loss    the output head and cross-entropy without the whole logits tensor, the
                  rows' softmax and gradient in C (loss_kernel.c)
    attention     training attention on the CPU in blocks of queries, its softmax and dropout
                  in C (attention_kernel.c; PyTorch has no fused CPU kernel with dropout)
    gelu          GPT-2's GELU and its gradient while training on the CPU, one C pass each
                  (gelu_kernel.c)
    int8          int8 inference: Int8Linear, quantize_, its kernels
    pages         the weights decoding streams, in 2 MiB pages (transparent huge pages)
    native        the C kernels (int8_kernel.c; decode_kernel.c, attention_kernel.c,
                  loss_kernel.c and gelu_kernel.c, written in simd.h's vectors for AVX-512,
                  AVX2 or 64-bit Arm's NEON; transpose_kernel.c), compiled once per machine
    tuning        which fast path runs here: each timed once per machine against the code it
                  replaces (what the CPU can do says whether it can run; the clock, whether
                  it does), the timings kept beside the compiled kernels
    fileio        atomic writes (temp file, fsync, rename), Ctrl-C-safe saves, outputs
                  checked before any work (check_output)
    devices       get_device, torchrun set-up, DDP / FSDP wrapping
    gpt2_params   the one table of GPT-2 parameter names (ours, Hugging Face's, OpenAI's,
                  GGUF's)
    gguf_file     GGUF files (llama.cpp's format): write one, read one back
    bpe_files     GPT-2's tokenizer files, offline and sha256-checked
    checkpoints   checkpoint files: written atomically, verified when read
    download      HTTP downloads that resume, retry and never leave a half file
    text_files    reading text, train/valid/test split files and their stamp, default corpus
    token_cache   token ids of big files, cached beside them as uint16
    records       records on disk: instructions, labelled texts (CSV/TSV/JSONL), preference
                  pairs; checks, splits by record (stratified by class), length groups, the
                  SMS Spam Collection download
    runs          a training run on disk: its length, checkpoint save/resume, run checks, the
                  log
    eval_data     the benchmark files (HellaSwag, LAMBADA, WikiText): sources, checks
    scoring       many log-likelihoods at once: evaluate.py's batched fast path

Every fast path has one switch (``ENABLED``, an environment variable, and a ``disabled()``
block) and a test against the plain code it replaces; where it can lose on some CPU, the clock
chooses it where it runs (engine/tuning.py).
"""

import contextlib


@contextlib.contextmanager
def turned_off(module, flag="ENABLED"):
    """Within this block ``module.<flag>`` is False; its old value comes back afterwards."""
    before = getattr(module, flag)
    setattr(module, flag, False)
    try:
        yield
    finally:
        setattr(module, flag, before)
