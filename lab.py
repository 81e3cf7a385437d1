"""The lab around RL4VLM's loop: what a run writes besides the policy, and how several runs are driven.

rl4vlm.py is the method and calls this module; nothing here imports rl4vlm.py or changes what a run computes:
- one-line errors, files that survive a crash, cached folders built once, the --sft-data file format;
- torchrun's ranks: which one this is, gathering and summing across them;
- checkpoints of data only, and exact resume;
- a run's table, curves and pages of episodes (what the agent saw, wrote and played);
- several runs (tasks x seeds x ablation variants) in worker processes, their progress and their tables.
"""
import fcntl
import itertools
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError

import ppo

ABLATIONS = {"": {"": {}},  # --ablations: the variants each task runs in, and the settings each changes
             "cot": {"with CoT": dict(cot=True), "without CoT": dict(cot=False)},
             "lambda": {f"lambda {c}": dict(cot=True, thought_coef=c) for c in (0.0, 0.5, 1.0)},
             "advantage": {"GAE": dict(advantage="gae"), "GiGPO": dict(advantage="gigpo")},
             "vloss": {"value clip": dict(clip_vloss=True), "no value clip": dict(clip_vloss=False)}}
PAPER = {"": "rl", "with CoT": "rl", "without CoT": "no_cot", "GAE": "rl"}  # a variant's number in Task.paper


# ---- One-line errors, files that survive a crash, cached folders built once

def fail(message: str):
    """Stop with one line and exit status 1: bad input, or a file that cannot be read as it should."""
    raise SystemExit(f"rl4vlm.py: error: {message}")


class WriteFailed(Exception):
    """A write that could not finish (no space, a quota, a read-only or vanished folder); its temporary is gone."""

    def __init__(self, path: Path, error: Exception):
        super().__init__(f"could not write {path} ({first_line(error)})")
        self.path = path


def write_atomically(path: Path, write) -> None:
    """write(tmp) beside `path`, fsync, rename to `path`, fsync the folder: after a crash, old or new, never half. A
    folder is replaced in two renames, the old one aside first (a crash between them leaves it aside, and the next
    write in that folder puts it back: remove_leftovers). A write that fails removes its temporary, leaves the old as
    it was and raises WriteFailed: what was being written, and why."""
    tmp, aside = (path.with_name(f".{path.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent)
        write(tmp)
        for name in [*tmp.rglob("*"), tmp]:
            flush(name)
        if path.is_dir():
            os.replace(path, aside)
        os.replace(tmp, path)
        flush(path.parent)
        remove(aside)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors raise these for a full disk
        remove(tmp)
        if aside.exists() and not path.exists():
            os.replace(aside, path)
        raise WriteFailed(path, e) from e


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> None:
    """Remove the temporaries that writers killed mid-write (SIGKILL, out of memory) left in `folder`, named with
    their process ids, and put back an old folder one left aside with no new one in its place; a live writer's stay."""
    for kind in ("tmp", "old"):
        for left in folder.glob(f".*.{kind}*"):
            name, _, pid = left.name[1:].rpartition(f".{kind}")
            if not pid.isdigit() or alive(int(pid)):
                continue
            if kind == "old" and not (folder / name).exists():
                os.replace(left, folder / name)
            else:
                remove(left)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing sent, only the check
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def first_line(e: Exception) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0][:200]


def stopped_writing(e: WriteFailed, run_dir: Path) -> str:
    """The one line for a write that failed: what, where, the free space there, and how to go on."""
    folder = e.path.parent
    free = f", {shutil.disk_usage(folder).free / 2**20:.1f} MB free there" if folder.exists() else ""
    return (f"{e}{free}; the last checkpoint and `latest` are as they were: make room, then continue with: "
            f"python rl4vlm.py --resume {run_dir}")


def flush(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


@contextmanager
def building(folder: Path):
    """One process at a time builds a cached folder; the others wait for it, then find it built. What dead writers
    left beside it goes first (a live writer's stays: a parallel run building another cached model)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder.parent)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        yield


@contextmanager
def damaged(path: Path, advice: str):
    """A file that cannot be read as what it should be stops the run with one line: its name, the error, what to do."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as e:
        fail(f"{path} is damaged or missing ({first_line(e)}); {advice}")


def read_sft_data(path: str) -> list[dict]:
    """--sft-data: {"image": path (relative to the file), "prompt": ..., "answer": ...} lines; a bad one: ValueError."""
    if not Path(path).is_file():
        raise ValueError(f"--sft-data {path}: no such file")
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--sft-data {path}: line {n} is not JSON ({e.msg})") from e
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("image", "prompt", "answer"))):
            raise ValueError(f'--sft-data {path}: line {n} needs the strings "image", "prompt" and "answer"')
        image = Path(path).parent / row["image"]  # an absolute path stays as it is
        if not image.is_file():
            raise ValueError(f"--sft-data {path}: line {n}: no image {image}")
        rows.append(dict(row, image=str(image)))
    if not rows:
        raise ValueError(f"--sft-data {path}: the file is empty")
    return rows


# ---- torchrun: each rank its own envs, samples and copy of the model (rl4vlm.ppo_update sums the gradients)

def init_distributed(s):
    """Join torchrun's group: NCCL on CUDA (cuda:LOCAL_RANK), gloo on CPU. In one process, what follows does nothing."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if s.num_envs % world or s.minibatch_size % world:
        fail(f"--num-envs and --minibatch-size are global: they must be multiples of the {world} ranks")
    if world == 1 or dist.is_initialized():
        return s
    if s.device.startswith("cuda"):
        s = replace(s, device=f"cuda:{os.environ['LOCAL_RANK']}")
        torch.cuda.set_device(s.device)
    backend = "nccl" if s.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=s.dist_timeout))
    return s


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(obj) -> list:
    """obj from every rank, in rank order ([obj] in one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_sum(tensors: list) -> None:
    """Sum tensors across ranks, in place."""
    for t in tensors if dist.is_initialized() else []:
        dist.all_reduce(t)


# ---- Checkpoints: data only (safetensors, JSON, tensors), nothing to unpickle

def save_checkpoint(run_dir: Path, update: int, policy, scheduler, pool, rng, keep: int) -> None:
    """What RL changes, every rank's: adapter (PEFT's format), state.pt (tensors), envs.json; the newest `keep` stay."""
    torch_rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [])
    ranks = gather(dict(pool=pool_state(pool), rng=rng.bit_generator.state, torch_rng=torch_rng))
    if rank_and_world()[0] > 0:
        return
    folder = run_dir / f"checkpoint-{update:05d}"

    def write(tmp: Path):
        ppo.save_adapter(policy.model, tmp)
        torch.save(dict(update=update, value_head=policy.value_head.state_dict(),
                        optimizer=scheduler.optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        torch_rng=[r.pop("torch_rng") for r in ranks]), tmp / "state.pt")
        (tmp / "envs.json").write_text(json.dumps(ranks))
    write_atomically(folder, write)
    write_text(run_dir / "latest", folder.name)
    older = sorted(p.name for p in run_dir.glob("checkpoint-*") if p.name < folder.name)
    newer = [p.name for p in run_dir.glob("checkpoint-*") if p.name > folder.name]  # of an abandoned future
    for name in older[:max(0, len(older) - (keep - 1))] + newer:
        shutil.rmtree(run_dir / name)


def restore_checkpoint(run_dir: Path, policy, scheduler, pool, rng) -> tuple[int, dict, list[str]]:
    """The latest checkpoint put back, every file checked before any is written: (update, results, metrics lines)."""
    latest, (rank, world) = run_dir / "latest", rank_and_world()
    name = latest.read_text().strip() if latest.is_file() else ""
    earlier = sorted(p.name for p in run_dir.glob("checkpoint-*") if p.name < name)
    advice = f"write {earlier[-1]} into {latest} to resume from the one before" if earlier else "start the run again"
    folder = run_dir / name
    if not name.startswith("checkpoint-") or not folder.is_dir():
        fail(f"{latest} names no checkpoint folder; {advice}")
    with damaged(folder / "state.pt", advice):
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    with damaged(folder / "envs.json", advice):
        ranks = json.loads((folder / "envs.json").read_text())
        if len(ranks) != world or len(state["torch_rng"]) != len(ranks):
            raise ValueError(f"written by {len(ranks)} ranks: resume with as many")
    with damaged(run_dir / "metrics.jsonl", "mend or delete its damaged lines, then resume"):
        lines = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["update"] <= state["update"]]
    with damaged(run_dir / "results.json", "start the run again"):
        results = json.loads((run_dir / "results.json").read_text())
    with damaged(folder, advice):
        ppo.load_adapter(policy.model, folder)
        policy.value_head.load_state_dict(state["value_head"])
        scheduler.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"][rank][0])
        if len(state["torch_rng"][rank]) > 1:
            torch.cuda.set_rng_state(state["torch_rng"][rank][1])
        load_pool_state(pool, ranks[rank]["pool"])
        rng.bit_generator.state = ranks[rank]["rng"]
    return state["update"], results, lines


def pool_state(pool) -> dict:
    """A rl4vlm.EnvPool as JSON data: each env's game, generator and time-limit count (no pictures: drawn again)."""
    games = [dict(game={k: v for k, v in vars(env.unwrapped).items() if k not in ENV_FRAME},
                  rng=env.unwrapped.np_random.bit_generator.state, steps=env._elapsed_steps) for env in pool.envs]
    return dict(started=pool.started, episode=pool.episode, returns=pool.returns.tolist(), envs=games)


def load_pool_state(pool, state: dict) -> None:
    """pool_state's data put back: each env as it was, its picture drawn again."""
    pool.started, pool.episode, pool.returns = state["started"], state["episode"], np.array(state["returns"])
    for env, saved in zip(pool.envs, state["envs"], strict=True):
        vars(env.unwrapped).update(saved["game"])
        env.unwrapped.np_random.bit_generator.state = saved["rng"]
        env._elapsed_steps = saved["steps"]
    pool.obs = [env.unwrapped.render() for env in pool.envs]
    pool.infos = [env.unwrapped.info() for env in pool.envs]


ENV_FRAME = {"render_mode", "observation_space", "action_space", "spec", "_np_random", "_np_random_seed"}  # not game


# ---- A run's pages of episodes, table and curves

def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    p, d = successes / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def write_episodes(page: Path, task, label: str, episodes: dict, processor) -> None:
    """A Markdown page of whole episodes {deal seed: [(picture, sample, reward)]}, pictures in a folder beside it."""
    folder, lines = page.with_suffix(""), [f"# {task.name}, {label}: the first {len(episodes)} held-out episodes", ""]
    pictures = {}  # file name -> picture
    for k, (seed, steps) in enumerate(episodes.items(), 1):
        lines += [f"## Episode {k} (deal seed {seed}): return {sum(r for *_, r in steps):g}", "",
                  "| step | picture | model input | answer | action | reward |", "|---|---|---|---|---|---|"]
        for t, (picture, x, reward) in enumerate(steps, 1):
            pictures[f"{k}-{t}.png"], seen, cell = Image.fromarray(picture), model_input(processor, x.prompt), ""
            if seen is not None:
                pictures[f"{k}-{t}-input.png"], cell = seen, f"![]({folder.name}/{k}-{t}-input.png)"
            action = task.actions[x.action]
            action = action if x.format_ok else f"no legal action: random {action} played"
            text = " ".join(x.text.splitlines()).replace("|", "\\|").replace("`", "'")  # one table cell
            lines.append(f"| {t} | ![]({folder.name}/{k}-{t}.png) | {cell} | `{text}` | {action} | {reward:g} |")
        lines.append("")
    write_atomically(folder, lambda tmp: (tmp.mkdir(), [image.save(tmp / name) for name, image in pictures.items()]))
    write_text(page, "\n".join(lines))


def model_input(processor, prompt: dict):
    """The picture as the model received it, where the processor gives one (1, 3, H, W) picture."""
    pixels, ip = prompt.get("pixel_values"), processor.image_processor
    if pixels is None or pixels.dim() != 4 or not hasattr(ip, "image_mean"):
        return None
    std, mean = (torch.tensor(v, device="cpu")[:, None, None] for v in (ip.image_std, ip.image_mean))
    pixels = pixels[0].float().cpu() * std + mean
    return Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def finished(folder: Path) -> dict:
    """A run's results.json ({} before its first evaluation): "rl" in it once the run is done."""
    return json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else {}


def plot_curves(path: Path, runs: dict, title: str) -> None:
    """Success against env steps, a line per run {name: (folder, the paper's % after RL or "")}; warm start dashed."""
    W, H, left, right, top, bottom = 800, 480, 60, 90, 50, 50
    img, font = Image.new("RGB", (W, H), "white"), ImageFont.load_default(size=14)
    d = ImageDraw.Draw(img)
    curves = {name: [(r["env_steps"], r["success"]) for r in metrics(folder)] for name, (folder, _) in runs.items()}
    xmax = max([x for points in curves.values() for x, _ in points] or [1])
    X = lambda x: left + x / xmax * (W - left - right)
    Y = lambda y: H - bottom - y * (H - top - bottom)
    step = next(m * 10**e for e in range(12) for m in (1, 2, 5) if xmax / (m * 10**e) <= 8)  # a round tick step
    for y in range(0, 101, 20):  # a light grid and its ticks
        d.line([(left, Y(y / 100)), (X(xmax), Y(y / 100))], fill="#e4e4e4")
        d.text((left - 6, Y(y / 100)), f"{y}%", fill="black", font=font, anchor="rm")
    for x in range(0, xmax + 1, step):
        d.line([(X(x), top), (X(x), Y(0))], fill="#e4e4e4")
        d.text((X(x), Y(0) + 6), f"{x:,}", fill="black", font=font, anchor="ma")
    d.line([(left, top), (left, Y(0)), (X(xmax), Y(0))], fill="black")
    d.text((X(xmax / 2), H - 16), "env steps     (dashed: the warm start;  triangle: the paper's 7B after RL)",
           fill="black", font=font, anchor="mm")
    legend = left + d.textlength(title + ": success rate     ", font=font)
    d.text((left, 14), f"{title}: success rate", fill="black", font=font)
    colours = itertools.cycle(["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"])
    for (name, (folder, paper)), colour in zip(runs.items(), colours):
        warm = Y(finished(folder)["warm_start"]["success"])
        for dash in range(left, round(X(xmax)) - 5, 12):
            d.line([(dash, warm), (dash + 6, warm)], fill=colour)
        points = [(X(x), Y(y)) for x, y in curves[name] if not math.isnan(y)]
        if len(points) > 1:
            d.line(points, fill=colour, width=2)
        if paper != "":
            y = Y(paper / 100)
            d.polygon([(X(xmax) + 3, y), (X(xmax) + 12, y - 6), (X(xmax) + 12, y + 6)], fill=colour)
            d.text((X(xmax) + 16, y), f"{paper:g}%", fill=colour, font=font, anchor="lm")
        d.text((legend, 14), name, fill=colour, font=font)  # the legend, along the top
        legend += d.textlength(name, font=font) + 24
    write_atomically(path, lambda tmp: img.save(tmp, format="PNG"))


def report_run(run_dir: Path, task, results: dict, paper) -> str:
    """A finished run's curve.png and results.md (a row per evaluation); returns the table."""
    plot_curves(run_dir / "curve.png", {task.env_id: (run_dir, paper)}, task.env_id)
    rows = [task.env_id, "| policy | success % (95% CI) | mean return | format failures % | answers read right % | "
            "thoughts true % | episodes |", "|---" * 7 + "|"]
    rows += [f"| {name} | {100 * r['success']:.1f} ({100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}) | "
             f"{r['mean_return']:.2f} | {100 * r['format_fail']:.1f} | {100 * r['read_right']:.1f} | "
             f"{100 * r['thought_right']:.1f} | {r['episodes']} |" for name, r in results.items()]
    write_text(run_dir / "results.md", "\n".join(rows) + "\n")
    return "\n".join(rows)

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --track: the package each needs


def tracker(s, run_dir: Path):
    """--track: a function that logs an update's metrics (their numbers, the action shares as action_share/<name>)
    at its env step to TensorBoard (run_dir/tensorboard) or Weights & Biases; without --track, one that does nothing."""
    def numbers(m: dict) -> dict:
        shares = {f"action_share/{k}": v for k, v in m["action_share"].items()}
        return {k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "env_steps"} | shares
    if s.track == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        return lambda m: ([writer.add_scalar(k, v, m["env_steps"]) for k, v in numbers(m).items()], writer.flush())
    if s.track == "wandb":
        import wandb
        wandb.init(project="rl4vlm", name=run_dir.name, config=asdict(s), dir=str(run_dir))
        return lambda m: wandb.log(numbers(m), step=m["env_steps"])
    return lambda m: None


# ---- Several runs (tasks, seeds, ablation variants) in worker processes, and their tables
RL4VLM = Path(__file__).with_name("rl4vlm.py")  # a run in a worker process: rl4vlm.py --resume FOLDER


def run_many(s, tasks, run_dir: Path, run) -> dict:
    """Each seed, task and variant in run_dir/seed<n>/<task>[-<variant>] (run, resumed or read), then curves, tables.
    run(settings, task, folder): rl4vlm.run, called here when the runs go one at a time (one worker, or torchrun)."""
    rank, world = rank_and_world()
    seeds, variants = s.seeds or [s.seed], ABLATIONS[s.ablations]
    runs = {}  # (task name, variant, seed) -> (task, folder, the run's settings)
    for seed, task, (name, change) in itertools.product(seeds, tasks, variants.items()):
        settings = replace(s, env=task.env_id, seed=seed, seeds=[], ablations="", **change)
        runs[task.name, name, seed] = (task, run_dir / f"seed{seed}" / "-".join([task.name, *name.split()]),
                                       task.with_defaults(settings))
    results = {key: finished(folder) for key, (_, folder, _) in runs.items()}
    todo = {key: run for key, run in runs.items() if "rl" not in results[key]}
    workers = min(s.workers or len(os.sched_getaffinity(0)), len(todo)) if world == 1 else 1
    if workers > 1:
        run_children(todo, workers, run_dir)
    for key, (task, folder, settings) in todo.items():
        results[key] = finished(folder) if workers > 1 else run(settings, task, folder)
    if rank > 0:
        return results
    for seed in seeds:
        curves = {f"{t.name} {name}".strip(): (runs[t.name, name, seed][1], t.paper.get(PAPER.get(name), ""))
                  for t in tasks for name in variants}
        plot_curves(run_dir / f"seed{seed}" / f"{s.ablations or 'curves'}.png", curves, f"seed {seed}")
    if s.ablations:  # after RL: with the env steps each variant played (gigpo plays its deals to their end)
        played = lambda t, name: np.mean([metrics(runs[t.name, name, seed][1])[-1]["env_steps"] for seed in seeds])
        rows = [(t.name, f"{name}, {label}", [results[t.name, name, seed][stage] for seed in seeds],
                 t.paper.get(PAPER.get(name), "") if stage == "rl" else "")
                for t in tasks for name in variants
                for stage, label in (("warm_start", "warm start"), ("rl", f"after RL, {played(t, name):,.0f} env steps"))]
        md = "\n".join(["Success % (paper: after RL)", ""] + seed_rows(rows, seeds))
        write_text(run_dir / "ablations.md", md + "\n")
    else:
        md, csv = suite_tables(tasks, seeds, {(t, seed): r for (t, _, seed), r in results.items()}, run_dir)
        write_text(run_dir / "results.md", md + "\n")
        write_text(run_dir / "results.csv", csv)
    print(md)
    return results


def run_children(runs: dict, workers: int, run_dir: Path) -> None:
    """The runs {key: (task, folder, settings)} as `rl4vlm.py --resume FOLDER` children, `workers` at a time."""
    waiting = sorted(runs, key=lambda key: -runs[key][2].max_new_tokens * runs[key][2].total_steps)
    running, told, failed, t0 = {}, dict.fromkeys(runs, 0), [], time.time()  # told: the stages said of each run

    def say(key, text):
        done = len(runs) - len(waiting) - len(running)
        print(f"{(time.time() - t0) / 60:5.1f} min  {label(key):<28} {text}   [{done} done, {len(running)} running, "
              f"{len(waiting)} waiting]", flush=True)
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                key = waiting.pop(0)
                _, folder, settings = runs[key]
                if not (folder / "settings.json").exists():
                    write_text(folder / "settings.json", json.dumps(asdict(settings), indent=1))
                with open(folder / "log.txt", "a") as out:  # a session of its own: Ctrl-C reaches it through us
                    running[key] = subprocess.Popen([sys.executable, RL4VLM, "--resume", folder],
                                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                say(key, "started")
            time.sleep(1)
            for key, child in list(running.items()):
                if child.poll() is not None:  # done, then its last stages are said
                    del running[key]
                stages = progress(*runs[key][1:])
                for text in stages[told[key]:]:
                    say(key, text)
                told[key] = max(told[key], len(stages))  # a resumed run rewrites its metrics
                if key not in running and child.returncode:
                    tail = (runs[key][1] / "log.txt").read_text(errors="replace").strip().splitlines()
                    why = tail[-1][:300] if tail else "(no output)"  # the error of a failed run
                    failed.append(f"{label(key)} ({runs[key][1] / 'log.txt'}: {why})")
                    say(key, f"failed (exit {child.returncode}): {why}")
    except KeyboardInterrupt:
        for child in running.values():
            child.send_signal(signal.SIGINT)
        for child in running.values():
            child.wait()
        raise
    if failed:
        fail(f"{len(failed)} of {len(runs)} runs failed: {'; '.join(failed)}; the others finished. Mend, then "
             f"continue with: python rl4vlm.py --resume {run_dir}")


def label(key) -> str:
    return " ".join(filter(None, [key[0], key[1], f"seed {key[2]}"]))  # (task, variant, seed) -> "Points24 seed 1"


def progress(folder: Path, s) -> list[str]:
    """The stages a run has reached: the warm start's evaluation, each checkpointed update, the evaluation after RL."""
    results, num_updates = finished(folder), max(1, s.total_steps // (s.num_envs * s.num_steps))
    stages = [f"warm start: success {100 * results['warm_start']['success']:.1f}%"] if "warm_start" in results else []
    lines = (folder / "metrics.jsonl").read_text().split("\n")[:-1] if (folder / "metrics.jsonl").exists() else []
    stages += [f"update {m['update']}/{num_updates}: success {m['success']:.3f}, format failures "  # whole lines only
               f"{m['format_fail']:.3f}, kept steps' approx_kl up to {m['step_kl_max']:.4f}"
               for m in map(json.loads, lines) if m["update"] % s.checkpoint_every == 0 or m["update"] == num_updates]
    return stages + ([f"after RL: success {100 * results['rl']['success']:.1f}%"] if "rl" in results else [])


def seed_rows(rows, seeds) -> list[str]:
    """Markdown rows of success % per seed, the mean and the min-max: rows of (cells..., [result per seed], paper)."""
    out = ["| task | policy | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean | min-max | paper (7B) |",
           "|---" * (len(seeds) + 5) + "|"]
    for *labels, per_seed, paper in rows:
        pct = [100 * r["success"] for r in per_seed]
        out.append(f"| {' | '.join(labels)} | " + " | ".join(f"{p:.1f}" for p in pct)
                   + f" | {np.mean(pct):.1f} | {min(pct):.1f}-{max(pct):.1f} | {paper} |")
    return out


def suite_tables(tasks, seeds, results: dict, run_dir: Path) -> tuple[str, str]:
    """Markdown: success % per seed, mean and min-max, the paper's, expert match, PPO step sizes, pages. CSV: all."""
    stages = (("warm_start", "warm start only", "sft"), ("rl", "after RL", "rl"))
    rows = [(t.name, label, [results[t.name, seed][stage] for seed in seeds], t.paper.get(paper, ""))
            for t in tasks for stage, label, paper in stages]
    md = [f"Success % (seeds {', '.join(map(str, seeds))}; 500 held-out episodes a cell unless --eval-episodes "
          "says otherwise)", "", *seed_rows(rows, seeds), "",
          "Warm start -> after RL, means over the seeds; the approx_kl of every kept PPO step and the undone ones; "
          "the critic's explained variance and value loss, means over the first and the second half of the updates:",
          "", "| task | greedy action = expert's % | answers read right % | thoughts true % | format failures % | "
          "approx_kl median | max | undone steps | explained variance | value loss |", "|---" * 10 + "|"]
    csv = ["task,seed,stage,success,ci_low,ci_high,episodes,expert_match,read_right,thought_right,format_fail,solvable,"
           "paper"]
    for t in tasks:
        mean = {k: [100 * np.mean([results[t.name, seed][stage][k] for seed in seeds]) for stage, *_ in stages]
                for k in ("expert_match", "read_right", "thought_right", "format_fail")}
        runs = [metrics(run_dir / f"seed{seed}" / t.name) for seed in seeds]
        updates = [m for rows in runs for m in rows]
        kl = [kl for m in updates for kl in m["step_kls"]] or [math.nan]  # every kept step
        halves = [m for rows in runs for m in rows[:len(rows) // 2]], [m for rows in runs for m in rows[len(rows) // 2:]]
        critic = [" -> ".join(f"{np.nanmean([m[k] for m in half]):.2f}" if half else "-" for half in halves)
                  for k in ("explained_variance", "value_loss")]  # "-": a run of one update has no first half
        md.append(f"| {t.name} | " + " | ".join("{:.1f} -> {:.1f}".format(*v) for v in mean.values())
                  + f" | {np.median(kl):.4f} | {max(kl):.4f} | {sum(m['undone_steps'] for m in updates)} | "
                  + " | ".join(critic) + " |")
        for seed, (stage, _, paper) in itertools.product(seeds, stages):
            r = results[t.name, seed][stage]
            csv.append(f"{t.name},{seed},{stage},{r['success']:.4f},{r['ci_low']:.4f},{r['ci_high']:.4f},"
                       f"{r['episodes']},{r['expert_match']:.4f},{r['read_right']:.4f},{r['thought_right']:.4f},"
                       f"{r['format_fail']:.4f},{r.get('solvable', '')},{t.paper.get(paper, '')}")
    md += [f"\n{t.name}: {100 * np.mean([results[t.name, seed]['rl']['solvable'] for seed in seeds]):.1f}% of the "
           "evaluated deals can be won at all." for t in tasks if t.solvable]
    pages = [f"[{t.name} seed {seed}, {stage}](seed{seed}/{t.name}/episodes-{stage}.md)" for t in tasks
             for seed in seeds for stage, *_ in stages
             if (run_dir / f"seed{seed}" / t.name / f"episodes-{stage}.md").exists()]
    md += ["", "Episodes step by step: " + ", ".join(pages)] if pages else []
    return "\n".join(md), "\n".join(csv) + "\n"
