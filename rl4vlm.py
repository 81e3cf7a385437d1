"""RL4VLM (Zhai et al., NeurIPS 2024, arXiv 2405.10292): fine-tune a vision-language model as an agent with PPO.

Each env step the VLM sees the task's picture and a prompt (envs.py) and writes a JSON chain of thought that ends
in "action"; parse.py maps the text to a legal action and the env returns a reward. PPO with a value head on the
last prompt token's hidden state and GAE over env steps fine-tunes the VLM through LoRA (ppo.py), with
    log pi(a|s) = thought_coef * sum log p(thought tokens) + sum log p(action tokens).
The sections below follow a run; lab.py holds what surrounds it (files, checkpoints, torchrun's ranks, tables,
curves, pages of episodes, several runs at once). Where this departs from the paper (the README says why):
1. The default policy is a tiny LLaVA built here from random weights; its warm start adds a perception loss.
2. The warm start is imperfect on purpose (--sft-expert), at the sampling temperature; the tiny model's own settings.
3. A text that names no legal action is all thought tokens: the random action played is not the model's choice.
4. Old log-probs and values come from the sampling pass; the update has no dropout either; suppressed tokens masked.
5. A trust region (a PPO step past --target-kl is undone, then tried shorter) and a KL penalty toward the warm start.
"""
from __future__ import annotations

import os
import platform

# ---- One set of CPU kernels: torch, MKL and oneDNN pick theirs by the CPU (AVX512 here, AVX2 there), and their
# float sums then differ in the 7th digit, which a run grows into points. Pinned to AVX2, any x86-64 CPU with AVX2
# gives the same numbers; set before torch loads, and only where the user has not set them.
CPU_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
if platform.machine().lower() in ("x86_64", "amd64"):
    for _name, _value in CPU_PINS.items():
        os.environ.setdefault(_name, _value)

import argparse
import ast
import bisect
import copy
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import re
import textwrap
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import envs
import lab
import parse
import ppo

BUILTIN, SUITE, DTYPES = "builtin", "gym-cards", ("float32", "bfloat16")


# ---- Settings: one dataclass turned into argparse flags; None means the task's default (envs.Task.defaults)

def _opt(default, help, type=None, check=None):
    """A settings field. check: a rule of CHECKS, or a tuple of the values allowed."""
    return field(default=default, metadata={"help": help, "type": type, "check": check})


CHECKS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}


@dataclass
class Settings:
    env: str = _opt("gym_cards/NumberLine-v0", "task id or name, several joined by commas, or gym-cards (all four)")
    model: str = _opt(BUILTIN, "'builtin' (a tiny LLaVA built on first use) or a Hugging Face VLM id or folder")
    seed: int = _opt(1, "seed of everything: model init, envs, sampling, minibatches")
    seeds: list = _opt((), "one run per seed (e.g. --seeds 1 2 3) in OUT_DIR/RUN_NAME/seed<n>, tables over them", int)
    ablations: str = _opt("", "each task run as cot (with, without CoT), lambda (thought_coef 0, 0.5, 1), "
                          "advantage (gae, gigpo) or vloss (--clip-vloss, --no-clip-vloss) says",
                          check=tuple(lab.ABLATIONS))
    out_dir: str = _opt("runs", "runs are written to OUT_DIR/RUN_NAME")
    run_name: str = _opt("", "default: <task>-seed<seed>-<unix time>")
    track: str = _opt("", "also log each update's metrics to tensorboard or wandb", check=("", *lab.TRACKERS))
    resume: str = _opt("", "continue the run in this folder from its last checkpoint (its settings are used)")
    cache_dir: str = _opt(".cache", "the built-in model and warm-started models are cached here")
    device: str = _opt("auto", "torch device: auto (cuda if there is one, else cpu), cpu, cuda, cuda:1...")
    dtype: str = _opt("float32", "model weights (LoRA, value head, logits, PPO maths: float32)", check=DTYPES)
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward pass: less memory, slower")
    threads: int = _opt(1, "torch CPU threads (1 and the AVX2 kernel pins, CPU_PINS, unless the environment sets "
                        "them: the same numbers on any x86-64 CPU with AVX2; 0: torch's default)", check=">= 0")
    workers: int = _opt(0, "runs of a suite at once, a process each (0: one per CPU core)", check=">= 0")
    dist_timeout: float = _opt(30.0, "under torchrun: minutes a rank waits for the others", check="> 0")

    cot: bool = _opt(True, "chain of thought in prompts and warm-start answers (--no-cot: action only)")
    thought_coef: float = _opt(0.5, "lambda: weight of the thought tokens' log-prob in log pi(a|s)", check=">= 0")
    temperature: float = _opt(0.2, "sampling temperature, also applied in the loss (as in the paper)", check="> 0")
    max_new_tokens: int = _opt(None, "longest answer sampled (default: the task's)", int, check="> 0")
    format_penalty: float = _opt(0.0, "subtracted from the reward when the text names no legal action", check=">= 0")
    target_kl: float = _opt(0.05, "no PPO step may take a minibatch's approx_kl past this (0: no limit)", check=">= 0")
    kl_coef: float = _opt(None, "weight of a KL penalty toward the warm start (default: task's)", float, check=">= 0")
    backtrack: int = _opt(4, "a step past target_kl is retried at half the length this many times", check=">= 0")

    num_envs: int = _opt(32, "environments stepped in parallel, one prompt each (in all, under torchrun)", check="> 0")
    num_steps: int = _opt(None, "steps per env per update (default: the task's)", int, check="> 0")
    total_steps: int = _opt(15360, "env steps of RL in all: total_steps // (num_envs * num_steps) updates (gigpo plays "
                            "each update's deals to their end, and logs the steps it played)", check="> 0")

    gamma: float = _opt(0.9, "discount", check="in [0, 1]")
    gae_lambda: float = _opt(0.95, "GAE lambda", check="in [0, 1]")
    advantage: str = _opt("gae", "gae (the critic's, as the paper) or gigpo (copies of one deal compared, no critic)",
                          check=("gae", "gigpo"))
    group_size: int = _opt(8, "gigpo: envs that play each deal together (num_envs per rank a multiple of it)",
                           check="> 0")
    step_coef: float = _opt(1.0, "gigpo: weight of the step-level advantage (omega)", check=">= 0")
    group_norm: str = _opt("std", "gigpo: against the group as (x - mean) / std, or as x - mean (mean)",
                           check=("std", "mean"))
    mixed_groups: bool = _opt(False, "gigpo: learn only from groups whose copies neither all won nor all lost")
    clip_coef: float = _opt(0.1, "PPO clip range (of the value loss too with --clip-vloss)", check="> 0")
    clip_vloss: bool = _opt(False, "clip the value loss to the sampling pass's value +- clip_coef (as the paper)")
    update_epochs: int = _opt(4, "PPO epochs per update", check="> 0")
    minibatch_size: int = _opt(128, "samples per optimizer step (in all, under torchrun)", check="> 0")
    micro_batch: int = _opt(32, "samples per forward pass on each rank (gradients are accumulated)", check="> 0")
    vf_coef: float = _opt(0.5, "value-loss coefficient", check=">= 0")
    max_grad_norm: float = _opt(1.0, "gradient clipping (paper: 0.01 for the 7B model)", check="> 0")
    lr: float = _opt(1e-3, "learning rate of LoRA and value head, cosine-annealed (paper: 1e-5)", check="> 0")
    lr_min: float = _opt(1e-9, "final learning rate of the cosine schedule", check=">= 0")

    lora_rank: int = _opt(8, "LoRA rank (paper: 128)", check="> 0")
    lora_alpha: float = _opt(16.0, "LoRA alpha; scaling = alpha / rank (paper: 256)", check="> 0")
    lora_dropout: float = _opt(0.0, "warm-start LoRA dropout; RL has none (paper: 0.05)", check="in [0, 1]")
    lora_targets: str = _opt("", "regex of the linear layers LoRA wraps (default: the language model's)")
    lora_vision: bool = _opt(False, "LoRA on the vision tower's linear layers too (unless --lora-targets is given)")

    sft_steps: int = _opt(None, "warm-start steps (default: the task's; 0 skips it)", int, check=">= 0")
    sft_batch: int = _opt(32, "warm-start batch size", check="> 0")
    sft_lr: float = _opt(1e-3, "warm-start learning rate", check="> 0")
    sft_expert: float = _opt(None, "expert's share of warm-start actions (default: task's)", float, check="in [0, 1]")
    sft_follow: float = _opt(None, "expert's share of warm-start moves (default: task's)", float, check="in [0, 1]")
    sft_data: str = _opt("", 'warm start on a JSONL file of {"image": path, "prompt": ..., "answer": ...} lines')
    aux_loss: str = _opt("auto", "perception loss (auto: built-in model, no --sft-data)", check=("auto", "on", "off"))

    eval_episodes: int = _opt(500, "held-out episodes per evaluation", check="> 0")
    eval_envs: int = _opt(256, "environments each rank steps in parallel while evaluating", check="> 0")
    checkpoint_every: int = _opt(5, "updates between checkpoints (and one after the last)", check="> 0")
    episodes: bool = _opt(True, "after each evaluation write episodes-<stage>.md: the first held-out episodes")
    keep_checkpoints: int = _opt(2, "the newest checkpoints kept (an older one until a newer is whole)", check="> 0")

    def __post_init__(self):
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"


GROUPS = {"env": "run and output", "cot": "the method", "num_envs": "PPO", "lora_rank": "LoRA",
          "sft_steps": "warm start", "eval_episodes": "evaluation and checkpoints"}  # --help: first field -> header


def settings_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The flags of Settings; with defaults=False a flag not on the command line is left out of what it parses."""
    parser = argparse.ArgumentParser(
        usage="python rl4vlm.py [--env ENV] [--seeds SEED ...] [options below]",
        description="RL4VLM: PPO fine-tuning of a vision-language model on gym-cards.",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=34, width=120))
    parser.error = lab.fail  # one line, not argparse's usage block
    group = parser
    for f in fields(Settings):
        group = parser.add_argument_group(GROUPS[f.name]) if f.name in GROUPS else group
        name, text = flag(f.name), f.metadata["help"]
        default = (list(f.default) if isinstance(f.default, tuple) else f.default) if defaults else argparse.SUPPRESS
        if isinstance(f.default, bool):
            group.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif isinstance(f.default, tuple):
            group.add_argument(name, type=f.metadata["type"], nargs="+", default=default, help=text)
        else:
            group.add_argument(name, type=f.metadata["type"] or type(f.default), default=default, help=text)
    return parser


RESUMABLE = ("device", "workers", "threads", "dist_timeout", "track")  # what may change when a run goes on


def parse_settings(argv=None) -> Settings:
    """The command line's settings, checked; with --resume, the run's own, with the RESUMABLE flags given."""
    parser = settings_parser()
    s = Settings(**vars(parser.parse_args(argv)))
    try:
        check_settings(s)
        if s.resume:
            s = resumed_settings(s.resume, vars(settings_parser(defaults=False).parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))
    return s


def resumed_settings(run_dir: str, given: dict) -> Settings:
    """A run's settings.json with the RESUMABLE flags given on the command line; any other flag is refused (the run
    goes on as it started), and so is a settings file this code cannot read as it was meant."""
    refused = sorted(set(given) - {"resume", *RESUMABLE})
    if refused:
        raise ValueError(f"--resume goes on with the run's own settings: {', '.join(flag(n) for n in refused)} cannot "
                         f"change (only {', '.join(map(flag, RESUMABLE))} can)")
    saved, known = json.loads((Path(run_dir) / "settings.json").read_text()), {f.name for f in fields(Settings)}
    if saved.keys() != known:
        raise ValueError(f"--resume {run_dir}: its settings.json was written by another version of rl4vlm.py (fields "
                         f"unknown here: {sorted(saved.keys() - known)}, missing: {sorted(known - saved.keys())})")
    changes = {k: v for k, v in given.items() if k != "resume" and v != saved[k]}
    if changes:
        print(f"resuming {run_dir} with " + ", ".join(f"{flag(k)} {v} (was {saved[k]})" for k, v in changes.items()))
    s = Settings(**dict(saved, **changes, resume=run_dir))
    check_settings(s)
    return s


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_settings(s: Settings) -> None:
    """Reject bad values (nan and inf too) before any work. Raises ValueError with a one-line reason."""
    tasks_of(s.env)  # ValueError lists the tasks
    import transformers
    if not hasattr(transformers.GenerationMixin, POSITION_IDS):
        raise ValueError(f"transformers {transformers.__version__} has no GenerationMixin.{POSITION_IDS}, which "
                         "position_ids calls: install the version requirements.txt names")
    for f in fields(Settings):
        value, rule = getattr(s, f.name), f.metadata["check"]
        if isinstance(rule, tuple) and value not in rule:
            named = [c for c in rule if c]
            raise ValueError(f"{flag(f.name)} must be {', '.join(named[:-1])} or {named[-1]}, got {value!r}")
        if isinstance(rule, str) and value is not None and not (math.isfinite(value) and CHECKS[rule](value)):
            raise ValueError(f"{flag(f.name)} must be {rule}, got {value}")
    for seed in [s.seed, *s.seeds]:
        if not 0 <= seed < MAX_SEED:
            raise ValueError(f"--seed must be in 0..{MAX_SEED - 1}, got {seed}")
    if len(set(s.seeds)) != len(s.seeds):
        raise ValueError(f"--seeds must differ, got {s.seeds}")
    if s.sft_data:
        lab.read_sft_data(s.sft_data)
        if s.aux_loss == "on":
            raise ValueError("--aux-loss on needs the env's labels, which --sft-data does not have")
    if s.resume and not (Path(s.resume) / "settings.json").is_file():
        raise ValueError(f"--resume {s.resume}: no settings.json there, not a run folder")
    if s.model != BUILTIN and Path(s.model).exists() and not (Path(s.model) / "config.json").is_file():
        raise ValueError(f"--model {s.model}: folder has no config.json, not a Hugging Face model")
    if s.track and importlib.util.find_spec(lab.TRACKERS[s.track]) is None:
        raise ValueError(f"--track {s.track}: the package {lab.TRACKERS[s.track]} is not installed (pip install it)")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if s.advantage == "gigpo" and (s.group_size < 2 or s.num_envs // world % s.group_size):
        raise ValueError(f"--advantage gigpo compares copies of a deal: --group-size must be 2 or more, and "
                         f"--num-envs per rank ({s.num_envs // world}) a multiple of it, got {s.group_size}")
    if s.workers > 1 and world > 1:
        raise ValueError("--workers: under torchrun the runs go one at a time, each over all the ranks")




def tasks_of(env: str) -> list:
    """--env: gym-cards (the four gym-cards tasks, envs.GYM_CARDS), one task, or several joined by commas."""
    names = envs.GYM_CARDS if env == SUITE else env.split(",")
    return [envs.get_task(name) for name in names]


# ---- Random streams and environments: every episode's seed, and a batch of envs
STREAMS, MAX_SEED, MAX_RANKS, STREAM_EPISODES = ("train", "eval", "warm_start"), 1000, 100, 10**6


def stream(name: str, seed: int, rank: int = 0) -> range:
    """The episode seeds of (stream, seed, rank), in order. Ranges never meet: no deal is played by two streams."""
    assert 0 <= seed < MAX_SEED and 0 <= rank < MAX_RANKS, (seed, rank)
    first = ((STREAMS.index(name) * MAX_SEED + seed) * MAX_RANKS + rank) * STREAM_EPISODES
    return range(first, first + STREAM_EPISODES)




@contextmanager
def torch_seeded(seed: int):
    """torch's generators seeded for a block, then put back: the CPU's, and this process's GPU's once CUDA is in use."""
    gpu = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=gpu):
        torch.random.default_generator.manual_seed(seed)  # torch.manual_seed would queue one for every GPU
        if gpu:
            torch.cuda.manual_seed(seed)
        yield


class EnvPool:
    """num_envs copies of one task, each episode on the stream's next seed (gymnasium's vector envs seed each once).
    With group_size > 1 (GiGPO) each group of envs plays one deal, and the rollout deals again: no reset on its own."""

    def __init__(self, env_id: str, num_envs: int, seeds: range, group_size: int = 1):
        # without gymnasium's passive checker (tests run check_env), which keeps every env's last picture
        self.envs = [gym.make(env_id, disable_env_checker=True) for _ in range(num_envs)]
        self.seeds, self.started, self.group_size = seeds, 0, group_size  # started: the episodes started so far
        self.episode = [0] * num_envs  # the number in the stream of each env's current episode
        self.obs, self.infos, self.returns = [None] * num_envs, [None] * num_envs, np.zeros(num_envs)
        self.done = [True] * num_envs  # episode over (groups only: one env's is restarted at once)
        for i in range(num_envs) if group_size == 1 else []:
            self.reset([i])

    def reset(self, envs: list[int]) -> None:
        """These envs start the stream's next episode, the same deal."""
        if self.started == len(self.seeds):
            raise RuntimeError(f"the stream's {len(self.seeds):,} episode seeds are used up")
        for i in envs:
            self.obs[i], self.infos[i] = self.envs[i].reset(seed=self.seeds[self.started])
            self.episode[i], self.returns[i], self.done[i] = self.started, 0.0, False
        self.started += 1

    def step(self, i: int, action: int):
        """Step env i (reset at an episode's end): reward, terminated, truncated, (final obs, info, return) or None."""
        self.obs[i], reward, terminated, truncated, self.infos[i] = self.envs[i].step(action)
        self.returns[i] += reward
        ended = (self.obs[i], self.infos[i], self.returns[i]) if terminated or truncated else None
        self.done[i] = bool(ended)
        if ended and self.group_size == 1:
            self.reset([i])
        return reward, terminated, truncated, ended


# ---- The model: the built-in tiny VLM, saved once and then loaded as any hub checkpoint is, and the Policy record


def task_corpus(seed: int, episodes: int = 100) -> list[str]:
    """The four gym-cards tasks' prompts and answers (with and without CoT) from play that follows the expert half of
    the time. Only these four, whatever TASKS holds: a task a fork adds is written in the byte-level fallback."""
    rng, texts = np.random.default_rng(seed), []
    for task in map(envs.get_task, envs.GYM_CARDS):
        env = gym.make(task.env_id)
        for episode in range(episodes):
            (_, info), done = env.reset(seed=seed + episode), False
            while not done:
                action = task.follow_or_random(task.expert(info), 0.5, rng)
                for cot in (True, False):
                    texts += [task.prompt(info, cot), task.answer(info, action, cot)]
                _, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
    return texts


def builtin_key(seed: int) -> str:
    """What shapes the built-in model, hashed: the tokenizer's corpus (the tasks' prompts and answers) and its builder.
    A cached model is found again after any other change (a comment, the expert's code)."""
    return hashlib.sha256((json.dumps(task_corpus(seed)) + code_key(build_builtin)).encode()).hexdigest()[:8]


def code_key(*functions) -> str:
    """The code of these functions and classes, hashed as Python reads it: a comment or a blank line changes nothing."""
    trees = [ast.dump(ast.parse(textwrap.dedent(inspect.getsource(f)))) for f in functions]
    return hashlib.sha256("\n".join(trees).encode()).hexdigest()[:16]


def model_key(path: str) -> str:
    """What a model is, hashed: every file of its folder (config, weights, tokenizer, template), or for a hub id the
    revision its files come from. A model saved again at the same path, with other weights, is another model."""
    folder = Path(path)
    if not folder.is_dir():  # a hub id: the commit that holds its config now (the cached one when offline)
        from huggingface_hub import hf_hub_download
        with lab.damaged(folder, "check the model's name, and the network or the hub's cache"):
            return "revision " + Path(hf_hub_download(path, "config.json")).parent.name
    digest = hashlib.sha256()
    for file in sorted(f for f in folder.iterdir() if f.is_file()):  # a 7B model's 15 GB: about 10 s, once a run
        with open(file, "rb") as f:
            digest.update(file.name.encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def build_builtin(folder: Path, seed: int) -> None:
    """A tiny LLaVA (CLIP vision tower, Llama text model) with a byte-level BPE tokenizer trained on the tasks' text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
    # numbers and action strings stay apart; the repeated text between them merges into long tokens (short sequences)
    words = sorted({a for task in map(envs.get_task, envs.GYM_CARDS) for a in task.actions if not a.isdigit()},
                   key=len, reverse=True)
    apart = Regex("|".join([r"\d+"] + [re.escape(w) for w in words]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(apart, "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(task_corpus(seed), trainers.BpeTrainer(
        vocab_size=2048, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|pad|>", "<|end|>", "<image>", "<|user|>", "<|assistant|>"]))
    # user turn: <|user|><image>prompt; assistant turn: <|assistant|>answer<|end|>
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{% for c in m['content'] %}"
                "{{ '<image>' if c['type'] == 'image' else c['text'] }}{% endfor %}"
                "{{ '<|end|>' if m['role'] == 'assistant' }}{% endfor %}{{ '<|assistant|>' if add_generation_prompt }}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|end|>", padding_side="left",
        extra_special_tokens={"image_token": "<image>", "user_token": "<|user|>", "assistant_token": "<|assistant|>"})
    image_px, patch = 64, 16  # 16 image tokens; measured to read NumberLine in minutes
    width = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
    text = LlamaConfig(**width, num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**width, image_size=image_px, patch_size=patch),
                         text_config=text, vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=(image_px // patch) ** 2,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    with torch_seeded(seed):
        model = LlavaForConditionalGeneration(config)
    pixels = CLIPImageProcessorPil(size={"shortest_edge": image_px}, crop_size={"height": image_px, "width": image_px})
    processor = LlavaProcessor(image_processor=pixels, tokenizer=tokenizer, patch_size=patch, chat_template=template,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    lab.write_atomically(folder, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp)))


@dataclass
class Policy:
    """pi(a|s): model, processor, value head, how it answers (as loaded: temperature 1, lambda 1) and its token ids."""
    model: torch.nn.Module
    processor: object
    value_head: ppo.ValueHead | None = None  # added for RL
    cot: bool = True             # the prompts ask for a chain of thought
    temperature: float = 1.0     # of sampling, and of the log-probs in the loss
    max_new_tokens: int = 32     # the longest answer
    thought_coef: float = 1.0    # lambda: the weight of the thought tokens' log-probs
    stop_ids: list[int] = field(init=False)  # end-of-turn tokens: an answer ends at the first of them
    suppress: list[int] = field(init=False)  # special tokens never sampled (an image token breaks the next pass)
    pad_id: int = field(init=False)

    def __post_init__(self):
        self.stop_ids = [int(i) for i in np.atleast_1d(self.model.generation_config.eos_token_id)]
        self.suppress = sorted(set(self.processor.tokenizer.all_special_ids) - set(self.stop_ids))
        self.pad_id = self.processor.tokenizer.pad_token_id

    @property
    def device(self) -> torch.device:
        return self.model.device


def load_policy(path: str, device: str, dtype: str = "float32", grad_checkpointing: bool = False) -> Policy:
    """Model and processor through the Auto classes; any but an image-text-to-text VLM with a chat template fails."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    with lab.damaged(Path(path), "check the name, or if it is a cached model, delete the folder to build it again"):
        config = AutoConfig.from_pretrained(path)
        if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            lab.fail(f"{path!r} is a {config.model_type!r} model, not an image-text-to-text VLM")
        processor = AutoProcessor.from_pretrained(path)
        if not getattr(processor, "chat_template", None):
            lab.fail(f"{path!r} has no chat template")
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    if grad_checkpointing:
        model.activation_checkpointing_enable()
    if dtype != "float32":
        model.get_output_embeddings().register_forward_hook(float32_logits)
    if processor.tokenizer.pad_token is None:  # e.g. Mistral's; padding is always masked, so EOS can stand in
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    # sampling draws from the loss's distribution: no generation defaults (top_k, top_p...), only the stop tokens
    eos = model.generation_config.eos_token_id or processor.tokenizer.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
    return Policy(model, processor)


def float32_logits(head, args, out):
    """LM-head hook: the logits in float32 (bf16 rounds a logit near 20 by 0.125, 0.625 nats at temperature 0.2)."""
    return F.linear(args[0].float(), head.weight.float(), None if head.bias is None else head.bias.float())


# ---- Prompts, generation and log-probs

def encode_prompt(processor, image, prompt: str, device) -> dict:
    """A chat-formatted prompt with its image inputs, batch dim 1: any model's image inputs stay per sample."""
    bos = processor.tokenizer.bos_token
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    chat = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    # a template that writes BOS itself gets no second one from the tokenizer (as in transformers)
    enc = processor(images=[Image.fromarray(image)], text=[chat], return_tensors="pt",
                    add_special_tokens=not (bos and chat.startswith(bos)))
    return {k: v.to(device) for k, v in enc.items()}


class TensorCache:
    """Rows of tensors by key, least recently used out first beyond max_bytes."""

    def __init__(self, max_bytes: int):
        self.rows, self.bytes, self.max_bytes = OrderedDict(), 0, max_bytes

    def get(self, key, make):
        if key not in self.rows:
            self.rows[key] = make()
            self.bytes += self.size(self.rows[key])
            while self.bytes > self.max_bytes and len(self.rows) > 1:
                self.bytes -= self.size(self.rows.popitem(last=False)[1])
        self.rows.move_to_end(key)
        return self.rows[key]

    @staticmethod
    def size(row: dict) -> int:
        return sum(v.nelement() * v.element_size() for v in row.values())


_prompt_caches = weakref.WeakKeyDictionary()  # processor -> TensorCache of 256 MB


def encode_prompts(processor, images, prompts: list[str], device) -> list[dict]:
    """encode_prompt, once per distinct (picture, prompt) pair: states repeat. The rows are shared: read only."""
    cache = _prompt_caches.setdefault(processor, TensorCache(256 * 2**20))
    return [cache.get((hashlib.sha1(np.ascontiguousarray(image)).digest(), image.shape, prompt, str(device)),
                      lambda: encode_prompt(processor, image, prompt, device))
            for image, prompt in zip(images, prompts)]


def pad_prompts(rows: list[dict], pad_id: int) -> dict:
    """Per-sample prompts -> one batch: (1, P) tensors padded on the left, the others (pixels, grids) at the end."""
    batch = {}
    for key in rows[0]:
        xs = [r[key] for r in rows]
        n = max(x.shape[1] for x in xs)
        if all(x.shape == r["input_ids"].shape for x, r in zip(xs, rows)):
            xs = [F.pad(x, (n - x.shape[1], 0), value=pad_id if key == "input_ids" else 0) for x in xs]
        else:
            xs = [F.pad(x, (0, 0) * (x.dim() - 2) + (0, n - x.shape[1])) for x in xs]
        batch[key] = torch.cat(xs)
    return batch


def state_prompts(policy: Policy, task, images, infos) -> tuple[list[dict], dict]:
    """The task's prompts for a batch of states: the per-sample rows (cached) and the padded batch."""
    rows = encode_prompts(policy.processor, images, [task.prompt(info, policy.cot) for info in infos], policy.device)
    return rows, pad_prompts(rows, policy.pad_id)


def pad_answers(answers: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers of different lengths (G_i,) -> gen_ids (B, G) right-padded with pad_id, gen_mask (B, G)."""
    G = max(len(a) for a in answers)
    return (torch.stack([F.pad(a, (0, G - len(a)), value=pad_id) for a in answers]),
            torch.stack([torch.arange(G, device=a.device) < len(a) for a in answers]))


def sampling_logits(logits, temperature: float, suppress: list[int]):
    """The one sampling distribution, as logits: logits / temperature, suppressed tokens at -inf (float32)."""
    logits = logits.float() / temperature
    if suppress:
        logits[..., suppress] = -math.inf
    return logits


class SamplingRecord:
    """generate's logits processor: sampling_logits, keeping only each step's entropy and drawn token's logp (B,)."""

    def __init__(self, temperature: float, suppress: list[int]):
        self.temperature, self.suppress, self.logp, self.logprobs, self.entropies = temperature, suppress, None, [], []

    def __call__(self, input_ids, logits):  # input_ids (B, P + k) end in the token drawn at step k - 1
        self.took(input_ids)
        logits = sampling_logits(logits, self.temperature, self.suppress)
        self.logp = torch.log_softmax(logits, -1)  # (B, V) at step k
        self.entropies.append(torch.special.entr(self.logp.exp()).sum(1))  # -sum p log p, 0 log 0 = 0
        return logits

    def took(self, sequences):  # the log-prob of the last token drawn; after generate, of the last step's
        if self.logp is not None:
            self.logprobs.append(self.logp.gather(1, sequences[:, -1:]).squeeze(1))


POSITION_IDS = "_prepare_position_ids_for_generation"  # transformers' GenerationMixin's; check_settings checks it


def position_ids(model, ids, mask, extra: dict):
    """generate()'s position ids of a left-padded batch (3-D for Qwen2-VL, a model's own override): the one private
    call, as no public function gives them for every family."""
    return getattr(model, POSITION_IDS)(ids, dict(input_ids=ids, attention_mask=mask, **extra))


@contextmanager
def first_pass_state(model, position: int):
    """The language model's last-layer state (B, H) at `position` in its first pass in the block (generation's is
    over the prompt), read by a hook: output_hidden_states would keep every layer's, and at every generated token."""
    states = []
    hook = model.get_decoder().register_forward_hook(  # a copy, not a view: the rest of the layer can go
        lambda module, args, out: None if states else states.append(out.last_hidden_state[:, position].clone()))
    try:
        yield states
    finally:
        hook.remove()


def forward(model, prompt: dict, gen_ids, gen_mask, temperature: float = 1.0, suppress=()):
    """One pass over left-padded prompts (B, P) + answers (B, G) -> log p of each answer token under the sampling
    distribution (B, G) (0 at padding), the last prompt token's last-layer state (B, H) and the model's output."""
    (B, P), G = prompt["input_ids"].shape, gen_ids.shape[1]
    ids = torch.cat([prompt["input_ids"], gen_ids], 1)                       # (B, P+G)
    mask = torch.cat([prompt["attention_mask"], gen_mask.long()], 1)
    # other per-token inputs (Gemma3's token_type_ids, Qwen2-VL's mm_token_type_ids) go on with 0 (text)
    extra = {k: torch.cat([v, v.new_zeros(B, G)], 1) if v.shape == (B, P) else v
             for k, v in prompt.items() if k not in ("input_ids", "attention_mask")}
    # logits only where they predict answer tokens (P - 1 .. P + G - 2): the LM head over the prompt is waste
    with first_pass_state(model, P - 1) as states:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(model, ids, mask, extra),
                    use_cache=False, logits_to_keep=G + 1, **extra)
    logp = torch.log_softmax(sampling_logits(out.logits[:, :-1], temperature, suppress), -1)  # (B, G, V)
    logprobs = logp.gather(-1, gen_ids.unsqueeze(-1)).squeeze(-1).where(gen_mask, 0.0)        # (B, G)
    return logprobs, states[0], out


def prompt_forward(model, prompt: dict):
    """The last prompt token's last-layer state (B, H) and the model's output, on the prompts alone."""
    empty = prompt["input_ids"][:, :0]  # (B, 0): no answer tokens
    return forward(model, prompt, empty, empty.bool())[1:]


def logprobs_and_values(policy: Policy, prompt: dict, gen_ids, gen_mask):
    """log p of each answer token (B, G) and V(s) from the last prompt token's hidden state (B,), in one forward."""
    logprobs, state, _ = forward(policy.model, prompt, gen_ids, gen_mask, policy.temperature, policy.suppress)
    return logprobs, policy.value_head(state)


def action_start(tokenizer, gen_ids: list[int], span) -> int:
    """The first token whose decoded prefix reaches the action value (span: parse.py's; None: all thought)."""
    if span is None:
        return len(gen_ids)
    past_start = lambda k: len(tokenizer.decode(gen_ids[:k + 1], skip_special_tokens=True)) > span[0]
    return bisect.bisect_left(range(len(gen_ids)), True, key=past_start)


@dataclass
class Sample:
    """One sampled answer to one state: what the PPO update and the diagnostics need."""
    prompt: dict           # the processor's output for the state, batch dim 1 (the prompt cache's: read only)
    gen_ids: torch.Tensor  # (G,) the answer's tokens, up to and including its end-of-turn token
    weights: torch.Tensor  # (G,) thought_coef on thought tokens, 1 on action tokens
    logprob: float         # log pi(a|s) = sum(weights * log p(token)) while sampling
    value: float           # V(s) while sampling
    entropy: torch.Tensor  # (G,) entropy of the sampling distribution at each token
    text: str
    n_thought: int         # tokens before the first action token (all of them without an action value)
    thought: str           # the text before the action value (all of it without one)
    action: int            # the action played: the text's, or a random one (format failure)
    format_ok: bool
    read_ok: bool | None = None     # with CoT: the answer's read fields are the state's, exactly
    thought_ok: bool | None = None  # with CoT: its thought is the state's true one (Points: the expert's plan)
    warm_logprobs: torch.Tensor | None = None  # (G,) with --kl-coef: log p of each token under the warm start


@torch.no_grad()
def act(policy: Policy, task, images, infos, rng) -> list[Sample]:
    """Sample one answer per state and turn it into an action."""
    rows, prompt = state_prompts(policy, task, images, infos)
    record = SamplingRecord(policy.temperature, policy.suppress)  # the sampling distribution: no other processor
    with first_pass_state(policy.model, -1) as states:
        sequences = policy.model.generate(**prompt, do_sample=True, top_k=0, top_p=1.0, logits_processor=[record],
                                          max_new_tokens=policy.max_new_tokens)
    record.took(sequences)
    # the samples' tensors live on the CPU (the update moves each minibatch to the model's device)
    gen_ids = sequences[:, prompt["input_ids"].shape[1]:].cpu()                                   # (B, G)
    logprobs, entropy = (torch.stack(x, 1).cpu() for x in (record.logprobs, record.entropies))  # (B, G)
    values = policy.value_head(states[0]).cpu()
    # tokens up to and including the first end-of-turn token are the answer; the rest is padding
    is_end = torch.isin(gen_ids, torch.tensor(policy.stop_ids, device="cpu")).long()
    gen_mask = (is_end.cumsum(1) - is_end) == 0
    tokenizer, samples = policy.processor.tokenizer, []
    for i in range(len(infos)):
        ids = gen_ids[i][gen_mask[i]].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        action, span = parse.parse_action(text, task.actions)
        format_ok = action is not None
        if not format_ok:  # the paper plays a random legal action; counted as a format failure
            action, span = task.random_action(rng), None  # not the model's choice: every token is thought
        first = action_start(tokenizer, ids, span)
        read_ok, thought_ok = task.answer_checks(infos[i], text) if policy.cot else (None, None)
        weights = torch.tensor([policy.thought_coef] * first + [1.0] * (len(ids) - first), device="cpu")
        samples.append(Sample(
            prompt=rows[i], gen_ids=gen_ids[i, :len(ids)].clone(), weights=weights,
            logprob=float((logprobs[i, :len(ids)] * weights).sum()), value=float(values[i]),
            entropy=entropy[i, :len(ids)].clone(), text=text, n_thought=first, thought=text[:span[0]] if span else text,
            action=action, format_ok=format_ok, read_ok=read_ok, thought_ok=thought_ok))
    return samples


def collate(samples: list[Sample], pad_id: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples -> left-padded prompts; right-padded gen_ids, gen_mask and weights (B, G), on the prompts' device."""
    gen_ids, gen_mask = pad_answers([x.gen_ids for x in samples], pad_id)
    weights = torch.stack([F.pad(x.weights, (0, gen_ids.shape[1] - len(x.weights))) for x in samples])
    prompt = pad_prompts([x.prompt for x in samples], pad_id)
    return prompt, *(x.to(prompt["input_ids"].device) for x in (gen_ids, gen_mask, weights))


# ---- Warm start (the paper's SFT step): the policy before RL

def warm_started_policy(s: Settings, task, log) -> Policy:
    """The policy before RL, answering as the settings say: the base model, warm-started unless --sft-steps 0, both
    cached and loaded as any checkpoint; on seeded streams of their own, so a cached run goes on as a fresh one."""
    path = s.model
    if s.model == BUILTIN:
        path = str(Path(s.cache_dir) / f"builtin-{builtin_key(s.seed)}-seed{s.seed}")
        with lab.building(Path(path)):
            if not (Path(path) / "config.json").exists():
                log(f"building the built-in tiny VLM in {path}")
                build_builtin(Path(path), s.seed)
    if s.sft_steps > 0:
        key = warm_start_key(s, task, model_key(path))
        folder = Path(s.cache_dir) / f"sft-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"
        with lab.building(folder):
            if not (folder / "config.json").exists():
                warm_start_into(folder, path, s, task, key, log)
        log(f"warm-started model: {folder}")
        path = str(folder)
    return replace(load_policy(path, s.device, s.dtype, s.grad_checkpointing), cot=s.cot, temperature=s.temperature,
                   max_new_tokens=s.max_new_tokens, thought_coef=s.thought_coef)


def warm_start_key(s: Settings, task, base: str) -> dict:
    """What shapes a warm start, and names its cached folder: the settings it uses, the base model (base: model_key's),
    its data (the first batches' fingerprint, or the --sft-data file's hash), its seeds and its code (WARM_START_CODE's
    functions as this module holds them now)."""
    full = s.model == BUILTIN  # from scratch: every weight trains; a pretrained model: LoRA, merged after
    key = {k: getattr(s, k) for k in ("model", "cot", "sft_steps", "sft_batch", "sft_lr", "sft_expert", "sft_follow",
                                      "seed", "max_grad_norm", "dtype", "temperature")}
    episodes = stream("warm_start", s.seed).start
    data = (hashlib.sha256(Path(s.sft_data).read_bytes()).hexdigest() if s.sft_data
            else fingerprint(states_batches(task, s, np.random.default_rng(episodes))))
    code = code_key(*[globals()[name] for name in WARM_START_CODE], ppo.LoRALinear, ppo.add_lora, ppo.merge_lora)
    return dict(key, env=task.env_id, aux=s.aux_loss == "on" or (s.aux_loss == "auto" and full and not s.sft_data),
                base=base, data=data, episodes=episodes, code=code,
                lora=None if full else [s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_targets, s.lora_vision])


# the code that shapes a warm start (what it reads, its loss, the batch layout, the pass, LoRA), in its cache key
WARM_START_CODE = ("warm_start_into", "warm_start", "states_batches", "file_batches", "perception_heads", "sft_loss",
                   "answer_text", "encode_prompt", "pad_prompts", "pad_answers", "forward", "sampling_logits",
                   "position_ids", "first_pass_state", "load_policy", "float32_logits", "add_lora", "lora_targets")


def warm_start_into(folder: Path, path: str, s: Settings, task, key: dict, log) -> None:
    """Warm-start the model at `path` as `key` says and save it to `folder` (a pretrained one's LoRA merged)."""
    full, aux = key["lora"] is None, key["aux"]
    # the loss at the sampling temperature: sampling at it then draws the answers' mix, not a sharpened one
    policy = replace(load_policy(path, s.device, s.dtype, s.grad_checkpointing), temperature=s.temperature)
    answers = f"answers from {s.sft_data}" if s.sft_data else f"expert's actions in {s.sft_expert:.0%} of them"
    log(f"warm start: {s.sft_steps} steps on {task.env_id}, {answers}"
        + (", auxiliary perception loss" if aux else "") + ("" if full else ", LoRA adapters merged after"))
    with torch_seeded(key["episodes"]):
        if not full:
            add_lora(policy.model, s)
        stats = warm_start(policy, task, s, aux, np.random.default_rng(key["episodes"]), log)
        if not full:
            ppo.merge_lora(policy.model)
    info = json.dumps(dict(key, **stats), indent=1)
    lab.write_atomically(folder, lambda tmp: (policy.model.save_pretrained(tmp), policy.processor.save_pretrained(tmp),
                                          (tmp / "warm_start.json").write_text(info)))


def warm_start(policy: Policy, task, s: Settings, aux: bool, rng, log) -> dict:
    """Supervised answers (envs.py's or an --sft-data file's) for whatever requires grad. With `aux`, linear heads read
    the state's labels off the image features and the value head's input: a VLM from scratch needs the help."""
    batches = file_batches(s.sft_data, s.sft_batch, rng) if s.sft_data else states_batches(task, s, rng)
    first = next(batches)
    heads = perception_heads(policy, task, first) if aux else {}
    params = [p for p in policy.model.parameters() if p.requires_grad]
    params += [p for head in heads.values() for p in head.parameters()]
    opt = torch.optim.AdamW(params, lr=s.sft_lr)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.sft_steps)  # to 0 at the last step
    policy.model.train()
    t0 = time.time()
    for step, batch in zip(range(1, s.sft_steps + 1), itertools.chain([first], batches)):
        loss, stats = sft_loss(policy, heads, task, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"warm start: loss is {loss.item()} at step {step}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        decay.step()
        if step % 50 == 0 or step == s.sft_steps:
            rate = step / (time.time() - t0)
            log(f"warm start {step}/{s.sft_steps}  " + "".join(f"{k} {v:.3f}  " for k, v in stats.items())
                + f"{rate:.1f} steps/s  eta {(s.sft_steps - step) / rate:.0f}s")
    policy.model.eval()
    return dict(step=step, **stats, seconds=round(time.time() - t0, 1))


def states_batches(task, s: Settings, rng):
    """Batches of (pictures, prompts, answers, labels) of play (sft_follow), true thoughts and actions (sft_expert)."""
    pool = EnvPool(task.env_id, s.sft_batch, stream("warm_start", s.seed))
    while True:
        infos = list(pool.infos)
        experts = [task.expert(info) for info in infos]
        actions = [task.follow_or_random(e, s.sft_expert, rng) for e in experts]
        yield (list(pool.obs), [task.prompt(info, s.cot) for info in infos],
               [task.answer(info, a, s.cot) for info, a in zip(infos, actions)], [task.labels(i) for i in infos])
        for i, e in enumerate(experts):  # the next states: along the expert's path, with random detours
            pool.step(i, task.follow_or_random(e, s.sft_follow, rng))


def fingerprint(batches, n: int = 8) -> str:
    """A hash of the first n batches of warm-start data (pictures, prompts, answers, labels): what shapes a cached
    warm start besides the settings, so that a change to a task's prompts, answers or pictures trains it again."""
    digest = hashlib.sha256()
    for images, prompts, answers, labels in itertools.islice(batches, n):
        digest.update(b"".join(np.ascontiguousarray(image).tobytes() for image in images))
        digest.update(repr([prompts, answers, labels]).encode())
    return digest.hexdigest()[:16]


def file_batches(path: str, batch_size: int, rng):
    """Batches of (pictures, prompts, answers, no labels) drawn from the rows of an --sft-data file."""
    data = lab.read_sft_data(path)
    while True:
        rows = [data[k] for k in rng.integers(len(data), size=batch_size)]
        yield ([np.asarray(Image.open(r["image"]).convert("RGB")) for r in rows],
               [r["prompt"] for r in rows], [r["answer"] for r in rows], None)


def perception_heads(policy: Policy, task, batch) -> dict:
    """One linear head per feature the perception loss reads, sized by a probe of the batch's first state."""
    rows = encode_prompts(policy.processor, batch[0][:1], batch[1][:1], policy.device)
    state, probe = prompt_forward(policy.model, pad_prompts(rows, policy.pad_id))
    sizes = {"image": probe.image_hidden_states.numel(), "prompt": state.shape[-1]}
    return {k: torch.nn.Linear(n, sum(task.label_classes), device=policy.device) for k, n in sizes.items()}


def sft_loss(policy: Policy, heads: dict, task, batch):
    """The answers' mean token negative log-likelihood, plus the perception heads' cross-entropy: (loss, stats)."""
    images, prompts, answers, labels = batch
    tokenizer = policy.processor.tokenizer
    stops = tokenizer.convert_ids_to_tokens(policy.stop_ids)
    answers = [tokenizer(answer_text(policy.processor, p, a, stops), add_special_tokens=False)["input_ids"]
               for p, a in zip(prompts, answers)]
    # the same batch layout as the PPO update: left-padded prompts, right-padded answers
    prompt = pad_prompts(encode_prompts(policy.processor, images, prompts, policy.device), policy.pad_id)
    gen_ids, gen_mask = pad_answers([torch.tensor(a, device=policy.device) for a in answers], policy.pad_id)
    logprobs, state, out = forward(policy.model, prompt, gen_ids, gen_mask, policy.temperature, policy.suppress)
    loss = lm_loss = -logprobs.sum() / gen_mask.sum()
    stats = {}
    if heads:
        features = {"image": out.image_hidden_states.reshape(len(images), -1).float(),  # (B, tokens * hidden), raw
                    "prompt": state.float()}                                                    # (B, hidden)
        labels = torch.tensor(labels, device=policy.device)                           # (B, n_labels)
        for name, head in heads.items():
            logits = head(features[name]).split(list(task.label_classes), dim=1)
            loss = loss + sum(F.cross_entropy(lg, labels[:, j]) for j, lg in enumerate(logits))
            right = torch.stack([lg.argmax(1) == labels[:, j] for j, lg in enumerate(logits)])
            stats[f"{name}_acc"] = right.float().mean().item()
    return loss, dict(lm_loss=lm_loss.item(), loss=loss.item(), **stats)


def answer_text(processor, prompt: str, answer: str, stop_tokens=None) -> str:
    """The assistant turn the chat template writes after the generation prompt, through the first stop token."""
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    head = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    reply = [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    full = processor.apply_chat_template(user + reply, tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template's assistant turn does not extend its generation prompt")
    turn = full[len(head):]  # cut after the first stop token, as generation stops there
    cuts = [turn.find(t, len(answer)) + len(t) for t in stop_tokens or [processor.tokenizer.eos_token]
            if t in turn[len(answer):]]
    return turn[:min(cuts)] if cuts else turn


def lora_targets(model, vision: bool = False) -> str:
    """A regex for the language model's linear layers (and the vision tower's), from the model's own submodules."""
    parts = [model.get_decoder()] + ([model.get_encoder(modality="image")] if vision else [])
    names = {id(m): name for name, m in model.named_modules()}
    if not all(names.get(id(p)) for p in parts):
        raise ValueError("cannot find the language model or vision tower: give --lora-targets")
    return "^(" + "|".join(re.escape(names[id(p)]) + r"\." for p in parts) + ")"


def add_lora(model, s: Settings) -> list[str]:
    """LoRA adapters as the settings say (rank, alpha, dropout, targets); returns the wrapped layers' names."""
    targets = s.lora_targets or lora_targets(model, s.lora_vision)
    return ppo.add_lora(model, s.lora_rank, s.lora_alpha, s.lora_dropout, targets)


def add_trainable(policy: Policy, s: Settings) -> list[torch.nn.Parameter]:
    """LoRA adapters and a new value head: the parameters RL trains (their initialisation draws from torch)."""
    add_lora(policy.model, s)
    policy.value_head = ppo.ValueHead(policy.model.config.get_text_config().hidden_size, device=policy.device)
    return ppo.lora_parameters(policy.model) + list(policy.value_head.parameters())


# ---- Rollout and the PPO update

@torch.no_grad()
def prompt_values(policy: Policy, task, images, infos) -> torch.Tensor:
    """V(s) for a batch of states (B,) from a prompt-only forward: bootstrap values, and final states' values."""
    state, _ = prompt_forward(policy.model, state_prompts(policy, task, images, infos)[1])
    return policy.value_head(state).cpu()


@dataclass
class Rollout:
    """num_steps steps of every env: samples (step-major: t * num_envs + i), tensors (num_steps, num_envs)."""
    samples: list[Sample]
    rewards: torch.Tensor
    values: torch.Tensor       # V(s_t) while sampling
    next_values: torch.Tensor  # V(s_{t+1}); after a truncation, of the episode's final state
    terminated: torch.Tensor
    truncated: torch.Tensor
    stats: dict


def rollout(policy: Policy, task, pool: EnvPool, num_steps: int, format_penalty: float, rng) -> Rollout:
    """num_steps steps of this rank's envs; the statistics are over every rank's."""
    rewards, terminated, truncated, values, next_values = torch.zeros(5, num_steps, len(pool.envs), device="cpu")
    samples, episode_returns, finals = [], [], []
    for t in range(num_steps):
        step_samples = act(policy, task, pool.obs, pool.infos, rng)
        for i, x in enumerate(step_samples):
            reward, term, trunc, ended = pool.step(i, x.action)
            rewards[t, i] = reward - (0.0 if x.format_ok else format_penalty)
            terminated[t, i], truncated[t, i], values[t, i] = term, trunc and not term, x.value
            if ended:
                episode_returns.append(ended[2])
                if truncated[t, i]:
                    finals.append((t, i, ended[0], ended[1]))
        samples += step_samples
    # V(s_{t+1}): the next step's value; after a truncation the final state's; after the last step a bootstrap value
    next_values[:-1] = values[1:]
    next_values[-1] = prompt_values(policy, task, pool.obs, pool.infos)
    if finals:
        final_values = prompt_values(policy, task, [f[2] for f in finals], [f[3] for f in finals])
        for (t, i, _, _), value in zip(finals, final_values):
            next_values[t, i] = value
    return Rollout(samples, rewards, values, next_values, terminated, truncated,
                   rollout_stats(samples, episode_returns, task))


def group_rollout(policy: Policy, task, pool: EnvPool, budget: int, s: Settings, rng) -> tuple[list[Sample], dict]:
    """GiGPO's rollout: each group of envs plays one deal to its end, the copies in step (a copy that has ended
    waits); a group is dealt again while this rank has fewer than `budget` samples. Returns the samples (whole
    episodes) and their advantages and returns (ppo.compute_gigpo)."""
    groups = [range(g, g + pool.group_size) for g in range(0, len(pool.envs), pool.group_size)]
    samples, episode_returns, steps = [], [], []  # steps: (reward, episode, deal, state) per sample
    while True:
        for g in groups:
            if all(pool.done[i] for i in g) and len(samples) < budget:
                pool.reset(list(g))
        playing = [i for i in range(len(pool.envs)) if not pool.done[i]]
        if not playing:
            break
        for i, x in zip(playing, act(policy, task, [pool.obs[i] for i in playing], [pool.infos[i] for i in playing],
                                     rng)):
            state = (hashlib.sha1(np.ascontiguousarray(pool.obs[i])).digest(), task.prompt(pool.infos[i], policy.cot))
            deal = pool.episode[i]
            reward, _, _, ended = pool.step(i, x.action)
            steps.append((reward - (0.0 if x.format_ok else s.format_penalty), (deal, i), deal, state))
            samples.append(x)
            if ended:
                episode_returns.append(ended[2])
    advantages, returns = ppo.compute_gigpo(*zip(*steps), s.gamma, s.step_coef, s.group_norm, s.mixed_groups)
    return samples, dict(advantages=advantages, returns=returns, stats=rollout_stats(samples, episode_returns, task))


def rollout_stats(samples: list[Sample], episode_returns: list[float], task) -> dict:
    """The rollout's statistics over every rank's samples and the episodes that ended in it."""
    ranks = lab.gather((episode_returns, [replace(x, prompt={}) for x in samples]))  # [(returns, samples) per rank]
    episode_returns, every = (sum(parts, []) for parts in zip(*ranks))
    return dict(episodes=len(episode_returns), samples=len(every),
                success=float(np.mean([envs.is_success(r) for r in episode_returns])) if episode_returns else math.nan,
                mean_return=float(np.mean(episode_returns)) if episode_returns else math.nan,
                **answer_shares(every), **diagnostics(every, task.actions),
                answer=every[0].text)  # one answer of the batch, to see the thoughts change


def answer_shares(samples: list[Sample]) -> dict:
    """Shares of answers naming no legal action and, with CoT, reading the state right and thinking the true thought."""
    ok, read, thought = np.array([(x.format_ok, x.read_ok, x.thought_ok) for x in samples], dtype=float).T  # None: nan
    return dict(format_fail=1 - ok.mean(), read_right=read.mean(), thought_right=thought.mean())


def diagnostics(samples: list[Sample], action_names) -> dict:
    """The method's failure modes: mean entropy (nats) over thought and over action tokens, the share of distinct
    thoughts (thought collapse, GTR arXiv 2503.08525, drives it down) and of each action played."""
    thought = torch.cat([x.entropy[:x.n_thought] for x in samples])
    action = torch.cat([x.entropy[x.n_thought:] for x in samples])
    played = np.bincount([x.action for x in samples], minlength=len(action_names)) / len(samples)
    return dict(thought_entropy=float(thought.mean()), action_entropy=float(action.mean()),  # nan if none
                distinct_thoughts=len({x.thought for x in samples}) / len(samples),
                action_share={name: round(float(p), 4) for name, p in zip(action_names, played)})


def ppo_update(policy: Policy, optimizer, samples: list[Sample], advantages, returns, s: Settings, rng) -> dict:
    """update_epochs passes over the batch in shuffled minibatches, as CleanRL's ppo.py, with two departures: each
    step is kept inside a trust region (trust_region_step), and the loss has a KL penalty toward the warm start.
    Under torchrun the batch is global (global_batch): each rank takes the step one process would on all of it."""
    b = global_batch(samples, advantages, returns, policy.device)  # (world * n,) tensors
    update_mode(policy.model)
    if s.kl_coef:
        keep_warm_logprobs(policy, samples, s.micro_batch)
    measured, step_kls, grad_norms, undone, scale = [], [], [], 0, 1.0
    for mb in minibatches(len(b["logprobs"]), s.minibatch_size, s.update_epochs, rng):
        optimizer.zero_grad()
        # the loss, its gradients and approx_kl in one pass (a pass of its own to check the KL first costs 30% more)
        measured.append(minibatch_loss(policy, samples, b, mb, s, backward=True))
        if s.target_kl and measured[-1]["approx_kl"] > s.target_kl:
            break  # the policy left the region on these samples, by steps on others: no step, the update ends
        grad_norm = sum_gradients_and_clip(optimizer, s.max_grad_norm)
        measure_kl = lambda: minibatch_loss(policy, samples, b, mb, s, backward=False)["approx_kl"]
        kl, scale, tries = trust_region_step(optimizer, measure_kl, s.target_kl, s.backtrack, scale)
        undone += tries
        if s.target_kl and kl > s.target_kl:
            break  # no step length within the target: the update ends
        step_kls.append(kl)
        grad_norms.append(grad_norm)
    policy.model.eval()
    return dict({k: float(np.mean([m[k] for m in measured])) for k in measured[0]},
                approx_kl_max=max(m["approx_kl"] for m in measured), optimizer_steps=len(step_kls), undone_steps=undone,
                step_kl_max=max(step_kls, default=0.0), step_kls=step_kls,
                grad_norm=float(np.mean(grad_norms)) if grad_norms else 0.0,
                explained_variance=ppo.explained_variance(b["values"], b["returns"]))


def minibatch_loss(policy: Policy, samples: list[Sample], b: dict, mb, s: Settings, backward: bool) -> dict:
    """The PPO loss (plus the KL penalty) over minibatch mb of the global batch b, micro-batch by micro-batch, with
    GAE's advantages normalised over mb; gradients summed into .grad if `backward`. Statistics: over every rank."""
    mb_advantages, gae = b["advantages"][mb], s.advantage == "gae"
    if len(mb) > 1 and gae:  # gigpo's are already relative, within each group
        mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
    places, mine = local_part(mb, b["first"], len(samples))
    totals = dict.fromkeys(["policy_loss", "value_loss", "approx_kl", "clipfrac"] + ["warm_kl"] * bool(s.kl_coef), 0.)
    for j in range(0, len(places), s.micro_batch):
        micro, part = mb[places[j:j + s.micro_batch]], [samples[i] for i in mine[j:j + s.micro_batch]]
        prompt, gen_ids, gen_mask, weights = collate(part, policy.pad_id)
        with torch.set_grad_enabled(backward):
            logprobs, new_values = logprobs_and_values(policy, prompt, gen_ids, gen_mask)
            new_logprobs = (logprobs * weights).sum(1)  # log pi(a|s), (micro,)
            loss, stats = ppo.ppo_loss(new_logprobs, b["logprobs"][micro], mb_advantages[places[j:j + s.micro_batch]],
                                       new_values, b["values"][micro], b["returns"][micro], s.clip_coef,
                                       s.vf_coef if gae else 0.0, s.clip_vloss)  # gigpo: no critic
            if s.kl_coef:  # toward the warm start, per answer token: k2's gradient, k3's value (ppo.py, 5)
                warm = pad_answers([x.warm_logprobs for x in part], 0)[0].to(logprobs)
                loss = loss + s.kl_coef * ppo.kl_penalty(logprobs, warm, gen_mask).mean()
                stats["warm_kl"] = ppo.token_kl(logprobs, warm, gen_mask).mean().item()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"PPO loss is {loss.item()} (stats {stats}); the last checkpoint is untouched")
        if backward:
            (loss * len(micro) / len(mb)).backward()
        for key in totals:
            totals[key] += stats[key] * len(micro) / len(mb)
    summed = torch.tensor(list(totals.values()), dtype=torch.float64, device=policy.device)
    lab.all_sum([summed])
    return dict(zip(totals, summed.tolist()))


def trust_region_step(optimizer, measure_kl, target_kl: float, backtrack: int, scale: float):
    """One optimizer step at `scale` times the learning rate whose approx_kl, measured after it on the same samples,
    is within target_kl (0: any). A step past it is undone (the weights and AdamW's state: its step is lr times one
    direction from one state) and tried at half the length, up to `backtrack` times. Returns (approx_kl of the last
    try, the length for the rest of the update, the steps undone); after `backtrack` halvings the last try is undone
    too, and its approx_kl is past the target."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lrs = [group["lr"] for group in optimizer.param_groups]  # the schedule's, put back after
    saved_params, saved_state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    undone = 0
    for _ in range(backtrack + 1):
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr * scale
        optimizer.step()
        kl = measure_kl()
        if not target_kl or kl <= target_kl:
            break
        for p, saved in zip(params, saved_params):
            p.data.copy_(saved)
        optimizer.load_state_dict(copy.deepcopy(saved_state))  # loading adopts the tensors, steps change them
        undone, scale = undone + 1, scale / 2
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    return kl, scale, undone


def keep_warm_logprobs(policy: Policy, samples: list[Sample], micro_batch: int) -> None:
    """Each sample's token log-probs under the warm start (the KL penalty's reference): this model with its adapters
    off, one more pass and no more memory."""
    with torch.no_grad(), ppo.lora_off(policy.model):
        for j in range(0, len(samples), micro_batch):
            logprobs, _ = logprobs_and_values(policy, *collate(samples[j:j + micro_batch], policy.pad_id)[:3])
            for x, lp in zip(samples[j:j + micro_batch], logprobs.cpu()):
                x.warm_logprobs = lp[:len(x.gen_ids)]


def global_batch(samples: list[Sample], advantages, returns, device) -> dict:
    """The update's batch over every rank: old log-probs, values, advantages and returns, rank 0's samples first,
    then rank 1's... ("first": where this rank's start; local_part finds them)."""
    local = torch.cat([torch.tensor([[x.logprob for x in samples], [x.value for x in samples]], device="cpu"),
                       torch.stack([advantages.flatten(), returns.flatten()])])  # (4, n)
    parts = lab.gather(local)  # with gigpo the ranks' n differ
    b = dict(zip(["logprobs", "values", "advantages", "returns"], torch.cat(parts, 1).to(device)))
    return dict(b, first=sum(x.shape[1] for x in parts[:lab.rank_and_world()[0]]))


def minibatches(size: int, minibatch_size: int, epochs: int, rng) -> list:
    """`epochs` shuffled passes over the global batch's indices, cut into minibatches: rank 0's order on every rank."""
    orders = lab.gather([rng.permutation(size) for _ in range(epochs)])[0]
    return [order[i:i + minibatch_size] for order in orders for i in range(0, size, minibatch_size)]


def local_part(mb, first: int, n: int):
    """The places in minibatch mb (global indices) of this rank's n samples, global first .. first + n - 1, and
    their indices in its own n."""
    places = np.flatnonzero((mb >= first) & (mb < first + n))
    return places, mb[places] - first


def sum_gradients_and_clip(optimizer, max_grad_norm: float) -> float:
    """Sum the gradients over the ranks (a rank with no sample in the minibatch adds zeros) and clip them; returns
    their norm before clipping."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if lab.rank_and_world()[1] > 1:
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
        lab.all_sum([p.grad for p in params])
    return float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))


def update_mode(model) -> None:
    """Eval mode as in sampling (no dropout), but train mode on layers that checkpoint (transformers does only then)."""
    model.eval()
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            m.training = True


# ---- Evaluation, and pages of episodes that show what the agent reads and thinks
SHOWN = 4  # episodes on a page: the evaluation's first deals, whatever their outcome


@torch.no_grad()
def evaluate(policy: Policy, task, s: Settings, log, label: str, page: Path | None = None) -> dict:
    """eval_episodes held-out deals sampled as in training, on forked generators (rank r of N plays r, r + N, ...)."""
    rank, world = lab.rank_and_world()
    deals = stream("eval", s.seed)
    seeds, n = deals[rank::world], len(range(rank, s.eval_episodes, world))
    pool = EnvPool(task.env_id, min(s.eval_envs, n), seeds)
    active, shown = [True] * len(pool.envs), {}  # episode -> its steps
    returns, answers, t0 = [], [], time.time()
    last_log, rng = t0, np.random.default_rng(seeds.start)
    with torch_seeded(seeds.start):
        while any(active):
            idx = [i for i in range(len(active)) if active[i]]
            samples = act(policy, task, [pool.obs[i] for i in idx], [pool.infos[i] for i in idx], rng)
            for i, x in zip(idx, samples):
                answers.append(replace(x, prompt={}))  # the prompt stays here, the rest goes to rank 0
                episode, picture = pool.episode[i], pool.obs[i]
                reward, _, _, ended = pool.step(i, x.action)
                if page and rank == 0 and episode < SHOWN:
                    shown.setdefault(episode, []).append((picture, x, reward))
                if ended:
                    returns.append(ended[2])
                    active[i] = pool.started <= n
            if time.time() - last_log > 10 or not any(active):
                last_log = time.time()
                log(f"evaluating {label}: {len(returns)}/{n} episodes, {time.time() - t0:.0f}s")
    if shown:
        lab.write_episodes(page, task, label, {seeds[k]: steps for k, steps in sorted(shown.items())}, policy.processor)
    returns, answers = (sum(parts, []) for parts in zip(*lab.gather((returns, answers))))
    n = s.eval_episodes
    wins = sum(envs.is_success(r) for r in returns)
    low, high = lab.wilson(wins, n)
    result = dict(episodes=n, success=wins / n, ci_low=low, ci_high=high, mean_return=float(np.mean(returns)),
                  **answer_shares(answers), seconds=round(time.time() - t0, 1))
    result["expert_match"] = expert_match(policy, task, deals, min(200, n), s.eval_envs)
    log(f"{label}: success {result['success']:.3f}, answers read right {result['read_right']:.3f}, thoughts true "
        f"{result['thought_right']:.3f}, greedy action = expert's on {result['expert_match']:.3f} of on-path states")
    if task.solvable:  # the share of the evaluated deals that can be won at all
        env = gym.make(task.env_id)
        result["solvable"] = float(np.mean([task.solvable(env.reset(seed=deals[k])[1]) for k in range(n)]))
    return result




@torch.no_grad()
def expert_match(policy: Policy, task, seeds: range, n: int, batch_size: int) -> float:
    """The share of n held-out states on the expert's path where the greedy answer takes the expert's action."""
    env, states, seed = gym.make(task.env_id, disable_env_checker=True), [], seeds.start
    while len(states) < n:
        (obs, info), done = env.reset(seed=seed), False
        seed += 1
        while not done and len(states) < n and (expert := task.expert(info)) is not None:
            states.append((obs, info, expert))
            obs, _, terminated, truncated, info = env.step(expert)
            done = terminated or truncated
    matches = []
    for k in range(0, n, batch_size):
        chunk = states[k:k + batch_size]
        prompt = state_prompts(policy, task, [x[0] for x in chunk], [x[1] for x in chunk])[1]
        out = policy.model.generate(**prompt, do_sample=False, max_new_tokens=policy.max_new_tokens,
                                    suppress_tokens=policy.suppress or None)
        texts = policy.processor.tokenizer.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        matches += [parse.parse_action(text, task.actions)[0] == x[2] for text, x in zip(texts, chunk)]
    return float(np.mean(matches))






# ---- The run: warm start, evaluate, RL updates, evaluate
LOGGED = ("success episodes mean_return format_fail read_right thought_right step_kl_max clipfrac optimizer_steps "
          "undone_steps explained_variance thought_entropy action_entropy distinct_thoughts").split()


def run(s: Settings, task, run_dir: Path) -> dict:
    """Under torchrun every rank runs this with its own envs (own stream of episodes); only rank 0 logs and writes."""
    rank, world = lab.rank_and_world()
    is_main = rank == 0
    log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    resuming = (run_dir / "latest").exists() or any(run_dir.glob("checkpoint-*"))
    if is_main and not resuming:
        lab.write_text(run_dir / "settings.json", json.dumps(asdict(s), indent=1))
    if s.threads:
        torch.set_num_threads(s.threads)

    # ---- seeding: the one place the run's streams start. torch's generator draws the LoRA and value-head init and
    # the tokens, `rng` fallback actions and minibatch order; EnvPool seeds episodes; cached models, evaluation fork.
    seeds = stream("train", s.seed, rank)
    torch.manual_seed(seeds.start)
    rng = np.random.default_rng(seeds.start)

    if rank > 0:
        dist.barrier()  # rank 0 builds and warm-starts the cached models alone; the others then load them
    policy = warm_started_policy(s, task, log)
    if is_main and world > 1:
        dist.barrier()
    params = add_trainable(policy, s)
    for p in params if world > 1 else []:  # every rank starts from rank 0's initialisation
        dist.broadcast(p.data, src=0)
    batch_size = s.num_envs * s.num_steps
    num_updates = max(1, s.total_steps // batch_size)
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_updates, eta_min=s.lr_min)
    log(f"LoRA on {len(ppo.lora_modules(policy.model))} linear layers, {sum(p.numel() for p in params):,} "
        f"trainable parameters; {num_updates} updates of {batch_size} env steps on {s.device}")
    track = lab.tracker(s, run_dir) if is_main else None
    pool = EnvPool(task.env_id, s.num_envs // world, seeds, s.group_size if s.advantage == "gigpo" else 1)

    results_path, metrics_path = run_dir / "results.json", run_dir / "metrics.jsonl"
    done, results, lines = lab.restore_checkpoint(run_dir, policy, scheduler, pool, rng) if resuming else (0, {}, [])
    if resuming:  # metrics.jsonl is written whole after each update: its lines past the checkpoint go then
        log(f"resuming {run_dir} after update {done}")
    env_steps = json.loads(lines[-1])["env_steps"] if lines else 0  # played: gigpo plays its deals to their end
    if "warm_start" not in results:
        page = s.episodes and run_dir / "episodes-warm_start.md"
        results["warm_start"] = evaluate(policy, task, s, log, "warm start", page)
        if is_main:
            lab.write_text(results_path, json.dumps(results, indent=1))

    for update in range(done + 1, num_updates + 1):
        t0 = time.time()
        if s.advantage == "gae":
            batch = rollout(policy, task, pool, s.num_steps, s.format_penalty, rng)
            samples, stats = batch.samples, batch.stats
            advantages, returns = ppo.compute_gae(batch.rewards, batch.values, batch.next_values, batch.terminated,
                                                  batch.truncated, s.gamma, s.gae_lambda)
        else:  # whole episodes, this rank's share of the batch at least
            samples, out = group_rollout(policy, task, pool, s.num_envs // world * s.num_steps, s, rng)
            advantages, returns, stats = out["advantages"], out["returns"], out["stats"]
        rollout_seconds = time.time() - t0
        stats.update(ppo_update(policy, optimizer, samples, advantages, returns, s, rng))
        lr = scheduler.get_last_lr()[0]  # this update's
        scheduler.step()
        seconds, env_steps = time.time() - t0, env_steps + stats["samples"]
        metrics = dict(update=update, env_steps=env_steps, **stats, lr=lr,
                       rollout_seconds=round(rollout_seconds, 2), steps_per_second=round(stats["samples"] / seconds, 1))
        top = max(stats["action_share"].items(), key=lambda kv: kv[1])
        log(f"update {update}/{num_updates}  steps {env_steps}  "
            + "  ".join(f"{k} {stats[k]:.3g}" for k in LOGGED)
            + f"  top action {top[0]!r} {top[1]:.2f}  {stats['samples'] / seconds:.0f} steps/s")
        if is_main:
            lines.append(json.dumps(metrics))
            lab.write_text(metrics_path, "".join(line + "\n" for line in lines))
            track(metrics)
        if update % s.checkpoint_every == 0 or update == num_updates:
            lab.save_checkpoint(run_dir, update, policy, scheduler, pool, rng, s.keep_checkpoints)

    results["rl"] = evaluate(policy, task, s, log, "after RL", s.episodes and run_dir / "episodes-rl.md")
    if policy.device.type == "cuda":
        log(f"peak GPU memory: {torch.cuda.max_memory_allocated(policy.device) / 2**30:.2f} GiB")
    if is_main:
        lab.write_text(results_path, json.dumps(results, indent=1))
        log(lab.report_run(run_dir, task, results, task.paper.get("rl" if s.cot else "no_cot", "")))
    return results


def main(argv=None) -> dict:
    s = parse_settings(argv)  # with --resume: the run's own settings
    run_dir = Path(s.resume) if s.resume else None
    s = lab.init_distributed(s)
    tasks = tasks_of(s.env)
    started = lab.gather(int(time.time()))[0]  # rank 0's clock names the run on every rank
    if not run_dir:
        name = [SUITE if s.env == SUITE else "-".join(t.name for t in tasks)] + [s.ablations] * bool(s.ablations)
        name += ["seeds" + "-".join(map(str, s.seeds)) if s.seeds else f"seed{s.seed}", str(started)]
        run_dir = Path(s.out_dir) / (s.run_name or "-".join(name))
        if (run_dir / "settings.json").exists():
            lab.fail(f"{run_dir} holds a run; continue it with --resume {run_dir} or pick another --run-name")
    lab.gather(None)  # every rank has looked before rank 0 writes
    try:
        if len(tasks) == 1 and not s.seeds and not s.ablations:
            return run(tasks[0].with_defaults(s), tasks[0], run_dir)
        if lab.rank_and_world()[0] == 0:  # several runs: run_dir/seed<n>/<task>, tables over them
            lab.write_text(run_dir / "settings.json", json.dumps(asdict(s), indent=1))
        return lab.run_many(s, tasks, run_dir, run)
    except lab.WriteFailed as e:  # no space, a quota, a read-only folder: one line, and how to go on
        lab.fail(lab.stopped_writing(e, run_dir))
    except KeyboardInterrupt:
        if lab.rank_and_world()[0] == 0:
            print(f"\ninterrupted; continue with: python rl4vlm.py --resume {run_dir}", flush=True)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
