"""The layout's promises: public names where the README says, and no import cycles."""

import ast
import importlib

import pytest

from conftest import ROOT

# The names the README, the notebooks and users' code import, by module.
PUBLIC = {
    "model": ["GPTModel", "GPT_CONFIG_124M", "MODEL_CONFIGS", "save_checkpoint",
              "load_checkpoint", "KVCache", "validate_config"],
    "generate": ["generate_text", "generate_tokens", "text_to_token_ids", "token_ids_to_text",
                 "generate_and_print", "filtered_probs", "sample_next_token", "TextStreamer"],
    "train_utils": ["train_model", "calc_loss_batch", "calc_loss_loader", "evaluate_model",
                    "plot_losses", "print_model_params", "get_device", "make_optimizer",
                    "lr_at", "plan_steps", "save_history"],
    "dataset": ["get_tokenizer", "GPTDataset", "create_dataloader", "split_train_val_test",
                "prepare_splits", "load_tokens", "default_corpus_text", "read_text"],
    "download_weights": ["download_file", "download_and_save_gpt2",
                         "load_gpt2_params_from_tf_ckpt", "load_weights_into_gpt"],
    "download_weights_hf": ["load_weights_into_gpt", "load_gpt2_hf", "export_to_hf"],
    "cpu_kernels": ["ENABLED", "disabled", "packed_for_cpu", "screened_argmax",
                    "tune_malloc", "linear", "head_logits"],
    "fused_loss": ["ENABLED", "disabled", "head_cross_entropy"],
    "fileio": ["atomic_write", "atomic_save", "read_checkpoint"],
    "gpt2_params": ["gpt2_param_names", "iter_gpt2_weights"],
    "devices": ["get_device", "setup_distributed", "wrap_model"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_importable_where_the_readme_says(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lost {missing}"


def _imports(path, modules):
    """Top-level modules of this repository that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found & modules - {path.stem}


def test_no_two_top_level_modules_import_each_other():
    # not even through an import inside a function: a cycle means the layering is wrong
    paths = sorted(ROOT.glob("*.py"))
    modules = {p.stem for p in paths}
    graph = {p.stem: _imports(p, modules) for p in paths}

    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return trail + [start]
                if dep not in trail:
                    stack.append((dep, trail + [dep]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_model_py_imports_no_training_or_file_format_code():
    # a learner reads model.py as GPT-2: the kernels, the fused loss and the file plumbing
    # are one call away
    assert _imports(ROOT / "model.py", {p.stem for p in ROOT.glob("*.py")}) == {
        "cpu_kernels", "fused_loss", "fileio"}
