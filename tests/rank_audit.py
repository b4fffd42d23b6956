"""Installed as `sitecustomize` in the processes of a multi-process test run (never imported by Wenmai).

In every process that a launcher started (RANK is set), it records each successful write under the run
folder (Python file and folder operations, torch.save, safetensors) (WENMAI_AUDIT_ROOT) to `<WENMAI_AUDIT_LOG>.rank<R>`, and wraps `finetune.adapters.save_adapter`
to dump the adapter as this rank holds it (gathered under ZeRO-3) to `<WENMAI_AUDIT_LOG>.adapter<R>.pt`.
"""

import builtins
import io
import os

RANK = os.environ.get("RANK")
ROOT = os.environ.get("WENMAI_AUDIT_ROOT")
LOG = os.environ.get("WENMAI_AUDIT_LOG")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _install() -> None:
    root = os.path.realpath(ROOT)
    original_open, original_os_open = builtins.open, os.open

    def record(operation, path):
        try:
            full = os.path.realpath(os.fspath(path))
        except TypeError:
            return
        if full == root or full.startswith(root + os.sep):
            with original_open(f"{LOG}.rank{RANK}", "a", encoding="utf-8") as f:
                f.write(f"{operation}\t{os.path.relpath(full, root)}\n")

    def audited_open(file, mode="r", *args, **kwargs):
        handle = original_open(file, mode, *args, **kwargs)
        if isinstance(file, str | bytes | os.PathLike) and any(c in mode for c in "wax+"):
            record("open", file)
        return handle

    def audited_os_open(path, flags, *args, **kwargs):
        fd = original_os_open(path, flags, *args, **kwargs)
        if flags & WRITE_FLAGS and kwargs.get("dir_fd") is None:
            record("os.open", path)
        return fd

    def wrap(name, paths):
        original = getattr(os, name)

        def audited(*args, **kwargs):
            result = original(*args, **kwargs)
            if kwargs.get("dir_fd") is None and kwargs.get("src_dir_fd") is None:
                for i in paths:
                    if i < len(args):
                        record(name, args[i])
            return result

        setattr(os, name, audited)

    def wrap_saver(module, name):  # writers in C++/Rust that bypass Python's open()
        original = getattr(module, name)

        def audited(obj, target, *args, **kwargs):
            result = original(obj, target, *args, **kwargs)
            if isinstance(target, str | os.PathLike):
                record(f"{module.__name__}.{name}", target)
            return result

        setattr(module, name, audited)

    import safetensors.torch
    import torch

    wrap_saver(torch, "save")
    wrap_saver(safetensors.torch, "save_file")
    builtins.open = io.open = audited_open
    os.open = audited_os_open
    for name, paths in (
        ("mkdir", [0]),
        ("replace", [0, 1]),
        ("rename", [0, 1]),
        ("unlink", [0]),
        ("remove", [0]),
        ("rmdir", [0]),
    ):
        wrap(name, paths)


def _dump_adapters() -> None:
    import finetune.adapters as adapters

    save_adapter = adapters.save_adapter

    def save_and_dump(trainer, folder):
        save_adapter(trainer, folder)
        import torch
        from peft import get_peft_model_state_dict

        model = trainer.accelerator.unwrap_model(trainer.model)
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        gather = getattr(trainer, "is_deepspeed_enabled", False) and any(hasattr(p, "ds_id") for p in params)
        if gather:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params):
                state = {k: v.detach().clone().float() for k, v in get_peft_model_state_dict(model).items()}
        else:
            state = {k: v.detach().clone().float() for k, v in get_peft_model_state_dict(model).items()}
            state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
        torch.save(state, f"{LOG}.adapter{RANK}.pt")

    adapters.save_adapter = save_and_dump


if RANK is not None and ROOT and LOG:
    _install()
    _dump_adapters()
