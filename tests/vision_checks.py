"""Checks shared by the toy test and the family matrix: each image is encoded once per pass,
and sharing image features changes nothing (values and gradients) against repeating the image."""

import torch

import families
import vlm

def vision_tower(model):
    base = model.base_model
    for name in families.VISION_TOWERS:
        if hasattr(base, name):
            return getattr(base, name)
    raise AttributeError(f"{type(model).__name__}: no vision tower among {families.VISION_TOWERS}")


class VisionInputCounter:
    """Counts the rows (images, tiles or patches) the vision tower is given, over every call."""

    def __init__(self, model):
        self.rows = 0
        self.handle = vision_tower(model).register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        self.rows += first.shape[0]

    def close(self):
        self.handle.remove()


def vision_rows(model, fn) -> int:
    counter = VisionInputCounter(model)
    try:
        fn()
    finally:
        counter.close()
    return counter.rows


def random_completions(model, processor, n: int, tokens: int) -> torch.Tensor:
    """[n, tokens] random ids a policy could sample (never an image placeholder or other blocked token)."""
    blocked = set(vlm.blocked_token_ids(model, processor))
    allowed = torch.tensor([i for i in range(10, 200) if i not in blocked])
    return allowed[torch.randint(len(allowed), (n, tokens))]


def check_shared_features(model, processor, images, group_size=3, tokens=6, tol=1e-5):
    """Shared-feature log-probs (and gradients) == the repeated-image path, and the vision tower
    sees B images per pass, not B x G."""
    torch.manual_seed(0)
    n = len(images) * group_size
    eos = vlm.eos_token_ids(model, processor)
    completion = random_completions(model, processor, n, tokens)
    mask, _ = vlm.completion_mask_from_ids(completion, eos)
    prompts = vlm.encode_prompts(processor, images)
    repeated = vlm.encode_prompts(processor, [img for img in images for _ in range(group_size)])
    with torch.no_grad():
        once = vision_rows(model, lambda: model(**prompts))
        shared_rows = vision_rows(model, lambda: vlm.completion_logprobs(model, prompts, completion, mask, group_size,
                                                                          micro_batch=2))
        shared = vlm.completion_logprobs(model, prompts, completion, mask, group_size, micro_batch=2)
        ref = vlm.completion_logprobs(model, repeated, completion, mask)
    assert shared_rows == once, f"vision tower saw {shared_rows} rows per pass, {once} for the B images"
    assert (shared - ref)[mask.bool()].abs().max().item() < tol

    # Gradients: micro-batched backward through shared features == one backward of the repeated path
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    vlm.completion_logprobs(model, repeated, completion, mask)[mask.bool()].sum().backward()
    expected = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)
    features = vlm.encode_images(model, prompts, chunked_backward=True)
    for s in range(0, n, 2):
        e = min(n, s + 2)
        lp = vlm.completion_logprobs(model, prompts, completion[s:e], mask[s:e], group_size, features=features,
                                     first_row=s)
        lp[mask[s:e].bool()].sum().backward()
    features.backward()
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)
    tower = {id(p) for p in vision_tower(model).parameters()}
    assert any(id(p) in tower and g.abs().sum() > 0 for p, g in zip(params, got)), \
        "no gradient reached the vision tower"
    for p, a, b in zip(params, got, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"gradient differs by {(a - b).abs().max().item()}"
