"""scripts/full_size.py's dry run: the plan the first GPU would run (docs/real_run.md's settings), with
the published configs' parameter counts, image tokens of an EmoSet-sized image and estimates,
built on the meta device (no weights, no GPU)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full_size():
    spec = importlib.util.spec_from_file_location("full_size", ROOT / "scripts" / "full_size.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["full_size"] = module   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_dry_run_plans_the_readme_settings(full_size, tmp_path):
    plan = full_size.main(["--dry-run", "--device", "cuda", "--out", str(tmp_path / "plan.json")])
    assert json.loads((tmp_path / "plan.json").read_text()) == plan
    assert plan["settings"] == {"device": "cuda", "batch_size": 8, "num_generations": 8, "max_new_tokens": 256,
                                "grpo_steps": 3, "lora_rank": None}
    lora = full_size.main(["--dry-run", "--device", "cuda", "--models", "smolvlm-256m", "--lora-rank", "16"])
    assert lora["settings"]["lora_rank"] == 16
    assert [m["model"] for m in plan["models"]] == list(full_size.MODELS)
    for m in plan["models"]:
        params, spec = m["parameters"], full_size.MODELS[m["model"]]
        assert params["vision"] + params["projector"] + params["language"] == params["total"]
        assert params["vision"] > 0.08e9 and params["language"] > 0.15e9
        # the published configs give the published sizes (and docs/real_run.md's plan's)
        assert abs(params["total"] / 1e9 - spec.readme_params_b) < 0.01, (m["model"], params["total"])
        assert 0 < m["image_tokens"] <= spec.max_image_tokens < m["prompt_tokens"] + spec.max_image_tokens
        est = m["estimate_gib"]
        assert est["weights_grads_adamw_fp32"] == pytest.approx(4 * est["weights_fp32"], abs=4e-3)
        assert est["reference_bf16"] == pytest.approx(est["weights_fp32"] / 2, abs=2e-3)
        assert est["logits_fp32_one_micro_batch"] == pytest.approx(
            min(spec.micro_batch, 64) * 256 * m["text"]["vocab"] * 4 / 2 ** 30, rel=1e-3)
    by_name = {m["model"]: m for m in plan["models"]}
    assert by_name["smolvlm-256m"]["image_tokens"] == 320            # 2 x 2 crops of 512 px + the global view
    assert by_name["qwen2-vl-2b"]["image_tokens"] == 234             # 18 x 13 merged 28 px units of 500 x 375


def test_cpu_defaults_and_refusals(full_size, capsys):
    s = full_size.settings_from(full_size.parse_args(["--device", "cpu"]))
    assert (s.batch_size, s.num_generations, s.max_new_tokens, s.grpo_steps) == (2, 2, 16, 1)
    with pytest.raises(SystemExit) as exit_:
        full_size.parse_args(["--models", "smolvlm-256m,llama-70b"])
    assert exit_.value.code == 2 and "llama-70b" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            full_size.main(["--device", "cuda", "--models", "smolvlm-256m"])
