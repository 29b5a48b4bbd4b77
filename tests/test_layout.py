"""The layout's promises: public names where the README says, the textbook above the engine,
no import cycles, and textbook modules short enough to read."""

import ast
import importlib
import json
import re

import pytest

from conftest import ROOT

# The names the README, the notebooks and users' code import, by module.
PUBLIC = {
    "model": ["GPTModel", "GPT_CONFIG_124M", "MODEL_CONFIGS", "save_checkpoint",
              "load_checkpoint", "KVCache", "validate_config", "size_key", "unwrap_model"],
    "generate": ["generate_text", "generate_tokens", "text_to_token_ids", "token_ids_to_text",
                 "generate_and_print", "filtered_probs", "sample_next_token", "TextStreamer"],
    "train_utils": ["train_model", "TrainConfig", "calc_loss_batch", "calc_loss_loader",
                    "evaluate_model", "plot_losses", "print_model_params", "get_device",
                    "make_optimizer", "lr_at", "plan_steps", "save_history",
                    "recompute_activations", "Objective", "loss_and_metrics", "dpo_loss",
                    "dpo_objective", "sequence_logprobs"],
    "dataset": ["get_tokenizer", "GPTDataset", "create_dataloader", "split_train_val_test",
                "prepare_splits", "load_tokens", "default_corpus_text", "read_text",
                "gpt2_bpe_files", "render_conversation", "create_instruction_dataloader",
                "read_records", "split_records", "read_preferences", "PreferenceDataset",
                "preference_conversations"],
    "download_weights": ["download_file", "download_and_save_gpt2",
                         "load_gpt2_params_from_tf_ckpt", "load_weights_into_gpt"],
    "download_weights_hf": ["load_weights_into_gpt", "load_gpt2_hf", "export_to_hf",
                            "HF_HUB_IDS", "export_to_gguf", "load_gguf", "load_source"],
    "model_sources": ["load_model", "crop_context", "set_dropout"],
    "lora": ["add_lora", "merge", "merged_state", "lora_config", "LoRALinear"],
    "evaluate": ["evaluate_perplexity", "load_examples", "hellaswag_score", "lambada_score",
                 "wikitext_score", "loglikelihoods", "encode_pair", "classification_scores"],
    "chat": ["Chat", "chat_loop", "main"],
    "classify": ["make_classifier", "last_token_index", "classify_logits", "set_trainable",
                 "ClassificationDataset", "create_classification_dataloader",
                 "classification_loss", "load_classifier", "class_probabilities", "main"],
    "tokenizer": ["BPETokenizer"],
    "look_inside": ["attention_weights", "forward_shapes", "parameter_counts", "flops_per_token",
                    "plot_attention"],
    "engine.cpu_kernels": ["ENABLED", "disabled", "packed_for_cpu", "screened_argmax",
                           "tune_malloc", "linear", "head_logits"],
    "engine.fused_loss": ["ENABLED", "disabled", "head_cross_entropy"],
    "engine.fileio": ["atomic_write", "atomic_save"],
    "engine.checkpoints": ["read_checkpoint", "write_checkpoint"],
    "engine.gpt2_params": ["gpt2_param_names", "iter_gpt2_weights"],
    "engine.gguf_file": ["write_gguf", "read_gguf", "own_tokenizer", "TYPES"],
    "engine.devices": ["get_device", "setup_distributed", "wrap_model", "training_precision"],
    "engine.int8": ["ENABLED", "disabled", "quantize_", "Int8Linear", "is_quantized"],
    "engine.tuning": ["MODE", "pick", "timings", "measure", "summary"],
    "engine.scoring": ["ENABLED", "disabled", "batched_loglikelihoods"],
    "engine.eval_data": ["TASK_FILES", "task_file", "read_hellaswag", "read_lambada",
                         "read_wikitext"],
}

TEXTBOOK = sorted(p.stem for p in ROOT.glob("*.py"))
ENGINE = sorted(f"engine.{p.stem}" for p in (ROOT / "engine").glob("*.py")
                if p.stem != "__init__")


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_importable_where_the_readme_says(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"


def _imports(path):
    """Modules of this repository that ``path`` imports, anywhere in the file (also inside
    functions): top-level ones by name, the engine's as "engine.<name>"."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names]
                                     if node.module == "engine" else [])
        for name in names:
            top = name.split(".")[0]
            if top in TEXTBOOK:
                found.add(top)
            elif name in ENGINE or (top == "engine" and name.count(".") == 1):
                found.add(name if name in ENGINE else ".".join(name.split(".")[:2]))
    return found


def _graph():
    paths = {m: ROOT / f"{m}.py" for m in TEXTBOOK}
    paths.update({m: ROOT / "engine" / f"{m.split('.')[1]}.py" for m in ENGINE})
    return {m: _imports(p) - {m} for m, p in paths.items()}


def test_no_two_modules_import_each_other():
    # not even through an import inside a function: a cycle means the layering is wrong
    graph = _graph()

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for dep in graph.get(node, ()):
                if dep == start:
                    return trail + [start]
                if dep not in trail:
                    stack.append((dep, trail + [dep]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_the_engine_imports_no_textbook_module():
    graph = _graph()
    upward = {m: sorted(d for d in graph[m] if d in TEXTBOOK) for m in ENGINE}
    assert not any(upward.values()), f"engine modules importing the textbook: {upward}"


def test_model_py_reaches_the_engine_only_for_kernels_and_files():
    # a learner reads model.py as GPT-2: the kernels, the fused loss and the file plumbing
    # are one call away, and no other textbook module is needed to follow it
    assert _graph()["model"] == {"engine.cpu_kernels", "engine.decoder", "engine.fused_loss",
                                 "engine.attention", "engine.devices", "engine.checkpoints",
                                 "engine.int8", "engine.gelu"}


def test_converters_and_entry_points_are_untangled():
    graph = _graph()
    assert "download_weights" not in graph["download_weights_hf"]
    assert "download_weights_hf" not in graph["generate"] | graph["evaluate"]


def test_the_top_level_stays_a_short_textbook():
    lines = {m: len((ROOT / f"{m}.py").read_text().splitlines()) for m in TEXTBOOK}
    # the eleven of the layout, then chat.py, tokenizer.py and classify.py (GPT-2 as a
    # classifier: Raschka's chapter 6 in one file)
    assert len(TEXTBOOK) <= 14, f"{len(TEXTBOOK)} top-level modules: {TEXTBOOK}"
    assert lines["model"] <= 400 and lines["dataset"] <= 300 and lines["train_utils"] <= 500, \
        {m: lines[m] for m in ("model", "dataset", "train_utils")}
    tree = ast.parse((ROOT / "train_utils.py").read_text())
    loop = next(n for n in tree.body if getattr(n, "name", None) == "train_model")
    assert loop.end_lineno - loop.lineno + 1 <= 100


# History and one machine's timings belong in git log and bench/README.md, not in what a
# learner reads: "as before" of what? "2x faster" on which CPU?
HISTORY_OR_TIMING = re.compile(
    r"original project|as before|\b\d+(\.\d+)?\s?(ms|us|µs)\b|\b\d+(\.\d+)?(-\d+(\.\d+)?)?x "
    r"(faster|slower|MKL)|~\d+(\.\d+)?x\b|\b\d+\.\d+ s\b", re.IGNORECASE)


def _prose(path):
    """A module's whole text; a notebook's markdown and the comments of its code cells."""
    if path.suffix != ".ipynb":
        return path.read_text()
    cells = json.loads(path.read_text())["cells"]
    return "\n".join(
        "".join(c["source"]) if c["cell_type"] == "markdown" else
        "\n".join(line[line.index("#"):] for line in "".join(c["source"]).splitlines()
                  if "#" in line)
        for c in cells)


@pytest.mark.parametrize("path", ["model.py", "dataset.py", "generate.py", "train_utils.py",
                                  *sorted(p.name for p in ROOT.glob("*.ipynb"))])
def test_the_textbook_says_what_and_why_not_history_or_one_machines_timings(path):
    found = [m.group(0) for m in HISTORY_OR_TIMING.finditer(_prose(ROOT / path))]
    assert not found, f"{path}: {found}"
