"""RL4VLM: fine-tune a vision-language model as a decision-making agent with PPO.

Zhai et al., "Fine-Tuning Large Vision-Language Models as Decision-Making Agents via
Reinforcement Learning", NeurIPS 2024, arXiv 2405.10292.

Each env step the VLM sees the task's picture and a prompt, writes a JSON chain of thought
that ends in "action", parse.py maps the text to a legal action and the env returns a reward.
PPO with a value head on the last prompt token's hidden state and GAE over env steps
fine-tunes the VLM through LoRA, with
    log pi(a|s) = thought_coef * sum log p(thought tokens) + sum log p(action tokens).
The paper first warm-starts the model with supervised answers (SFT), then runs RL.

Its sections follow the run; envs.py holds the tasks, parse.py text -> action, ppo.py the maths.

Where this departs from the paper or from textbook PPO (the README says more):
1. The default policy is a tiny LLaVA built here from random weights; its warm start adds an
   auxiliary perception loss (--aux-loss) and is imperfect on purpose (--sft-expert: a per-task
   share of its answers takes the expert's action, the rest a random one), so RL has a job.
2. The tiny model has its own hyper-parameters (learning rate, LoRA rank, a KL guard).
3. A text that names no legal action counts all its tokens as thought tokens: the random
   action played instead is not the model's choice.
4. Old log-probs and values come from the sampling pass itself, not from a second forward;
   special tokens suppressed while sampling are masked in the loss too: one distribution.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import pickle
import re
import shutil
import sys
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from datetime import timedelta
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from safetensors.torch import load_file

import envs
import parse
import ppo

BUILTIN = "builtin"


# ----------------------------------------------------------------------------------------
# Settings: one dataclass, turned into argparse flags. None means "the task's default"
# (envs.Task.defaults), so per-task settings live in the task table, not in branches.

def _opt(default, help, type=None, check=None):
    return field(default=default, metadata={"help": help, "type": type, "check": check})


CHECKS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}


@dataclass
class Settings:
    env: str = _opt("gym_cards/NumberLine-v0", "task id or short name (numberline, ezpoints, points24, blackjack), several joined by commas, or gym-cards for all four")
    model: str = _opt(BUILTIN, "'builtin' (a tiny LLaVA built on first use) or a Hugging Face VLM id or folder")
    seed: int = _opt(1, "seed of everything: model init, envs, sampling, minibatches")
    seeds: list = _opt((), "run once per seed (e.g. --seeds 1 2 3) in OUT_DIR/RUN_NAME/seed<n>; the tables show each seed, the mean and the min-max", int)
    out_dir: str = _opt("runs", "runs are written to OUT_DIR/RUN_NAME")
    run_name: str = _opt("", "default: <task>-seed<seed>-<unix time>")
    resume: str = _opt("", "continue the run in this folder from its last checkpoint (its settings are used)")
    cache_dir: str = _opt(".cache", "the built-in model and warm-started models are cached here")
    device: str = _opt("cpu", "torch device")
    dtype: str = _opt("float32", "model weights: float32, bfloat16 or float16 (LoRA, value head, PPO maths: float32)")
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward pass: less memory, slower")
    threads: int = _opt(1, "torch CPU threads: 1 gives the same numbers on any number of cores, 0 takes torch's default (all cores)", check=">= 0")
    dist_timeout: float = _opt(30.0, "under torchrun: minutes a rank waits for the others before the job fails", check="> 0")
    # the method
    cot: bool = _opt(True, "chain of thought in prompts and warm-start answers (--no-cot: action only)")
    thought_coef: float = _opt(0.5, "lambda: weight of the thought tokens' log-prob in log pi(a|s)", check=">= 0")
    temperature: float = _opt(0.2, "sampling temperature, also applied in the loss (as in the paper)", check="> 0")
    max_new_tokens: int = _opt(None, "longest answer sampled (default: the task's)", int, check="> 0")
    format_penalty: float = _opt(0.0, "subtracted from the reward when the text names no legal action", check=">= 0")
    target_kl: float = _opt(0.05, "stop an update's epochs at the first minibatch whose approx_kl exceeds this, before its step (0: never)", check=">= 0")
    # rollouts
    num_envs: int = _opt(32, "environments stepped in parallel, one prompt each; under torchrun the global count, split across the ranks", check="> 0")
    num_steps: int = _opt(None, "steps per env per update (default: the task's)", int, check="> 0")
    total_steps: int = _opt(None, "env steps of RL in all (default: the task's)", int, check="> 0")
    # PPO
    gamma: float = _opt(0.9, "discount", check="in [0, 1]")
    gae_lambda: float = _opt(0.95, "GAE lambda", check="in [0, 1]")
    clip_coef: float = _opt(0.1, "PPO clip range, also for the value loss", check="> 0")
    update_epochs: int = _opt(4, "PPO epochs per update", check="> 0")
    minibatch_size: int = _opt(128, "samples per optimizer step (global under torchrun)", check="> 0")
    micro_batch: int = _opt(32, "samples per forward pass on each rank (gradients are accumulated)", check="> 0")
    vf_coef: float = _opt(0.5, "value-loss coefficient", check=">= 0")
    max_grad_norm: float = _opt(1.0, "gradient clipping (paper: 0.01 for the 7B model)", check="> 0")
    lr: float = _opt(1e-3, "learning rate of LoRA and value head, cosine-annealed (paper: 1e-5)", check="> 0")
    lr_min: float = _opt(1e-9, "final learning rate of the cosine schedule", check=">= 0")
    lora_rank: int = _opt(8, "LoRA rank (paper: 128)", check="> 0")
    lora_alpha: float = _opt(16.0, "LoRA alpha; scaling = alpha / rank (paper: 256)", check="> 0")
    lora_dropout: float = _opt(0.0, "LoRA dropout (paper: 0.05)", check="in [0, 1]")
    lora_targets: str = _opt("", "regex of the linear layers LoRA wraps (default: the language model's)")
    lora_vision: bool = _opt(False, "LoRA on the vision tower's linear layers too (unless --lora-targets is given)")
    # warm start (the paper's SFT step)
    sft_steps: int = _opt(None, "warm-start steps (default: the task's; 0 skips it)", int, check=">= 0")
    sft_batch: int = _opt(32, "warm-start batch size", check="> 0")
    sft_lr: float = _opt(1e-3, "warm-start learning rate", check="> 0")
    sft_expert: float = _opt(None, "share of warm-start answers whose action is the expert's, the rest random: how imperfect the warm start is (default: the task's)", float, check="in [0, 1]")
    sft_follow: float = _opt(0.75, "share of moves that follow the expert while the warm start gathers its states, the rest random", check="in [0, 1]")
    sft_data: str = _opt("", 'warm start on a JSONL file of {"image": path, "prompt": ..., "answer": ...} lines')
    aux_loss: str = _opt("auto", "auxiliary perception loss in the warm start: auto (built-in model, no --sft-data), on, off")
    ablations: str = _opt("", "instead of plain runs: cot (each task with and without chain of thought) or lambda (thought_coef 0, 0.2, 0.5, 1)")
    # evaluation and checkpoints
    eval_episodes: int = _opt(500, "held-out episodes per evaluation", check="> 0")
    eval_envs: int = _opt(256, "environments each rank steps in parallel while evaluating (no gradients: larger batches pay)", check="> 0")
    checkpoint_every: int = _opt(5, "updates between checkpoints (and one after the last)", check="> 0")
    episodes: bool = _opt(True, "after each evaluation write episodes-<stage>.md: the first held-out episodes, step by step")
    keep_checkpoints: int = _opt(2, "the newest checkpoints kept: an older one stays until a newer one is complete", check="> 0")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        sys.exit(f"rl4vlm.py: error: {message}")


def parse_settings(argv=None) -> Settings:
    parser = _Parser(description="RL4VLM: PPO fine-tuning of a vision-language model on gym-cards.")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, type=f.metadata["type"], nargs="+", default=list(f.default), help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.metadata["type"] or type(f.default), default=f.default, help=f.metadata["help"])
    s = Settings(**vars(parser.parse_args(argv)))
    try:
        check_settings(s)
    except ValueError as e:
        parser.error(str(e))
    return s


def check_settings(s: Settings) -> None:
    """Reject bad values (nan and inf too) before any work. Raises ValueError with a one-line reason."""
    tasks_of(s.env)  # ValueError lists the tasks
    flag = lambda name: "--" + name.replace("_", "-")
    for f in fields(Settings):
        value, rule = getattr(s, f.name), f.metadata["check"]
        if rule and value is not None and not (math.isfinite(value) and CHECKS[rule](value)):
            raise ValueError(f"{flag(f.name)} must be {rule}, got {value}")
    for seed in [s.seed, *s.seeds]:
        if not 0 <= seed < MAX_SEED:
            raise ValueError(f"--seed must be in 0..{MAX_SEED - 1}, got {seed}")
    choices = dict(ablations=("", "cot", "lambda"), aux_loss=("auto", "on", "off"), dtype=("float32", "bfloat16", "float16"))
    for name, allowed in choices.items():
        if getattr(s, name) not in allowed:
            named = [c for c in allowed if c]
            raise ValueError(f"{flag(name)} must be {', '.join(named[:-1])} or {named[-1]}, got {getattr(s, name)!r}")
    if len(set(s.seeds)) != len(s.seeds):
        raise ValueError(f"--seeds must differ, got {s.seeds}")
    if s.sft_data:
        read_sft_data(s.sft_data)
        if s.aux_loss == "on":
            raise ValueError("--aux-loss on needs the env's labels, which --sft-data does not have")
    if s.resume and not (Path(s.resume) / "settings.json").is_file():
        raise ValueError(f"--resume {s.resume}: no settings.json there, not a run folder")
    if s.model != BUILTIN and Path(s.model).exists() and not (Path(s.model) / "config.json").is_file():
        raise ValueError(f"--model {s.model}: folder has no config.json, not a Hugging Face model")


def read_sft_data(path: str) -> list[dict]:
    """--sft-data: one {"image": path, "prompt": str, "answer": str} a line; image paths are
    relative to the file's folder. Raises ValueError naming the first bad line."""
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


def with_task_defaults(s: Settings, task) -> Settings:
    """Fill the settings left at None from the task's table entry."""
    return replace(s, **{k: v for k, v in task.defaults.items() if getattr(s, k) is None})


# ----------------------------------------------------------------------------------------
# Model. The built-in tiny VLM is saved once and then loaded exactly as a hub checkpoint is.
# The built-in tokenizer and the warm-start data follow from envs.py's texts, so the cached
# models are keyed by a digest of it.
TEXTS = hashlib.sha256(Path(envs.__file__).read_bytes()).hexdigest()[:8]

def task_corpus(seed: int, episodes: int = 100) -> list[str]:
    """Prompts and answers of every task, with and without chain of thought, from play that
    follows the expert half of the time (so that winning formulas are in it too)."""
    rng = np.random.default_rng(seed)
    texts = []
    for task in envs.TASKS.values():
        env = gym.make(task.env_id)
        for episode in range(episodes):
            _, info = env.reset(seed=seed + episode)
            done = False
            while not done:
                action = task.follow_or_random(task.expert(info), 0.5, rng)
                for cot in (True, False):
                    texts += [task.prompt(info, cot), task.answer(info, action, cot)]
                _, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
    return texts


def build_builtin(folder: Path, seed: int) -> None:
    """A tiny LLaVA (CLIP vision tower + Llama text model) with a byte-level BPE tokenizer
    trained on the tasks' own text, written to `folder` with save_pretrained."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)
    specials = ["<|pad|>", "<|end|>", "<image>", "<|user|>", "<|assistant|>"]
    # Numbers and action strings are kept apart; the text between them may merge into long
    # tokens (the prompts repeat), which keeps sequences short on a CPU.
    words = sorted({a for task in envs.TASKS.values() for a in task.actions if not a.isdigit()}, key=len, reverse=True)
    apart = Regex("|".join([r"\d+"] + [re.escape(w) for w in words]))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(apart, "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(task_corpus(seed), trainers.BpeTrainer(
        vocab_size=2048, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # user turn: <|user|><image>prompt; assistant turn: <|assistant|>answer<|end|>
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' }}"
                "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}{{ '<image>' }}{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}{{ '<|end|>' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|end|>", padding_side="left",
        extra_special_tokens={"image_token": "<image>", "user_token": "<|user|>", "assistant_token": "<|assistant|>"})
    # 64 px pictures in 16 px patches: 16 image tokens; measured to read NumberLine in minutes
    image_px, patch = 64, 16
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_px, patch_size=patch)
    text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", image_seq_length=(image_px // patch) ** 2,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_px}, crop_size={"height": image_px, "width": image_px})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=template)
    write_atomically(folder, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp)))


def write_atomically(path: Path, write) -> None:
    """write(tmp), a file or a folder beside `path`; flush it to disk, rename it to `path`, flush
    the folder: after a crash `path` is the old one or the new one, never half of either."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a folder left by a crash
    tmp.unlink(missing_ok=True)  # or a file
    write(tmp)
    for name in [*tmp.rglob("*"), tmp]:
        flush(name)
    if path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    flush(path.parent)


def flush(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: a rename in it)."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


@dataclass
class Policy:
    """What travels together through generation, log-probs and training: the model, its
    processor and value head, and what follows from them once."""
    model: torch.nn.Module
    processor: object
    value_head: ppo.ValueHead | None = None  # added for RL
    stop_ids: list[int] = field(init=False)  # end-of-turn tokens: an answer ends at the first
    suppress: list[int] = field(init=False)  # special tokens never sampled (an image token would break the next forward)
    pad_id: int = field(init=False)

    def __post_init__(self):
        self.stop_ids = [int(i) for i in np.atleast_1d(self.model.generation_config.eos_token_id)]
        self.suppress = sorted(set(self.processor.tokenizer.all_special_ids) - set(self.stop_ids))
        self.pad_id = self.processor.tokenizer.pad_token_id


def load_policy(path: str, device: str, dtype: str = "float32") -> Policy:
    """Model and processor through the Auto classes, with a clear error for anything that is
    not an image-text-to-text model with a chat template."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    advice = "check the name, or if it is a cached model, delete the folder to build it again"
    with damaged(Path(path), advice):
        config = AutoConfig.from_pretrained(path)
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise SystemExit(f"rl4vlm.py: error: {path!r} is a {config.model_type!r} model, not an image-text-to-text VLM")
    with damaged(Path(path), advice):
        processor = AutoProcessor.from_pretrained(path)
    if not getattr(processor, "chat_template", None):
        raise SystemExit(f"rl4vlm.py: error: {path!r} has no chat template")
    with damaged(Path(path), advice):
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    if processor.tokenizer.pad_token is None:  # e.g. Mistral's; padding is always masked, so EOS can stand in
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    # Sampling must draw from exactly the distribution the loss uses: drop the checkpoint's
    # generation defaults (top_k, top_p, repetition penalty...), keep only its stop tokens.
    eos = model.generation_config.eos_token_id or processor.tokenizer.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
    return Policy(model, processor)


# ----------------------------------------------------------------------------------------
# Prompts, generation and log-probs.

def encode_prompt(processor, image, prompt: str, device) -> dict:
    """A chat-formatted prompt with the processor's image inputs, batch dimension 1, so that
    every model's image inputs stay per sample whatever their layout."""
    bos = processor.tokenizer.bos_token
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True, tokenize=False)
    # a template that writes BOS itself gets no second one from the tokenizer (as in transformers)
    enc = processor(images=[Image.fromarray(image)], text=[chat], return_tensors="pt",
                    add_special_tokens=not (bos and chat.startswith(bos)))
    return {k: v.to(device) for k, v in enc.items()}


class TensorCache:
    """Rows of tensors by key, least recently used out first beyond max_bytes."""

    def __init__(self, max_bytes: int):
        self.rows, self.bytes, self.max_bytes = OrderedDict(), 0, max_bytes

    def get(self, key, make):
        if key in self.rows:
            self.rows.move_to_end(key)
            return self.rows[key]
        row = self.rows[key] = make()
        self.bytes += self.size(row)
        while self.bytes > self.max_bytes and len(self.rows) > 1:
            self.bytes -= self.size(self.rows.popitem(last=False)[1])
        return row

    @staticmethod
    def size(row: dict) -> int:
        return sum(v.nelement() * v.element_size() for v in row.values())


# The processor's work (resizing the picture, the chat template, tokenizing) is done once per
# distinct (picture, prompt) pair: states repeat (NumberLine has 36), and so do their pictures.
_prompt_caches = weakref.WeakKeyDictionary()  # processor -> TensorCache of 256 MB


def encode_prompts(processor, images, prompts: list[str], device) -> list[dict]:
    """encode_prompt for each (picture, prompt) pair, from the cache when the pair came before.
    The rows are shared, so nothing may change them in place."""
    cache = _prompt_caches.setdefault(processor, TensorCache(256 * 2**20))
    return [cache.get((hashlib.sha1(np.ascontiguousarray(image)).digest(), image.shape, prompt, str(device)),
                      lambda: encode_prompt(processor, image, prompt, device))
            for image, prompt in zip(images, prompts)]


def pad_prompts(rows: list[dict], pad_id: int) -> dict:
    """Per-sample prompts -> one batch. Tensors shaped like input_ids (1, P) are per token: padded
    on the left (input_ids with pad_id, the rest with 0). The others (pixels, image sizes or grids)
    are concatenated, their dim 1 (crops or patches) zero-padded at the end, as processors do."""
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


def sampling_logprobs(logits, temperature: float, suppress: list[int]):
    """The one sampling distribution: log-softmax of logits / temperature with the suppressed
    tokens at -inf. (..., V) -> (..., V) float32."""
    logits = logits.float() / temperature
    if suppress:
        logits[..., suppress] = -math.inf
    return torch.log_softmax(logits, -1)


def state_prompts(policy: Policy, task, images, infos, s: Settings) -> tuple[list[dict], dict]:
    """The task's prompts for a batch of states: the per-sample rows (cached) and the padded batch."""
    rows = encode_prompts(policy.processor, images, [task.prompt(info, s.cot) for info in infos], s.device)
    return rows, pad_prompts(rows, policy.pad_id)


def pad_answers(answers: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Answers of different lengths (G_i,) -> gen_ids (B, G) right-padded with pad_id, gen_mask (B, G)."""
    G = max(len(a) for a in answers)
    return (torch.stack([F.pad(a, (0, G - len(a)), value=pad_id) for a in answers]),
            torch.stack([torch.arange(G) < len(a) for a in answers]))


def position_ids(model, ids, mask, extra: dict):
    """The position ids generate() gives a left-padded batch (from each row's first real token; 3-D
    for Qwen2-VL). No public route exists, so this is the one private transformers call; a hand
    check (test_position_ids_count_from_the_first_real_token) and the per-family log-prob tests guard it."""
    return model._prepare_position_ids_for_generation(ids, dict(input_ids=ids, attention_mask=mask, **extra))


def forward(model, prompt: dict, gen_ids, gen_mask, temperature: float = 1.0, suppress=()):
    """One pass over prompt + generated tokens.
    prompt: left-padded processor output (input_ids (B, P), ...); gen_ids, gen_mask (B, G).
    Returns log p of each generated token (B, G) under the sampling distribution (0 at padding)
    and the model output; out.hidden_states[-1][:, P - 1] is the last prompt token's state."""
    (B, P), G = prompt["input_ids"].shape, gen_ids.shape[1]
    ids = torch.cat([prompt["input_ids"], gen_ids], 1)                       # (B, P+G)
    mask = torch.cat([prompt["attention_mask"], gen_mask.long()], 1)
    # other per-token inputs (Gemma3's token_type_ids, Qwen2-VL's mm_token_type_ids) go on with
    # 0 (text) over the answer
    extra = {k: torch.cat([v, v.new_zeros(B, G)], 1) if v.shape == (B, P) else v
             for k, v in prompt.items() if k not in ("input_ids", "attention_mask")}
    # logits only at the G + 1 last positions: P - 1 .. P + G - 2 predict the answer's tokens, and
    # the LM head over the prompt would be wasted work (half the compute of a small model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(model, ids, mask, extra),
                output_hidden_states=True, use_cache=False, logits_to_keep=G + 1, **extra)
    logp = sampling_logprobs(out.logits[:, :-1], temperature, suppress)                 # (B, G, V)
    logprobs = logp.gather(-1, gen_ids.unsqueeze(-1)).squeeze(-1).where(gen_mask, 0.0)  # (B, G)
    return logprobs, out


def logprobs_and_values(policy: Policy, prompt: dict, gen_ids, gen_mask, temperature: float):
    """log p of each answer token under the sampling distribution (B, G) and V(s) from the last
    prompt token's hidden state (B,), in one forward."""
    logprobs, out = forward(policy.model, prompt, gen_ids, gen_mask, temperature, policy.suppress)
    return logprobs, policy.value_head(out.hidden_states[-1][:, prompt["input_ids"].shape[1] - 1])


def action_start(tokenizer, gen_ids: list[int], span) -> int:
    """Index of the first action token, the one holding the action value's first character (span:
    parse.py's (start, end) in the decoded text; None: every token is thought). Found from the
    lengths of decoded prefixes, never from token ids, by bisection: prefixes only grow."""
    if span is None:
        return len(gen_ids)
    lo, hi = 0, len(gen_ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(gen_ids[:mid + 1], skip_special_tokens=True)) > span[0]:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class Sample:
    """One sampled answer to one state: what the PPO update and the diagnostics need."""
    prompt: dict           # the processor's output for the state, batch dim 1 (shared with the prompt cache: read only)
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


@torch.no_grad()
def act(policy: Policy, task, images, infos, s: Settings, rng) -> list[Sample]:
    """Sample one answer per state and turn it into an action."""
    rows, prompt = state_prompts(policy, task, images, infos, s)
    out = policy.model.generate(**prompt, do_sample=True, temperature=s.temperature, top_k=0, top_p=1.0,
                                max_new_tokens=s.max_new_tokens, suppress_tokens=policy.suppress or None,
                                output_logits=True, output_hidden_states=True, return_dict_in_generate=True)
    P = prompt["input_ids"].shape[1]
    gen_ids = out.sequences[:, P:]                                           # (B, G)
    # tokens up to and including the first end-of-turn token are the answer; the rest is padding
    is_end = torch.isin(gen_ids, torch.tensor(policy.stop_ids, device=gen_ids.device))
    gen_mask = (is_end.long().cumsum(1) - is_end.long()) == 0
    # one generation step at a time: stacking the logits first would hold (B, G, V) floats twice or more
    logprobs, entropy = (gen_ids.new_zeros(gen_ids.shape, dtype=torch.float32) for _ in range(2))  # (B, G)
    for k, logits in enumerate(out.logits):
        logp = sampling_logprobs(logits, s.temperature, policy.suppress)    # (B, V)
        logprobs[:, k] = logp.gather(1, gen_ids[:, k:k + 1]).squeeze(1)
        entropy[:, k] = torch.special.entr(logp.exp()).sum(1)               # -sum p log p, 0 log 0 = 0
    values = policy.value_head(out.hidden_states[0][-1][:, -1])              # prompt pass, last layer, last token
    samples = []
    for i in range(len(infos)):
        ids = gen_ids[i][gen_mask[i]].tolist()
        text = policy.processor.tokenizer.decode(ids, skip_special_tokens=True)
        action, span = parse.parse_action(text, task.actions)
        format_ok = action is not None
        if not format_ok:  # the paper plays a random legal action; counted as a format failure
            action, span = task.random_action(rng), None  # not the model's choice: every token is thought
        first = action_start(policy.processor.tokenizer, ids, span)
        weights = torch.tensor([s.thought_coef] * first + [1.0] * (len(ids) - first))
        samples.append(Sample(prompt=rows[i], gen_ids=torch.tensor(ids, dtype=torch.long), weights=weights,
                              logprob=float((logprobs[i, :len(ids)] * weights).sum()), value=float(values[i]),
                              entropy=entropy[i, :len(ids)], text=text, n_thought=first, thought=text[:span[0]] if span else text,
                              action=action, format_ok=format_ok))
    return samples


def diagnostics(samples: list[Sample], action_names) -> dict:
    """The method's known failure modes, per batch: the mean entropy (nats) of the sampling
    distribution over thought tokens and over action tokens, the share of distinct thoughts
    (the text before the action value; thought collapse, GTR arXiv 2503.08525, drives it
    down) and the share of each action played (a policy collapsing onto one action)."""
    thought = torch.cat([x.entropy[:x.n_thought] for x in samples])
    action = torch.cat([x.entropy[x.n_thought:] for x in samples])
    played = np.bincount([x.action for x in samples], minlength=len(action_names)) / len(samples)
    return dict(thought_entropy=float(thought.mean()) if len(thought) else math.nan,
                action_entropy=float(action.mean()) if len(action) else math.nan,
                distinct_thoughts=len({x.thought for x in samples}) / len(samples),
                action_share={name: round(float(p), 4) for name, p in zip(action_names, played)})


def collate(samples: list[Sample], pad_id: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Samples -> left-padded prompts; right-padded gen_ids, gen_mask and weights (B, G)."""
    gen_ids, gen_mask = pad_answers([x.gen_ids for x in samples], pad_id)
    weights = torch.stack([F.pad(x.weights, (0, gen_ids.shape[1] - len(x.weights))) for x in samples])
    return pad_prompts([x.prompt for x in samples], pad_id), gen_ids, gen_mask, weights


# ----------------------------------------------------------------------------------------
# Random streams and environments.
# A stream is a range of episode seeds, one per (stream, seed, rank): training (per rank),
# evaluation and the warm start's states. The ranges never meet (test_episode_seed_streams_never_overlap),
# so no deal is played by two streams, and each stream's first seed also seeds its numpy and
# torch generators.
STREAMS, MAX_SEED, MAX_RANKS, STREAM_EPISODES = ("train", "eval", "warm_start"), 1000, 100, 10**6


def stream(name: str, seed: int, rank: int = 0) -> range:
    """The episode seeds of a stream, in the order its episodes are played."""
    assert 0 <= seed < MAX_SEED and 0 <= rank < MAX_RANKS, (seed, rank)
    first = ((STREAMS.index(name) * MAX_SEED + seed) * MAX_RANKS + rank) * STREAM_EPISODES
    return range(first, first + STREAM_EPISODES)


class EnvPool:
    """num_envs copies of one task; each episode gets the stream's next seed, whatever the batching
    (gymnasium's vector envs seed each env once: a deal would depend on which env played it)."""

    def __init__(self, env_id: str, num_envs: int, seeds: range):
        # without gymnasium's passive checker (tests run check_env), which keeps every env's last picture
        self.envs = [gym.make(env_id, disable_env_checker=True) for _ in range(num_envs)]
        self.seeds, self.started, self.episode = seeds, 0, [0] * num_envs  # episodes started; each env's
        self.obs, self.infos = [None] * num_envs, [None] * num_envs
        self.returns = np.zeros(num_envs)
        for i in range(num_envs):
            self.reset(i)

    def reset(self, i: int) -> None:
        if self.started == len(self.seeds):
            raise RuntimeError(f"the stream's {len(self.seeds):,} episode seeds are used up")
        self.obs[i], self.infos[i] = self.envs[i].reset(seed=self.seeds[self.started])
        self.episode[i], self.started = self.started, self.started + 1
        self.returns[i] = 0.0

    def step(self, i: int, action: int):
        """Step env i; on episode end, reset it. Returns reward, terminated, truncated and the
        episode's (final obs, final info, return) when it ended, else None."""
        obs, reward, terminated, truncated, info = self.envs[i].step(action)
        self.returns[i] += reward
        ended = None
        if terminated or truncated:
            ended = (obs, info, self.returns[i])
            self.reset(i)
        else:
            self.obs[i], self.infos[i] = obs, info
        return reward, terminated, truncated, ended

    def state(self) -> dict:
        """The pool as JSON data, for checkpoints: each env's game, generator and time-limit count
        (no pictures: they are drawn again)."""
        return dict(started=self.started, episode=self.episode, returns=self.returns.tolist(), envs=[dict(
            game={k: v for k, v in vars(env.unwrapped).items() if k not in ENV_FRAME},
            rng=env.unwrapped.np_random.bit_generator.state, steps=env._elapsed_steps) for env in self.envs])

    def load_state(self, state: dict) -> None:
        self.started, self.episode, self.returns = state["started"], state["episode"], np.array(state["returns"], dtype=float)
        for env, saved in zip(self.envs, state["envs"], strict=True):
            vars(env.unwrapped).update(saved["game"])
            env.unwrapped.np_random.bit_generator.state = saved["rng"]
            env._elapsed_steps = saved["steps"]
        self.obs, self.infos = [env.unwrapped.render() for env in self.envs], [env.unwrapped.info() for env in self.envs]


ENV_FRAME = {"render_mode", "observation_space", "action_space", "spec", "_np_random", "_np_random_seed"}  # not game state


# ----------------------------------------------------------------------------------------
# Warm start (the paper's SFT step).

def warm_start(policy: Policy, task, s: Settings, aux: bool, rng, log) -> dict:
    """Supervised answers written by envs.py for states of play (states_batches), or the rows of
    the --sft-data file (file_batches); trains whatever requires grad (all weights, or LoRA).
    With `aux` (states of play only), linear heads predict the state's labels from (1) the
    projected image features: a from-scratch VLM does not learn to read its picture from the
    language loss alone (measured), and (2) the last prompt token's hidden state, the value
    head's input, which nothing else makes carry the state. The heads are dropped after."""
    if aux and s.sft_data:
        raise ValueError("the perception loss needs the env's labels, which --sft-data does not have")
    batches = file_batches(s, rng) if s.sft_data else states_batches(task, s, rng)
    first = next(batches)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    heads = perception_heads(policy, task, first, s) if aux else {}
    params += [p for head in heads.values() for p in head.parameters()]
    opt = torch.optim.AdamW(params, lr=s.sft_lr)
    policy.model.train()
    t0, stats = time.time(), {}
    for step, batch in enumerate(itertools.chain([first], batches), 1):
        loss, stats = sft_loss(policy, heads, task, batch, s)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"warm start: loss is {loss.item()} at step {step}")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
        opt.step()
        if step % 50 == 0 or step == s.sft_steps:
            rate = step / (time.time() - t0)
            log(f"warm start {step}/{s.sft_steps}  " + "".join(f"{k} {v:.3f}  " for k, v in stats.items())
                + f"{rate:.1f} steps/s  eta {(s.sft_steps - step) / rate:.0f}s")
        if step == s.sft_steps:
            break
    policy.model.eval()
    return dict(step=step, **stats)


def states_batches(task, s: Settings, rng):
    """Batches of (pictures, prompts, answers, labels) from play that follows the expert with
    probability sft_follow (random moves otherwise, so that the answers cover detours too). An
    answer's thoughts are true (for the Points tasks: the expert's plan); its action is the
    expert's with probability sft_expert, else random."""
    pool = EnvPool(task.env_id, s.sft_batch, stream("warm_start", s.seed))
    while True:
        infos = list(pool.infos)
        experts = [task.expert(info) for info in infos]
        actions = [task.follow_or_random(e, s.sft_expert, rng) for e in experts]
        yield (list(pool.obs), [task.prompt(info, s.cot) for info in infos],
               [task.answer(info, a, s.cot) for info, a in zip(infos, actions)], [task.labels(i) for i in infos])
        for i, e in enumerate(experts):  # the next states: along the expert's path, with random detours
            pool.step(i, task.follow_or_random(e, s.sft_follow, rng))


def file_batches(s: Settings, rng):
    """Batches of (pictures, prompts, answers, no labels) drawn from the --sft-data rows."""
    data = read_sft_data(s.sft_data)
    while True:
        rows = [data[k] for k in rng.integers(len(data), size=s.sft_batch)]
        yield ([np.asarray(Image.open(r["image"]).convert("RGB")) for r in rows],
               [r["prompt"] for r in rows], [r["answer"] for r in rows], None)


def perception_heads(policy: Policy, task, batch, s: Settings) -> dict:
    """One linear head per feature the perception loss reads, sized by a probe of the first state."""
    rows = encode_prompts(policy.processor, batch[0][:1], batch[1][:1], s.device)
    empty = torch.zeros(1, 0, dtype=torch.long, device=s.device)
    probe = forward(policy.model, pad_prompts(rows, policy.pad_id), empty, empty.bool())[1]
    sizes = {"image": probe.image_hidden_states.numel(), "prompt": probe.hidden_states[-1].shape[-1]}
    return {k: torch.nn.Linear(n, sum(task.label_classes)).to(s.device) for k, n in sizes.items()}


def sft_loss(policy: Policy, heads: dict, task, batch, s: Settings):
    """The warm start's loss on one batch (pictures, prompts, answers, labels): the answers' mean
    token negative log-likelihood, plus the perception heads' cross-entropy if there are heads.
    Returns (loss, stats)."""
    images, prompts, answers, labels = batch
    tokenizer = policy.processor.tokenizer
    stops = tokenizer.convert_ids_to_tokens(policy.stop_ids)
    answers = [torch.tensor(tokenizer(answer_text(policy.processor, p, a, stops), add_special_tokens=False)["input_ids"])
               for p, a in zip(prompts, answers)]
    # the same batch layout as the PPO update: left-padded prompts, right-padded answers
    prompt = pad_prompts(encode_prompts(policy.processor, images, prompts, s.device), policy.pad_id)
    gen_ids, gen_mask = (x.to(s.device) for x in pad_answers(answers, policy.pad_id))
    logprobs, out = forward(policy.model, prompt, gen_ids, gen_mask)
    loss = lm_loss = -logprobs.sum() / gen_mask.sum()
    stats = {}
    if heads:
        P = prompt["input_ids"].shape[1]
        features = {"image": out.image_hidden_states.reshape(len(images), -1).float(),  # (B, tokens * hidden), raw
                    "prompt": out.hidden_states[-1][:, P - 1].float()}                 # (B, hidden)
        labels = torch.tensor(labels, device=s.device)                                # (B, n_labels)
        for name, head in heads.items():
            logits = head(features[name]).split(list(task.label_classes), dim=1)
            loss = loss + sum(F.cross_entropy(lg, labels[:, j]) for j, lg in enumerate(logits))
            stats[f"{name}_acc"] = torch.stack([lg.argmax(1) == labels[:, j] for j, lg in enumerate(logits)]).float().mean().item()
    return loss, dict(lm_loss=lm_loss.item(), loss=loss.item(), **stats)


def answer_text(processor, prompt: str, answer: str, stop_tokens=None) -> str:
    """The assistant turn as the chat template writes it after the generation prompt, up to
    and including the first stop token (default: the tokenizer's EOS), i.e. exactly what the
    policy should generate."""
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    head = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                                         tokenize=False)
    if not full.startswith(head):
        raise ValueError("the chat template's assistant turn does not extend its generation prompt")
    turn = full[len(head):]  # cut after the first stop token, as generation stops there
    cuts = [i + len(t) for t in stop_tokens or [processor.tokenizer.eos_token] if (i := turn.find(t, len(answer))) >= 0]
    return turn[:min(cuts)] if cuts else turn


def warm_started_policy(s: Settings, task, log) -> Policy:
    """The policy before RL: the base model, warm-started on the task unless --sft-steps 0.
    Both the built-in model and the warm-started one are cached and then loaded from disk,
    through the same code path as any checkpoint. They draw from their own seeded streams,
    so a cached and a fresh run continue identically."""
    cache = Path(s.cache_dir)
    base = s.model
    if s.model == BUILTIN:
        base = str(cache / f"builtin-{TEXTS}-seed{s.seed}")
        if not (Path(base) / "config.json").exists():
            log(f"building the built-in tiny VLM in {base}")
            with torch.random.fork_rng(devices=[]):
                build_builtin(Path(base), s.seed)
    if s.sft_steps == 0:
        return load_policy(base, s.device, s.dtype)
    full = s.model == BUILTIN  # from scratch: every weight trains; a pretrained model: LoRA, merged after
    aux = s.aux_loss == "on" or (s.aux_loss == "auto" and full and not s.sft_data)
    key = dict(model=s.model, env=task.env_id, cot=s.cot, sft_steps=s.sft_steps, sft_batch=s.sft_batch, sft_lr=s.sft_lr,
               sft_expert=s.sft_expert, sft_follow=s.sft_follow, aux=aux, seed=s.seed, texts=TEXTS,
               episodes=stream("warm_start", s.seed).start, max_grad_norm=s.max_grad_norm, dtype=s.dtype,
               sft_data=s.sft_data and hashlib.sha256(Path(s.sft_data).read_bytes()).hexdigest(),
               lora=None if full else [s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_targets, s.lora_vision])
    folder = cache / ("sft-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12])
    if not (folder / "config.json").exists():
        policy = load_policy(base, s.device, s.dtype)
        if s.grad_checkpointing:
            policy.model.activation_checkpointing_enable()
        log(f"warm start: {s.sft_steps} steps on {task.env_id}, "
            + (f"answers from {s.sft_data}" if s.sft_data else f"expert's actions in {s.sft_expert:.0%} of the answers")
            + (", auxiliary perception loss" if aux else "") + ("" if full else ", LoRA adapters merged after"))
        t0 = time.time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream("warm_start", s.seed).start)
            if not full:
                ppo.add_lora(policy.model, s.lora_rank, s.lora_alpha, s.lora_dropout, lora_targets(policy.model, s))
            stats = warm_start(policy, task, s, aux, np.random.default_rng(stream("warm_start", s.seed).start), log)
            if not full:
                ppo.merge_lora(policy.model)
        info = dict(key, **stats, seconds=round(time.time() - t0, 1))
        write_atomically(folder, lambda tmp: (policy.model.save_pretrained(tmp), policy.processor.save_pretrained(tmp),
                                              (tmp / "warm_start.json").write_text(json.dumps(info, indent=1))))
    log(f"warm-started model: {folder}")
    return load_policy(str(folder), s.device, s.dtype)


def lora_targets(model, s: Settings) -> str:
    """--lora-targets, or a regex for the language model's linear layers (and with --lora-vision
    the vision tower's), found as the model's own submodules rather than by names per family."""
    if s.lora_targets:
        return s.lora_targets
    parts = [model.get_decoder()] + ([model.get_encoder(modality="image")] if s.lora_vision else [])
    names = {id(m): name for name, m in model.named_modules()}
    if not all(names.get(id(p)) for p in parts):
        raise ValueError("cannot find the language model or vision tower: give --lora-targets")
    return "^(" + "|".join(re.escape(names[id(p)]) + r"\." for p in parts) + ")"


# ----------------------------------------------------------------------------------------
# Rollout, PPO update, evaluation.

@torch.no_grad()
def prompt_values(policy: Policy, task, images, infos, s: Settings) -> torch.Tensor:
    """V(s) for a batch of states (B,): a prompt-only forward (used for the bootstrap value after
    the last step and for the final state of a truncated episode)."""
    prompt = state_prompts(policy, task, images, infos, s)[1]
    empty = torch.zeros(len(infos), 0, dtype=torch.long, device=s.device)
    return logprobs_and_values(policy, prompt, empty, empty.bool(), s.temperature)[1]


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


def rollout(policy: Policy, task, pool: EnvPool, s: Settings, rng) -> Rollout:
    """num_steps steps of this rank's envs; the statistics are over every rank's."""
    T, N = s.num_steps, len(pool.envs)
    rewards, terminated, truncated, values, next_values = (torch.zeros(T, N) for _ in range(5))
    samples, episode_returns, finals = [], [], []
    for t in range(T):
        step_samples = act(policy, task, pool.obs, pool.infos, s, rng)
        for i, x in enumerate(step_samples):
            reward, term, trunc, ended = pool.step(i, x.action)
            rewards[t, i] = reward - (0.0 if x.format_ok else s.format_penalty)
            terminated[t, i], truncated[t, i] = term, trunc and not term
            values[t, i] = x.value
            if ended:
                episode_returns.append(ended[2])
                if truncated[t, i]:
                    finals.append((t, i, ended[0], ended[1]))
        samples += step_samples
    # V(s_{t+1}): the next step's value; after a truncation, the episode's final state's value
    # (after a termination it is never used); after the last step, a bootstrap value.
    next_values[:-1] = values[1:]
    next_values[-1] = prompt_values(policy, task, pool.obs, pool.infos, s)
    if finals:
        v = prompt_values(policy, task, [f[2] for f in finals], [f[3] for f in finals], s)
        for (t, i, _, _), value in zip(finals, v):
            next_values[t, i] = value
    episode_returns, every = (sum(parts, []) for parts in zip(*gather((episode_returns, [replace(x, prompt={}) for x in samples]))))
    stats = dict(episodes=len(episode_returns),
                 success=float(np.mean([envs.is_success(r) for r in episode_returns])) if episode_returns else math.nan,
                 mean_return=float(np.mean(episode_returns)) if episode_returns else math.nan,
                 format_fail=float(np.mean([not x.format_ok for x in every])), **diagnostics(every, task.actions),
                 answer=every[0].text)  # one answer of the batch, to see the thoughts change
    return Rollout(samples, rewards, values, next_values, terminated, truncated, stats)


def ppo_update(policy: Policy, optimizer, samples: list[Sample], advantages, returns, s: Settings, rng) -> dict:
    """update_epochs passes over the batch in shuffled minibatches (micro-batches accumulate);
    advantages, returns: (num_steps, num_envs of this rank), step-major like `samples`. The KL
    guard (CleanRL's target_kl, checked before each step): at the first minibatch whose approx_kl
    exceeds target_kl, no step and the update ends. Statistics: means over the minibatches measured.
    Under torchrun the batch is global (rank r holds samples r * n .. r * n + n - 1): every rank
    follows rank 0's minibatch order and normalises over the whole minibatch; gradients and
    statistics are summed across ranks, so each takes the step one process would take."""
    rank, world = rank_and_world()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    n = len(samples)
    local = torch.stack([torch.tensor([x.logprob for x in samples]), torch.tensor([x.value for x in samples]),
                         advantages.flatten(), returns.flatten()])                        # (4, n)
    b_logprobs, b_values, b_advantages, b_returns = torch.cat(gather(local), 1)          # (4, world * n)
    orders = gather([rng.permutation(world * n) for _ in range(s.update_epochs)])[0]
    minibatches = [order[i:i + s.minibatch_size] for order in orders for i in range(0, world * n, s.minibatch_size)]
    policy.model.train()
    measured, grad_norms = [], []
    for k, mb in enumerate(minibatches):
        mb_advantages = b_advantages[mb]
        if len(mb) > 1:
            mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)
        mine = np.flatnonzero(mb // n == rank)  # the places in mb of this rank's samples
        optimizer.zero_grad()
        mb_stats = dict.fromkeys(("policy_loss", "value_loss", "approx_kl", "clipfrac"), 0.0)
        for j in range(0, len(mine), s.micro_batch):
            places = mine[j:j + s.micro_batch]
            micro = mb[places]
            prompt, gen_ids, gen_mask, weights = collate([samples[g - rank * n] for g in micro], policy.pad_id)
            logprobs, new_values = logprobs_and_values(policy, prompt, gen_ids.to(s.device), gen_mask.to(s.device),
                                                       s.temperature)
            new_logprobs = (logprobs * weights.to(s.device)).sum(1)     # log pi(a|s), (micro,)
            loss, stats = ppo.ppo_loss(new_logprobs, b_logprobs[micro], mb_advantages[places],
                                       new_values, b_values[micro], b_returns[micro], clip_coef=s.clip_coef,
                                       vf_coef=s.vf_coef)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"PPO loss is {loss.item()} (minibatch {k + 1}, stats {stats}); "
                                         "the last checkpoint is untouched")
            (loss * len(micro) / len(mb)).backward()
            for key in mb_stats:  # explained_variance is of the whole batch, computed once below
                mb_stats[key] += stats[key] * len(micro) / len(mb)
        totals = torch.tensor(list(mb_stats.values()), dtype=torch.float64, device=s.device)
        all_sum([totals])
        measured.append(dict(zip(mb_stats, totals.tolist())))
        if s.target_kl and measured[-1]["approx_kl"] > s.target_kl:
            break  # the KL guard
        if world > 1:  # sum the gradients; a rank with no sample in this minibatch adds zeros
            for p in params:
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            all_sum([p.grad for p in params])
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)))
        optimizer.step()
    policy.model.eval()
    out = {k: float(np.mean([m[k] for m in measured])) for k in measured[0]}
    out.update(approx_kl_max=max(m["approx_kl"] for m in measured), optimizer_steps=len(grad_norms),
               grad_norm=float(np.mean(grad_norms)) if grad_norms else 0.0,
               explained_variance=ppo.explained_variance(b_values, b_returns))
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate."""
    p, d = successes / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def evaluate(policy: Policy, task, s: Settings, log, label: str, page: Path | None = None) -> dict:
    """s.eval_episodes episodes of the evaluation stream (held-out deals), sampled as in
    training; under torchrun rank r plays episodes r, r + N, r + 2N... and the results are
    gathered. Its generators are forked, so it does not move the training ones. With `page`,
    the first SHOWN episodes are written there step by step (write_episodes)."""
    rank, world = rank_and_world()
    deals = stream("eval", s.seed)
    seeds, n = deals[rank::world], len(range(rank, s.eval_episodes, world))
    pool = EnvPool(task.env_id, min(s.eval_envs, n), seeds)
    active, shown = [True] * len(pool.envs), {}  # episode -> its steps
    returns, format_ok, t0 = [], [], time.time()
    last_log = t0
    rng = np.random.default_rng(seeds.start)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds.start)
        while any(active):
            idx = [i for i in range(len(active)) if active[i]]
            samples = act(policy, task, [pool.obs[i] for i in idx], [pool.infos[i] for i in idx], s, rng)
            for i, x in zip(idx, samples):
                format_ok.append(x.format_ok)
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
        write_episodes(page, task, label, {seeds[k]: steps for k, steps in sorted(shown.items())}, policy.processor)
    returns, format_ok = (sum(parts, []) for parts in zip(*gather((returns, format_ok))))
    n = s.eval_episodes
    wins = sum(envs.is_success(r) for r in returns)
    low, high = wilson(wins, n)
    result = dict(episodes=n, success=wins / n, ci_low=low, ci_high=high, mean_return=float(np.mean(returns)),
                  format_fail=1 - float(np.mean(format_ok)), seconds=round(time.time() - t0, 1))
    result["expert_match"] = expert_match(policy, task, s, deals, n=min(200, s.eval_episodes))
    log(f"{label}: success {result['success']:.3f}, greedy action = expert's on {result['expert_match']:.3f} "
        f"of held-out states along the expert's path")
    if task.solvable:  # the share of the evaluated deals that can be won at all
        env = gym.make(task.env_id)
        result["solvable"] = float(np.mean([task.solvable(env.reset(seed=deals[k])[1]) for k in range(n)]))
    return result


@torch.no_grad()
def expert_match(policy: Policy, task, s: Settings, seeds: range, n: int = 200) -> float:
    """The share of n held-out states along the expert's path (the evaluation's deals, played
    by the expert) where the greedy answer's action is the expert's: how well the policy has
    learnt the decision, apart from the luck of sampling."""
    env, states, seed = gym.make(task.env_id, disable_env_checker=True), [], seeds.start
    while len(states) < n:
        (obs, info), done = env.reset(seed=seed), False
        seed += 1
        while not done and len(states) < n and (expert := task.expert(info)) is not None:
            states.append((obs, info, expert))
            obs, _, terminated, truncated, info = env.step(expert)
            done = terminated or truncated
    matches = []
    for k in range(0, n, s.eval_envs):
        chunk = states[k:k + s.eval_envs]
        prompt = state_prompts(policy, task, [x[0] for x in chunk], [x[1] for x in chunk], s)[1]
        out = policy.model.generate(**prompt, do_sample=False, max_new_tokens=s.max_new_tokens,
                                    suppress_tokens=policy.suppress or None)
        texts = policy.processor.tokenizer.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        matches += [parse.parse_action(text, task.actions)[0] == x[2] for text, x in zip(texts, chunk)]
    return float(np.mean(matches))


# ----------------------------------------------------------------------------------------
# Data parallelism under torchrun: each rank steps its own envs and samples with its own copy
# of the model; the LoRA and value-head gradients are summed across ranks at every optimizer
# step (the frozen weights are never communicated). In one process these do nothing.

def init_distributed(s: Settings) -> Settings:
    """Join torchrun's process group: NCCL on CUDA (rank on cuda:LOCAL_RANK), gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 or dist.is_initialized():
        return s
    if s.device.startswith("cuda"):
        s = replace(s, device=f"cuda:{os.environ['LOCAL_RANK']}")
        torch.cuda.set_device(s.device)
    dist.init_process_group("nccl" if s.device.startswith("cuda") else "gloo", timeout=timedelta(minutes=s.dist_timeout))
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


# ----------------------------------------------------------------------------------------
# Checkpoints, logging, plots, pages of episodes.

SHOWN = 4  # episodes on a page: the evaluation's first deals, whatever their outcome


def write_episodes(page: Path, task, label: str, episodes: dict, processor) -> None:
    """A Markdown page of whole episodes {deal seed: [(picture, sample, reward)]}: per step the
    picture, the picture as the model received it, its answer, the action played and the reward.
    The pictures are PNG files in a folder beside the page."""
    folder, lines = page.with_suffix(""), [f"# {task.name}, {label}: the first {len(episodes)} held-out episodes", ""]
    folder.mkdir(parents=True, exist_ok=True)
    for k, (seed, steps) in enumerate(episodes.items(), 1):
        lines += [f"## Episode {k} (deal seed {seed}): return {sum(r for *_, r in steps):g}", "",
                  "| step | picture | model input | answer | action | reward |", "|---|---|---|---|---|---|"]
        for t, (picture, x, reward) in enumerate(steps, 1):
            pictures = [Image.fromarray(picture), model_input(processor, x.prompt)]
            for picture, suffix in zip(pictures, ("", "-input")):
                if picture is not None:
                    picture.save(folder / f"{k}-{t}{suffix}.png")
            action = task.actions[x.action] if x.format_ok else f"no legal action: random {task.actions[x.action]} played"
            text = " ".join(x.text.splitlines()).replace("|", "\\|").replace("`", "'")  # one table cell
            lines.append(f"| {t} | ![]({folder.name}/{k}-{t}.png) | " + (f"![]({folder.name}/{k}-{t}-input.png)"
                         if pictures[1] else "") + f" | `{text}` | {action} | {reward:g} |")
        lines.append("")
    write_text(page, "\n".join(lines))


def model_input(processor, prompt: dict):
    """The picture as the model received it, where the processor gives one (1, 3, H, W) picture."""
    pixels, ip = prompt.get("pixel_values"), processor.image_processor
    if pixels is None or pixels.dim() != 4 or not hasattr(ip, "image_mean"):
        return None
    pixels = pixels[0].float().cpu() * torch.tensor(ip.image_std)[:, None, None] + torch.tensor(ip.image_mean)[:, None, None]
    return Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())

def save_checkpoint(run_dir: Path, update: int, policy: Policy, optimizer, scheduler, pool, rng, keep: int) -> None:
    """The adapter (PEFT format: safetensors and JSON), state.pt (tensors only: the value head,
    optimizer, scheduler and every rank's torch generators) and envs.json (every rank's envs and
    numpy generator as JSON data): nothing a reader has to unpickle. Gathered from every rank;
    rank 0 writes it to a temporary folder, renames it, then `latest` names it. The newest
    `keep` checkpoints stay."""
    torch_rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_initialized() else [])
    ranks = gather(dict(pool=pool.state(), rng=rng.bit_generator.state, torch_rng=torch_rng))
    if rank_and_world()[0] > 0:
        return
    folder = run_dir / f"checkpoint-{update:05d}"

    def write(tmp: Path):
        ppo.save_adapter(policy.model, tmp)
        torch.save(dict(update=update, value_head=policy.value_head.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), torch_rng=[r.pop("torch_rng") for r in ranks]), tmp / "state.pt")
        (tmp / "envs.json").write_text(json.dumps(ranks))
    write_atomically(folder, write)
    write_text(run_dir / "latest", folder.name)
    names = sorted(p.name for p in run_dir.glob("checkpoint-*"))  # any newer ones are of an abandoned future
    for old in [n for n in names if n < folder.name][:-keep + 1 or None] + [n for n in names if n > folder.name]:
        shutil.rmtree(run_dir / old)


@contextmanager
def damaged(path: Path, advice: str):
    """A file that cannot be read as what it should be stops the run with one line: its name, the
    error, and what to do."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError) as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise SystemExit(f"rl4vlm.py: error: {path} is damaged or missing ({reason}); {advice}") from e


def read_checkpoint(run_dir: Path) -> dict:
    """Everything a resume reads, read and checked before anything is written: the latest
    checkpoint, results.json and the metrics lines up to the checkpoint."""
    latest = run_dir / "latest"
    name = latest.read_text().strip() if latest.is_file() else ""
    earlier = sorted(p.name for p in run_dir.glob("checkpoint-*") if p.name < name)
    advice = (f"write {earlier[-1]} into {latest} to resume from the checkpoint before it" if earlier
              else "start the run again")
    folder = run_dir / name
    if not name.startswith("checkpoint-") or not folder.is_dir():
        raise SystemExit(f"rl4vlm.py: error: {latest} names no checkpoint folder; {advice}")
    with damaged(folder / "state.pt", advice):
        state = torch.load(folder / "state.pt", weights_only=True)
    with damaged(folder / "envs.json", advice):
        ranks = json.loads((folder / "envs.json").read_text())
        if len(ranks) != rank_and_world()[1] or len(state["torch_rng"]) != len(ranks):
            raise ValueError(f"written by {len(ranks)} ranks: resume with as many")
    with damaged(folder / ppo.WEIGHTS_NAME, advice):
        load_file(folder / ppo.WEIGHTS_NAME), json.loads((folder / ppo.CONFIG_NAME).read_text())
    with damaged(run_dir / "metrics.jsonl", "mend or delete its damaged lines, then resume"):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        lines = [line for line in lines if json.loads(line)["update"] <= state["update"]]
    with damaged(run_dir / "results.json", "start the run again"):
        results = json.loads((run_dir / "results.json").read_text())
    return dict(folder=folder, state=state, ranks=ranks, metrics=lines, results=results, advice=advice)


def restore_checkpoint(saved: dict, policy: Policy, optimizer, scheduler, pool) -> np.random.Generator:
    """Put a checkpoint read by read_checkpoint back: weights, optimizer, envs and generators."""
    rank = rank_and_world()[0]
    state, mine = saved["state"], saved["ranks"][rank]
    with damaged(saved["folder"], saved["advice"]):
        ppo.load_adapter(policy.model, saved["folder"])
        policy.value_head.load_state_dict(state["value_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"][rank][0])
        if len(state["torch_rng"][rank]) > 1:
            torch.cuda.set_rng_state(state["torch_rng"][rank][1])
        pool.load_state(mine["pool"])
        rng = np.random.default_rng()
        rng.bit_generator.state = mine["rng"]
    return rng


def plot_curves(path: Path, curves: dict, title: str) -> None:
    """Success rate against env steps, one line per curve: {name: (xs, ys)}. Pillow only."""
    W, H, m = 640, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xmax = max([max(xs) for xs, _ in curves.values() if xs] or [1])
    d.line([(m, m), (m, H - m), (W - m, H - m)], fill="black")
    labels = [((8, H - m - y * (H - 2 * m) - 6), f"{y:.1f}") for y in (0.0, 0.5, 1.0)] + [
        ((W - m - 40, H - m + 8), f"{xmax:,}"), ((W // 2 - 60, H - m + 24), "env steps"), ((m, 15), title + " (success rate)")]
    for place, text in labels:
        d.text(place, text, fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for k, (name, (xs, ys)) in enumerate(curves.items()):
        points = [(m + x / xmax * (W - 2 * m), H - m - y * (H - 2 * m)) for x, y in zip(xs, ys) if not math.isnan(y)]
        if len(points) > 1:
            d.line(points, fill=colours[k % len(colours)], width=2)
        d.text((W - m - 150, H - m - 20 - 14 * k), name, fill=colours[k % len(colours)])
    img.save(path)


# ----------------------------------------------------------------------------------------
# The run.

def run(s: Settings, task, run_dir: Path) -> dict:
    """Warm start, evaluate, RL, evaluate. Under torchrun every rank runs this with its own share
    of the envs (its own stream of episodes); only rank 0 logs and writes."""
    rank, world = rank_and_world()
    is_main = rank == 0
    log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    resuming = (run_dir / "latest").exists() or any(run_dir.glob("checkpoint-*"))
    saved = read_checkpoint(run_dir) if resuming else None  # before anything is written
    if is_main and not resuming:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(run_dir / "settings.json", json.dumps(asdict(s), indent=1))
    if s.threads:
        torch.set_num_threads(s.threads)

    # ---- seeding: the one place the run's random streams start. torch's generator draws the LoRA
    # and value-head init and the sampled tokens, `rng` the fallback actions and minibatch order;
    # EnvPool seeds every episode. The cached models and evaluation fork their own streams.
    seeds = stream("train", s.seed, rank)
    torch.manual_seed(seeds.start)
    rng = np.random.default_rng(seeds.start)

    if rank > 0:
        dist.barrier()  # rank 0 builds and warm-starts the cached models alone; the others then load them
    policy = warm_started_policy(s, task, log)
    if is_main and world > 1:
        dist.barrier()
    model = policy.model.eval()
    if s.grad_checkpointing:
        model.activation_checkpointing_enable()
    wrapped = ppo.add_lora(model, s.lora_rank, s.lora_alpha, s.lora_dropout, lora_targets(model, s))
    policy.value_head = ppo.ValueHead(model.config.get_text_config().hidden_size).to(s.device)
    params = ppo.lora_parameters(model) + list(policy.value_head.parameters())
    for p in params if world > 1 else []:  # every rank starts from rank 0's initialisation
        dist.broadcast(p.data, src=0)
    batch_size = s.num_envs * s.num_steps
    num_updates = max(1, s.total_steps // batch_size)
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=num_updates, eta_min=s.lr_min)
    log(f"LoRA on {len(wrapped)} linear layers, {sum(p.numel() for p in params):,} trainable parameters; "
        f"{num_updates} updates of {batch_size} env steps")

    results_path, metrics_path = run_dir / "results.json", run_dir / "metrics.jsonl"
    results = saved["results"] if resuming else {}
    pool, start = EnvPool(task.env_id, s.num_envs // world, seeds), 1
    if resuming:
        rng, start = restore_checkpoint(saved, policy, optimizer, scheduler, pool), saved["state"]["update"] + 1
        if is_main:
            write_text(metrics_path, "".join(line + "\n" for line in saved["metrics"]))
        log(f"resuming {run_dir} after update {start - 1}")
    elif is_main:
        metrics_path.write_text("")
    if "warm_start" not in results:
        results["warm_start"] = evaluate(policy, task, s, log, "warm start", s.episodes and run_dir / "episodes-warm_start.md")
        if is_main:
            write_text(results_path, json.dumps(results, indent=1))

    try:
        for update in range(start, num_updates + 1):
            t0 = time.time()
            batch = rollout(policy, task, pool, s, rng)
            rollout_seconds = time.time() - t0
            advantages, returns = ppo.compute_gae(batch.rewards, batch.values, batch.next_values, batch.terminated,
                                                  batch.truncated, s.gamma, s.gae_lambda)
            stats = dict(batch.stats, **ppo_update(policy, optimizer, batch.samples, advantages, returns, s, rng))
            scheduler.step()
            seconds = time.time() - t0
            top = max(stats["action_share"].items(), key=lambda kv: kv[1])
            metrics = dict(update=update, env_steps=update * batch_size, **stats, lr=scheduler.get_last_lr()[0],
                           rollout_seconds=round(rollout_seconds, 2), steps_per_second=round(batch_size / seconds, 1))
            log(f"update {update}/{num_updates}  steps {update * batch_size}  " + "  ".join(f"{k} {stats[k]:.3g}" for k in (
                "success", "episodes", "mean_return", "format_fail", "approx_kl", "clipfrac", "optimizer_steps",
                "explained_variance", "thought_entropy", "action_entropy", "distinct_thoughts"))
                + f"  top action {top[0]!r} {top[1]:.2f}  {batch_size / seconds:.0f} steps/s")
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if update % s.checkpoint_every == 0 or update == num_updates:
                save_checkpoint(run_dir, update, policy, optimizer, scheduler, pool, rng, s.keep_checkpoints)
    except KeyboardInterrupt:
        last = (run_dir / "latest").read_text().strip() if (run_dir / "latest").exists() else "none"
        log(f"\ninterrupted; last checkpoint: {last}. Continue with: python rl4vlm.py --resume {run_dir}")
        raise SystemExit(130)

    results["rl"] = evaluate(policy, task, s, log, "after RL", s.episodes and run_dir / "episodes-rl.md")
    if is_main:
        write_text(results_path, json.dumps(results, indent=1))
        plot_curves(run_dir / "curve.png", {task.env_id: curve(run_dir)}, task.env_id)
        table = results_table(task, results)
        write_text(run_dir / "results.md", table + "\n")
        log(table)
    return results


def results_table(task, results: dict) -> str:
    rows = ["| policy | success % (95% CI) | mean return | format failures % | episodes |", "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {100 * r['success']:.1f} ({100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}) | "
                    f"{r['mean_return']:.2f} | {100 * r['format_fail']:.1f} | {r['episodes']} |")
    return f"{task.env_id}\n" + "\n".join(rows)


SUITE = "gym-cards"


def tasks_of(env: str) -> list:
    """--env: gym-cards (all four tasks), one task, or several joined by commas."""
    return list(envs.TASKS.values()) if env == SUITE else [envs.get_task(name) for name in env.split(",")]


def run_many(s: Settings, tasks, run_dir: Path) -> dict:
    """Each seed, each task (with --ablations each variant too: with and without chain of thought,
    or thought_coef 0, 0.2, 0.5 and 1) in turn, in run_dir/seed<n>/<task>[-<variant>]; finished
    runs are skipped and an interrupted one resumes, so --resume works here too. Then the curves
    of each seed and the tables: results.md and results.csv, or ablations.md."""
    variants = ({"": {}} if not s.ablations else {"with CoT": dict(cot=True), "without CoT": dict(cot=False)}
                if s.ablations == "cot" else {f"lambda {c}": dict(cot=True, thought_coef=c) for c in (0.0, 0.2, 0.5, 1.0)})
    seeds, results, is_main = s.seeds or [s.seed], {}, rank_and_world()[0] == 0
    for seed in seeds:
        folders = {}
        for task in tasks:
            for name, change in variants.items():
                folders[f"{task.name} {name}".strip()] = folder = run_dir / f"seed{seed}" / "-".join([task.name, *name.split()])
                results[task.name, name, seed] = run_or_load(replace(s, seed=seed, seeds=[], **change), task, folder)
        if is_main:
            plot_curves(run_dir / f"seed{seed}" / f"{s.ablations or 'curves'}.png", {k: curve(f) for k, f in folders.items()},
                        f"seed {seed}")
    if is_main and s.ablations:
        paper = lambda t, name: {"with CoT": t.paper["rl"], "without CoT": t.paper["no_cot"]}.get(name, "")
        md = "\n".join(["Success % (paper: after RL)", ""] + seed_rows(
            [(t.name, f"{name}, {label}", [results[t.name, name, seed][stage] for seed in seeds], paper(t, name) if stage == "rl" else "")
             for t in tasks for name in variants for stage, label in (("warm_start", "warm start"), ("rl", "after RL"))], seeds))
        write_text(run_dir / "ablations.md", md + "\n")
    elif is_main:
        md, csv = suite_tables(tasks, seeds, {(t, seed): r for (t, _, seed), r in results.items()}, run_dir)
        write_text(run_dir / "results.md", md + "\n")
        write_text(run_dir / "results.csv", csv)
    if is_main:
        print(md)
    return results


def run_or_load(s: Settings, task, folder: Path) -> dict:
    """A finished run's results, or run (or resume) it."""
    done = folder / "results.json"
    previous = json.loads(done.read_text()) if done.exists() else {}
    return previous if "rl" in previous else run(with_task_defaults(s, task), task, folder)


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def curve(folder: Path) -> tuple[list, list]:
    history = metrics(folder)  # read once
    return [m["env_steps"] for m in history], [m["success"] for m in history]


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
    """The paper's comparison per seed (success % with the warm start only and after RL, mean and
    min-max, the paper's 7B numbers), the greedy expert match and PPO step sizes, links to the
    pages of episodes. Returns Markdown and CSV (every seed's 95% interval)."""
    rows = [(t.name, label, [results[t.name, seed][stage] for seed in seeds], t.paper[paper])
            for t in tasks for stage, label, paper in (("warm_start", "warm start only", "sft"), ("rl", "after RL", "rl"))]
    md = [f"Success % (seeds {', '.join(map(str, seeds))}; 500 held-out episodes a cell unless --eval-episodes says otherwise)", ""]
    pages = [f"[{t.name} seed {seed}, {stage}](seed{seed}/{t.name}/episodes-{stage}.md)" for t in tasks for seed in seeds
             for stage in ("warm_start", "rl") if (run_dir / f"seed{seed}" / t.name / f"episodes-{stage}.md").exists()]
    md += seed_rows(rows, seeds)
    md += ["", "| task | greedy action = expert's: warm start | after RL | approx_kl median | approx_kl max |", "|---|---|---|---|---|"]
    for t in tasks:
        match = [np.mean([results[t.name, seed][stage]["expert_match"] for seed in seeds]) for stage in ("warm_start", "rl")]
        kl = [m["approx_kl"] for seed in seeds for m in metrics(run_dir / f"seed{seed}" / t.name)]  # every update
        md.append(f"| {t.name} | {100 * match[0]:.1f} | {100 * match[1]:.1f} | {np.median(kl):.4f} | {np.max(kl):.4f} |")
    csv = ["task,seed,stage,success,ci_low,ci_high,episodes,expert_match,solvable,paper"] + [
        f"{t.name},{seed},{stage},{r['success']:.4f},{r['ci_low']:.4f},{r['ci_high']:.4f},{r['episodes']},"
        f"{r['expert_match']:.4f},{r.get('solvable', '')},{t.paper[paper]}" for t in tasks for seed in seeds
        for stage, paper in (("warm_start", "sft"), ("rl", "rl")) for r in [results[t.name, seed][stage]]]
    for t in tasks:
        if t.solvable:
            share = np.mean([results[t.name, seed]["rl"]["solvable"] for seed in seeds])
            md.append(f"\n{t.name}: {100 * share:.1f}% of the evaluated deals can be won at all.")
    md += ["", "Episodes step by step: " + ", ".join(pages)] if pages else []
    return "\n".join(md), "\n".join(csv) + "\n"


def main(argv=None) -> dict:
    s = parse_settings(argv)
    resume = bool(s.resume)
    run_dir = Path(s.resume) if resume else None
    if resume:  # the run's own settings; the command line only names the run
        s = Settings(**json.loads((run_dir / "settings.json").read_text()))
    world = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun
    if s.num_envs % world or s.minibatch_size % world:
        sys.exit(f"rl4vlm.py: error: --num-envs and --minibatch-size are global: they must be multiples of the {world} ranks")
    s = init_distributed(s)
    tasks = tasks_of(s.env)
    name = SUITE if s.env == SUITE else "-".join(t.name for t in tasks)
    seeds = "seeds" + "-".join(map(str, s.seeds)) if s.seeds else f"seed{s.seed}"
    started = gather(int(time.time()))[0]  # rank 0's clock names the run on every rank
    run_dir = run_dir or Path(s.out_dir) / (s.run_name or f"{name}{'-' + s.ablations if s.ablations else ''}-{seeds}-{started}")
    if (run_dir / "settings.json").exists() and not resume:
        sys.exit(f"rl4vlm.py: error: {run_dir} holds a run; continue it with --resume {run_dir} or pick another --run-name")
    gather(None)  # every rank has looked before rank 0 writes
    if len(tasks) > 1 or s.seeds or s.ablations:  # several runs: run_dir/seed<n>/<task>, tables over them
        if rank_and_world()[0] == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text(run_dir / "settings.json", json.dumps(asdict(s), indent=1))
        return run_many(s, tasks, run_dir)
    return run(with_task_defaults(s, tasks[0]), tasks[0], run_dir)


if __name__ == "__main__":
    main()
