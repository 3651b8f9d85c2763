"""LoRA (lora.py): the wrapped layer and its merge on hand-sized numbers, gradients that reach only
the adapters, the GRPO reference from the same model with the adapters off, merged checkpoints
that give the unmerged model's logits, exact resume (also after kill -9), and sft.py / clgrpo.py
with --lora-rank on the toy and on three tiny families, through their command lines."""

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoints
import clgrpo
import families
import grpo_run
import lora
import sft
import vlm
from data import load_image, read_emoset_split
from test_faults import ENV, REPO, run_killed

# ---------------------------------------------------------------------------------------------
# The layer and the merge, by hand
# ---------------------------------------------------------------------------------------------


def hand_layer() -> lora.LoRALinear:
    """W = [[1, 2], [3, 4]], b = [0.5, -1], r = 1, alpha = 2 (scale 2), A = [[1, 1]], B = [[2], [0]]."""
    base = torch.nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -1.0]))
    layer = lora.LoRALinear(base, rank=1, alpha=2.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[2.0], [0.0]]))
    return layer


def test_merge_formula_on_a_hand_sized_example():
    layer = hand_layer()
    x = torch.tensor([[1.0, 2.0]])
    # W x + b = [5.5, 10]; A x = 3; (alpha / r) B A x = 2 * [6, 0] = [12, 0]
    assert layer(x).tolist() == [[17.5, 10.0]]
    # W + (alpha / r) B A = [[1, 2], [3, 4]] + 2 * [[2, 2], [0, 0]]
    assert layer.merged_weight().tolist() == [[5.0, 6.0], [3.0, 4.0]]
    with lora.lora_disabled(torch.nn.Sequential(layer)):
        assert layer(x).tolist() == [[5.5, 10.0]]           # the base alone
    assert layer.enabled                                     # switched back on


def test_at_init_the_wrapped_layer_is_the_base_layer():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16)
    expected = base(x)
    layer = lora.LoRALinear(base, rank=4, alpha=8.0)
    assert torch.equal(layer.lora_B, torch.zeros(8, 4)) and layer.lora_A.abs().max() > 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(16)      # nn.Linear's init bound
    assert torch.equal(layer(x), expected)                    # B = 0: bit-identical output
    assert layer.weight is base.weight and not layer.weight.requires_grad


def test_lora_disabled_restores_the_switch_when_the_body_raises():
    model = torch.nn.Sequential(hand_layer())
    with pytest.raises(KeyError):
        with lora.lora_disabled(model):
            raise KeyError("boom")
    assert model[0].enabled
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with lora.lora_disabled(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass


# ---------------------------------------------------------------------------------------------
# On the tiny VLM: which layers, how many parameters, where the gradients go
# ---------------------------------------------------------------------------------------------
def test_default_targets_wrap_the_language_model_only_and_count_closed_form(tiny_model_dir):
    model, _ = families.load_model(tiny_model_dir)
    base_total = sum(p.numel() for p in model.parameters())
    wrapped = lora.add_lora(model, rank=4)
    assert len(wrapped) == 14 and all(".text_model." in n for n in wrapped)   # 2 layers x 7 projections
    # per layer, r (d_in + d_out): q 4(128+128) + k 4(128+64) + v 4(128+64) + o 4(128+128)
    #   + gate 4(128+256) + up 4(128+256) + down 4(256+128) = 1024 + 768 + 768 + 1024 + 3 x 1536 = 8192
    assert lora.count_parameters(model) == (2 * 8192, base_total + 2 * 8192)
    layer = model.model.text_model.layers[0].self_attn.q_proj
    assert isinstance(layer, lora.LoRALinear) and layer.scale == 2.0        # alpha defaults to 2 x rank


def test_vision_targets_only_when_asked_and_bad_targets_are_refused(tiny_model_dir):
    model, _ = families.load_model(tiny_model_dir)
    wrapped = lora.add_lora(model, rank=2, alpha=2, targets="q_proj", vision=True)
    assert sum(".vision_model." in n for n in wrapped) == 2 and sum(".text_model." in n for n in wrapped) == 2
    for targets, message in (("lm_head", "tied to another module"), ("mlp", "is a .*MLP, not a Linear"),
                             ("nope", "no layer .* outside the vision tower .* named .*q_proj")):
        with pytest.raises(ValueError, match=message):
            lora.add_lora(families.load_model(tiny_model_dir)[0], rank=2, targets=targets)
    with pytest.raises(ValueError, match="vision"):   # out_proj exists only in the vision tower
        lora.add_lora(families.load_model(tiny_model_dir)[0], rank=2, targets="out_proj")


def sft_batch(processor, toy_data, n=4):
    records, _ = read_emoset_split(toy_data, "train", limit=n)
    return sft.build_sft_batch(processor, [load_image(toy_data, r) for r in records],
                               [f"<answer>{r['label']}</answer>" for r in records])


def test_gradients_reach_only_the_adapters_and_the_base_stays_bit_identical(tiny_model_dir, toy_data):
    model, processor = families.load_model(tiny_model_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, rank=4)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora.lora_state_dict(model))
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    batch = sft_batch(processor, toy_data)
    for step in range(2):
        sft.sft_loss(model, batch).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
        a_grads = [m.lora_A.grad.abs().max().item() for m in lora.lora_layers(model).values()]
        b_grads = [m.lora_B.grad.abs().max().item() for m in lora.lora_layers(model).values()]
        assert all(g > 0 for g in b_grads)
        # step 1: dL/dA = (alpha / r) B^T dL/dh x^T = 0 exactly, since B = 0; after one step B != 0
        assert all(g == 0 for g in a_grads) if step == 0 else all(g > 0 for g in a_grads)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = model.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)      # weight decay never touched the base


# ---------------------------------------------------------------------------------------------
# The reference for free, and merged checkpoints
# ---------------------------------------------------------------------------------------------
def lora_model_with_random_adapters(folder, seed=0, rank=4):
    """The folder's model with adapters whose B is random too (as after training), so the adapted
    model really differs from its base."""
    model, processor = families.load_model(folder)
    lora.add_lora(model, rank=rank)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=gen))
    return model, processor


def rollout_for(model, processor, toy_data, g=3):
    records, _ = read_emoset_split(toy_data, "val", limit=2)
    torch.manual_seed(0)
    return vlm.sample_completions(model, processor, [load_image(toy_data, r) for r in records], group_size=g,
                                  max_new_tokens=12)


def test_reference_logprobs_are_the_base_models_with_the_adapters_off(tiny_model_dir, toy_data):
    model, processor = lora_model_with_random_adapters(tiny_model_dir)
    r = rollout_for(model, processor, toy_data)
    args = (r.prompts, r.completion_ids, r.completion_mask, r.group_size)
    policy = clgrpo.Policy(model, processor, None, None, None)
    with torch.no_grad():
        ref = clgrpo.reference_logprobs(policy, args)
        separate = vlm.completion_logprobs(families.load_model(tiny_model_dir)[0], *args)
        adapted = vlm.completion_logprobs(model, *args)
    keep = r.completion_mask.bool()
    assert (ref - separate)[keep].abs().max().item() < 1e-6
    assert (adapted - separate)[keep].abs().max().item() > 1e-3      # the adapters do change the policy
    assert all(layer.enabled for layer in lora.lora_layers(model).values())


def test_a_saved_checkpoint_is_plain_and_merged_and_gives_the_unmerged_logits(tiny_model_dir, toy_data, tmp_path):
    model, processor = lora_model_with_random_adapters(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = checkpoints.save_checkpoint(model, processor, tmp_path / "ckpt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())      # training model untouched
    saved = load_file(ckpt / "model.safetensors")
    plain = load_file(tiny_model_dir / "model.safetensors")
    assert saved.keys() == plain.keys()                                                 # no adapter tensors
    adapters = load_file(ckpt / lora.ADAPTERS_FILE)
    assert adapters.keys() == lora.lora_state_dict(model).keys()
    assert all(torch.equal(adapters[k], v) for k, v in lora.lora_state_dict(model).items())
    merged, _ = families.load_model(ckpt)
    assert not lora.lora_layers(merged)
    batch = {k: v for k, v in sft_batch(processor, toy_data).items() if k != "labels"}
    with torch.no_grad():
        a, b = model(**batch).logits, merged(**batch).logits
    assert (a - b).abs().max().item() < 1e-5
    q = "model.text_model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(q)
    expected = layer.weight + layer.scale * layer.lora_B @ layer.lora_A
    assert torch.allclose(saved[q + ".weight"], expected, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The scripts: flags, no reference model, resume
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("main, base", [(sft.main, ["--mode", "label", "--model", "m", "--data", "d"]),
                                        (clgrpo.main, ["--stage", "3", "--model", "m", "--data", "d"])])
@pytest.mark.parametrize("flags, message", [
    (["--lora-alpha", "8"], "--lora-alpha needs --lora-rank"),
    (["--lora-rank", "4", "--lora-vision", "--freeze-vision"], "choose one"),
    (["--lora-rank", "4", "--lora-targets", " , "], "names no layer"),
    (["--lora-rank", "0"], "argument --lora-rank"),
])
def test_contradictory_lora_flags_are_refused_before_loading(tmp_path, monkeypatch, capsys, main, base, flags,
                                                             message):
    monkeypatch.setattr(families, "load_model", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
    with pytest.raises(SystemExit) as e:
        main(base + ["--out", str(tmp_path / "run"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_ref_dtype_with_lora_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        grpo_run.parse_args(["--stage", "3", "--model", "m", "--data", "d", "--out", str(tmp_path / "r"),
                           "--lora-rank", "4", "--ref-dtype", "bfloat16"])
    assert "--ref-dtype has no effect with --lora-rank" in capsys.readouterr().err


FAST_RL = ["--batch-size", "4", "--num-generations", "8", "--max-new-tokens", "40", "--eval-every", "0",
           "--save-every", "100", "--lr", "1e-3", "--mu", "2"]


def test_a_lora_grpo_run_loads_no_reference_model_and_has_kl(tmp_path, half_format_model, toy_data, monkeypatch):
    loads, real = [], families.load_model
    monkeypatch.setattr(families, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    torch.manual_seed(0)
    out = tmp_path / "run"
    clgrpo.main(["--stage", "3", "--model", str(half_format_model), "--data", str(toy_data), "--out", str(out),
                 "--steps", "2", "--beta", "0.04", "--lora-rank", "8", *FAST_RL, "--mu", "1"])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(loads) == 1                                       # the policy only: pi_ref is its base
    assert metrics[0]["kl_mean"] == 0.0 < metrics[1]["kl_mean"]  # B = 0 at step 1: the policy is its reference
    assert all(math.isfinite(m["loss"]) and m["skipped_update"] == 0 for m in metrics)


def test_lora_grpo_resume_matches_an_uninterrupted_run(tmp_path, half_format_model, toy_data, one_thread):
    def run(name, *extra):
        clgrpo.main(["--stage", "3", "--model", str(half_format_model), "--data", str(toy_data),
                     "--out", str(tmp_path / name), "--steps", "4", "--lora-rank", "4", *FAST_RL, *extra])
        return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    full = run("full")
    run("split", "--stop-after", "2")
    split = run("split", "--resume")
    assert [m["reward_mean"] for m in split] == [m["reward_mean"] for m in full]
    assert [m["kl_mean"] for m in split] == [m["kl_mean"] for m in full]
    a, b = (load_file(tmp_path / n / "checkpoint" / lora.ADAPTERS_FILE) for n in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_lora_run_needs_its_lora_flags(tmp_path, tiny_model_dir, toy_data):
    common = ["--mode", "label", "--model", str(tiny_model_dir), "--data", str(toy_data), "--out", str(tmp_path / "r"),
              "--steps", "2", "--batch-size", "2", "--eval-every", "0"]
    sft.main(common + ["--lora-rank", "4", "--stop-after", "1"])
    with pytest.raises(SystemExit, match="holds LoRA adapters; resume with the run's --lora-\\* flags"):
        sft.main(common + ["--resume"])
    with pytest.raises(SystemExit, match="lora_[AB] is .*resume with the run's own --lora-rank"):
        sft.main(common + ["--resume", "--lora-rank", "2"])


def test_lora_sft_killed_at_random_points_resumes_to_the_same_adapters_and_weights(tmp_path, tiny_model_dir,
                                                                                  toy_data, one_thread):
    import random

    rng = random.Random(11)

    def cmd(out, resume=False):
        return [sys.executable, "sft.py", "--mode", "label", "--model", str(tiny_model_dir), "--data", str(toy_data),
                "--out", str(out), "--steps", "8", "--batch-size", "4", "--warmup", "2", "--save-every", "1",
                "--eval-every", "0", "--lora-rank", "4", "--lr", "1e-2"] + (["--resume"] if resume else [])

    sft.main(cmd(tmp_path / "ref")[2:])
    out = tmp_path / "killed"
    has_state = lambda: any((out / d / "trainer_state.pt").is_file() for d in ("checkpoint", ".checkpoint.old"))  # noqa: E731
    kills = sum(run_killed(cmd(out, resume=has_state()), out / "metrics.jsonl", k, rng)
                for k in sorted(rng.sample(range(1, 7), 2)))
    assert kills >= 1
    subprocess.run(cmd(out, resume=has_state()), cwd=REPO, env=ENV, check=True, capture_output=True)
    for name in ("model.safetensors", lora.ADAPTERS_FILE):
        ref, got = load_file(tmp_path / "ref" / "checkpoint" / name), load_file(out / "checkpoint" / name)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if k != "step_s"} for x in open(path)]  # noqa: E731
    assert strip(out / "metrics.jsonl") == strip(tmp_path / "ref" / "metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# Through the command lines: the toy and three tiny families
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["toy", "idefics3", "qwen2_vl", "internvl"])
def test_lora_sft_then_lora_stage3_through_the_command_line(family, tiny_model_dir, tiny_family_dir, toy_data,
                                                            tmp_path):
    folder = tiny_model_dir if family == "toy" else tiny_family_dir(family)
    records, _ = read_emoset_split(toy_data, "train", limit=8)
    with open(tmp_path / "cot.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({**r, "think": "The background is dark.", "answer": r["label"]}) + "\n")
    common = ["--data", str(toy_data), "--steps", "2", "--batch-size", "2", "--eval-every", "0", "--save-every", "2",
              "--lora-rank", "4"]
    sft.main(["--mode", "cot", "--cot", str(tmp_path / "cot.jsonl"), "--model", str(folder),
              "--out", str(tmp_path / "sft"), "--warmup", "1", "--lr", "1e-2", *common])
    clgrpo.main(["--stage", "3", "--model", str(tmp_path / "sft"), "--out", str(tmp_path / "rl"), "--beta", "0.04",
                 "--num-generations", "2", "--max-new-tokens", "8", "--lr", "1e-3", *common])
    for run, key in (("sft", "loss"), ("rl", "reward_mean")):
        lines = [json.loads(x) for x in open(tmp_path / run / "metrics.jsonl")]
        assert len(lines) == 2 and all(math.isfinite(x[key]) for x in lines), run
        saved = load_file(tmp_path / run / "checkpoint" / "model.safetensors")
        assert saved.keys() == load_file(folder / "model.safetensors").keys(), run   # a plain checkpoint
    assert math.isfinite(lines[-1]["kl_mean"])
    trained, _ = families.load_model(tmp_path / "sft")
    base, _ = families.load_model(folder)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed and all(k.endswith(tuple(f"{t}.weight" for t in lora.parse_targets(lora.DEFAULT_TARGETS)))
                           for k in changed)   # only the adapted projections moved, merged into their weights
