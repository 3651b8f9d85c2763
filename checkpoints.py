"""Checkpoints and resuming: atomic saves and their recovery, the finite-weights guard, trainer and RNG state."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

import lora


def save_checkpoint(model, processor, out: str | os.PathLike, trainer_state: dict | None = None,
                    extra_json: dict | None = None) -> Path:
    """Write a checkpoint folder atomically: build it under a temporary name, then rename.

    Non-finite weights are refused before anything is written (`require_finite_weights`).
    A crash mid-save leaves the previous checkpoint untouched (and a stray temp folder that the
    next save removes). A kill between the two renames leaves the previous checkpoint as
    `.NAME.old`, which `recover_checkpoint` puts back at the next start. `trainer_state` (step,
    optimizer, scheduler, RNG...) goes to trainer_state.pt in the same folder, so weights and
    state can never disagree. A model with LoRA adapters is saved as a plain checkpoint with
    merged weights (W + (alpha / r) B A), plus adapters.safetensors for resuming."""
    import json

    require_finite_weights(model)
    out = recover_checkpoint(out)
    tmp, old = _checkpoint_siblings(out)
    adapters = lora.lora_layers(model)   # LoRA: the weights are saved merged, the adapters alone beside them
    model.save_pretrained(tmp, state_dict=lora.merged_state_dict(model) if adapters else None)
    if adapters:
        lora.save_adapters(model, tmp / lora.ADAPTERS_FILE)
    processor.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    for name, obj in (extra_json or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    if out.exists():
        os.replace(out, old)  # keep the previous one until the new one is in place
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _checkpoint_siblings(out: Path) -> tuple[Path, Path]:
    return out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")


def recover_checkpoint(out: str | os.PathLike) -> Path:
    """Undo what an interrupted `save_checkpoint` left behind; returns `out`.

    The states a kill can leave, and what is kept:
      OUT only, or OUT + .tmp (killed while writing)      OUT; the partial .tmp is removed
      .old + .tmp, no OUT (killed between the renames)     .old goes back to OUT (the last
                                                           checkpoint that was fully in place)
      OUT + .old (killed before removing .old)             OUT; .old is removed
    """
    out = Path(out)
    tmp, old = _checkpoint_siblings(out)
    if old.exists() and not out.exists():
        os.replace(old, out)
        print(f"recovered {out} from {old.name}, left by a run killed while saving")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    return out


def start_run(out: str, resume: bool, seed: int) -> tuple[Path, Path, Path | None]:
    """A trainer's first lines: its run folder, its checkpoint folder and the checkpoint to resume
    from (resume_point: an interrupted save is recovered first), with every RNG seeded."""
    ckpt = resume_point(out, resume)
    seed_everything(seed)
    return Path(out), Path(out) / "checkpoint", ckpt


def resume_point(out: str | os.PathLike, resume: bool) -> Path | None:
    """The checkpoint folder to resume from (None for a fresh start), after recovering an
    interrupted save. `--resume` with no trainer state there is an error that changes nothing:
    starting fresh would silently overwrite the run's log and checkpoint."""
    ckpt = recover_checkpoint(Path(out) / "checkpoint")
    if not resume:
        return None
    if not (ckpt / "trainer_state.pt").is_file():
        raise SystemExit(f"error: --resume: {ckpt / 'trainer_state.pt'} not found, so there is nothing to resume; "
                         "nothing was changed. Check --out, or drop --resume to start a fresh run in that folder.")
    return ckpt


class NonFiniteError(FloatingPointError):
    """Weights (or gradients) that hold NaN or inf: training must stop, nothing may be saved."""


def require_finite_weights(model) -> None:
    """Raise NonFiniteError naming the first parameter holding NaN/inf.

    One fused reduction (torch._foreach_norm: a norm is finite iff every element is, barring an
    overflow of the sum of squares, which is then also worth stopping for) and ONE host sync,
    so it is cheap enough to run after every optimizer step."""
    params = [p.detach() for p in model.parameters()]
    if not params:
        return
    norms = torch._foreach_norm(params)
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return
    name = next(n for n, p in model.named_parameters()
                if not bool(torch.isfinite(p).all()) or not torch.isfinite(p.norm()))
    raise NonFiniteError(f"non-finite weights (first: {name})")


# ---------------------------------------------------------------------------------------------
# Reproducibility: every RNG a run touches, so a resumed run continues the same random stream
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_state(step: int, optimizer, scheduler, sampler, **extra) -> dict:
    """Everything a resumed run needs besides the weights: saved as trainer_state.pt."""
    return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "sampler": sampler.state_dict(), "rng": rng_state(), **extra}


def restore_training_state(ckpt: str | os.PathLike, optimizer, scheduler, sampler) -> dict:
    """Load trainer_state.pt into the optimizer, scheduler, data sampler and RNGs; return it."""
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state["rng"])
    return state
