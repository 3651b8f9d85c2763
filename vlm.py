"""The model calls a GRPO step makes: sample G completions per prompt, score their tokens' log-probs.

Read in this order: `sample_completions` (one batched call for B prompts x G completions) and
`completion_logprobs` (per-token log pi of given completions), then what both are built from:
the prompt tensors (`encode_prompts`), the tokens that end or may never appear in a completion,
each prompt's image encoded once (`encode_images`) and each prompt run once per group
(`prompt_states`). Works with any Hugging Face image-text-to-text checkpoint that
`families.load_model` accepts (the tiny toy model is Idefics3, SmolVLM's architecture); each
prompt holds exactly one image. Loading, the family table and the chat template live in
families.py; checkpoints and resuming in checkpoints.py.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import families
import kv_cache


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """B prompts x G completions, flattened example-major to N = B*G rows (row i*G+g)."""
    prompts: dict                  # the B prompts' tensors (one image each), as the processor made them
    group_size: int                # G: rows i*G .. i*G+G-1 continue prompt i
    completion_ids: torch.Tensor   # [N, T]
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    truncated: torch.Tensor        # [N] bool, no EOS within max_new_tokens
    texts: list[str]               # decoded completions (special tokens removed)


@torch.no_grad()
def sample_completions(model, processor, images: list, group_size: int = 1, max_new_tokens: int = 64,
                       temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                       prompt: str | list[str] | None = None) -> Rollout:
    """Sample `group_size` completions for each image in ONE batched call.

    The B prompts are preprocessed once and their images encoded once; the B prompts are
    prefilled once and the G rows of each continue from its shared KV cache (prompt_states). A
    family that does not share the prompt uses generate(num_return_sequences=G), which expands
    the prompt to G rows before prefilling.
    `prompt`: one chat prompt for all images, one per image, or None for the standard one.
    Pure temperature sampling: top_k is disabled, so the sampling distribution is exactly
    softmax(logits / temperature), the one `completion_logprobs` scores.
    """
    if group_size > 1 and not do_sample:
        raise ValueError("greedy decoding gives one completion per prompt: use group_size=1")
    device = next(model.parameters()).device
    prompts = encode_prompts(processor, images, prompt, device)
    eos, pad = eos_token_ids(model, processor), processor.tokenizer.pad_token_id
    blocked = blocked_token_ids(model, processor, eos)
    was_training = model.training
    model.eval()
    if shares_prompt(model):   # prefill the B prompts once, continue G rows from their shared cache
        completion_ids = _sample_from_shared_prompt(model, prompts, group_size, max_new_tokens, do_sample,
                                                    temperature, top_p, blocked, eos, pad)
    else:
        sampling = dict(temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
            dict(temperature=None, top_p=None, top_k=None)
        sequences = model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                                   num_return_sequences=group_size, suppress_tokens=blocked, eos_token_id=eos,
                                   pad_token_id=pad, **sampling)
        completion_ids = sequences[:, prompts["input_ids"].shape[1]:]
    model.train(was_training)
    mask, truncated = completion_mask_from_ids(completion_ids, eos)
    texts = processor.tokenizer.batch_decode(completion_ids * mask + pad * (1 - mask), skip_special_tokens=True)
    return Rollout(prompts, group_size, completion_ids, mask, truncated, texts)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [N, T] that keeps tokens up to and including the first EOS, and `truncated` [N].

    Tokens after the first EOS are padding from batched generation and must not count. A
    completion with no EOS was cut at max_new_tokens (truncated); its tokens all count.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    seen_before = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # an EOS strictly before this position
    mask = (~seen_before).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


# ---------------------------------------------------------------------------------------------
# Log-probs
# ---------------------------------------------------------------------------------------------
def completion_logprobs(model, prompts: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                        group_size: int = 1, temperature: float = 1.0, micro_batch: int | None = None,
                        with_entropy: bool = False, features: ImageFeatures | None = None, first_row: int = 0,
                        shared_prompt: bool | None = None):
    """Per-token log pi(o_t | q, o_<t) of given completions, [N, T] (and entropy [N, T]).

    Row r continues prompt r // group_size; `first_row` > 0 when the completions are a slice
    (rows first_row..) of a rollout. The prompts' images are encoded once (or pass
    `features` from encode_images) and shared by all rows, whatever the micro-batch. Each
    micro-batch runs each of its prompts once and its rows only over their completion tokens
    (prompt_states), unless `shared_prompt` is False (default: shares_prompt(model)).
    log-probs use softmax(logits / temperature), the distribution the tokens were sampled from.
    log p(token) = logit(token) - logsumexp(logits): this avoids materialising a full
    [N, T, V] log-softmax in the autograd graph. Entropy (a diagnostic) is computed without grad.
    Rows are processed `micro_batch` at a time when given (use it under torch.no_grad() for the
    reference / old policy; for training, micro-batch in the loop so each chunk can backward).
    """
    n = completion_ids.shape[0]
    if features is None:
        features = encode_images(model, prompts)
    if shared_prompt is None:
        shared_prompt = shares_prompt(model)
    step = micro_batch or n
    logps, entropies = [], []
    for s in range(0, n, step):
        e = min(n, s + step)
        rows = [r // group_size for r in range(first_row + s, first_row + e)]
        if shared_prompt:
            logits = _shared_prompt_logits(model, prompts, completion_ids[s:e], completion_mask[s:e], features, rows)
        else:
            logits = _forward_completion_logits(model, row_inputs(prompts, rows), completion_ids[s:e],
                                                completion_mask[s:e], features.for_rows(rows))
        logits = logits.float() / temperature
        ids = completion_ids[s:e].unsqueeze(-1)
        logps.append((logits.gather(-1, ids).squeeze(-1) - torch.logsumexp(logits, dim=-1)))
        if with_entropy:
            with torch.no_grad():
                logp_all = F.log_softmax(logits, dim=-1)
                entropies.append(-(logp_all.exp() * logp_all).sum(-1))
    logp = torch.cat(logps)
    return (logp, torch.cat(entropies)) if with_entropy else logp


# ---------------------------------------------------------------------------------------------
# Prompts, and the tokens that end or may never appear in a completion
# ---------------------------------------------------------------------------------------------
def encode_prompts(processor, images: list, prompts: list[str] | str | None = None, device="cpu") -> dict:
    """Tokenise one prompt per image (left padded) and preprocess the images, as tensors on `device`."""
    if prompts is None:
        prompts = families.chat_prompt(processor)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    return {k: v.to(device) for k, v in tokenize_chat(processor, images, prompts).items()}


def tokenize_chat(processor, images: list, texts: list[str]):
    """processor(images, texts): one image per text, padded on the tokenizer's side.

    Rendered chat text already holds every special token the template wants. A template that
    writes the BOS itself (Gemma, Llama) would get a second one from the tokenizer, so special
    tokens are added only when the text does not start with the BOS (what apply_chat_template
    itself does when it tokenizes)."""
    bos = processor.tokenizer.bos_token
    add_special = not (bos and texts and all(t.startswith(bos) for t in texts))
    return processor(images=[[img] for img in images], text=texts, return_tensors="pt", padding=True,
                     add_special_tokens=add_special)


def eos_token_ids(model, processor) -> list[int]:
    """Token ids that end a completion: the model's EOS ids and the chat template's end-of-turn token."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    tok = processor.tokenizer
    for token in (families.end_of_turn_token(processor), tok.eos_token):
        tid = tok.convert_tokens_to_ids(token) if token else None
        if tid is not None and tid != tok.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def blocked_token_ids(model, processor, eos_ids: list[int] | None = None) -> list[int]:
    """Special tokens a completion must never contain (image placeholders, pad, BOS, ...), all but
    the end-of-completion ids (`eos_ids`, computed here when not given).

    A freshly initialised (or a collapsing) model will happily sample the image placeholder, and
    the next forward then crashes because the number of image tokens no longer matches the images.
    """
    keep = set(eos_ids if eos_ids is not None else eos_token_ids(model, processor))
    blocked = set(processor.tokenizer.all_special_ids)
    for attr in ("image_token_id", "fake_image_token_id", "video_token_id", "global_image_token_id",
                 "image_start_token_id", "image_end_token_id", "boi_token_id", "eoi_token_id"):
        tid = getattr(processor, attr, None)
        if isinstance(tid, int):
            blocked.add(tid)
    return sorted(blocked - keep)


# ---------------------------------------------------------------------------------------------
# Image features, computed once per pass and shared by the G completions of each prompt
# ---------------------------------------------------------------------------------------------
# The G completions of a prompt share its image. Repeating the image G times would run the
# vision tower G times on the same pixels (and hold G copies of them). Instead the B images are
# encoded once, and each completion row is given its prompt's features: transformers' VLMs take
# precomputed features through `mm_encoder_outputs` (generate() does the same internally).
@dataclass
class ImageFeatures:
    """The vision tower + projector output for B prompts (one image each)."""
    output: object                   # what get_image_features returned: pooler_output (+ deepstack_features)
    entries: list[list[int]]         # indices into pooler_output that belong to each prompt
    detached: list | None = None     # (graph tensor, leaf) pairs when chunked_backward=True

    def for_rows(self, prompt_of_row: list[int]) -> dict:
        """`mm_encoder_outputs` for rows whose prompts are `prompt_of_row` (a prompt may repeat)."""
        index = [i for p in prompt_of_row for i in self.entries[p]]
        out = copy.copy(self.output)
        out["pooler_output"] = _select(self.output["pooler_output"], index)
        if out.get("deepstack_features") is not None:  # Qwen3-VL: per-layer features, laid out like pooler_output
            out["deepstack_features"] = [_select(layer, index) for layer in self.output["deepstack_features"]]
        return {"image": out}

    def backward(self) -> None:
        """With chunked_backward: send the gradient accumulated on the features by every chunk's
        backward() through the vision tower, once (the chain rule, split at the features)."""
        pairs = [(t, leaf.grad) for t, leaf in self.detached or [] if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def encode_images(model, prompts: dict, chunked_backward: bool = False) -> ImageFeatures:
    """Run the vision tower once on the B prompts' images.

    `chunked_backward`: the caller will run backward() once per micro-batch of completions. The
    features are then handed out as detached leaves that collect those gradients, and
    ImageFeatures.backward() sends their sum through the vision tower once at the end (the
    graph of the vision pass cannot be backpropagated several times)."""
    encoder = model.base_model.get_image_features
    wanted = inspect.signature(encoder).parameters
    output = encoder(**{k: v for k, v in prompts.items() if k in wanted}, return_dict=True)
    per_prompt = (prompts["input_ids"] == image_token_id(model)).sum(dim=1).tolist()
    entries = _entries_per_prompt([len(x) for x in output["pooler_output"]], per_prompt)
    detached = None
    if chunked_backward and torch.is_grad_enabled():
        detached = []

        def leaf(t):
            if not t.requires_grad:
                return t
            d = t.detach().requires_grad_(True)
            detached.append((t, d))
            return d
        _map_feature_tensors(output, leaf)
    return ImageFeatures(output, entries, detached)


def _select(pooled, index: list[int]):
    if torch.is_tensor(pooled):
        return pooled[torch.tensor(index, device=pooled.device)]
    return [pooled[i] for i in index]


def _map_feature_tensors(output, fn) -> None:
    """Apply fn to every tensor of pooler_output / deepstack_features, in place."""
    def apply(x):
        return fn(x) if torch.is_tensor(x) else [apply(v) for v in x]
    for key in ("pooler_output", "deepstack_features"):
        if output.get(key) is not None:
            output[key] = apply(output[key])


def image_token_id(model) -> int:
    return model.config.image_token_id


def _entries_per_prompt(entry_tokens: list[int], prompt_tokens: list[int]) -> list[list[int]]:
    """Group the vision output's entries (images, tiles or crops) by prompt, in order, so that
    each prompt's entries hold exactly as many features as it has image placeholder tokens."""
    groups, i = [], 0
    for p, need in enumerate(prompt_tokens):
        group, have = [], 0
        while have < need and i < len(entry_tokens):
            group.append(i)
            have += entry_tokens[i]
            i += 1
        if have != need:
            raise ValueError(f"prompt {p}: {need} image tokens, but the vision output gives {have} features")
        groups.append(group)
    if i != len(entry_tokens):
        raise ValueError(f"the vision output has {len(entry_tokens) - i} entries that no prompt's image tokens use")
    return groups


def row_inputs(prompts: dict, prompt_of_row: list[int]) -> dict:
    """The prompt tensors of each completion row (no pixels: rows get image features instead).

    Every tensor with one row per prompt (input ids, masks, token-type ids, image grids, image
    sizes) is indexed by the row's prompt; pixel tensors (any layout: per prompt, flattened
    patches or tiles) are left out, they only feed the vision tower."""
    b = prompts["input_ids"].shape[0]
    index = torch.tensor(prompt_of_row, device=prompts["input_ids"].device)
    out = {}
    for key, value in prompts.items():
        if key.startswith("pixel_"):
            continue
        if not (torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == b):
            raise ValueError(f"prompt input {key!r} {tuple(getattr(value, 'shape', ()))} has no row per prompt "
                             f"({b} prompts): cannot give it to the completion rows")
        out[key] = value[index]
    return out


# ---------------------------------------------------------------------------------------------
# The prompt once per group: its keys and values are computed for B rows and shared by G rows
# ---------------------------------------------------------------------------------------------
# In a causal model a prompt token attends only to earlier tokens, so the prompt's keys and
# values (at every layer) do not depend on the completion that follows. The G completions of a
# prompt can therefore attend to ONE copy of them: the prompt runs on B rows, its cache is
# expanded to the G rows (an index, so the gradient of a shared state is the sum over its rows),
# and each completion row runs only its own tokens. This is what generation does with a KV cache.
# It holds under activation checkpointing too: kv_cache.py says why the caches survive a replay.
@dataclass
class PromptStates:
    """What the completion rows of B prompts need from the prompts' forward pass."""
    cache: list                    # per layer (keys, values) [B, heads, P, d]
    last_logits: torch.Tensor      # [B, V] logits after the last prompt token: they predict completion token 0
    attention_mask: torch.Tensor   # [B, P] the prompts' mask (left padding)
    positions: torch.Tensor        # [B, M] or [3, B, M] (mrope): positions of completion tokens 0..M-1

    def for_rows(self, index: torch.Tensor, decoding: bool = False):
        """What the rows continuing prompts `index` [N] see (a prompt repeats G times): a cache of
        their prompts' keys and values, the prompts' mask [N, P] and the positions of their
        completion tokens [N, M] (or [3, N, M]). `decoding`: the cache has room for the M tokens
        decoding adds one at a time; otherwise a log-prob pass runs all of its tokens in one
        forward and only reads it."""
        room = self.positions.shape[-1] if decoding else None
        cache = kv_cache.rows_cache([(k[index], v[index]) for k, v in self.cache], room)
        positions = self.positions[:, index] if self.positions.dim() == 3 else self.positions[index]
        return cache, self.attention_mask[index], positions


def shares_prompt(model) -> bool:
    """Is the prompt computed once per group (prompt_states) for this model? Not for a family
    where it is not proven exact (Family.shared_prompt)."""
    family = families.FAMILIES.get(model.config.model_type)
    return bool(family is None or family.shared_prompt)


def prompt_states(model, prompts: dict, features: ImageFeatures, prompt_ids: list[int],
                  completion_len: int) -> PromptStates:
    """Run the prompts `prompt_ids` (indices into `prompts`) once, with gradients if enabled,
    and keep their per-layer keys and values, the logits after their last token and the
    positions of the `completion_len` completion tokens that will follow them."""
    inputs = row_inputs(prompts, prompt_ids)
    batch = dict(inputs)
    if not uses_mrope(model):
        batch["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
    kept = kv_cache.prompt_cache()   # a checkpointed layer's replay does not write to it again
    # use_cache asks the model to make a cache; this one is given, and read from `kept` below
    with kv_cache.checkpointed_layers_keep_cache(model):
        out = model(**batch, mm_encoder_outputs=features.for_rows(prompt_ids), past_key_values=kept,
                    use_cache=False, logits_to_keep=1)
    cache = [(layer.keys, layer.values) for layer in kept.layers]
    return PromptStates(cache, out.logits[:, -1, :], inputs["attention_mask"],
                        _completion_positions(model, inputs, completion_len))


def _completion_positions(model, prompts: dict, length: int) -> torch.Tensor:
    """Positions of `length` completion tokens after each prompt, as the per-row path gives them:
    the next positions after the prompt's attended tokens (left padding is invisible). With
    Qwen's multimodal RoPE the 3-D positions of the prompt plus `length` text tokens come from
    the model's own get_rope_index (text positions depend only on the token types and the mask)."""
    mask = prompts["attention_mask"]
    b = mask.shape[0]
    if not uses_mrope(model):
        start = mask.long().sum(-1, keepdim=True)
        return start + torch.arange(length, device=mask.device)
    ones = mask.new_ones(b, length)
    kwargs = {k: v for k, v in prompts.items() if not k.startswith("pixel_")}
    kwargs["input_ids"] = torch.cat([prompts["input_ids"], prompts["input_ids"].new_zeros(b, length)], dim=1)
    kwargs["attention_mask"] = torch.cat([mask, ones], dim=1)
    kwargs["mm_token_type_ids"] = torch.cat([prompts["mm_token_type_ids"], ones.new_zeros(b, length)
                                             .to(prompts["mm_token_type_ids"].dtype)], dim=1)
    get_rope_index = model.base_model.get_rope_index
    wanted = inspect.signature(get_rope_index).parameters
    positions, _ = get_rope_index(**{k: v for k, v in kwargs.items() if k in wanted})
    return positions[..., -length:]


def _continue_rows(model, cache, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
    """Forward completion tokens `ids` [N, t] of rows whose `cache` holds their prompt (and their
    completion so far); `attention_mask` covers the cache and the t tokens, `positions` the t
    tokens. Returns (logits [N, t, V], the cache, now holding the t tokens too)."""
    with kv_cache.checkpointed_layers_keep_cache(model):
        out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                    use_cache=False)   # the cache is given (and updated in place): none to make
    return out.logits, cache


DROP_FINISHED = 0.25   # finished rows leave decoding once they are this fraction of its batch


def _sample_from_shared_prompt(model, prompts: dict, group_size: int, max_new_tokens: int, do_sample: bool,
                               temperature: float, top_p: float, blocked: list[int], eos: list[int],
                               pad: int) -> torch.Tensor:
    """Completion ids [B*G, T]: the B prompts run once (prompt_states), each of the G rows of a
    prompt starts from its cache and adds one token per step. A row that samples an EOS has
    finished: `pad` from then on. Finished rows leave the batch (with their cache rows) once they
    are a quarter of it (DROP_FINISHED), so the steps that only the longest completions need cost
    less; the loop stops when every row has finished or at max_new_tokens."""
    b = prompts["input_ids"].shape[0]
    device = prompts["input_ids"].device
    states = prompt_states(model, prompts, encode_images(model, prompts), list(range(b)), max_new_tokens)
    index = torch.arange(b, device=device).repeat_interleave(group_size)
    logits = states.last_logits[index]
    cache, prompt_mask, positions = states.for_rows(index, decoding=True)
    # every generated token is attended (as in generate()), so step j's mask is a prefix of this
    # one; prompts without padding need none (and the model skips building one at every step)
    full_mask = (None if bool(prompt_mask.all()) else
                 torch.cat([prompt_mask, prompt_mask.new_ones(len(index), max_new_tokens)], dim=1))
    p = prompt_mask.shape[1]
    decoding_step = _decoding_step_for(model)   # resolved once, not per token
    eos_ids = torch.tensor(eos, device=device)
    tokens = torch.full((len(index), max_new_tokens), pad, device=device)
    rows = torch.arange(len(index), device=device)          # the rows still in the batch
    done = torch.zeros(len(index), dtype=torch.bool, device=device)
    for j in range(max_new_tokens):
        nxt = _next_tokens(logits, do_sample, temperature, top_p, blocked).masked_fill(done, pad)
        tokens[rows, j] = nxt
        done |= torch.isin(nxt, eos_ids)
        finished = int(done.sum())   # the step's one host sync
        if finished == len(rows) or j == max_new_tokens - 1:
            return tokens[:, :j + 1]
        if finished >= DROP_FINISHED * len(rows):   # copying the cache costs a few steps' worth
            keep = (~done).nonzero().squeeze(1)
            rows, nxt, done, positions = rows[keep], nxt[keep], done[keep], positions[..., keep, :]
            full_mask = full_mask[keep] if full_mask is not None else None
            for layer in cache.layers:
                layer.keep_rows(keep)
        mask = full_mask[:, :p + j + 1] if full_mask is not None else None
        logits = decoding_step(cache, nxt[:, None], mask, positions[..., j:j + 1])


def _decoding_step_for(model):
    """The function of one decoding step, (cache, ids [N, 1], mask, positions) -> logits [N, V];
    `cache` gains the token. No image token follows the prompt, so a step needs only the language
    model and the LM head: the VLM's wrapper (image merge, output bookkeeping) would do nothing
    but cost ~8% of sampling on a small model. Bitwise the full model's logits on every family
    (tests/test_shared_prompt.py); a model that post-processes its logits (final soft-capping)
    takes the full forward."""
    text_config = getattr(model.config, "text_config", model.config)
    if getattr(text_config, "final_logit_softcapping", None):
        return functools.partial(_full_forward_step, model)
    decoder, head = model.get_decoder(), model.get_output_embeddings()

    def language_model_step(cache, ids, attention_mask, positions):
        hidden = decoder(input_ids=ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=False).last_hidden_state
        return head(hidden)[:, -1, :]
    return language_model_step


def _full_forward_step(model, cache, ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor):
    """One decoding step through the whole VLM: logits [N, V] after `ids` [N, 1]."""
    return _continue_rows(model, cache, ids, attention_mask, positions)[0][:, -1, :]


def _next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                 blocked: list[int]) -> torch.Tensor:
    """One token per row from last-position logits [N, V], as generate() picks it: blocked
    tokens to -inf, then greedy argmax, or temperature, nucleus (top-p) and a draw from
    softmax(scores) (draw_from)."""
    scores = logits.float().clone()
    if blocked:
        scores[:, blocked] = -float("inf")
    if not do_sample:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_p < 1.0:   # drop the least likely tokens whose total probability is at most 1 - top_p
        ordered, order = scores.sort(dim=-1)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False   # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return draw_from(scores.softmax(dim=-1))


def draw_from(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of `probs` [N, V], index i with probability p_i: by the inverse CDF,
    the first i whose cumulative sum c_i = p_0 + ... + p_i exceeds u * c_V-1, u ~ U[0, 1).
    One uniform per row: torch.multinomial on a CPU draws one exponential per vocabulary entry
    (14% of sampling a small model). A token with p_i = 0 is never drawn: its c_i equals c_i-1,
    so the search stops before it. Two pitfalls: u * c_V-1 can round up to the total itself (the
    search would return V), and a parallel cumsum (a GPU's) can round c_i above c_i-1 where
    p_i = 0 (an image placeholder would then crash the next forward). Either way the draw becomes
    the first index that reaches the total, which has p_i > 0. (A CPU's cumsum adds in float64,
    one entry after another, so there the second cannot happen.)"""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    first_at_total = (cdf < total).sum(dim=-1, keepdim=True)
    drawn = torch.minimum(torch.searchsorted(cdf, torch.rand_like(total) * total, right=True), first_at_total)
    return torch.where(probs.gather(1, drawn) > 0, drawn, first_at_total).squeeze(1)


def _shared_prompt_logits(model, prompts: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                          features: ImageFeatures, prompt_of_row: list[int]) -> torch.Tensor:
    """Logits that predict each completion token, [N, T, V], with each distinct prompt of the
    rows run once (prompt_states): token 0 is predicted by the prompt's last logits, tokens
    1..T-1 by the rows' own forward over completion tokens 0..T-2."""
    distinct = sorted(set(prompt_of_row))
    index = torch.tensor([distinct.index(p) for p in prompt_of_row], device=completion_ids.device)
    t = completion_ids.shape[1]
    states = prompt_states(model, prompts, features, distinct, t)
    first = states.last_logits[index].unsqueeze(1)
    if t == 1:
        return first
    cache, prompt_mask, positions = states.for_rows(index)
    mask = torch.cat([prompt_mask, completion_mask[:, :-1].to(prompt_mask.dtype)], dim=1)
    rest, _ = _continue_rows(model, cache, completion_ids[:, :-1], mask, positions[..., :t - 1])
    return torch.cat([first, rest], dim=1)


# ---------------------------------------------------------------------------------------------
# The per-row forward (families that do not share the prompt), and positions
# ---------------------------------------------------------------------------------------------
def _forward_completion_logits(model, inputs: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                               image_features: dict):
    """Logits that predict each completion token: [N, T, V], the per-row path: every row runs
    its whole prompt again (the fallback when `shares_prompt(model)` is False)."""
    n, t = completion_ids.shape
    batch = dict(inputs)
    prompt_len = inputs["input_ids"].shape[1]
    batch["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    prompt_mask = inputs["attention_mask"]
    batch["attention_mask"] = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1)
    # Every other per-token input must grow with the completion too (token-type ids: 0 = text).
    for key, value in inputs.items():
        if key not in ("input_ids", "attention_mask") and torch.is_tensor(value) and value.shape[:2] == (n, prompt_len):
            batch[key] = torch.cat([value, value.new_zeros(n, t)], dim=1)
    if not uses_mrope(model):
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    # Only the last T+1 positions' logits are needed; position P-1+j predicts completion token j.
    logits = model(**batch, mm_encoder_outputs=image_features, use_cache=False, logits_to_keep=t + 1).logits
    return logits[:, :-1, :]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only attended tokens (as generate() does), so padding is invisible."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def uses_mrope(model) -> bool:
    """Qwen2-VL-style multimodal RoPE computes its own 3-D positions from the image grid."""
    text_config = getattr(model.config, "text_config", model.config)
    rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    return "mrope_section" in rope
