"""Where the work runs: one device, or one process per device under torchrun.

    get_device()            CUDA, then Apple's MPS, then CPU; or the one asked for
    training_precision()    bf16 autocast where bf16 is native (AMX, AVX512-BF16, CUDA)
    autocast(device, dtype) that autocast, as the training loop enters it
    resolve_dtype("bf16")   the torch dtype of a precision's name
    setup_distributed()     join torchrun's process group: (device, rank, world_size)
    wrap_model(m, "ddp")    DistributedDataParallel, or "fsdp": FSDP2 shards

Device and dtype are chosen once, at the entry point (train.py, generate.py, a notebook's
first cell), and passed down; the other modules read the device from their inputs.
"""

import contextlib
import os
import platform

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def get_device(preferred=None):
    """torch.device to run on: CUDA, then Apple's MPS, then CPU; or the one asked for."""
    if preferred is None or str(preferred) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(preferred)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {str(preferred)!r}; choose cuda, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(preferred)!r} was asked for, but this PyTorch sees no CUDA "
                         f"GPU; use --device cpu or install a CUDA build of torch")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(preferred)!r} was asked for, but MPS (Apple GPU) is not "
                         f"available here; use --device cpu")
    return device


def cpu_info(key):
    """A field of /proc/cpuinfo's first processor ("vendor_id", "flags", "model name"), or
    "" where there is none (not Linux); Windows' platform.processor() names the vendor."""
    try:
        with open("/proc/cpuinfo") as f:
            block = f.read().split("\n\n", 1)[0]
    except OSError:
        return platform.processor() if key == "vendor_id" else ""
    line = next((ln for ln in block.splitlines() if ln.split(":")[0].strip() == key), ":")
    return line.split(":", 1)[1].strip()


def cpu_model():
    """The CPU's name: x86's "model name"; on Arm, which has none, its implementer and part
    numbers ("Arm 0x41 part 0xd0c": a Neoverse N1)."""
    name = cpu_info("model name")
    if name or not cpu_info("CPU part"):
        return name
    return f"Arm {cpu_info('CPU implementer')} part {cpu_info('CPU part')}"


def onednn_bf16():
    """Whether oneDNN, which runs PyTorch's bf16 products on x86 CPUs, has bf16 products here
    (AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX, unless ONEDNN_MAX_CPU_ISA holds it back; never
    where PyTorch was built without it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def native_bf16(device):
    """What makes bf16 matrix products native on ``device`` ("AMX", "AVX512-BF16", "CUDA"),
    or None where bf16 would be emulated (slower than fp32): the CPU's flags, and oneDNN able
    to use them (held back to AVX2, a bf16 step of the built-in corpus took 110 s, not 1.3)."""
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_bf16_supported() else None
    flags = set(cpu_info("flags").split()) if device.type == "cpu" else set()
    why = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    return why if why and onednn_bf16() else None


def training_precision(device, dtype="auto"):
    """("bf16" or "fp32", why) for train_model's ``dtype``: "auto" is bf16 autocast where bf16
    products are native (AMX and AVX512-BF16 CPUs, recent CUDA GPUs), measured 1.5-1.9x an
    fp32 step on both CPU families (bench/train_speed.py), and fp32 elsewhere."""
    if dtype not in ("fp32", "bf16", "auto"):
        raise ValueError(f"dtype must be 'fp32', 'bf16' or 'auto', got {dtype!r}")
    if dtype != "auto":
        return dtype, "as asked"
    why = native_bf16(device)
    return ("bf16", f"auto: {why}") if why else ("fp32", "auto: no native bf16 here")


def autocast(device, dtype):
    """train_model's autocast: bf16 (matmuls in bfloat16: half the bytes, faster units; the
    rest fp32) where training_precision says so, else a context that changes nothing."""
    use_bf16 = training_precision(device, dtype)[0] == "bf16"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


# The precisions weights can be loaded in, by the names the command lines take
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(dtype):
    """``None``, a floating torch dtype, or a name in DTYPES ("bf16") -> torch dtype or None."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be None, one of {list(DTYPES)} or the torch dtype of one "
                     f"(e.g. torch.bfloat16), got {dtype!r}")


# ---------------------------------------------------------------------------------------
# Several processes (torchrun): DistributedDataParallel or FSDP2.
#
# torchrun starts one process per device and tells each its RANK and WORLD_SIZE. Every
# process holds the model (DDP: whole; FSDP: a shard of each weight), trains on its own
# slice of each batch, and the gradients are averaged across processes before the step,
# so all of them take the same step.

def setup_distributed(device_preference=None, backend=None):
    """Join the process group if launched by torchrun; return (device, rank, world_size).

    Without torchrun this returns (get_device(device_preference), 0, 1) and changes nothing.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return get_device(device_preference), 0, 1
    device = get_device(device_preference)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs CUDA GPUs but the device is {device.type}; "
                         f"use --backend gloo (the default on CPU)")
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                             f"GPUs here; set --nproc_per_node to at most the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    return device, dist.get_rank(), dist.get_world_size()


def wrap_model(model, parallel, device):
    """Wrap ``model`` for several processes: "ddp" (a full copy per process, gradients
    all-reduced) or "fsdp" (FSDP2 ``fully_shard``: each block's weights, gradients and
    optimizer state split across processes, gathered one block at a time when needed,
    which is what lets 774M/1558M models train on cards too small for a whole copy)."""
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                       else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.trf_blocks:
            fully_shard(block)          # one all-gather per block, freed after use
        fully_shard(model)              # the embeddings, final norm and head
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def unwrap_model(model):
    """The plain model inside torch.compile (``._orig_mod``) and DDP (``.module``) wrappers."""
    while hasattr(model, "_orig_mod") or isinstance(getattr(model, "module", None), nn.Module):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def recompute_activations(model):
    """Activation checkpointing, in place: each block keeps only its input during the
    forward pass and computes its activations again in backward, when they are needed.

    Fine-tuning memory is weights + gradients + AdamW's moments + activations; this cuts
    the last to about one block's worth, for about a third more compute per step
    (bench/finetune_memory.py). Values, dropout masks and gradients are unchanged (the
    recomputation replays the same random numbers), and so are the state dict's names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    gpt = unwrap_model(model)
    for i, block in enumerate(gpt.trf_blocks):
        gpt.trf_blocks[i] = checkpoint_wrapper(block)
    return model


# ---------------------------------------------------------------------------------------
# The training loop


def barrier():
    """Wait until every process gets here (no-op without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def grad_sync(model, last):
    """Context for one micro-batch's backward: average gradients across processes only
    on the last micro-batch of a step (the earlier ones just add up locally)."""
    if isinstance(model, DistributedDataParallel) and not last:
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def gather(obj, world_size):
    """Every rank's ``obj`` as a list on rank 0 (a list of one without torchrun)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def mean_across_processes(value, device, world_size):
    """The mean of a float over all processes (the value itself without torchrun)."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world_size
