"""LoRA in plain PyTorch: low-rank adapters on a frozen model, the reference model for free,
and checkpoints that stay plain Hugging Face folders.

A wrapped linear layer computes

    h = W x + b + (alpha / r) * B (A x)        A: [r, d_in] (random),  B: [d_out, r] (zeros)

W and b are the base layer's, frozen; only A and B train, r * (d_in + d_out) numbers instead of
d_in * d_out. B starts at 0, so B A = 0 and the wrapped model starts *exactly* at the base
model: step 0 of a LoRA run is the checkpoint it loaded, and its first gradient reaches only B
(dL/dA = (alpha / r) B^T (dL/dh) x^T = 0 while B = 0). Switching the adapters off gives the base
model back, bit for bit; that is the frozen GRPO reference with no second copy in memory.
Saving merges W' = W + (alpha / r) B A, so every later stage loads an ordinary checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

ADAPTERS_FILE = "adapters.safetensors"   # beside the merged weights in every LoRA checkpoint
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"   # attention + MLP, every family here
RANK_HELP = "train LoRA adapters of this rank on a frozen base instead of every weight (default: full fine-tuning)"
ALPHA_HELP = "LoRA scale numerator: the update is (alpha / rank) B A (default: 2 x rank)"
TARGETS_HELP = "comma-separated layer names that get adapters: the last part of a module's name"
VISION_HELP = "also put adapters on the vision tower's layers named in --lora-targets (default: tower frozen)"


class LoRALinear(torch.nn.Module):
    """A linear layer plus a low-rank update: h = W x + b + (alpha / r) B A x.

    `weight` and `bias` are the base layer's own Parameters (frozen), so the module keeps the
    base's state-dict names and anything that reads `layer.weight` still works. A is initialised
    like nn.Linear's weight (uniform, +-1/sqrt(d_in)), B to zeros: the layer starts equal to the
    base. Adapters are float32 whatever the base's dtype, so a bf16 base still gets full-precision
    updates. `enabled = False` (see `lora_disabled`) computes the base layer alone."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = torch.nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = torch.nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # nn.Linear's own init
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return h
        # A x first: r-wide, so the update costs r (d_in + d_out) per token, never d_in x d_out.
        delta = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return h + self.scale * delta.to(h.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A, computed in float32, returned in W's dtype."""
        return (self.weight.float() + self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(text: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj'); an empty list is an error."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError("--lora-targets names no layer")
    return names


def _in_vision_tower(name: str) -> bool:
    import families   # the vision towers' names, by family, live with the family table (families imports lora)

    return any(f".{tower}." in f".{name}." for tower in families.VISION_TOWERS)


def add_lora(model: torch.nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS,
             vision: bool = False) -> list[str]:
    """Freeze every parameter of `model`, then replace each nn.Linear whose name ends in one of
    `targets` (outside the vision tower unless `vision`) by a LoRALinear. Returns the wrapped
    names. alpha defaults to 2 * rank (scale 2, whatever the rank).

    Refused with a clear message: no layer matches; a matching module is not nn.Linear; a
    matching weight is tied to another module (lm_head and the embeddings): a merge would change
    both, and the saved checkpoint would keep only one of them."""
    alpha = 2.0 * rank if alpha is None else float(alpha)
    targets = parse_targets(targets) if isinstance(targets, str) else tuple(targets)
    shared = {}   # id(parameter) -> how many modules hold it
    for _, prm in model.named_parameters(remove_duplicate=False):
        shared[id(prm)] = shared.get(id(prm), 0) + 1
    chosen = [(name, module) for name, module in model.named_modules()
              if name.rsplit(".", 1)[-1] in targets and (vision or not _in_vision_tower(name))]
    if not chosen:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and (vision or not _in_vision_tower(n))})
        where = "" if vision else " outside the vision tower (--lora-vision adds it)"
        raise ValueError(f"--lora-targets {','.join(targets)}: no layer of {type(model).__name__}{where} has such a "
                         f"name; its linear layers there are named {', '.join(linears)}")
    for name, module in chosen:   # every check before the first change: an error leaves the model as it was
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"--lora-targets: {name} is a {type(module).__name__}, not a Linear layer")
        if shared[id(module.weight)] > 1:
            raise ValueError(f"--lora-targets: {name}.weight is tied to another module (e.g. the embeddings); "
                             "an adapter on it cannot be merged into a checkpoint")
    model.requires_grad_(False)
    for name, module in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha))
    return [name for name, _ in chosen]


def lora_layers(model: torch.nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module):
    """Run `model` as its base: every LoRALinear computes W x + b alone. The GRPO reference is
    the start of the stage, and with B A added on top of the start that start is the base model
    itself, so pi_ref costs no second model. The switch is restored even when the body raises.
    A model without adapters is an error: its 'base' would silently be the policy itself."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("lora_disabled: the model has no LoRA adapters")
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.enabled = was


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every wrapped weight replaced by W + (alpha / r) B A
    and no adapter tensors: what a plain checkpoint of the trained model holds. The model itself
    is left untouched (training goes on from the unmerged adapters)."""
    layers = lora_layers(model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    with torch.no_grad():
        for name, layer in layers.items():
            state[f"{name}.weight"] = layer.merged_weight()
    return state


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: {'<layer>.lora_A': [r, d_in], '<layer>.lora_B': [d_out, r]}."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def load_lora_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str = "adapters") -> None:
    """Copy saved adapters into a model wrapped with the same layers and rank; a different set
    of layers or shapes (another --lora-rank or --lora-targets) is refused, naming the first."""
    own = lora_state_dict(model)
    if own.keys() != state.keys():
        extra, missing = sorted(state.keys() - own.keys()), sorted(own.keys() - state.keys())
        raise ValueError(f"{where}: the saved adapters are for other layers (saved only: {extra[:2]}, "
                         f"this run only: {missing[:2]}); resume with the run's own --lora-targets")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise ValueError(f"{where}: {key} is {tuple(value.shape)}, this run's is {tuple(own[key].shape)}; "
                                 "resume with the run's own --lora-rank")
            params[key].copy_(value)


def save_adapters(model: torch.nn.Module, path: str | Path) -> None:
    """The adapters alone (safetensors), with the rank and alpha in the file's metadata."""
    from safetensors.torch import save_file

    layer = next(iter(lora_layers(model).values()))
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(path),
              metadata={"rank": str(layer.rank), "alpha": repr(layer.alpha), "format": "clgrpo-lora"})


def load_adapters(model: torch.nn.Module, path: str | Path) -> None:
    from safetensors.torch import load_file

    load_lora_state_dict(model, load_file(str(path), device=str(model_device(model))), where=str(path))


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def flag_problem(args) -> str | None:
    """Why the given LoRA flags contradict each other (argparse namespace with only given flags)."""
    given = {name for name in ("lora_alpha", "lora_targets", "lora_vision") if getattr(args, name, None)}
    if given and not getattr(args, "lora_rank", None):
        return f"--{sorted(given)[0].replace('_', '-')} needs --lora-rank"
    if getattr(args, "lora_vision", False) and getattr(args, "freeze_vision", False):
        return "--lora-vision puts adapters on the vision tower, --freeze-vision keeps it frozen: choose one"
    if getattr(args, "lora_rank", None) and getattr(args, "ref_dtype", None):
        return "--ref-dtype has no effect with --lora-rank: the reference is the base model, the adapters switched off"
    if getattr(args, "lora_targets", None) is not None and not args.lora_targets.replace(",", "").strip():
        return "--lora-targets names no layer"
    return None


def setup(model: torch.nn.Module, cfg, checkpoint: Path | None) -> None:
    """Put the run's adapters on `model` (the base, --model), frozen but for the adapters; when
    resuming, with the values saved in `checkpoint`/adapters.safetensors. One line says what trains."""
    try:
        wrapped = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_vision)
    except ValueError as err:
        raise SystemExit(f"{cfg.model}: {err}") from None
    if checkpoint is not None:
        path = Path(checkpoint) / ADAPTERS_FILE
        if not path.is_file():
            raise SystemExit(f"--resume with --lora-rank: {path} not found (was the run trained without LoRA?)")
        try:
            load_adapters(model, path)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    trainable, total = count_parameters(model)
    layer = next(iter(lora_layers(model).values()))
    print(f"clgrpo: LoRA rank {layer.rank}, alpha {layer.alpha:g} on {len(wrapped)} layers: "
          f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)")
