"""Benchmark: this project's GRPO step (clgrpo.py, stage 3) against TRL's GRPOTrainer, on the same
checkpoint, data and settings, on the CPU in fp32.

What it measures, per side and per mu (updates per generation batch): the median wall seconds of
one step, the peak resident memory of the process, the mean completion length, and the median
seconds of each phase of a step. It also proves the TRL hand-off end to end: the TRL side trains
on `cot_builder.py export --to trl` output, scored by `rewards.trl_format_reward` and
`rewards.trl_accuracy_reward` with stage 3's weights (clgrpo.STAGE_PRESETS).

TRL is never a dependency of the project: it lives in its own virtual environment, made once by

    python scripts/bench_trl.py --setup                 # runs/trl_env: trl==1.16.0 (--env DIR for another)

The environment sees the system's packages (--system-site-packages), so it reuses the installed
torch and transformers, and pip is held to exactly those versions: it never pulls another torch (a
CUDA build). Only the TRL worker, run by that environment's python, imports trl. Then

    bash demo.sh                                        # or any checkpoint folder and EmoSet root
    python scripts/bench_trl.py --model runs/demo/stage2 --data runs/demo/data --out runs/bench_trl

runs, for each mu in --mu (default 1 2), --repeats times (default 2): the project, then TRL, each a
fresh process with --threads torch threads (default 1), so a change of machine load hits both.
A quick check on a random tiny model (under a minute):

    python toy.py model /tmp/m --size tiny && python toy.py data /tmp/d --difficulty stepwise
    python scripts/bench_trl.py --model /tmp/m --data /tmp/d --out /tmp/bench_trl \\
        --steps 3 --warmup 1 --repeats 1 --max-new-tokens 16

One step, on both sides, is one generation batch: B prompts (--batch-size 4) x G completions
(--num-generations 8) sampled in one batch, scored, their reference log-probs computed (and with
mu > 1 the old policy's: see below), then mu optimizer steps, each on all B x G completions at
once (no gradient accumulation). Settings are the same on both sides: beta 0.04 (k3 KL to the start checkpoint),
eps_low = eps_high = 0.2, sequence-level mean loss (clgrpo `--aggregation sequence`, TRL
`loss_type="grpo"`), group-std advantages, AdamW at a constant learning rate 1e-4, gradient norm
clipped at 1, temperature 1, top_p 1, no top-k, the same special tokens suppressed in sampling
(vlm.blocked_token_ids), at most --max-new-tokens (64) tokens.
- project: one call of clgrpo.grpo_step, inside `clgrpo.py --stage 3` (run through this script's
  project worker, which times each call; the flags are stored in bench_trl.json as `command`).
- TRL: mu global steps of GRPOTrainer with per_device_train_batch_size = B x G,
  gradient_accumulation_steps = 1, steps_per_generation = 1, num_iterations = mu,
  max_steps = steps x mu: the first of the mu global steps generates, each is one optimizer step.
  Its time is the sum, over those mu global steps, of on_step_begin -> on_step_end (a
  TrainerCallback). Loading the batch from the dataloader falls before on_step_begin, as loading
  the images falls outside grpo_step on the project side.
The first --warmup (2) steps of every process are left out of the medians.

The table, one per mu, one row per side:
- `s/step`: median seconds of one step (all repeats pooled); `project/TRL`: the project's median
  over TRL's (below 1: the project is faster).
- `peak RSS MiB`: the largest resident set of the process (ru_maxrss: model, reference model,
  optimizer state, activations, and each side's imports), the largest over the repeats.
- `completion len`: mean tokens per completion (up to and including the end-of-turn token) over the
  timed steps. Both sides start from the same model but sample different prompts and tokens: step
  times scale with this length, so compare it before the times.
- the phases, median seconds per step: `sample` (chat template, image preprocessing, generate,
  decode), `score` (the reward functions), `logprobs` (the no-grad passes: the reference's, and
  TRL's old-policy pass when mu > 1), `update` (the mu forward + backward + optimizer steps; TRL:
  the step minus its generation side, i.e. `_prepare_inputs`), `other` (the rest of the step:
  advantages, batching; TRL: its second processor pass over the images for the training forward,
  padding, metrics).
Each phase is its own median, so the phases need not add up to `s/step`. Everything, each step of
each process included, is written to OUT/bench_trl.json.

The TRL side is set up as docs/handoff.md says: the exported train.jsonl loaded with
`datasets.load_dataset("json", ...)` and its `image` column cast to `datasets.Image()`, the model
given as its folder (a run folder's checkpoint/), in fp32 (TRL's GRPOConfig defaults to bf16 and
gradient checkpointing: both are turned off). It gets the project's processor (families.load_processor)
and, through `generation_kwargs`, the project's suppressed tokens (TRL alone suppresses only the
image token). The TRL worker checks that TRL's prompt tokens equal the project's for the same image
and that both end completions on the same token ids; a warning says when they do not.

What still differs (the benchmark measures these, it does not remove them):
- TRL repeats each prompt G times before generating: the chat template, the image processor and the
  vision tower run once per completion (B x G), in sampling and in every forward; in every pass
  the project encodes each of the B images once and runs each prompt once for its G completions.
- With mu > 1, TRL computes the old policy's log-probs in a no-grad pass of its own (in `logprobs`);
  clgrpo.py keeps those of its first update's forward (the weights have not moved since sampling),
  so it runs one forward pass fewer per step (its log's `passes` field lists the passes).
- TRL computes the token entropy in every update, the project in the first of the mu updates only.
- The prompts drawn differ (TRL's RepeatSampler, clgrpo's EpochSampler, both seeded), and so do the
  sampled tokens; hence the completion-length column.
- Outside the step times: model loading and, at the end, the project's checkpoint save (deleted
  afterwards) and TRL's end-of-training summary; both count in the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_VERSION = "1.16.0"
PHASES = ("sample", "score", "logprobs", "update", "other")


# ---------------------------------------------------------------------------------------------
# Setup: the separate TRL environment
# ---------------------------------------------------------------------------------------------
def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def installed_version(name: str) -> str | None:
    """The version of `name` installed for this python, without a local label (2.13.0+cpu -> 2.13.0)."""
    from importlib import metadata
    try:
        return metadata.version(name).split("+")[0]
    except metadata.PackageNotFoundError:
        return None


def setup(env: Path) -> None:
    """Create the venv (seeing the system's packages) and install trl into it, with torch and
    transformers held to the versions installed here, so pip never replaces them."""
    pins = {name: installed_version(name) for name in ("torch", "transformers")}
    missing = [name for name, version in pins.items() if version is None]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not installed for {sys.executable}: install the project's "
                 f"requirements first (README, Quickstart)")
    if not env_python(env).exists():
        print(f"creating {env} (--system-site-packages: it reuses this python's torch and transformers)")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env)], check=True)
    constraints = env / "bench_constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    print(f"installing trl=={TRL_VERSION} with {', '.join(f'{n}=={v}' for n, v in pins.items())} kept")
    subprocess.run([str(env_python(env)), "-m", "pip", "install", "--quiet", "-c", str(constraints),
                    f"trl=={TRL_VERSION}"], check=True)
    check = ("import torch, transformers, trl, datasets, accelerate; print(' '.join("
             "f'{m.__name__}=={m.__version__}' for m in (trl, torch, transformers, datasets, accelerate)))")
    out = subprocess.run([str(env_python(env)), "-c", check], check=True, capture_output=True, text=True).stdout
    print(f"ok: {env}: {out.strip()}")


def check_env(env: Path) -> None:
    """One line and exit 1 when the TRL environment is missing or holds another trl."""
    probe = "import importlib.metadata as m; print(m.version('trl'))"
    found = None
    if env_python(env).exists():
        run = subprocess.run([str(env_python(env)), "-c", probe], capture_output=True, text=True)
        found = run.stdout.strip() if run.returncode == 0 else None
    if found != TRL_VERSION:
        what = f"holds trl {found}" if found else "has no trl"
        sys.exit(f"error: the TRL environment {env} {what if env_python(env).exists() else 'does not exist'}: "
                 f"run `python scripts/bench_trl.py --setup{'' if env == default_env() else f' --env {env}'}` first")


def default_env() -> Path:
    return ROOT / "runs" / "trl_env"


# ---------------------------------------------------------------------------------------------
# Workers: one process per (side, mu, repeat); each writes RUN/result.json
# ---------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def torch_threads() -> int:
    """torch's intra-op threads at the end of a run: proof that nothing changed --threads."""
    import torch
    return torch.get_num_threads()


def set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)


def project_argv(spec: dict) -> list[str]:
    """The clgrpo.py flags of the project side: the benchmark's settings, everything else default."""
    return ["--stage", "3", "--model", spec["model"], "--data", spec["data"], "--out", spec["run"],
            "--steps", str(spec["steps"]), "--batch-size", str(spec["batch_size"]),
            "--num-generations", str(spec["num_generations"]), "--max-new-tokens", str(spec["max_new_tokens"]),
            "--beta", str(spec["beta"]), "--eps-low", str(spec["eps_low"]), "--eps-high", str(spec["eps_high"]),
            "--aggregation", "sequence", "--scale-rewards", "group", "--lr", str(spec["lr"]), "--warmup", "0",
            "--temperature", "1.0", "--top-p", "1.0", "--mu", str(spec["mu"]), "--seed", str(spec["seed"]),
            "--device", "cpu", "--dtype", "float32", "--eval-every", "0", "--sample-every", "0",
            "--save-every", str(spec["steps"])]


def project_worker(spec: dict) -> dict:
    """clgrpo.main with project_argv, timing each clgrpo.grpo_step call (one generation batch); the
    phase times and completion lengths come from the run's metrics.jsonl."""
    set_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    import clgrpo
    from config import run_cli

    step_seconds = []
    grpo_step = clgrpo.grpo_step

    def timed_step(*args, **kwargs):
        t0 = time.perf_counter()
        result = grpo_step(*args, **kwargs)
        step_seconds.append(time.perf_counter() - t0)
        return result

    clgrpo.grpo_step = timed_step     # main() looks the name up at each call
    run_cli(clgrpo.main, project_argv(spec))
    rss = peak_rss_mib()
    lines = (Path(spec["run"]) / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines if line.strip()]
    if len(metrics) != len(step_seconds):
        raise RuntimeError(f"{len(metrics)} lines in metrics.jsonl but {len(step_seconds)} timed steps")
    steps = []
    for seconds, m in zip(step_seconds, metrics):
        phases = {name: m.get(f"time_{name}", 0.0) for name in ("sample", "score", "logprobs", "update")}
        phases["other"] = seconds - sum(phases.values())
        steps.append({"step_s": seconds, **phases, "completion_len_mean": m["completion_len_mean"],
                      "completions": m["generations"], "optimizer_steps": 0 if m["skipped_update"] else spec["mu"],
                      "reward_mean": m["reward_mean"], "passes": m.get("passes")})
    config = json.loads((Path(spec["run"]) / "run_config.json").read_text())
    return {"steps": steps, "peak_rss_mib": rss, "rewards": config["rewards"], "torch_threads": torch_threads(),
            "command": ["python", "clgrpo.py", *project_argv(spec)]}


def trl_worker(spec: dict) -> dict:
    """GRPOTrainer on the exported dataset, timed per generation batch (see the module docstring)."""
    set_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    from collections import defaultdict
    from types import SimpleNamespace

    import datasets
    import torch
    import trl
    from transformers import GenerationConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import clgrpo
    import families
    import vlm
    from rewards import trl_accuracy_reward, trl_format_reward

    mu = spec["mu"]
    # Stage 3's reward weights, from the project's own presets (format + accuracy).
    weights = clgrpo.stage_config(3, model=spec["model"], data=spec["data"], out=spec["run"]).rewards
    reward_funcs = [trl_format_reward, trl_accuracy_reward]
    reward_weights = [weights.get("format", 0.0), weights.get("accuracy", 0.0)]
    # The project's processor (left padding; loads image-only without torchvision, where
    # AutoProcessor would fail for families with a video processor) and the tokens its sampler
    # suppresses: every special token but the end of turn (image placeholders, pad, BOS). TRL
    # suppresses only the image token by default: the random toy model then samples
    # <fake_token_around_image>, <|im_start|> and <pad> inside its completions.
    model_dir = str(families.resolve_model_path(spec["model"]))   # a run folder's model is in its checkpoint/
    processor = families.load_processor(model_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig()
    eos = vlm.eos_token_ids(SimpleNamespace(generation_config=generation), processor)
    blocked = vlm.blocked_token_ids(None, processor, eos)

    train = datasets.load_dataset("json", data_files=spec["trl_data"], split="train")
    train = train.cast_column("image", datasets.Image())
    args = GRPOConfig(
        output_dir=spec["run"], report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=spec["seed"],
        model_init_kwargs={"dtype": "float32"}, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=spec["batch_size"] * spec["num_generations"], gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=mu, max_steps=spec["steps"] * mu,
        num_generations=spec["num_generations"], max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"suppress_tokens": blocked},
        beta=spec["beta"], epsilon=spec["eps_low"], epsilon_high=spec["eps_high"], loss_type="grpo",
        scale_rewards="group", reward_weights=reward_weights, mask_truncated_completions=False,
        learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch",   # torch.optim.AdamW, as clgrpo.py (not the fused variant)
        use_vllm=False, dataloader_num_workers=0, disable_tqdm=True)

    current: dict = defaultdict(float)   # this generation batch's seconds per phase, so far
    records, log_lines = [], []

    def timed(fn, phase):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                name = phase if phase != "logprobs" or not torch.is_grad_enabled() else "loss_logprobs"
                current[name] += time.perf_counter() - t0
        return wrapper

    class StepClock(TrainerCallback):
        """Seconds from on_step_begin to on_step_end, summed over the mu global steps of a batch."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            current["step_s"] += time.perf_counter() - self.t0
            current["optimizer_steps"] += 1
            if state.global_step % mu == 0:
                r = dict(current)
                r["update"] = r["step_s"] - r.get("prepare", 0.0)
                r["other"] = r.get("prepare", 0.0) - sum(r.get(k, 0.0) for k in ("sample", "score", "logprobs"))
                records.append(r)
                current.clear()

        def on_log(self, args, state, control, logs=None, **kwargs):
            log_lines.append(dict(logs or {}))

    trainer = GRPOTrainer(model=model_dir, args=args, train_dataset=train, processing_class=processor,
                          reward_funcs=reward_funcs, callbacks=[StepClock()])
    generate = trainer._generate
    first = {}   # the first prompt TRL rendered, checked against the project's own after training

    def generate_and_measure(prompts):
        out = generate(prompts)
        first.setdefault("prompt", (prompts[0], out[0][0]))
        completion_ids = out[1]     # (prompt_ids, completion_ids, tool_mask, completions, ...)
        current["completion_len_mean"] = sum(map(len, completion_ids)) / len(completion_ids)
        current["completions"] = len(completion_ids)
        return out

    # Instance attributes win over the class's methods: each self.<name>(...) call is timed.
    trainer._generate = timed(generate_and_measure, "sample")                 # template, images, generate, decode
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "score")   # the reward functions
    trainer._get_per_token_logps_and_entropies = timed(trainer._get_per_token_logps_and_entropies, "logprobs")
    trainer._prepare_inputs = timed(trainer._prepare_inputs, "prepare")       # the whole generation side
    trainer.compute_loss = timed(trainer.compute_loss, "loss_forward")        # the training forward + loss
    trainer.train()
    rss = peak_rss_mib()
    # Same prompt: the tokens TRL generated from (its chat template over the exported row, the image
    # put before the text) against vlm.encode_prompts, the project's prompt for the same image.
    messages, trl_ids = first["prompt"]
    image = next(part["image"] for part in messages[0]["content"] if part.get("type") == "image")
    ours = vlm.encode_prompts(processor, [image])
    same_prompt = list(trl_ids) == ours["input_ids"][0][ours["attention_mask"][0].bool()].tolist()
    project_eos = vlm.eos_token_ids(trainer.model, processor)
    return {"steps": records, "peak_rss_mib": rss, "logs": log_lines, "same_prompt_tokens": same_prompt,
            "model_dtype": str(trainer.model.dtype), "model_class": type(trainer.model).__name__,
            "torch_threads": torch_threads(),
            "rewards": dict(zip([f.__name__ for f in reward_funcs], reward_weights)),
            "eos_token_ids": {"trl": list(trainer.eos_token_ids), "project": project_eos},
            "suppress_tokens": blocked, "trl_args": {k: str(v) for k, v in args.to_dict().items()},
            "versions": {"trl": trl.__version__, "torch": torch.__version__, "datasets": datasets.__version__}}


def run_worker(kind: str, spec_path: Path) -> None:
    """Entry of a worker process: read the spec, run, write RUN/result.json (atomically)."""
    spec = json.loads(spec_path.read_text())
    result = (project_worker if kind == "project" else trl_worker)(spec)
    atomic_write_json(Path(spec["run"]) / "result.json", result)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def launch(kind: str, python: str, spec: dict, env: dict) -> dict:
    """Run one worker in a fresh RUN folder; its stdout and stderr go to RUN/worker.{out,err}.
    A failure prints the last lines of its stderr and exits 1."""
    run = Path(spec["run"])
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(run / "spec.json")]
    t0 = time.perf_counter()
    with open(run / "worker.out", "w") as out, open(run / "worker.err", "w") as err:
        rc = subprocess.run(cmd, stdout=out, stderr=err, env=env, cwd=ROOT).returncode
    if rc != 0 or not (run / "result.json").exists():
        print(f"error: the {kind} worker failed (exit {rc}); the last lines of {run / 'worker.err'}:", file=sys.stderr)
        print(tail(run / "worker.err"), file=sys.stderr)
        sys.exit(1)
    result = json.loads((run / "result.json").read_text())
    result["process_s"] = time.perf_counter() - t0
    shutil.rmtree(run / "checkpoint", ignore_errors=True)   # the project's final save: not needed here
    return result


def summarise(runs: list[dict], warmup: int) -> dict:
    """Medians over the timed steps of every run of one side (the first `warmup` of each left out)."""
    timed = [s for r in runs for s in r["steps"][warmup:]]
    return {"median_step_s": statistics.median(s["step_s"] for s in timed),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "completion_len_mean": statistics.fmean(s["completion_len_mean"] for s in timed),
            "phases_median_s": {p: statistics.median(s.get(p, 0.0) for s in timed) for p in PHASES},
            "timed_steps": len(timed),
            "per_run_median_step_s": [statistics.median(s["step_s"] for s in r["steps"][warmup:]) for r in runs]}


def table(mu: int, summary: dict) -> str:
    project, trl = summary["project"], summary["trl"]
    head = ["side", "s/step", "project/TRL", "peak RSS MiB", "completion len", *PHASES]
    rows = [head, ["---"] * len(head)]
    for name, s in (("project", project), ("TRL", trl)):
        ratio = f"{project['median_step_s'] / trl['median_step_s']:.2f}" if name == "project" else "1"
        rows.append([name, f"{s['median_step_s']:.3f}", ratio, f"{s['peak_rss_mib']:.0f}",
                     f"{s['completion_len_mean']:.1f}", *(f"{s['phases_median_s'][p]:.3f}" for p in PHASES)])
    steps = f"{project['timed_steps']} / {trl['timed_steps']} timed steps"
    return f"mu = {mu} ({steps}; phases: median seconds per step)\n\n" + \
        "\n".join("| " + " | ".join(r) + " |" for r in rows)


def warn_if_not_comparable(result: dict) -> None:
    """One line for each check of the TRL run that shows the two sides did not do the same work."""
    eos = result["eos_token_ids"]
    problems = [
        (not result["same_prompt_tokens"], "TRL's prompt tokens differ from the project's for the same image"),
        (set(eos["trl"]) != set(eos["project"]), f"end-of-completion ids differ: TRL {eos['trl']}, "
                                                 f"project {eos['project']}"),
        (any(s["optimizer_steps"] != result["mu"] for s in result["steps"]), "a TRL step did not make mu updates"),
    ]
    for bad, message in problems:
        if bad:
            print(f"warning: {message}", file=sys.stderr)


def export_trl_data(data: str, out: Path) -> Path:
    """The TRL dataset of the train split (the prompts clgrpo.py draws from), by the project's exporter."""
    folder = out / "trl_data"
    cmd = [sys.executable, "cot_builder.py", "export", "--to", "trl", "--split", "train", "--skip-missing",
           "--data", data, "--out", str(folder)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr.strip()}")
    print(done.stdout.strip())
    return folder / "train.jsonl"


def bench(args) -> None:
    env_dir = Path(args.env).resolve()
    check_env(env_dir)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    trl_data = export_trl_data(str(Path(args.data).resolve()), out)
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "hf_datasets_cache"),
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    settings = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()),
                "trl_data": str(trl_data), "steps": args.steps, "batch_size": args.batch_size,
                "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens, "beta": args.beta,
                "eps_low": args.eps_low, "eps_high": args.eps_high, "lr": args.lr, "seed": args.seed,
                "threads": args.threads}
    pythons = {"project": sys.executable, "trl": str(env_python(env_dir))}
    report = {"settings": {**settings, "warmup": args.warmup, "repeats": args.repeats, "mu": args.mu},
              "runs": [], "summary": {}}
    tables = []
    for mu in args.mu:
        runs = {"project": [], "trl": []}
        for repeat in range(args.repeats):
            for side in ("project", "trl"):   # alternating: drift in machine load hits both sides
                spec = {**settings, "mu": mu, "run": str(out / f"mu{mu}" / f"{side}_{repeat}")}
                result = launch(side, pythons[side], spec, env)
                result.update(side=side, mu=mu, repeat=repeat)
                runs[side].append(result)
                report["runs"].append(result)
                timed = [s["step_s"] for s in result["steps"][args.warmup:]]
                print(f"mu={mu} {side:7s} #{repeat}: {len(result['steps'])} steps, "
                      f"median {statistics.median(timed):.3f} s/step after warm-up, "
                      f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['process_s']:.0f} s in all", flush=True)
                if side == "trl":
                    warn_if_not_comparable(result)
                atomic_write_json(out / "bench_trl.json", report)   # partial results survive an interruption
        report["summary"][f"mu{mu}"] = {side: summarise(r, args.warmup) for side, r in runs.items()}
        tables.append(table(mu, report["summary"][f"mu{mu}"]))
    atomic_write_json(out / "bench_trl.json", report)
    print()
    print("\n\n".join(tables))
    print(f"\nraw numbers: {out / 'bench_trl.json'}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--setup", action="store_true", help="create the TRL environment (--env) and install trl into it")
    p.add_argument("--env", default=str(default_env()), help="the TRL virtual environment")
    p.add_argument("--model", help="checkpoint folder both sides start from (e.g. runs/demo/stage2)")
    p.add_argument("--data", help="EmoSet-layout data root (its train split is the prompts)")
    p.add_argument("--out", default="runs/bench_trl", help="output folder: bench_trl.json and one folder per run")
    p.add_argument("--mu", type=int, nargs="+", default=[1, 2], help="updates per generation batch, each benchmarked")
    p.add_argument("--steps", type=int, default=8, help="steps (generation batches) per process")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each process left out of the medians")
    p.add_argument("--repeats", type=int, default=2, help="processes per side and mu, alternating with the other side")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker (and OMP_NUM_THREADS)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step (B)")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion length limit")
    p.add_argument("--beta", type=float, default=0.04, help="KL weight")
    p.add_argument("--eps-low", type=float, default=0.2, help="lower clip bound")
    p.add_argument("--eps-high", type=float, default=0.2, help="upper clip bound")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (constant)")
    p.add_argument("--seed", type=int, default=0, help="seed of both sides")
    p.add_argument("--worker", choices=["project", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, Path(args.spec))
    if args.setup:
        return setup(Path(args.env).resolve())
    if not (args.model and args.data):
        p.error("--model and --data are required (or --setup)")
    if args.steps <= args.warmup or args.warmup < 0:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}), which must be >= 0")
    if min(args.mu) < 1 or args.repeats < 1 or args.threads < 1 or args.batch_size < 1 or args.num_generations < 2:
        p.error("--mu, --repeats, --threads and --batch-size must be >= 1, --num-generations >= 2")
    for flag, path in (("--model", args.model), ("--data", args.data)):
        if not Path(path).is_dir():
            p.error(f"{flag} {path}: not a folder")
    bench(args)


if __name__ == "__main__":
    main()
