"""Dynamic sampling (DAPO), off by default: more generation rounds until B groups have reward signal, then one batch.

A group whose G rewards are all equal has advantages 0 and teaches nothing (README: groups
without reward signal). With `--dynamic-sampling`, clgrpo.grpo_step generates rounds of fresh
prompts until B groups have signal, or until `--max-extra-rounds` more rounds have run, and
trains on the first B groups with signal, topped up with zero-std groups when there are too
few. Each round is a clgrpo.GroupBatch from clgrpo.generate_round, advantages included: a
group's advantages depend on its own rewards alone, so the batch keeps them as they are.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import vlm


def more_rounds(first, generate_round, draw_prompts, max_extra_rounds: int) -> list:
    """The step's generation rounds: `first`, then `generate_round(*draw_prompts())` (fresh
    prompts) until B groups have signal or `max_extra_rounds` extra rounds have run, whichever
    comes first."""
    if draw_prompts is None:
        raise ValueError("dynamic sampling needs draw_prompts, a function that returns (records, images) "
                         "of new prompts")
    rounds = [first]
    while sum(int((~r.zero_std).sum()) for r in rounds) < len(first.records) and len(rounds) <= max_extra_rounds:
        rounds.append(generate_round(*draw_prompts()))
    return rounds


def pick_groups(zero_std_per_round: list[torch.Tensor], batch_size: int) -> list[tuple[int, int]]:
    """(round, group) pairs that make up the training batch: every group with signal, in order, up
    to `batch_size`; if there are too few, the batch is topped up with zero-std groups (in order).

    Topping up keeps the batch at B groups, so a step that ran out of rounds is exactly the plain
    GRPO step (the same batch size, memory, loss scale and KL term) rather than a smaller batch in
    which a single group weighs B times more."""
    signal = [(k, j) for k, z in enumerate(zero_std_per_round) for j, flat in enumerate(z.tolist()) if not flat]
    flat = [(k, j) for k, z in enumerate(zero_std_per_round) for j, is_flat in enumerate(z.tolist()) if is_flat]
    return sorted((signal + flat)[:batch_size])   # generation order: one full round is the round as is


def assemble_batch(processor, rounds: list, device):
    """The picked groups as one batch, of the rounds' own type (clgrpo.GroupBatch). When they are
    the first round's groups it is that round, unchanged. Otherwise the kept prompts are re-encoded
    in one processor call (one consistent left padding) rather than spliced from the rounds'
    tensors, which differ in prompt length and padding and in how each model family lays them
    out. Completions are right-padded to the longest round with pad tokens under a 0 mask, exactly
    as generate() pads a finished completion."""
    picks = pick_groups([r.zero_std for r in rounds], len(rounds[0].records))
    if picks == [(0, j) for j in range(len(rounds[0].records))]:
        return rounds[0]
    g = rounds[0].rollout.group_size
    rows = [(rounds[k], slice(j * g, (j + 1) * g)) for k, j in picks]
    images = [rounds[k].images[j] for k, j in picks]
    width = max(r.rollout.completion_ids.shape[1] for r, _ in rows)

    def stack(name: str, fill: int) -> torch.Tensor:
        parts = [getattr(r.rollout, name)[sl] for r, sl in rows]
        return torch.cat([F.pad(x, (0, width - x.shape[1]), value=fill) for x in parts])

    rollout = vlm.Rollout(prompts=vlm.encode_prompts(processor, images, device=device), group_size=g,
                          completion_ids=stack("completion_ids", processor.tokenizer.pad_token_id),
                          completion_mask=stack("completion_mask", 0),
                          truncated=torch.cat([r.rollout.truncated[sl] for r, sl in rows]),
                          texts=[t for r, sl in rows for t in r.rollout.texts[sl]])
    components = {name: [v for r, sl in rows for v in r.components[name][sl]] for name in rounds[0].components}
    return dataclasses.replace(rounds[0], records=[rounds[k].records[j] for k, j in picks], images=images,
                               rollout=rollout, rewards=torch.cat([r.rewards[sl] for r, sl in rows]),
                               components=components, advantages=torch.cat([r.advantages[sl] for r, sl in rows]),
                               zero_std=torch.stack([rounds[k].zero_std[j] for k, j in picks]))
