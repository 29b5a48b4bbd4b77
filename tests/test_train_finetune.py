"""Issue 14: fine-tuning from any weights (full or LoRA) and strided perplexity."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import evaluate
import generate
from conftest import make_hf_model, signal_at_first_save
from dataset import create_dataloader, default_corpus_text, get_tokenizer, load_tokens
from download_weights_hf import export_to_hf, load_weights_into_gpt
from engine.checkpoints import read_checkpoint
from engine.runs import in_order
from lora import add_lora, lora_config, merge
from model import GPTModel, load_checkpoint
from model_sources import crop_context, load_model, set_dropout
from train import main
from train_utils import recompute_activations, train_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--batch-size", "4", "--eval-iter", "2", "--no-progress", "--device", "cpu",
       "--dtype", "fp32", "--start-context", "The", "--context-length", "32"]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random GPT-2 (GPT-2's vocabulary, 64 positions) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    make_hf_model(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                  seed=3).save_pretrained(folder)
    return folder


def _data(tmp_path, n=30_000):
    (tmp_path / "input.txt").write_text(default_corpus_text()[:n])
    return ["--data", str(tmp_path / "input.txt"), "--out", str(tmp_path / "run.pth")]


def _hf_loss(hf, tokens, ctx, batch_size, n_batches):
    """GPT2LMHeadModel's mean per-token loss on train_model's evaluation windows."""
    loader = in_order(create_dataloader(tokens, batch_size, ctx, ctx, shuffle=False))
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            if i == n_batches:
                break
            logits = hf(input_ids=x).logits
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / count


def test_init_from_a_folder_starts_at_its_own_loss_and_lowers_it(tmp_path, hf_folder, capsys):
    from transformers import GPT2LMHeadModel
    history = main([*_data(tmp_path), *RUN, "--init-from", str(hf_folder), "--max-steps", "12",
                    "--eval-freq", "6", "--learning-rate", "3e-3"])
    out = capsys.readouterr().out
    hf = GPT2LMHeadModel.from_pretrained(hf_folder).eval()
    tokens = load_tokens(tmp_path / "train.txt")
    want = _hf_loss(hf, tokens, 32, 4, 2)
    assert history["step"][:2] == [0, 6]
    assert history["train_loss"][0] == pytest.approx(want, abs=1e-5)
    assert f"Ep 0 (Step 000000): Train loss {history['train_loss'][0]:.3f}" in out
    assert history["train_loss"][-1] < history["train_loss"][0] - 0.5
    ckpt = read_checkpoint(tmp_path / "run.pth")
    assert ckpt["settings"]["init_from"] == str(hf_folder)
    assert ckpt["config"] == {**load_model(hf_folder).cfg, "context_length": 32}
    assert ckpt["config"]["tie_embeddings"] is True                  # the head stays tied
    model = load_checkpoint(tmp_path / "run.pth")
    assert model.out_head.weight is model.tok_emb.weight


@pytest.mark.parametrize("flags, match", [
    (["--emb-dim", "64"], r"these flags would change it: --emb-dim 64 \(it has 32\)"),
    (["--context-length", "100"], r"--context-length 100 \(it has 64 positions\)"),
    (["--no-tie-embeddings"], r"--tie-embeddings False \(it has True\)"),
])
def test_init_from_refuses_flags_that_change_the_shape(tmp_path, hf_folder, flags, match):
    with pytest.raises(ValueError, match=match):
        main([*_data(tmp_path), *RUN[:-2], "--init-from", str(hf_folder), *flags])


def test_crop_context_keeps_what_the_model_computes(hf_pair):
    hf, ours = hf_pair
    idx = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = ours(idx)
        cropped = crop_context(load_model_copy(ours), 12)
        assert cropped.pos_emb.weight.shape == (12, 48) and cropped.cfg["context_length"] == 12
        torch.testing.assert_close(cropped(idx), before)


def load_model_copy(model):
    copy = GPTModel(model.cfg)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


# ---- LoRA ----------------------------------------------------------------------------------

def _tiny_pretrained(seed=0):
    hf = make_hf_model(vocab_size=50257, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                       seed=seed)
    model = GPTModel({"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2,
                      "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": True})
    return load_weights_into_gpt(model, hf)


def test_lora_trains_only_the_adapters_and_merges_exactly():
    model = add_lora(_tiny_pretrained(), rank=4, alpha=8)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    assert len(trainable) == 2 * 4 * 2                         # A, B x 4 layers x 2 blocks
    assert lora_config(model) == {"rank": 4, "alpha": 8, "targets": ["qkv", "out_proj", "fc",
                                                                       "proj"]}
    tokens = torch.randint(0, 50257, (3000,), generator=torch.Generator().manual_seed(1))
    train = create_dataloader(tokens, batch_size=4, max_length=32, stride=32)
    history = train_model(model, train, train, device="cpu", num_epochs=1, eval_freq=100,
                          learning_rate=1e-2, progress=False)
    assert history["final_step"] == len(train)
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), f"{name} moved"            # bit for bit
    assert all(model.get_parameter(n).abs().sum() > 0 for n in trainable if n.endswith(".B"))
    # merged: W + (alpha / r) A B in an ordinary model, the same function
    plain = merge(model).eval()
    model.eval()
    assert lora_config(plain) is None
    layer = model.trf_blocks[1].ff.fc
    torch.testing.assert_close(plain.trf_blocks[1].ff.fc.weight,
                               layer.base.weight + 2.0 * layer.A @ layer.B)
    idx = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_a_lora_checkpoint_loads_generates_and_exports_merged(tmp_path, hf_folder, capsys):
    from transformers import GPT2LMHeadModel
    main([*_data(tmp_path), *RUN, "--init-from", str(hf_folder), "--lora-rank", "4",
          "--max-steps", "6", "--learning-rate", "1e-2"])
    out = capsys.readouterr().out
    # per block: qkv 32x4 + 4x96, out_proj 32x4 + 4x32, fc 32x4 + 4x128, proj 128x4 + 4x32
    assert "Trainable parameters: 4,096 (" in out
    ckpt = read_checkpoint(tmp_path / "run.pth")
    assert ckpt["lora"]["rank"] == 4 and len(ckpt["lora"]["adapters"]) == 16
    # the adapters on the frozen source are what the merged weights compute
    rebuilt = add_lora(crop_context(load_model(hf_folder), 32), 4, 16.0)
    rebuilt.load_state_dict({**rebuilt.state_dict(), **ckpt["lora"]["adapters"]})
    merged = load_checkpoint(tmp_path / "run.pth")
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), rebuilt.eval()(idx), atol=1e-5, rtol=1e-5)
    text = generate.main(["--weights", str(tmp_path / "run.pth"), "--max-new-tokens", "5",
                          "--device", "cpu"])
    assert text.startswith("Every effort moves you")
    export_to_hf(rebuilt, tmp_path / "hf-out")                  # a LoRA model exports merged
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf-out").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, merged(idx), atol=1e-5, rtol=1e-5)


def _final(out):
    return [line for line in out.splitlines() if line.startswith("final:")][-1]


def test_a_lora_run_resumes_bit_exactly_after_kill_9(tmp_path, hf_folder):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def cmd(folder, *extra):
        return [sys.executable, os.path.join(ROOT, "train.py"), *_data(folder, 40_000), *RUN,
                "--init-from", str(hf_folder), "--lora-rank", "4", "--max-steps", "40",
                "--eval-freq", "10", "--checkpoint-every", "3", "--drop-rate", "0.1", *extra]

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = subprocess.run(cmd(ref_dir), capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    code, _, _ = signal_at_first_save(cmd(tmp_path), tmp_path / "run.pth", signal.SIGKILL)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = read_checkpoint(tmp_path / "run.pth")["step"]
    assert 3 <= killed_at < 40
    resumed = subprocess.run(cmd(tmp_path, "--resume"), capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {killed_at}" in resumed.stdout
    assert _final(resumed.stdout) == _final(ref.stdout)
    hist = json.loads((tmp_path / "run_history.json").read_text())
    ref_hist = json.loads((ref_dir / "run_history.json").read_text())
    assert hist["val_loss"] == ref_hist["val_loss"] and hist["step_loss"] == ref_hist["step_loss"]


def test_resume_refuses_another_lora_shape(tmp_path, hf_folder):
    main([*_data(tmp_path), *RUN, "--init-from", str(hf_folder), "--lora-rank", "4",
          "--max-steps", "2"])
    with pytest.raises(ValueError, match=r"trained with LoRA \{'rank': 4, .*and this model has "
                                         r"\{'rank': 8"):
        main([*_data(tmp_path), *RUN, "--init-from", str(hf_folder), "--lora-rank", "8",
              "--max-steps", "4", "--resume"])


# ---- evaluate.py ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, ctx, stride", [(300, 40, 16), (97, 40, 39), (41, 40, 20),
                                            (250, 32, 32), (10, 40, 5)])
def test_strided_windows_score_each_token_once(n, ctx, stride):
    seen = []
    for begin, end, k in evaluate.strided_windows(n, ctx, stride):
        assert end - begin <= ctx and k <= end - begin - 1
        seen += range(end - k, end)
    if stride < ctx:
        assert seen == list(range(1, n))                 # every token after the first, once
    else:
        assert len(seen) == len(set(seen)) and seen[-1] == n - 1


def _hf_strided_loss(hf, tokens, ctx, stride):
    """The loop of transformers' guide "Perplexity of fixed-length models", exact counts."""
    ids = torch.as_tensor(tokens)[None]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + ctx, ids.shape[1])
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())     # the labels after the shift
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == ids.shape[1]:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [16, 39, 7])
def test_evaluate_equals_the_strided_loss_of_hugging_face(hf_pair, stride):
    hf, ours = hf_pair
    tokens = torch.randint(0, 211, (300,), generator=torch.Generator().manual_seed(4))
    got = evaluate.evaluate_perplexity(ours, tokens, context_length=40, stride=stride,
                                       batch_size=3, progress=False)
    want, n = _hf_strided_loss(hf, tokens, 40, stride)
    assert got["tokens"] == n == 299
    assert got["loss"] == pytest.approx(want, abs=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_evaluate_cli_prints_the_last_line(tmp_path, hf_folder, capsys):
    text = tmp_path / "eval.txt"
    text.write_text(default_corpus_text()[:3000])
    result = evaluate.main(["--weights", str(hf_folder), "--data", str(text),
                            "--context-length", "32", "--no-progress", "--device", "cpu"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == (f"loss={result['loss']:.6f} perplexity={result['perplexity']:.4f} "
                    f"bits_per_byte={result['bits_per_byte']:.6f} tokens={result['tokens']}")
    tokens = load_tokens(text)
    assert result["tokens"] == len(tokens) - 1                       # stride 16 < 32
    data = text.read_bytes()
    first = len(get_tokenizer().decode_bytes(tokens[:1].tolist()))
    nats = result["loss"] * result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / (len(data) - first))


def test_generate_cli_takes_a_save_pretrained_folder(hf_folder, capsys):
    text = generate.main(["--weights", str(hf_folder), "--max-new-tokens", "4",
                          "--temperature", "0", "--device", "cpu"])
    assert text.startswith("Every effort moves you") and len(text) > len("Every effort moves you")


@pytest.mark.parametrize("with_lora", [False, True])
def test_recomputed_activations_give_the_same_training(with_lora):
    # activation checkpointing changes only what is kept in memory: the same dropout masks,
    # losses and weights, step by step (full fine-tuning and LoRA)
    def run(recompute):
        model = _tiny_pretrained(seed=2)
        model = add_lora(model, 4) if with_lora else model
        torch.manual_seed(0)
        model = recompute_activations(model) if recompute else model
        set_dropout(model, 0.1)
        tokens = torch.randint(0, 50257, (1500,), generator=torch.Generator().manual_seed(1))
        train = create_dataloader(tokens, batch_size=4, max_length=32, stride=32)
        history = train_model(model, train, train, device="cpu", num_epochs=1, eval_freq=100,
                              learning_rate=1e-2, progress=False)
        return history["step_loss"], {n: p.detach().clone() for n, p in model.state_dict().items()}
    plain_losses, plain_state = run(False)
    losses, state = run(True)
    assert losses == plain_losses
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
