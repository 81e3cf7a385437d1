"""rl4vlm tests, on CPU with no network: the tasks' rules, the maths, the parser, the loop.

Fixtures and helpers come first, then the tests of envs.py, parse.py, ppo.py and rl4vlm.py in
that order, the data-parallel ones last (their two ranks run beside the others); each test is
named after the rule it proves and checks it exactly, against a hand computation or an
independent implementation. No test times anything: bench.py does."""
import rl4vlm  # first: it pins torch's CPU kernels (CPU_PINS) before torch loads
from collections import Counter
from dataclasses import fields, replace
from types import SimpleNamespace
import copy
import errno
import fcntl
import hashlib
import importlib.util
import itertools
from itertools import combinations_with_replacement
from pathlib import Path
import json
import math
import os
import pickle
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import warnings

from PIL import Image
from gymnasium.envs.toy_text.blackjack import BlackjackEnv as GymnasiumBlackjack
from gymnasium.utils import seeding
from gymnasium.utils.env_checker import check_env
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM
import gymnasium as gym
import numpy as np
import pytest
import torch

from bench import TINY, bpe_tokenizer, build_gemma3
import envs
import lab
import parse
import ppo


# ======================================================================================
# Fixtures and helpers, in the order of the modules they serve
# ======================================================================================
# --- envs.py ---------------------------------------------------------------------------


IDS = ["gym_cards/NumberLine-v0", "gym_cards/EZPoints-v0", "gym_cards/Points24-v0", "gym_cards/Blackjack-v0"]


def make(env_id, seed=0, **state):
    """The bare env after reset(seed), with any state attributes overwritten (a hand-made state)."""
    env = gym.make(env_id).unwrapped
    env.reset(seed=seed)
    for name, value in state.items():
        setattr(env, name, value)
    return env


def press(env, *entries):
    """Step a Points env with action strings; returns the last (reward, terminated, truncated)."""
    for entry in entries:
        _, reward, terminated, truncated, _ = env.step(env.actions.index(entry))
    return reward, terminated, truncated


def play(env_id, seed, steps=12):
    env = gym.make(env_id)
    obs, info = env.reset(seed=seed)
    pictures, rewards = [obs], []
    action_rng = np.random.default_rng(123)  # the same actions for every seed
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(int(action_rng.integers(env.action_space.n)))
        pictures.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            obs, info = env.reset()
            pictures.append(obs)
    return pictures, rewards


def expert_returns(task, episodes, seed):
    """Returns of the expert's episodes on the bare env (no pictures): the deals of reset(seed), reset(), ..."""
    env, returns = task.env_class(), []
    env.reset(seed=seed)
    for episode in range(episodes):
        if episode:
            env.deal()
        total, done = 0.0, False
        while not done and (action := task.expert(env.info())) is not None:
            reward, terminated, truncated = env.play(action)
            total, done = total + reward, terminated or truncated
        returns.append(total)
    return returns


def painted(env):
    """The reference for env.render(): every sprite painted afresh onto one canvas, no cache."""
    image = Image.new("RGB", (envs.SIZE, envs.SIZE), env.background)
    for x, y, *sprite in env.sprites():
        envs.paint(image, x, y, *sprite)
    return np.asarray(image)


def random_play_states(env_id, steps, seed=0):
    """The bare env after each of `steps` random actions (new episodes as needed), as (env, sprites) pairs."""
    env = gym.make(env_id).unwrapped
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(len(env.actions))))
        if terminated or truncated:
            env.reset()
        yield env


# --- ppo.py ----------------------------------------------------------------------------


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama():
    torch.manual_seed(0)  # the same base weights every time
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(config).eval()


def randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ppo.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


INPUT_IDS = torch.arange(1, 13).reshape(2, 6)


@torch.no_grad()
def logits(model):
    return model(INPUT_IDS).logits


# --- rl4vlm.py, with the built-in tiny VLM -------------------------------------------------


HERE = Path(__file__).parent


# a few tiny updates: 4 envs x 4 steps, a 3-step warm start, 4 evaluation episodes
FAST = ["--num-envs", "4", "--num-steps", "4", "--total-steps", "48", "--sft-steps", "3", "--sft-batch", "4",
        "--eval-episodes", "4", "--minibatch-size", "8", "--micro-batch", "4", "--max-new-tokens", "16",
        "--checkpoint-every", "2"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def base_policy(cache):
    """The built-in tiny VLM (random weights, no warm start) with LoRA and a value head."""
    folder = cache / "builtin-seed1"
    if not folder.exists():
        rl4vlm.build_builtin(folder, seed=1)
    policy = rl4vlm.load_policy(str(folder), "cpu")
    torch.manual_seed(0)
    rl4vlm.add_trainable(policy, rl4vlm.Settings(lora_rank=4, lora_alpha=8.0))
    for _, m in ppo.lora_modules(policy.model):  # random B so that LoRA takes part in every check below
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return policy


@pytest.fixture
def policy(base_policy):
    """base_policy with weights of its own (the processor is shared, read only): no test can change another's."""
    return replace(base_policy, model=copy.deepcopy(base_policy.model), value_head=copy.deepcopy(base_policy.value_head))


def settings(**kw):
    task = envs.get_task(kw.pop("env", "numberline"))
    return task.with_defaults(rl4vlm.Settings(**kw)), task


def states(n, seed=0):
    env = gym.make(envs.get_task("numberline").env_id)
    obs, infos = zip(*[env.reset(seed=seed + k) for k in range(n)])
    return list(obs), list(infos)


def trainable(policy):
    return ppo.lora_parameters(policy.model) + list(policy.value_head.parameters())


def answer_samples(policy, task, prompts, answers):
    """Samples of given prompt texts and answers: weights 1, old log-prob and value 0."""
    env = gym.make(task.env_id)
    samples = []
    for k, (prompt, answer) in enumerate(zip(prompts, answers)):
        obs, _ = env.reset(seed=k)
        ids = torch.tensor(policy.processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
        samples.append(rl4vlm.Sample(
            prompt=rl4vlm.encode_prompts(policy.processor, [obs], [prompt], "cpu")[0], gen_ids=ids,
            weights=torch.ones(len(ids)), logprob=0.0, value=0.0, entropy=torch.zeros(len(ids)), text=answer,
            n_thought=0, thought="", action=0, format_ok=True))
    return samples


class PiecesTokenizer:
    """A stand-in tokenizer: token i decodes to pieces[i]."""
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def action_start_by_every_prefix(tokenizer, gen_ids, span):
    """The definition, quadratic: the first token whose decoded prefix reaches past the action's start."""
    ends = [len(tokenizer.decode(gen_ids[:i + 1], skip_special_tokens=True)) for i in range(len(gen_ids))]
    return next((i for i, end in enumerate(ends) if end > span[0]), len(gen_ids))


def check_split_equals_the_definition(tokenizer, ids):
    """action_start equals the definition for every place the action value could start."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for start in range(len(text) + 1):
        assert rl4vlm.action_start(tokenizer, ids, (start, start)) == \
            action_start_by_every_prefix(tokenizer, ids, (start, start)), (ids, start)


def check_prompt_cache(processor):
    """encode_prompts (cached) gives exactly the processor's own tensors, for repeated and new pairs."""
    pictures = [gym.make("gym_cards/NumberLine-v0").reset(seed=k)[0] for k in range(3)]
    prompts = ["first prompt", "second prompt", "first prompt"]
    first = rl4vlm.encode_prompts(processor, pictures, prompts, "cpu")
    again = rl4vlm.encode_prompts(processor, [p.copy() for p in pictures], prompts, "cpu")  # equal pictures, new arrays
    assert all(a is b for a, b in zip(first, again)), "a repeated pair must come from the cache"
    swapped = rl4vlm.encode_prompts(processor, pictures, prompts[::-1], "cpu")
    for picture, prompt, row in zip(pictures + pictures, prompts + prompts[::-1], first + swapped):
        fresh = rl4vlm.encode_prompt(processor, picture, prompt, "cpu")
        assert row.keys() == fresh.keys() and all(torch.equal(row[k], fresh[k]) for k in fresh), prompt


def update_batch(policy):
    """8 samples of hand-made answers, old log-probs 0.1 off the policy's, fixed advantages and returns (1, 8): the
    batch of the data-parallel tests (policy at temperature 0.2)."""
    answers = ['{"action": "+"}', '{"action": "-"}', '{"thoughts": "up", "action": "+"}', "-"] * 2
    samples = answer_samples(policy, envs.get_task("numberline"), [f"prompt {k}" for k in range(8)], answers)
    with torch.no_grad():
        logprobs, values = rl4vlm.logprobs_and_values(policy, *rl4vlm.collate(samples, policy.pad_id)[:3])
    for k, (x, lp, v) in enumerate(zip(samples, logprobs.sum(1).tolist(), values.tolist())):
        x.logprob, x.value = lp + 0.1 * (-1) ** k, v
    return samples, torch.linspace(-1.0, 1.0, 8)[None], torch.linspace(0.5, -0.5, 8)[None]


def two_rank_job(rank, port, policy_dir, cache, out):
    """What each of two gloo processes does in the data-parallel tests: (1) one PPO update on
    its half of update_batch(), and one with gigpo on 3 and 5 of its samples; (2) a run of 2
    updates, the same run stopped during update 2, then resumed; the same with gigpo.
    Writes what it saw to out/rank<r>.pt."""
    with open(out / f"rank{rank}.log", "w") as log:  # not into whichever test's output pytest captures meanwhile
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    lab.init_distributed(rl4vlm.Settings(dist_timeout=2.0))
    seen = {}
    for advantage, part in (("gae", slice(4 * rank, 4 * rank + 4)), ("gigpo", slice(0, 3) if rank == 0 else slice(3, 8))):
        policy = replace(rl4vlm.load_policy(str(cache / "builtin-seed1"), "cpu"), temperature=0.2)
        ppo.load_adapter(policy.model, policy_dir)
        policy.model.eval()
        policy.value_head = ppo.ValueHead(policy.model.config.get_text_config().hidden_size)
        policy.value_head.load_state_dict(torch.load(policy_dir / "value_head.pt", weights_only=True))
        samples, advantages, returns = update_batch(policy)
        s, _ = settings(minibatch_size=4, micro_batch=1, update_epochs=2, target_kl=0, advantage=advantage)
        stats = rl4vlm.ppo_update(policy, torch.optim.SGD(trainable(policy), lr=1e-2), samples[part],
                                  advantages[:, part], returns[:, part], s, np.random.default_rng(0))
        seen[advantage] = dict(weights=[p.detach() for p in trainable(policy)], stats=stats)
    common = FAST + ["--cache-dir", str(cache), "--out-dir", str(out), "--total-steps", "32", "--checkpoint-every", "1"]
    for name, flags in (("", []), ("-gigpo", ["--advantage", "gigpo", "--group-size", "2"])):
        seen["full" + name] = rl4vlm.main(common + flags + ["--run-name", "full" + name])
        with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stopped:
            patch.setattr(rl4vlm, "ppo_update", interrupting(rl4vlm.ppo_update, at_call=2))
            rl4vlm.main(common + flags + ["--run-name", "stopped" + name])
        seen["stopped_code" + name] = stopped.value.code
        seen["resumed" + name] = rl4vlm.main(["--resume", str(out / ("stopped" + name))])
    torch.save(seen, out / f"rank{rank}.pt")


def interrupting(function, at_call):
    """`function`, except that its call number `at_call` raises KeyboardInterrupt, as Ctrl-C would."""
    calls = []

    def wrapped(*args):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return function(*args)
    return wrapped


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def two_ranks_started(request, cache, tmp_path_factory):
    """two_rank_job in two spawned processes, started when the session starts if a selected test needs two_ranks:
    most tests keep one core busy (a run sets torch to one thread), so the ranks run beside them on the cores left
    instead of after them. At a lower priority, so that the tests keep their core; with a cache of their own, as
    other tests inspect and lock the shared one meanwhile. Yields the processes and the out folder, or None."""
    if not any("two_ranks" in item.fixturenames for item in request.session.items):
        yield None
        return
    base_policy = request.getfixturevalue("base_policy")
    out = tmp_path_factory.mktemp("two-ranks")
    ppo.save_adapter(base_policy.model, out / "policy")
    torch.save(base_policy.value_head.state_dict(), out / "policy" / "value_head.pt")
    shutil.copytree(cache / "builtin-seed1", out / "cache" / "builtin-seed1")
    ranks = torch.multiprocessing.start_processes(two_rank_job, args=(free_port(), out / "policy", out / "cache", out),
                                                  nprocs=2, join=False, start_method="spawn")
    for process in ranks.processes:  # from their start, their imports too
        os.setpriority(os.PRIO_PROCESS, process.pid, 10)
    yield ranks, out
    for process in ranks.processes:  # still running only if the session ended before a test needed them
        if process.is_alive():
            process.terminate()
        process.join()


@pytest.fixture(scope="session")
def two_ranks(two_ranks_started):
    """What each rank of two_rank_job saw, and the out folder, once both have finished."""
    ranks, out = two_ranks_started
    while not ranks.join():  # raises if a rank failed
        pass
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out  # written by the children above


def read_page(page):
    """The episodes of a page: [(deal seed, return, [(picture, input picture, answer, action, reward)])]."""
    episodes = []
    for line in page.read_text().splitlines():
        if m := re.match(r"## Episode \d+ \(deal seed (\d+)\): return (\S+)", line):
            episodes.append((int(m[1]), float(m[2]), []))
        elif m := re.match(r"\| \d+ \| !\[\]\((\S+)\) \| !\[\]\((\S+)\) \| `(.*)` \| (.+) \| (\S+) \|$", line):
            episodes[-1][2].append((page.parent / m[1], page.parent / m[2], m[3], m[4], float(m[5])))
    return episodes


class RunsCode:
    """A pickle payload: unpickling it would create the file `marker`."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def damage(run, kind):
    """Damage a stopped run folder (checkpoint-00001 and -00002, latest at 2) as `kind` says."""
    checkpoint = run / "checkpoint-00002"
    if kind == "truncated state.pt":
        (checkpoint / "state.pt").write_bytes((checkpoint / "state.pt").read_bytes()[:1000])
    elif kind == "missing envs.json":
        (checkpoint / "envs.json").unlink()
    elif kind == "latest names nothing":
        (run / "latest").write_text("checkpoint-00009")
    elif kind == "damaged metrics line":
        lines = (run / "metrics.jsonl").read_text().splitlines()
        (run / "metrics.jsonl").write_text("\n".join([lines[0][:30]] + lines[1:]) + "\n")
    elif kind == "half-written cached model":
        for weights in Path(json.loads((run / "settings.json").read_text())["cache_dir"]).glob("sft-*/model.safetensors"):
            weights.write_bytes(weights.read_bytes()[:5000])  # the run's warm start among them
    elif kind == "pickle payload in envs.json":
        (checkpoint / "envs.json").write_bytes(pickle.dumps(RunsCode(run.parent / "marker")))
    elif kind == "pickle payload in state.pt":
        torch.save({"update": RunsCode(run.parent / "marker")}, checkpoint / "state.pt")
    return {"truncated state.pt": "state.pt", "missing envs.json": "envs.json", "latest names nothing": "latest",
            "damaged metrics line": "metrics.jsonl", "half-written cached model": "sft-",
            "pickle payload in envs.json": "envs.json", "pickle payload in state.pt": "state.pt"}[kind]


@pytest.fixture(scope="module")
def stopped_run(cache, tmp_path_factory):
    """A run stopped (Ctrl-C) during update 3 with a checkpoint after each update: 1 and 2 kept."""
    out = tmp_path_factory.mktemp("stopped")
    shutil.copytree(cache, out / "cache")  # its own cache, which one of the tests damages
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as e:
        patch.setattr(rl4vlm, "ppo_update", interrupting(rl4vlm.ppo_update, at_call=3))
        rl4vlm.main(FAST + ["--cache-dir", str(out / "cache"), "--out-dir", str(out), "--run-name", "run",
                            "--checkpoint-every", "1"])
    assert e.value.code == 130
    return out / "run"



def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("rollout_seconds", "steps_per_second")} for r in rows]


def strip_seconds(results):
    """A run's results without the seconds each evaluation took."""
    return {stage: {k: v for k, v in r.items() if k != "seconds"} for stage, r in results.items()}


def write_sft_data(folder, n=4):
    """A JSONL of n expert answers for NumberLine states, pictures saved beside it."""
    task = envs.get_task("numberline")
    obs, infos = states(n, seed=100)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for k, (image, info) in enumerate(zip(obs, infos)):
        Image.fromarray(image).save(folder / f"{k}.png")
        lines.append(json.dumps({"image": f"{k}.png", "prompt": task.prompt(info, True),
                                 "answer": task.answer(info, task.expert(info), True)}))
    (folder / "sft.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "sft.jsonl"


def ppo_step(policy, s, samples, lr=1e-2):
    """One PPO update of one epoch over `samples` (one step: advantages +1, -1, ...)."""
    n = len(samples)
    advantages = torch.tensor([[(-1.0) ** k for k in range(n)]])
    s = replace(s, update_epochs=1, minibatch_size=n, micro_batch=2, target_kl=0.0)  # no trust region: it steps
    return rl4vlm.ppo_update(policy, torch.optim.AdamW(trainable(policy), lr=lr), samples, advantages,
                             advantages.clone(), s, np.random.default_rng(0))


# --- rl4vlm.py, with tiny random models of other families --------------------------------
# Tiny random LLaVA, Idefics3 and Gemma3 models are built here from configs (offline), saved to a
# folder and driven through `--model FOLDER`.
#
# Qwen2-VL cannot go through `--model FOLDER` here: its processor insists on a video processor,
# and video processors need torchvision, which does not import next to the CPU torch here. The
# Qwen2-VL model itself builds, so a stand-in for the processor's image path drives it through
# act / forward / ppo_update (3-D rotary positions, mm_token_type_ids, flat pixel_values).


def build_llava(folder):
    """LLaVA-1.5 layout: CLIP vision tower, projector, Llama; chat turns in Vicuna style; no pad
    token, as Mistral's tokenizer (LLaVA-NeXT's) has none."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    tok = bpe_tokenizer(["<unk>", "<s>", "</s>", "<image>"], add_bos=True, unk_token="<unk>", bos_token="<s>",
                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{{ 'USER: ' if m['role'] == 'user' else 'ASSISTANT: ' }}"
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}{{ ' ' if m['role'] == 'user' else '</s>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    px, patch = 32, 8
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**TINY, image_size=px, patch_size=patch),
        text_config=LlamaConfig(**TINY, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=(px // patch) ** 2,
        image_token_index=tok.convert_tokens_to_ids("<image>"))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": px}, crop_size={"height": px, "width": px}),
        tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)
    return LlavaForConditionalGeneration(config), processor


def build_idefics3(folder):
    """Idefics3 (SmolVLM's architecture): SigLIP-style vision model, pixel shuffle, Llama named text_model."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig)
    tok = bpe_tokenizer(["<|pad|>", "<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                         "<global-img>"], pad_token="<|pad|>", bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>")
    # Idefics3's own template: "User:<image>...<end_of_utterance>\nAssistant: ..."
    template = ("<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
                "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
    px, patch, scale = 32, 8, 2
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**TINY, image_size=px, patch_size=patch),
        text_config=LlamaConfig(**TINY, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        scale_factor=scale, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": px}, max_image_size={"longest_edge": px},
                                                  do_image_splitting=False),
        tokenizer=tok, image_seq_len=(px // patch) ** 2 // scale ** 2, chat_template=template)
    return Idefics3ForConditionalGeneration(config), processor


BUILDERS = {"llava": build_llava, "idefics3": build_idefics3, "gemma3": build_gemma3}


@pytest.fixture(scope="module", params=list(BUILDERS))
def folder(request, tmp_path_factory):
    """A tiny random model of one family, saved as a hub checkpoint is."""
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model, processor = BUILDERS[request.param](path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def llava(tmp_path):
    path = tmp_path / "llava"
    torch.manual_seed(0)
    model, processor = build_llava(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def fast_args(folder, tmp_path, *extra):
    return ["--model", str(folder), "--env", "numberline", "--num-envs", "2", "--num-steps", "2", "--total-steps", "4",
            "--sft-steps", "2", "--sft-batch", "2", "--eval-episodes", "2", "--max-new-tokens", "8",
            "--minibatch-size", "4", "--micro-batch", "2", "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path), *extra]


def load(folder, **settings):
    """The policy as run() sees it: loaded from the folder, answering as the settings say, LoRA on the default
    targets (B made random so that the adapters take part), a value head."""
    s = envs.get_task("numberline").with_defaults(rl4vlm.Settings(**settings))
    policy = replace(rl4vlm.load_policy(str(folder), "cpu", s.dtype), temperature=s.temperature,
                     max_new_tokens=s.max_new_tokens, thought_coef=s.thought_coef)
    torch.manual_seed(0)
    rl4vlm.add_trainable(policy, replace(s, lora_rank=4, lora_alpha=8.0))
    for _, m in ppo.lora_modules(policy.model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    return s, policy


class Qwen2VLStandIn:
    """What Qwen2VLProcessor does for one image per text (the class itself cannot be built here)."""
    def __init__(self, image_processor, tokenizer, chat_template):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def __call__(self, images, text, return_tensors, add_special_tokens=True):
        pixels = self.image_processor(images=images, return_tensors=return_tensors)  # pixel_values (patches, 3*2*8*8)
        n = int(pixels["image_grid_thw"][0].prod()) // self.image_processor.merge_size ** 2
        enc = self.tokenizer([t.replace("<|image_pad|>", "<|image_pad|>" * n) for t in text],
                             return_tensors=return_tensors, add_special_tokens=add_special_tokens)
        enc["mm_token_type_ids"] = (enc["input_ids"] == self.tokenizer.convert_tokens_to_ids("<|image_pad|>")).long()
        return {**enc, **pixels}


# ======================================================================================
# envs.py: every rule of the gym-cards rules file, the task table, the solvers and the experts
# ======================================================================================
# --- gymnasium frame -------------------------------------------------------------------


@pytest.mark.parametrize("env_id", IDS)
def test_registered_with_300_step_limit_and_picture_space(env_id):
    env = gym.make(env_id)
    assert env.spec.max_episode_steps == 300
    assert env.observation_space == gym.spaces.Box(0, 255, (300, 300, 3), np.uint8)
    obs, info = env.reset(seed=1)
    assert obs.shape == (300, 300, 3) and obs.dtype == np.uint8 and isinstance(info, dict)


@pytest.mark.parametrize("env_id", IDS)
def test_check_env_passes_without_warnings(env_id):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(gym.make(env_id).unwrapped)
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("env_id", IDS)
def test_same_seed_same_pictures_and_rewards_different_seeds_differ(env_id):
    pictures, rewards = play(env_id, seed=7)
    random.seed(99)  # the global generators must play no part
    np.random.seed(99)
    pictures2, rewards2 = play(env_id, seed=7)
    assert rewards == rewards2 and len(pictures) == len(pictures2)
    assert all(np.array_equal(a, b) for a, b in zip(pictures, pictures2))
    first_pictures = {play(env_id, seed=s, steps=0)[0][0].tobytes() for s in range(8)}
    assert len(first_pictures) > 1, "different seeds gave the same first picture"


@pytest.mark.parametrize("env_id", IDS)
def test_info_is_a_snapshot(env_id):
    env = gym.make(env_id)
    _, info = env.reset(seed=3)
    before = json.dumps(info)
    env.step(0)
    assert json.dumps(info) == before, "a stored info changed when the env moved on"


def test_cached_picture_equals_a_fresh_drawing_for_every_number_line_state():
    env = make("gym_cards/NumberLine-v0")
    for position in range(6):
        for target in range(6):
            env.position, env.target = position, target
            assert np.array_equal(env.render(), painted(env)), (position, target)


@pytest.mark.parametrize("env_id", IDS[1:])
def test_cached_picture_equals_a_fresh_drawing_on_random_play(env_id):
    envs.tile.cache_clear()
    pictures = 0
    for env in random_play_states(env_id, 150):
        assert np.array_equal(env.render(), painted(env)), env.info()
        pictures += 1
    # and a wide formula (Points) or a second row of cards (Blackjack), where layouts wrap
    env = make(env_id)
    if env_id.endswith("Blackjack-v0"):
        env.player = [1, 2, 3, 4, 5, 6, 7]
    else:
        env.formula = ["10", "*", "(", "10", " ", "/"] * (env.max_entries // 6 + 1)
    assert np.array_equal(env.render(), painted(env))
    assert pictures == 150


def test_each_sprite_is_painted_once_and_pictures_are_new_arrays():
    env = make("gym_cards/NumberLine-v0", position=2, target=4)
    first = env.render()
    painted = envs.tile.cache_info().misses
    env.position = 3
    assert not np.array_equal(env.render(), first)
    assert envs.tile.cache_info().misses <= painted + 1, "only the new number's line may be painted"
    env.position = 2
    again = env.render()
    assert envs.tile.cache_info().misses <= painted + 1, "a state seen before must be made of cached tiles"
    assert np.array_equal(again, first) and again is not first and again.flags.writeable


# --- NumberLine ------------------------------------------------------------------------


def test_number_line_start_and_target_draw_with_the_mod_5_quirk():
    seen_equal = set()
    for seed in range(400):
        rng, _ = seeding.np_random(seed)
        start, target = int(rng.integers(0, 6)), int(rng.integers(0, 6))
        info = make("gym_cards/NumberLine-v0", seed).info()
        assert info["Current"] == start
        if start == target:
            seen_equal.add(start)
            assert info["Target"] == (target + 1) % 5
        else:
            assert info["Target"] == target
    assert 5 in seen_equal, "no seed tested the 5-and-5 case (target must become 1)"


def test_number_line_actions_and_rewards():
    env = make("gym_cards/NumberLine-v0", position=2, target=4)
    assert env.actions == ("-", "+")
    assert env.step(1)[1:4] == (0.0, False, False) and env.position == 3  # "+" moves up, closer: 0
    assert env.step(0)[1:4] == (-1.0, False, False) and env.position == 2  # "-" moves down, away: -1
    env.step(1)
    _, reward, terminated, truncated, info = env.step(1)
    assert (reward, terminated, truncated, info) == (1.0, True, False, {"Target": 4, "Current": 4})


@pytest.mark.parametrize("position,action,target", [(0, 0, 3), (5, 1, 2)])
def test_number_line_blocked_at_an_end_gives_minus_1(position, action, target):
    env = make("gym_cards/NumberLine-v0", position=position, target=target)
    assert env.step(action)[1:4] == (-1.0, False, False) and env.position == position


def test_number_line_truncated_after_10_steps():
    env = make("gym_cards/NumberLine-v0", position=0, target=5)
    for step in range(1, 11):
        _, _, terminated, truncated, _ = env.step(0)
        assert not terminated and truncated == (step == 10)


def test_number_line_reaching_target_on_step_10_is_terminated_not_truncated():
    env = make("gym_cards/NumberLine-v0", position=0, target=1)
    for _ in range(9):
        env.step(0)
    assert env.step(1)[1:4] == (1.0, True, False)


# --- Points (EZPoints, Points24) -------------------------------------------------------


def test_points_action_indices():
    assert envs.EZPointsEnv.actions == tuple(str(n) for n in range(1, 11)) + ("+", "*", "=")
    assert envs.Points24Env.actions == tuple(str(n) for n in range(1, 11)) + ("+", "-", "*", "/", "(", ")", "=")


def test_ez_points_deal_distribution():
    second_cards, first_ranks, swapped = {}, set(), 0
    env = envs.EZPointsEnv()
    for seed in range(3000):
        rng, _ = seeding.np_random(seed)
        rank = int(rng.integers(2, 14))  # card 1 is drawn first, then maybe swapped
        env.np_random, _ = seeding.np_random(seed)  # reset(seed=seed) without drawing the picture
        env.deal()
        first = 0 if env.ranks[0] == rank else 1
        assert env.ranks[first] == rank and env.ranks[1 - first] <= 10, "card 2 is a plain number card"
        assert set(env.suits) <= set("SHCD")
        second_cards.setdefault(min(rank, 10), []).append(env.numbers[1 - first])
        first_ranks.add(rank)
        swapped += first
    assert first_ranks == set(range(2, 14))
    assert 1300 < swapped < 1700, "the cards swap places half the time"
    for value, seconds in second_cards.items():
        products = sum(value * s == 12 and value + s != 12 for s in seconds)
        assert all(value + s == 12 or value * s == 12 for s in seconds)
        if value in (2, 3, 4):  # (6 * 2 and 6 + 6 are both 12: nothing to tell apart)
            assert 0.35 < products / len(seconds) < 0.65, (value, products, len(seconds))
        elif value != 6:
            assert products == 0


def test_points24_deal_distribution():
    ranks = Counter()
    env = envs.Points24Env()
    env.reset(seed=0)
    for _ in range(1000):
        env.deal()
        assert len(env.ranks) == 4 and env.numbers == [min(r, 10) for r in env.ranks]
        ranks.update(env.ranks)
    assert set(ranks) == set(range(1, 14)) and max(ranks.values()) < 2 * min(ranks.values())
    assert make("gym_cards/Points24-v0", ranks=[1, 11, 12, 13], suits=list("SHCD")).info()["Cards"] == ["AS", "JH", "QC", "KD"]


@pytest.mark.parametrize("env_id,limit", [("gym_cards/EZPoints-v0", 5), ("gym_cards/Points24-v0", 20)])
def test_points_formula_too_long_ends_terminated_with_minus_1(env_id, limit):
    env = make(env_id, formula=["+"] * limit)
    assert press(env, "+") == (0.0, False, False) and len(env.formula) == limit + 1
    assert press(env, "=") == (-1.0, True, False), "'=' comes after the length check; an end, not a time limit"
    env.formula = ["+"] * limit
    assert press(env, "=")[1] is True, f"{limit} entries may still be evaluated"


@pytest.mark.parametrize("env_id,limit", [("gym_cards/EZPoints-v0", 5), ("gym_cards/Points24-v0", 20)])
def test_the_formula_too_long_ending_is_not_bootstrapped_so_its_value_is_minus_1(env_id, limit):
    # the step's final state is the state it came from: bootstrapped, V's target there is -1 + gamma V, whose fixed
    # point is -1 / (1 - gamma) = -10; not bootstrapped, the target is -1 whatever V says
    env = make(env_id, formula=["+"] * (limit + 1))
    reward, terminated, truncated = press(env, "+")
    flags = [torch.tensor([[flag]]) for flag in (terminated, truncated)]
    value = torch.zeros(1, 1)
    for _ in range(200):  # the critic fitted to its own target, again and again
        _, value = ppo.compute_gae(torch.tensor([[reward]]), value, value, *flags, 0.9, 0.95)
    assert value.item() == -1.0


def test_points_illegal_number_appends_a_blank():
    env = make("gym_cards/EZPoints-v0", ranks=[6, 6], formula=[])
    assert press(env, "6", "+", "6") == (0.0, False, False)
    assert press(env, "6") == (-1.0, False, False) and env.formula == ["6", "+", "6", " "]
    assert press(env, "5") == (-1.0, False, False) and env.formula[-1] == " "
    assert press(env, "=") == (10.0, True, False), "'6+6 ' still evaluates to 12"


def test_points_equals_is_not_appended_and_rewards():
    env = make("gym_cards/EZPoints-v0", ranks=[2, 6], formula=[])
    assert press(env, "2", "*", "6", "=") == (10.0, True, False) and env.formula == ["2", "*", "6"]
    env = make("gym_cards/EZPoints-v0", ranks=[2, 6], formula=[])
    assert press(env, "2", "+", "6", "=") == (-1.0, True, False)
    env = make("gym_cards/EZPoints-v0", ranks=[13, 2], formula=[])  # a king counts as 10
    assert press(env, "10", "+", "2", "=") == (10.0, True, False)


def test_points_every_card_used_exactly_once():
    assert press(make("gym_cards/Points24-v0", ranks=[4, 6, 1, 1], formula=[]), "4", "*", "6", "=")[0] == -1.0
    assert press(make("gym_cards/Points24-v0", ranks=[4, 6, 1, 1], formula=[]), "4", "*", "6", "*", "1", "=")[0] == -1.0
    assert press(make("gym_cards/Points24-v0", ranks=[4, 6, 1, 1], formula=[]), "4", "*", "6", "*", "1", "*", "1", "=")[0] == 10.0


def test_points_numbers_join_and_double_star_is_a_power():
    assert envs.formula_value("".join(["2", "10"])) == 210
    assert press(make("gym_cards/EZPoints-v0", ranks=[2, 10], formula=[]), "2", "10", "=") == (-1.0, True, False)
    # 2 then 4 is 24: every card used once, so the env accepts it, as eval would
    assert press(make("gym_cards/Points24-v0", ranks=[2, 4, 1, 1], formula=[]), "2", "4", "*", "1", "*", "1", "=")[0] == 10.0
    assert envs.formula_value("2**3") == 8
    assert press(make("gym_cards/Points24-v0", ranks=[2, 3, 3, 1], formula=[]), "2", "*", "*", "3", "*", "3", "*", "1", "=")[0] == 10.0
    assert envs.formula_value("8//3") == 2, "'/' twice is a floor division"


def test_points_division_compared_exactly_in_floats():
    assert envs.formula_value("8/(3-8/3)") == eval("8/(3-8/3)") != 24
    formula = ["8", "/", "(", "3", "-", "8", "/", "3", ")"]
    assert press(make("gym_cards/Points24-v0", ranks=[8, 3, 8, 3], formula=formula), "=")[0] == -1.0
    formula = ["6", "/", "(", "1", "-", "3", "/", "4", ")"]  # 6/0.25 is exactly 24.0
    assert press(make("gym_cards/Points24-v0", ranks=[6, 1, 3, 4], formula=formula), "=")[0] == 10.0
    assert not envs.points24_solvable([3, 3, 8, 8]) and envs.points24_solvable([1, 3, 4, 6])


def test_points_bad_syntax_and_division_by_zero_give_minus_1():
    assert press(make("gym_cards/Points24-v0", ranks=[2, 1, 1, 3], formula=[]), "2", "+", "=") == (-1.0, True, False)
    formula = ["2", "/", "(", "1", "-", "1", ")", "*", "3"]
    assert press(make("gym_cards/Points24-v0", ranks=[2, 1, 1, 3], formula=formula), "=") == (-1.0, True, False)
    assert press(make("gym_cards/EZPoints-v0", ranks=[2, 10], formula=[]), "=") == (-1.0, True, False)


def test_formula_value_matches_eval_and_a_huge_power_is_no_number():
    assert envs.formula_value("10**10**10") is None and envs.formula_value("1**10**10**10") is None
    rng = np.random.default_rng(0)
    tokens = list(envs.Points24Env.actions[:-1]) + [" "]
    for _ in range(3000):
        text = "".join(rng.choice(tokens, size=int(rng.integers(1, 8))))
        if text.count("**") > 1:
            continue  # eval itself could hang
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)  # eval warns about calls like (1)(2)
            try:
                expected = eval(text)
            except (SyntaxError, ArithmeticError, TypeError):
                expected = None
        expected = None if isinstance(expected, tuple) else expected  # "()" is no number
        assert envs.formula_value(text) == expected, text


# --- Solvers and experts for the Points tasks ------------------------------------------


def test_points_solver_writes_env_formulas_that_the_env_accepts():
    for numbers in [(1, 2, 3, 4), (1, 5, 5, 5), (3, 3, 7, 7), (1, 1, 10, 10), (2, 2, 2, 9)]:
        for entries in envs.solutions(numbers, 24, "+-*/")[:40]:
            assert all(e in envs.Points24Env.actions for e in entries) and len(entries) <= 20
            assert not any(a.isdigit() and b.isdigit() for a, b in zip(entries, entries[1:])), entries
            env = make("gym_cards/Points24-v0", ranks=list(numbers), formula=[])
            assert press(env, *entries, "=") == (10.0, True, False), entries


@pytest.mark.slow
def test_points24_solvable_count():
    deals = list(combinations_with_replacement(range(1, 11), 4))
    solvable = [d for d in deals if envs.points24_solvable(list(d))]
    assert not envs.points24_solvable([1, 1, 1, 1]) and envs.points24_solvable([1, 2, 3, 4])
    # 566 deals make 24 in exact fractions; 3 3 8 8 (only 8/(3-8/3)) fails in floats
    assert len(deals) == 715 and len(solvable) == 565


def test_points_expert_follows_a_solution_prefix():
    expert = envs.get_task("points24").expert
    actions = envs.Points24Env.actions
    info = {"Numbers": [4, 6, 1, 1], "Formula": []}
    moves = []
    while (a := expert(info)) is not None and actions[a] != "=":
        info["Formula"].append(actions[a])
        moves.append(actions[a])
    assert envs.formula_value("".join(moves)) == 24 and actions[a] == "="
    # a dead end, and an unsolvable deal: no move wins, "=" ends the deal at one -1 (any other path ends at -1 or less)
    assert actions[expert({"Numbers": [4, 6, 1, 1], "Formula": ["(", "("]})] == "="
    assert actions[expert({"Numbers": [1, 1, 1, 1], "Formula": []})] == "="
    assert envs.get_task("ezpoints").expert({"Numbers": [6, 6], "Formula": ["6", "+", "6"]}) == 12  # "="


def test_expert_success_number_line_and_ez_points_100_percent():
    for name in ("numberline", "ezpoints"):
        returns = expert_returns(envs.get_task(name), 3000, seed=0)
        assert all(envs.is_success(r) for r in returns), name


@pytest.mark.parametrize("name", ["numberline", "ezpoints", "points24", "blackjack"])
def test_expert_through_the_gymnasium_api(name):
    task = envs.get_task(name)
    env = gym.make(task.env_id)
    returns = []
    for episode in range(30):
        _, info = env.reset(seed=0) if episode == 0 else env.reset()
        total, done = 0.0, False
        while not done and (action := task.expert(info)) is not None:
            _, reward, terminated, truncated, info = env.step(action)
            total, done = total + reward, terminated or truncated
        returns.append(total)
    assert returns == expert_returns(task, 30, seed=0), "the tests' expert loop plays other games"


def test_expert_success_points24_is_exactly_the_solvable_share():
    task, env = envs.get_task("points24"), envs.Points24Env()
    env.reset(seed=0)
    successes = solvable = 0
    for _ in range(2000):
        env.deal()
        solvable += envs.points24_solvable(env.numbers)
        episode_return, done = 0.0, False
        while not done and (action := task.expert(env.info())) is not None:
            reward, terminated, truncated = env.play(action)
            episode_return, done = episode_return + reward, terminated or truncated
        successes += envs.is_success(episode_return)
    assert successes == solvable and 0.5 < solvable / 2000 < 0.95


# --- Blackjack -------------------------------------------------------------------------


def test_blackjack_plays_card_for_card_like_gymnasium():
    action_rng = np.random.default_rng(0)
    for seed in range(500):
        ours, theirs = make("gym_cards/Blackjack-v0", seed), GymnasiumBlackjack()
        theirs.reset(seed=seed)
        assert ours.info() == {"Dealer": theirs.dealer, "Player": theirs.player}, seed
        done = False
        while not done:
            action = int(action_rng.integers(2))
            _, reward, done, truncated, info = ours.step(action)
            assert (reward, done, truncated) == theirs.step(action)[1:4], seed
            assert info == {"Dealer": theirs.dealer, "Player": theirs.player}, seed


def test_blackjack_deck_and_face_up_card():
    ranks, values, up_ranks = Counter(), Counter(), Counter()
    for seed in range(600):
        env = make("gym_cards/Blackjack-v0", seed)
        ranks.update(env.player)
        values.update(env.info()["Player"])
        up_ranks[env.dealer[0]] += 1
        assert env.info()["Dealer"][0] == min(env.dealer[0], 10)
    assert set(ranks) == set(range(1, 14)) and 2 * values[7] < values[10] < 6 * values[7], "J/Q/K/10 count 10"
    assert 10 not in up_ranks and {11, 12, 13} <= set(up_ranks), "like gymnasium, a ten-valued up card shows J/Q/K"


@pytest.mark.parametrize("dealer,drawn", [([10, 6], True), ([1, 5], True), ([10, 7], False), ([1, 6], False)])
def test_blackjack_dealer_draws_to_17_counting_a_usable_ace_as_11(dealer, drawn):
    for seed in range(20):
        env = make("gym_cards/Blackjack-v0", seed, dealer=list(dealer), player=[10, 9])
        env.step(0)
        assert (len(env.dealer) > 2) == drawn
        final = env.total(env.dealer)
        assert final >= 17 and all(env.total(env.dealer[:k]) < 17 for k in range(2, len(env.dealer)))


@pytest.mark.parametrize("player,dealer,reward", [([10, 9], [10, 8], 1.0), ([10, 7], [10, 8], -1.0),
                                                  ([10, 8], [10, 8], 0.0), ([1, 10], [10, 1], 0.0),
                                                  ([10, 2], [10, 6, 10], 1.0), ([1, 9], [10, 9], 1.0)])
def test_blackjack_stand_rewards(player, dealer, reward):
    env = make("gym_cards/Blackjack-v0", player=player, dealer=dealer)
    assert env.step(0)[1:4] == (reward, True, False)


def test_blackjack_hit_rewards_and_usable_ace():
    env = make("gym_cards/Blackjack-v0", player=[10, 10], dealer=[10, 7])
    env.draw_rank = lambda: 5
    assert env.step(1)[1:4] == (-1.0, True, False), "bust on hit: -1, terminated"
    env = make("gym_cards/Blackjack-v0", player=[1, 5], dealer=[10, 7])
    env.draw_rank = lambda: 10
    assert env.step(1)[1:4] == (0.0, False, False) and env.total(env.player) == 16, "the ace drops to 1"
    assert envs.hand_total([1, 1, 9]) == (21, 1) and envs.hand_total([1, 5, 10]) == (16, 0)


def test_blackjack_dp_policy_and_optimum():
    policy, expected, win = envs.blackjack_optimum()
    assert 0.42 < win < 0.44 and -0.06 < expected < -0.03
    assert policy[(20, 0, 10)] == 0 and policy[(11, 0, 10)] == 1 and policy[(16, 0, 10)] == 1
    assert policy[(12, 0, 4)] == 0 and policy[(13, 0, 2)] == 0 and policy[(12, 0, 2)] == 1
    assert policy[(18, 1, 9)] == 1 and policy[(18, 1, 7)] == 0 and policy[(17, 1, 6)] == 1
    assert len(policy) == 10 * (18 + 10)  # hard 4..21 and soft 12..21 against ten up cards


def test_blackjack_expert_wins_as_the_optimum_says():
    returns = expert_returns(envs.get_task("blackjack"), 20_000, seed=0)
    win_rate = np.mean([envs.is_success(r) for r in returns])
    assert abs(win_rate - envs.blackjack_optimum()[2]) < 0.01, win_rate


# --- The task table --------------------------------------------------------------------


def test_get_task_by_id_or_short_name():
    assert list(envs.TASKS) == IDS
    for env_id in IDS:
        short = env_id.split("/")[1].split("-")[0]
        assert envs.get_task(env_id) is envs.get_task(short.lower()) is envs.get_task(short.upper()) is envs.TASKS[env_id]
    with pytest.raises(ValueError, match="numberline"):
        envs.get_task("pong")
    assert envs.get_task("blackjack").actions == ("stand", "hit")
    assert envs.is_success(0.5) and not envs.is_success(0.0) and not envs.is_success(-1.0)


@pytest.mark.parametrize("env_id", IDS)
def test_prompts_and_answers(env_id):
    task, env = envs.TASKS[env_id], gym.make(env_id)
    for seed in range(20):
        _, info = env.reset(seed=seed)
        for cot in (True, False):
            prompt = task.prompt(info, cot)
            assert task.name in prompt and all(json.dumps(a) in prompt for a in task.actions)
            assert ('"thoughts"' in prompt) == cot and prompt.rstrip("}").endswith('"action": "<legal action>"')
        if "Formula" in info:
            assert f'Formula: "{" ".join(info["Formula"])}"' in task.prompt(info, True)
        answers = [json.loads(task.answer(info, a, True)) for a in range(len(task.actions))]
        for action, answer in enumerate(answers):
            keys = list(answer)
            assert keys[-2:] == ["thoughts", "action"] and answer["action"] == task.actions[action]
            assert {k: v for k, v in answer.items() if k != "action"} == {k: v for k, v in answers[0].items() if k != "action"}
        assert json.loads(task.answer(info, 0, False)) == {"action": task.actions[0]}
        labels = task.labels(info)
        assert len(labels) == len(task.label_classes) and all(0 <= l < n for l, n in zip(labels, task.label_classes))
        if task.expert(info) is not None:
            assert 0 <= task.expert(info) < len(task.actions)


def test_answers_read_the_state_truly():
    nl, ez, bj = envs.get_task("numberline"), envs.get_task("ezpoints"), envs.get_task("blackjack")
    assert json.loads(nl.answer({"Target": 4, "Current": 2}, 1, True)) == {
        "current": 2, "target": 4, "thoughts": "target is above current", "action": "+"}
    info = {"Cards": ["2S", "KH"], "Numbers": [2, 10], "Formula": ["2", "+"]}
    assert json.loads(ez.answer(info, 9, True)) == {"cards": [2, 10], "formula": "2 +",
                                                    "thoughts": "sorted: 2 10, plan: 2 + 10, to write: 10", "action": "10"}
    assert ez.labels(info) == [1, 9]
    info = {"Dealer": [1, 10], "Player": [1, 6]}
    assert json.loads(bj.answer(info, 0, True)) == {"dealer": 1, "player": 17, "thoughts": "soft 17 against 1", "action": "stand"}
    assert bj.labels(info) == [0, 17, 1]


def test_points_thoughts_state_the_plan_and_what_is_left_of_it():
    ez, p24 = envs.get_task("ezpoints"), envs.get_task("points24")
    cards = lambda numbers, *formula: {"Numbers": numbers, "Formula": list(formula)}
    # the first solution, shortest then in entry order, that continues the formula: 2 * 6 before 6 * 2
    assert ez.thought(cards([6, 2])) == "sorted: 2 6, plan: 2 * 6, to write: 2 * 6"
    assert ez.thought(cards([6, 2], "6")) == "sorted: 2 6, plan: 6 * 2, to write: * 2"
    assert ez.thought(cards([6, 2], "2", "*", "6")) == "sorted: 2 6, plan: 2 * 6, to write: ="
    assert ez.thought(cards([6, 2], "2", "+")) == "sorted: 2 6, plan: none, to write: ="   # a dead end
    assert ez.thought(cards([6, 2], " ")) == "sorted: 2 6, plan: none, to write: ="       # a blank from an illegal number
    # the expert writes the plan's next entry, "=" once it is written, "=" in a dead end (12: "=")
    assert [ez.expert(cards([6, 2], *f)) for f in ([], ["6"], ["2", "*", "6"], ["2", "+"])] == [1, 11, 12, 12]
    assert p24.thought(cards([4, 1, 3, 2])) == "sorted: 1 2 3 4, plan: 1 * 2 * 3 * 4, to write: 1 * 2 * 3 * 4"
    assert p24.thought(cards([1, 1, 1, 1])) == "sorted: 1 1 1 1, plan: none, to write: ="  # no solution at all


def test_warm_start_actions_follow_the_expert_at_the_share_given():
    rng, n, task = np.random.default_rng(0), 20_000, envs.get_task("ezpoints")  # 13 actions
    draws = [task.follow_or_random(3, 0.75, rng) for _ in range(n)]
    # the expert's action with probability 0.75, else uniform over 13 (which includes it): 0.75 + 0.25 / 13
    assert abs(draws.count(3) / n - (0.75 + 0.25 / 13)) < 0.01
    assert abs(draws.count(5) / n - 0.25 / 13) < 0.005
    assert all(task.follow_or_random(3, 1.0, rng) == 3 for _ in range(100))
    assert len({task.follow_or_random(None, 1.0, rng) for _ in range(200)}) == 13  # no expert: random


def test_blackjack_expert_and_labels_use_only_the_face_up_card():
    bj = envs.get_task("blackjack")
    for hidden in range(1, 11):
        info = {"Dealer": [6, hidden], "Player": [10, 2]}
        assert bj.expert(info) == bj.expert({"Dealer": [6, 1], "Player": [10, 2]}) == 0
        assert bj.labels(info) == [5, 12, 0] and bj.answer(info, 1, True) == bj.answer({"Dealer": [6], "Player": [10, 2]}, 1, True)


# ======================================================================================
# parse.py: the cases table (« » mark the expected span of the value; the markers are removed)
# and random strings
# ======================================================================================


NL = ["-", "+"]


BJ = ["stand", "hit"]


EZ = [str(i) for i in range(1, 11)] + ["+", "*", "="]


P24 = [str(i) for i in range(1, 11)] + ["+", "-", "*", "/", "(", ")", "="]


CASES = [
    # NumberLine
    ('{"current position": 3, "target position": 5, "thoughts": "move right", "action": "«+»"}', NL, "+"),
    ('{"action": "«-»"}', NL, "-"),
    ("{'action': '«+»'}", NL, "+"),  # single quotes
    ('{"action": «-»}', NL, "-"),  # unquoted
    ('"action":"«+»"', NL, "+"),  # no spaces
    ('{"action" :   " «+» "  }', NL, "+"),  # extra spaces, inside the quotes too
    ('We should go right. "ACTION": "«+»"', NL, "+"),  # upper-case key
    ('{"thoughts": "closer", "action": "«+»"}\nThis moves the position to 4.', NL, "+"),  # text after the JSON
    ('{"action": "«+ or -»"}', NL, None),  # names two actions
    ('{"action": "«»"}', NL, None),  # empty value
    ('{"thoughts": "go left", "actions": "-"}', NL, None),  # "actions" is not "action"
    ('{"thoughts": "go right", "action": "«+»', NL, "+"),  # cut off
    ('{"action":\n  "«-»"}', NL, "-"),  # value on the next line
    # Blackjack
    ('```json\n{"dealer": 10, "player": 15, "thoughts": "risky", "action": "«stand»"}\n```', BJ, "stand"),
    ('{"action": "«Hit»"}', BJ, "hit"),  # case-insensitive
    ('{"action": "«hit or stand»"}', BJ, None),
    ('{"action": "hit", "action": "«stand»"}', BJ, "stand"),  # two keys: the last wins
    ('{"thoughts": "action: hit would bust", "action": "«stand»"}', BJ, "stand"),
    ("Action: «hit»", BJ, "hit"),  # prose, unquoted
    ('{"action": "«hitting»"}', BJ, None),
    ('{"thoughts": "17 is low", "action": "«hit»\n', BJ, "hit"),  # cut off at a newline
    ('{"next_action": "hit"}', BJ, None),
    ("{'thoughts': 'stay', 'action': '«stand»'}\nDone.", BJ, "stand"),
    ('{"action": "stand" } {"action": «hit»}', BJ, "hit"),  # two JSON objects
    # EZPoints
    ('{"cards": [2, 5], "formula": "2+", "thoughts": "need 10", "action": "«10»"}', EZ, "10"),  # never "1"
    ('{"action": «10»}', EZ, "10"),
    ('{"action": "«1»"}', EZ, "1"),
    ('{"action": "«10»', EZ, "10"),  # cut off
    ('{"action": "«=»"}\n```', EZ, "="),
    ('{"action": "«*»", "thoughts": "times"}', EZ, "*"),  # action not the last field
    ('{"action": "«2 + 3»"}', EZ, None),
    ('{"action": "«11»"}', EZ, None),
    ('{"action": "«-»"}', EZ, None),  # legal in Points24, not in EZPoints
    ("", EZ, None),  # empty answer
    # Points24
    ('{"action": "«/»"}', P24, "/"),
    ('{"action": "«(»"}', P24, "("),
    ('{"action": "«)»"}', P24, ")"),
    ('```\n{"formula": "(", "action": "«10»"}\n```\nI chose 10.', P24, "10"),
    ("The action is 10.", P24, None),  # no "action" key
    ("{'action': «7»}", P24, "7"),
    ('{"cards": ["J", 3, 7, 1], "action": "«10»"} "action" here means the next card', P24, "10"),
]


@pytest.mark.parametrize("marked, actions, expected", CASES)
def test_parse_cases(marked, actions, expected):
    text = marked.replace("«", "").replace("»", "")
    index, span = parse.parse_action(text, actions)
    if "«" in marked:
        start = marked.index("«")
        assert span == (start, marked.index("»") - 1), f"{text!r}: span {span}, value {text[span[0]:span[1]]!r}"
    else:
        assert span is None
    assert index == (None if expected is None else actions.index(expected))


def test_parse_random_strings():
    rng = np.random.default_rng(0)
    pieces = ['{', '}', '"action"', "'action'", "action", "ACTION", ':', ' : ', '"+"', "'hit'", '"10"', '10', '1',
              '"', "'", ',', ' ', '\n', '```json', '```', 'stand', '"-', '(', ')', '/', '=', '"thoughts": "x"']
    keys, seps = ['"action"', "'action'", "action", "Action", '"ACTION"'], [":", ": ", " : ", ":\n"]
    values = ['"+"', "'hit'", '"10"', "10", "1", '"stand', "=", '" / "', '"(', "Stand", '"hit or stand"', '"11"', '""']
    printable = [chr(c) for c in range(32, 127)] + ["\n", "\t", "é", "«"]
    legal = 0
    for i in range(10_000):
        if i % 3 == 0:  # random characters
            text = "".join(rng.choice(printable, size=rng.integers(0, 40)))
        elif i % 3 == 1:  # random JSON-ish fragments
            text = "".join(rng.choice(pieces, size=rng.integers(1, 12)))
        else:  # fragments around a key and a value, so that some strings hold a legal action
            key, sep, value = rng.choice(keys), rng.choice(seps), rng.choice(values)
            around = lambda: "".join(rng.choice(pieces, size=rng.integers(0, 4)))
            text = around() + key + sep + value + around()
        actions = (P24, BJ, NL, EZ)[i % 4]
        index, span = parse.parse_action(text, actions)
        assert index is None or span is not None
        if span is not None:
            start, end = span
            assert 0 <= start <= end <= len(text)
        if index is not None:
            legal += 1
            assert actions[index].lower() == text[start:end].strip(" \"'").lower() == text[start:end].lower()
    assert legal > 500, f"the random strings rarely held a legal action ({legal}); the test would prove little"


# ======================================================================================
# ppo.py: GAE and the PPO loss exactly, LoRA against the base model, the value head
# ======================================================================================


def test_gae_by_hand():
    # 1 env, 4 steps: step 1 is truncated (bootstraps from its final observation, V = 4.0),
    # step 2 is terminated (its next value 3.0 must be ignored), step 3 is the rollout's last step.
    # gamma = gae_lambda = 0.5, so gamma * gae_lambda = 0.25; every number is exact in binary.
    #   t=3: delta = 1 + 0.5*2.0 - 1.5 = 0.5               adv = 0.5
    #   t=2: delta = 2 + 0         - 0.5 = 1.5 (terminal)    adv = 1.5  (no recursion past the end)
    #   t=1: delta = 0 + 0.5*4.0 - 1.0 = 1.0 (truncated)   adv = 1.0  (no recursion past the end)
    #   t=0: delta = 1 + 0.5*1.0 - 0.5 = 1.0               adv = 1.0 + 0.25*1.0 = 1.25
    #   returns = adv + values = [1.75, 2.0, 2.0, 2.0]
    col = lambda *x: torch.tensor(x, dtype=torch.float64)[:, None]  # (4, 1)
    rewards, values, next_values = col(1, 0, 2, 1), col(0.5, 1.0, 0.5, 1.5), col(1.0, 4.0, 3.0, 2.0)
    terminated, truncated = col(0, 0, 1, 0).bool(), col(0, 1, 0, 0).bool()
    advantages, returns = ppo.compute_gae(rewards, values, next_values, terminated, truncated, 0.5, 0.5)
    assert torch.equal(advantages, col(1.25, 1.0, 1.5, 0.5))
    assert torch.equal(returns, col(1.75, 2.0, 2.0, 2.0))
    # float flags give the same answer as bool flags
    advantages_f, _ = ppo.compute_gae(rewards, values, next_values, terminated.double(), truncated.double(), 0.5, 0.5)
    assert torch.equal(advantages_f, advantages)


def test_gigpo_by_hand():
    # gamma = 0.5. Deal A, three copies from state s0: copy 1 and 3 go to s1 and win 10, copy 2 goes to s2 and loses.
    #   returns R = 10, -1, 10: mean 19/3, deviations 11/3, -22/3, 11/3, sample std sqrt(242/9 / 2) = 11/3 * sqrt(3):
    #   A^E = 1/sqrt(3), -2/sqrt(3), 1/sqrt(3).
    #   G at s0 = 0 + 0.5 * 10 = 5, -0.5, 5: the same shape, A^S = 1/sqrt(3), -2/sqrt(3), 1/sqrt(3);
    #   G at s1 = 10, 10: a tie, 0; s2 seen once: 0.
    # Deal B, two copies that both lose (-1: A^E = 0), copy 1 at once, copy 2 a step later: G at s0 = -1 and -0.5,
    #   A^S = -1/sqrt(2), 1/sqrt(2) (ending sooner is worse here); s3 seen once: 0. B's s0 is not A's s0.
    # Deal C, two copies alike: everything ties, 0. The steps come interleaved, as a rollout records them.
    steps = [  # (reward, episode, deal, state): the first step of every copy, then the second of those that go on
        (0, "A1", "A", "s0"), (0, "A2", "A", "s0"), (0, "A3", "A", "s0"), (-1, "B1", "B", "s0"), (0, "B2", "B", "s0"),
        (0, "C1", "C", "s0"), (0, "C2", "C", "s0"),
        (10, "A1", "A", "s1"), (-1, "A2", "A", "s2"), (10, "A3", "A", "s1"), (-1, "B2", "B", "s3"),
        (1, "C1", "C", "s1"), (1, "C2", "C", "s1")]
    a, b = 1 / math.sqrt(3), 1 / math.sqrt(2)
    expected_adv = [2 * a, -4 * a, 2 * a, -b, b, 0, 0, a, -2 * a, a, 0, 0, 0]
    expected_ret = [5, -0.5, 5, -1, -0.5, 0.5, 0.5, 10, -1, 10, -1, 1, 1]
    advantages, returns = ppo.compute_gigpo(*zip(*steps), gamma=0.5, step_coef=1.0)
    assert returns.tolist() == expected_ret
    assert torch.allclose(advantages, torch.tensor(expected_adv), atol=1e-5)  # 1e-6 is added to each std
    assert advantages[[5, 6, 10, 11, 12]].tolist() == [0] * 5, "ties and states seen once: exactly 0"
    # step_coef weighs the step level alone: 0 leaves the episode level
    episode_only, _ = ppo.compute_gigpo(*zip(*steps), gamma=0.5, step_coef=0.0)
    assert torch.allclose(episode_only, torch.tensor([a, -2 * a, a, 0, 0, 0, 0, a, -2 * a, a, 0, 0, 0]), atol=1e-5)
    # norm "mean": the deviations alone. A: R - 19/3 = 11/3, -22/3, 11/3 and G(s0) - 19/6 = 11/6, -22/6, 11/6;
    # B: G(s0) + 0.75 = -0.25, 0.25; ties and states seen once still 0
    by_mean, _ = ppo.compute_gigpo(*zip(*steps), gamma=0.5, step_coef=1.0, norm="mean")
    expected = [5.5, -11, 5.5, -0.25, 0.25, 0, 0, 11 / 3, -22 / 3, 11 / 3, 0, 0, 0]
    assert torch.allclose(by_mean, torch.tensor(expected), atol=1e-6)
    # mixed_only: deal A holds wins and a loss and keeps its advantages; B (all lost) and C (all won) get 0
    mixed, _ = ppo.compute_gigpo(*zip(*steps), gamma=0.5, step_coef=1.0, mixed_only=True)
    keep = torch.tensor([d == "A" for _, _, d, _ in steps])
    assert torch.equal(mixed, advantages * keep) and advantages[3:5].abs().min() > 0


def test_gae_matches_plain_loop():
    rng = np.random.default_rng(0)
    T, N, gamma, lam = 16, 4, 0.9, 0.95
    r, v, nv = rng.normal(size=(T, N)), rng.normal(size=(T, N)), rng.normal(size=(T, N))
    term, trunc = rng.random((T, N)) < 0.2, rng.random((T, N)) < 0.2
    expected = np.zeros((T, N))
    for n in range(N):  # one env at a time, plain floats
        next_adv = 0.0
        for t in range(T - 1, -1, -1):
            bootstrap = 0.0 if term[t, n] else gamma * nv[t, n]
            delta = r[t, n] + bootstrap - v[t, n]
            if term[t, n] or trunc[t, n]:
                next_adv = 0.0
            expected[t, n] = next_adv = delta + gamma * lam * next_adv
    adv, ret = ppo.compute_gae(*map(torch.tensor, (r, v, nv, term, trunc)), gamma, lam)
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-12)
    assert torch.allclose(ret, torch.tensor(expected + v), atol=1e-12)


def test_ppo_loss_at_ratio_one():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(64, generator=g)
    adv, values, returns = torch.randn(64, generator=g), torch.randn(64, generator=g), torch.randn(64, generator=g)
    loss, stats = ppo.ppo_loss(old.clone(), old, adv, values, values, returns, vf_coef=0.0)
    assert torch.equal(loss, -adv.mean())
    assert stats["policy_loss"] == -adv.mean().item()
    assert stats["approx_kl"] == 0.0 and stats["clipfrac"] == 0.0
    assert stats["value_loss"] == pytest.approx(0.5 * ((values - returns) ** 2).mean().item())


def test_ppo_policy_clipping():
    clip = 0.1
    ratio = torch.tensor([0.8, 0.95, 1.05, 1.2, 0.8, 0.95, 1.05, 1.2])
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
    old = torch.zeros(8)
    new = ratio.log().requires_grad_()
    zeros = torch.zeros(8)
    loss, stats = ppo.ppo_loss(new, old, adv, zeros, zeros, zeros, clip_coef=clip, vf_coef=0.0)
    loss.backward()
    # clipped (no gradient) only where the ratio left [0.9, 1.1] in the direction the advantage rewards
    clipped = ((adv > 0) & (ratio > 1 + clip)) | ((adv < 0) & (ratio < 1 - clip))
    assert clipped.tolist() == [False, False, False, True, True, False, False, False]
    assert torch.equal(new.grad == 0, clipped)
    expected = torch.where(clipped, -adv * ratio.clamp(1 - clip, 1 + clip), -adv * ratio).mean()
    assert torch.allclose(loss, expected)
    assert stats["clipfrac"] == 0.5  # |ratio - 1| > 0.1 for 0.8 and 1.2, whatever the sign
    assert stats["approx_kl"] > 0


def test_ppo_value_clipping():
    clip = 0.1
    old_values = torch.zeros(5)
    values = torch.tensor([0.5, 0.5, 0.05, -0.5, -0.5])
    returns = torch.tensor([1.0, 0.0, 1.0, -1.0, 0.3])
    # clipped values: [0.1, 0.1, 0.05, -0.1, -0.1]; the larger squared error is kept:
    #   max(0.25, 0.81) = 0.81 (clipped), max(0.25, 0.01) = 0.25, 0.9025 both, max(0.25, 0.81) = 0.81 (clipped),
    #   max(0.64, 0.16) = 0.64
    per_sample = torch.tensor([0.81, 0.25, 0.9025, 0.81, 0.64])
    zeros = torch.zeros(5)
    new = values.clone().requires_grad_()
    loss, stats = ppo.ppo_loss(zeros, zeros, zeros, new, old_values, returns, clip_coef=clip, vf_coef=1.0,
                               clip_vloss=True)
    loss.backward()
    assert torch.allclose(loss, 0.5 * per_sample.mean())
    assert (new.grad == 0).tolist() == [True, False, False, True, False]


def test_without_the_value_clip_the_value_loss_follows_returns_far_from_the_old_values():
    # a win's return +10 where the sampling pass said 0: clipped, V gets no gradient past 0.1; unclipped, the plain
    # squared error 0.5 * (V - R)^2, gradient V - R
    values, returns, zeros = torch.tensor([0.5, -0.5, 0.05]), torch.tensor([10.0, -1.0, 1.0]), torch.zeros(3)
    new = values.clone().requires_grad_()
    loss, _ = ppo.ppo_loss(zeros, zeros, zeros, new, zeros, returns, clip_coef=0.1, vf_coef=1.0)
    loss.backward()
    assert torch.allclose(loss, 0.5 * ((values - returns) ** 2).mean())
    assert torch.allclose(new.grad, (values - returns) / 3)
    assert rl4vlm.Settings().clip_vloss is False


def test_explained_variance_by_hand():
    zeros, ones = torch.zeros(4), torch.ones(4)
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert ppo.explained_variance(returns, returns) == 1.0
    assert ppo.explained_variance(torch.full((4,), 2.5), returns) == 0.0
    assert math.isnan(ppo.explained_variance(zeros, ones))


def test_lora_bare_linear():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    x = torch.randn(3, 8)
    lora = ppo.LoRALinear(base, rank=4, alpha=8, dropout=0.0)
    assert lora.scaling == 2.0 and lora.lora_A.weight.shape == (4, 8) and lora.lora_B.weight.shape == (6, 4)
    assert torch.equal(lora(x), base(x))  # B = 0: exactly the base layer
    model = torch.nn.Sequential(base)
    assert ppo.add_lora(model, 4, 8, 0.0, ["0"]) == ["0"]
    randomise_lora(model)
    m = model[0]
    with torch.no_grad():
        expected = base(x) + 2.0 * x @ m.lora_A.weight.T @ m.lora_B.weight.T
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert not torch.allclose(model(x), base(x))
        unmerged = model(x)
        ppo.merge_lora(model)
        assert type(model[0]) is torch.nn.Linear
        assert torch.allclose(model(x), unmerged, atol=1e-6)


def test_lora_on_tiny_llama(tmp_path):
    model = tiny_llama()
    base_keys = set(model.state_dict())
    base_logits = logits(model)
    names = ppo.add_lora(model, rank=4, alpha=8, dropout=0.05, targets=TARGETS)
    assert len(names) == 2 * 7 and "lm_head" not in names
    # the model's own keys are unchanged; the only new keys are the adapters'
    keys = set(model.state_dict())
    assert {k for k in keys if ".lora_" not in k} == base_keys
    assert len(keys - base_keys) == 2 * len(names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names) and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in ppo.lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    assert torch.equal(logits(model), base_logits)  # B = 0: exactly the base model

    randomise_lora(model)
    lora_logits = logits(model)
    assert not torch.allclose(lora_logits, base_logits)

    # save, then load into a freshly built model with the same base weights
    ppo.save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["lora_dropout"] == 0.05 and config["bias"] == "none" and config["task_type"] is None
    assert sorted(config["target_modules"]) == sorted(TARGETS) and config["base_model_name_or_path"] == "tiny-llama"
    assert config["fan_in_fan_out"] is False and config["use_dora"] is False and config["use_rslora"] is False
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = tiny_llama()  # load_adapter adds the LoRA layers from the config
    ppo.load_adapter(fresh, tmp_path)
    fresh2 = tiny_llama()  # or into layers added by hand
    ppo.add_lora(fresh2, 4, 8, 0.05, TARGETS)
    ppo.load_adapter(fresh2, tmp_path)
    saved = dict(ppo.lora_modules(model))
    for f in (fresh, fresh2):
        assert [n for n, _ in ppo.lora_modules(f)] == names
        for name, m in ppo.lora_modules(f):
            assert torch.equal(m.lora_A.weight, saved[name].lora_A.weight)
            assert torch.equal(m.lora_B.weight, saved[name].lora_B.weight)
        assert torch.equal(logits(f), lora_logits)

    # an adapter that does not fit the model is refused
    wrong = tiny_llama()
    ppo.add_lora(wrong, 4, 8, 0.0, ["q_proj"])
    with pytest.raises(ValueError, match="does not fit"):
        ppo.load_adapter(wrong, tmp_path)

    ppo.merge_lora(model)
    assert not ppo.lora_modules(model) and set(model.state_dict()) == base_keys
    assert torch.allclose(logits(model), lora_logits, atol=1e-6)


def test_lora_partial_targets_saved_exactly(tmp_path):
    # wrapping q_proj of layer 0 only: the list ["q_proj"] would make PEFT wrap layer 1's too
    model = tiny_llama()
    names = ppo.add_lora(model, 2, 4, 0.0, r"layers\.0\..*q_proj$")
    assert names == ["model.layers.0.self_attn.q_proj"]
    ppo.save_adapter(model, tmp_path)
    target = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(target, str)
    all_names = [n for n, _ in tiny_llama().named_modules()]
    assert [n for n in all_names if re.fullmatch(target, n)] == names  # PEFT full-matches a str


def test_add_lora_errors_when_nothing_matches():
    with pytest.raises(ValueError, match="no nn.Linear"):
        ppo.add_lora(tiny_llama(), 4, 8, 0.0, ["no_such_proj"])


def test_value_head_float32():
    head = ppo.ValueHead(32, width=16)
    hidden = torch.randn(2, 3, 32).to(torch.bfloat16)
    value = head(hidden)
    assert value.dtype == torch.float32 and value.shape == (2, 3)
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert torch.equal(value, head(hidden.float()))


# ======================================================================================
# rl4vlm.py
# ======================================================================================
# --- settings, random streams and clear errors ------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--num-envs", "-1"], "--num-envs must be > 0"),
    (["--env", "chess"], "chess"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--sft-expert", "1.5"], "--sft-expert must be in [0, 1]"),
    (["--sft-follow", "-0.1"], "--sft-follow must be in [0, 1]"),
    (["--target-kl", "-1"], "--target-kl must be >= 0"),
    (["--ablations", "dropout"], "--ablations must be cot, lambda, advantage or vloss"),
    (["--advantage", "grpo"], "--advantage must be gae or gigpo, got 'grpo'"),
    (["--advantage", "gigpo", "--group-size", "1"], "--group-size must be 2 or more"),
    (["--advantage", "gigpo", "--num-envs", "12"], "--num-envs per rank (12) a multiple of it, got 8"),
    (["--seeds", "1", "1"], "--seeds must differ"),
    (["--seeds"], "expected at least one argument"),
    (["--env", "numberline,chess"], "chess"),
    (["--num-steps", "ten"], "invalid int value"),
    (["--model", str(HERE)], "no config.json"),
    (["--resume", str(HERE)], "not a run folder"),
    (["--seed", "1000"], "--seed must be in 0..999"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--target-kl", "inf"], "--target-kl must be >= 0, got inf"),
    (["--seeds", "3", "-1"], "--seed must be in 0..999, got -1"),
    (["--dtype", "float64"], "--dtype must be float32 or bfloat16"),
    (["--dtype", "float16"], "--dtype must be float32 or bfloat16, got 'float16'"),
    (["--aux-loss", "on", "--sft-data", "SFT"], "--aux-loss on needs the env's labels"),
])
def test_bad_settings_are_rejected_with_one_line(argv, message, tmp_path):
    argv = [str(write_sft_data(tmp_path, n=1)) if a == "SFT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        rl4vlm.parse_settings(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_resume_takes_the_flags_that_may_change_and_refuses_any_other_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    saved = rl4vlm.asdict(rl4vlm.Settings(lr=2e-3, device="cpu"))
    (run / "settings.json").write_text(json.dumps(saved))
    s = rl4vlm.parse_settings(["--resume", str(run), "--threads", "2", "--workers", "0"])
    assert (s.lr, s.threads, s.workers, s.resume) == (2e-3, 2, 0, str(run))
    assert capsys.readouterr().out == f"resuming {run} with --threads 2 (was 1)\n"  # --workers 0: no change
    for argv, name in ((["--lr", "0.5"], "--lr"), (["--no-cot"], "--cot"), (["--seeds", "1", "2"], "--seeds"),
                       (["--lr", "0.002"], "--lr")):  # the last as saved: still not a flag --resume takes
        with pytest.raises(SystemExit) as e:
            rl4vlm.parse_settings(["--resume", str(run), *argv])
        assert f"{name} cannot change" in str(e.value) and "\n" not in str(e.value), argv
    for fields_then in (dict(saved, renamed_field=1), {k: v for k, v in saved.items() if k != "clip_vloss"}):
        (run / "settings.json").write_text(json.dumps(fields_then))
        with pytest.raises(SystemExit) as e:
            rl4vlm.parse_settings(["--resume", str(run)])
        assert "written by another version" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", [f.name for f in fields(rl4vlm.Settings) if isinstance(f.default, float) or f.metadata["type"] is float])
def test_every_float_flag_refuses_nan_and_inf(name, value):
    with pytest.raises(SystemExit) as e:
        rl4vlm.parse_settings(["--" + name.replace("_", "-") + "=" + value])
    assert str(e.value).startswith(f"rl4vlm.py: error: --{name.replace('_', '-')} must be") and "\n" not in str(e.value)


@pytest.mark.slow
def test_bad_flag_exits_nonzero_with_one_line():
    out = subprocess.run([sys.executable, str(HERE / "rl4vlm.py"), "--lora-rank", "0"],
                         capture_output=True, text=True, cwd=HERE)
    assert out.returncode != 0
    assert out.stderr.strip() == "rl4vlm.py: error: --lora-rank must be > 0, got 0"


@pytest.mark.parametrize("line, message", [
    (None, "no such file"),
    ("not json", "line 2 is not JSON"),
    ('{"image": "0.png", "prompt": "p"}', 'line 2 needs the strings "image", "prompt" and "answer"'),
    ('{"image": "missing.png", "prompt": "p", "answer": "a"}', "line 2: no image"),
])
def test_bad_sft_data_is_rejected_with_one_line(tmp_path, line, message):
    data = write_sft_data(tmp_path, n=1)
    if line is None:
        data = tmp_path / "missing.jsonl"
    else:
        data.write_text(data.read_text() + line + "\n")
    with pytest.raises(SystemExit) as e:
        rl4vlm.parse_settings(["--sft-data", str(data)])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_track_logs_each_updates_numbers_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    written = []

    class SummaryWriter:  # torch.utils.tensorboard's, as far as the tracker uses it
        def __init__(self, folder):
            written.append(folder)

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            written.append("flush")
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    track = lab.tracker(rl4vlm.Settings(track="tensorboard"), tmp_path)
    track(dict(update=2, env_steps=64, success=0.5, step_kls=[0.01], action_share={"+": 0.75, "-": 0.25}, answer="+"))
    assert written == [str(tmp_path / "tensorboard"), ("update", 2, 64), ("success", 0.5, 64),
                       ("action_share/+", 0.75, 64), ("action_share/-", 0.25, 64), "flush"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        rl4vlm.parse_settings(["--track", "tensorboard"])
    assert str(e.value) == "rl4vlm.py: error: --track tensorboard: the package tensorboard is not installed (pip install it)"


def test_device_auto_is_cuda_when_there_is_one_else_cpu(monkeypatch):
    assert rl4vlm.Settings(device="cpu").device == "cpu"
    for available, device in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        assert rl4vlm.Settings().device == rl4vlm.parse_settings([]).device == device


def test_a_model_that_is_not_a_vlm_is_rejected(tmp_path):
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="not an image-text-to-text"):
        rl4vlm.load_policy(str(tmp_path), "cpu")


def test_a_model_without_a_chat_template_is_rejected(llava):
    (llava / "chat_template.jinja").unlink()
    with pytest.raises(SystemExit, match="has no chat template"):
        rl4vlm.load_policy(str(llava), "cpu")


def test_a_task_added_to_the_table_changes_neither_the_suite_nor_the_builtin_model(monkeypatch):
    # a fork's task, registered and in the table: --env gym-cards still means the four, and the built-in model (its
    # tokenizer's corpus, hence its key) stays the four tasks' own
    key, suite = rl4vlm.builtin_key(1), rl4vlm.tasks_of("gym-cards")
    mine = replace(envs.get_task("numberline"), env_id="gym_cards/Mine-v0", goal="Reach the other number, quickly.")
    monkeypatch.setitem(gym.registry, mine.env_id, gym.envs.registration.EnvSpec(mine.env_id, envs.NumberLineEnv))
    monkeypatch.setitem(envs.TASKS, mine.env_id, mine)
    assert rl4vlm.tasks_of("gym-cards") == suite == [envs.TASKS[i] for i in envs.GYM_CARDS]
    assert rl4vlm.builtin_key(1) == key


@pytest.mark.slow
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the pins are x86-64's")
def test_torch_mkl_and_onednn_kernels_are_pinned_to_avx2_unless_the_user_set_them():
    code = "import os, rl4vlm, torch; print(torch.backends.cpu.get_cpu_capability(), *map(os.getenv, rl4vlm.CPU_PINS))"
    unset = {k: v for k, v in os.environ.items() if k not in rl4vlm.CPU_PINS}
    asked = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=HERE, stdout=subprocess.PIPE, text=True)
             for env in (unset, dict(unset, ATEN_CPU_CAPABILITY="default"))]  # the second: a user's own setting
    pinned, users = (process.communicate()[0].split() for process in asked)
    assert pinned == ["AVX2", "avx2", "AVX2", "AVX2"]  # this machine's own is AVX512
    assert users == ["DEFAULT", "default", "AVX2", "AVX2"]


def test_env_names_one_task_several_or_the_suite():
    names = lambda env: [t.name for t in rl4vlm.tasks_of(env)]
    assert names("gym-cards") == ["NumberLine", "EZPoints", "Points24", "Blackjack"]
    assert names("blackjack,ezpoints") == ["Blackjack", "EZPoints"] and names("gym_cards/Points24-v0") == ["Points24"]


def test_episode_seed_streams_never_overlap():
    """Every (stream, seed, rank) owns its own range of episode seeds: sorted by start, each range
    ends before the next begins, over every seed and rank the settings allow."""
    ranges = sorted((rl4vlm.stream(name, seed, rank) for name in rl4vlm.STREAMS
                     for seed in range(rl4vlm.MAX_SEED) for rank in range(rl4vlm.MAX_RANKS)), key=lambda r: r.start)
    assert len(ranges) == 3 * 1000 * 100 and all(len(r) == rl4vlm.STREAM_EPISODES for r in ranges)
    assert all(a.stop <= b.start for a, b in zip(ranges, ranges[1:]))
    pool = rl4vlm.EnvPool("gym_cards/NumberLine-v0", 2, range(7, 10))  # a pool never leaves its range
    with pytest.raises(RuntimeError, match="episode seeds are used up"):
        for _ in range(20):
            pool.step(0, 0)


# --- the policy: prompts, generation, log-probs and the lambda split ---------------------


def test_policy_suppresses_every_special_token_but_the_stop_tokens(policy):
    tok = policy.processor.tokenizer
    assert policy.stop_ids == [tok.eos_token_id] and policy.pad_id == tok.pad_token_id
    assert set(policy.suppress) == set(tok.all_special_ids) - {tok.eos_token_id}
    assert tok.convert_tokens_to_ids("<image>") in policy.suppress and tok.pad_token_id in policy.suppress


def test_prompt_cache_gives_the_processors_tensors(policy):
    check_prompt_cache(policy.processor)


def test_tensor_cache_forgets_the_least_recently_used_beyond_its_bytes():
    cache = rl4vlm.TensorCache(max_bytes=2 * 400)  # room for two rows of 100 float32 values
    row = lambda: {"x": torch.zeros(100)}
    a, b = cache.get("a", row), cache.get("b", row)
    assert cache.get("a", row) is a  # "a" is now the most recent
    cache.get("c", row)
    assert list(cache.rows) == ["a", "c"] and cache.bytes == 800
    assert cache.get("b", row) is not b  # "b" was forgotten and is made anew


def test_position_ids_count_from_the_first_real_token(policy):
    """The one private transformers call (rl4vlm.position_ids): left padding does not shift positions."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = rl4vlm.position_ids(policy.model, torch.ones_like(mask), mask, {})
    assert positions[0, 2:].tolist() == [0, 1, 2] and positions[1].tolist() == [0, 1, 2, 3, 4]


def test_batch_of_different_lengths_equals_each_alone(policy):
    task = envs.get_task("numberline")
    prompts = ["short", "a somewhat longer prompt about the target number", task.prompt({"Target": 1, "Current": 2}, True)]
    answers = ['{"action": "+"}', '{"current": 2, "target": 1, "thoughts": "x", "action": "-"}', "+"]
    samples = answer_samples(policy, task, prompts, answers)
    assert len({x.prompt["input_ids"].shape[1] for x in samples}) == 3, "prompts must differ in length"
    with torch.no_grad():
        batch = rl4vlm.logprobs_and_values(policy, *rl4vlm.collate(samples, policy.pad_id)[:3])
        for i, x in enumerate(samples):
            alone = rl4vlm.logprobs_and_values(policy, *rl4vlm.collate([x], policy.pad_id)[:3])
            n = len(x.gen_ids)
            assert torch.allclose(batch[0][i, :n], alone[0][0], atol=1e-5)
            assert (batch[0][i, n:] == 0).all()
            assert torch.allclose(batch[1][i], alone[1][0], atol=1e-5)


def test_forward_logprobs_equal_log_softmax_of_every_logit(policy):
    """forward() asks the model for the logits of the answer positions only; they must be the
    full pass's logits at positions P-1 .. P+G-2."""
    task, model = envs.get_task("numberline"), policy.model
    samples = answer_samples(policy, task, ["a prompt", "another, longer prompt"], ['{"action": "+"}', '{"action": "-"}'])
    prompt, gen_ids, gen_mask, _ = rl4vlm.collate(samples, policy.pad_id)
    with torch.no_grad():
        logprobs = rl4vlm.forward(model, prompt, gen_ids, gen_mask, 0.7)[0]
        ids = torch.cat([prompt["input_ids"], gen_ids], 1)
        mask = torch.cat([prompt["attention_mask"], gen_mask.long()], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=prompt["pixel_values"]).logits
    P = prompt["input_ids"].shape[1]
    expected = torch.log_softmax(logits[:, P - 1:-1] / 0.7, -1).gather(-1, gen_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs, expected.where(gen_mask, 0.0), atol=1e-5)


def test_lambda_split_by_hand():
    pieces = ['{"thoughts": "go', ' up", ', '"action": "', '+', '"}']
    text = "".join(pieces)
    _, span = parse.parse_action(text, ["-", "+"])
    assert text[span[0]:span[1]] == "+"
    first = rl4vlm.action_start(PiecesTokenizer(pieces), list(range(5)), span)
    assert first == 3  # thought tokens 0..2, action tokens 3..4
    # a token holding the value's first character counts as action, even with the key in it
    pieces = ['{"thoughts": "go up", ', '"action": "+', '"}']
    _, span = parse.parse_action("".join(pieces), ["-", "+"])
    assert rl4vlm.action_start(PiecesTokenizer(pieces), [0, 1, 2], span) == 1
    # no "action" key: every token is thought
    assert rl4vlm.action_start(PiecesTokenizer(["no", " json"]), [0, 1], None) == 2


@pytest.mark.slow
def test_lambda_split_equals_decoding_every_prefix(policy):
    """On every task's answers (with and without thoughts) and on random token sequences, special
    tokens and broken UTF-8 bytes included, with the built-in tokenizer and a foreign one."""
    processor = policy.processor
    foreign = bpe_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    rng = np.random.default_rng(0)
    for tokenizer in (processor.tokenizer, foreign):
        for task in envs.TASKS.values():
            _, info = gym.make(task.env_id).reset(seed=1)
            for cot in (True, False):
                answer = task.answer(info, int(rng.integers(len(task.actions))), cot)
                check_split_equals_the_definition(tokenizer, tokenizer(answer, add_special_tokens=False)["input_ids"])
        for _ in range(30):
            check_split_equals_the_definition(tokenizer, rng.integers(len(tokenizer), size=24).tolist())
    assert "\ufffd" in foreign.decode([foreign.convert_tokens_to_ids("\u00c3")]), "no broken byte was tried"


def test_lambda_split_with_the_builtin_tokenizer(policy):
    processor = policy.processor
    task = envs.get_task("numberline")
    info = {"Target": 4, "Current": 1}
    text = rl4vlm.answer_text(processor, task.prompt(info, True), task.answer(info, 1, True))
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = processor.tokenizer.decode(ids, skip_special_tokens=True)
    index, span = parse.parse_action(decoded, task.actions)
    assert index == 1
    first_action = rl4vlm.action_start(processor.tokenizer, ids, span)
    # the thought tokens decode to exactly the text before the action value
    assert processor.tokenizer.decode(ids[:first_action], skip_special_tokens=True) == decoded[:span[0]]


def test_act_weighs_thought_tokens_by_lambda(policy, monkeypatch):
    """log pi(a|s) by hand: the first token is thought, the rest action (parse_action is made to
    say the value starts after the first token's text), so log pi = 0.25 * lp[0] + sum(lp[1:])."""
    task, tok = envs.get_task("numberline"), policy.processor.tokenizer
    policy = replace(policy, max_new_tokens=6, thought_coef=0.25, temperature=0.2)
    monkeypatch.setattr(rl4vlm, "action_start", lambda tokenizer, ids, span: 1)
    obs, infos = states(2)
    torch.manual_seed(0)
    samples = rl4vlm.act(policy, task, obs, infos, np.random.default_rng(0))
    for x in samples:
        lp, _ = rl4vlm.logprobs_and_values(policy, *rl4vlm.collate([x], policy.pad_id)[:3])
        lp = lp[0].tolist()
        assert x.weights.tolist() == [0.25] + [1.0] * (len(lp) - 1) and x.n_thought == 1
        assert abs(x.logprob - (0.25 * lp[0] + sum(lp[1:]))) < 1e-5, tok.decode(x.gen_ids)


def test_rollout_logprobs_values_and_entropy_equal_a_full_forward(policy):
    task, policy = envs.get_task("numberline"), replace(policy, max_new_tokens=12, temperature=0.7, thought_coef=0.5)
    obs, infos = states(4)
    torch.manual_seed(0)
    samples = rl4vlm.act(policy, task, obs, infos, np.random.default_rng(0))
    assert all(0 <= x.action < len(task.actions) for x in samples)
    with torch.no_grad():
        for x in samples:
            prompt, gen_ids, gen_mask, weights = rl4vlm.collate([x], policy.pad_id)
            logprobs, values = rl4vlm.logprobs_and_values(policy, prompt, gen_ids, gen_mask)
            assert abs(float((logprobs * weights).sum()) - x.logprob) < 1e-5
            assert abs(float(values[0]) - x.value) < 1e-5
            # the entropy of each step's sampling distribution, -sum p log p over the unsuppressed tokens
            logits = rl4vlm.forward(policy.model, prompt, gen_ids, gen_mask)[2].logits[0, :-1].double() / 0.7
            p = torch.softmax(logits.index_fill(1, torch.tensor(policy.suppress), -math.inf), -1)
            entropy = -(p * p.log()).nan_to_num().sum(1)
            assert torch.allclose(x.entropy.double(), entropy, atol=1e-4)
            assert x.n_thought == int((weights[0] == 0.5).sum())


def test_gigpo_rollout_plays_each_deal_whole_in_every_copy_of_its_group(monkeypatch):
    """4 envs in groups of 2, 12 samples wanted: each deal goes to one group's two envs, every episode is played to its
    end, the next rollout deals new ones. Each episode replayed in a fresh env from its deal's seed gives the states
    (picture and prompt), the rewards (less the format penalty) and the end that the advantages were computed on.
    The answers are drawn at random here (a stand-in for act: this is about the envs)."""
    task, policy = envs.get_task("numberline"), types.SimpleNamespace(cot=True)
    s, _ = settings(format_penalty=0.5, gamma=0.9)
    compute, seen = ppo.compute_gigpo, []
    monkeypatch.setattr(ppo, "compute_gigpo", lambda *a: (seen.append(a), compute(*a))[1])
    monkeypatch.setattr(rl4vlm, "act", lambda policy, task, images, infos, rng: [rl4vlm.Sample(
        prompt={}, gen_ids=torch.zeros(1, dtype=torch.long), weights=torch.ones(1), logprob=0.0, value=0.0,
        entropy=torch.zeros(1), text="", n_thought=0, thought="", action=int(rng.integers(2)),
        format_ok=bool(rng.integers(2))) for _ in infos])
    pool, rng = rl4vlm.EnvPool(task.env_id, 4, range(100, 200), group_size=2), np.random.default_rng(0)
    played = [rl4vlm.group_rollout(policy, task, pool, 12, s, rng) for _ in range(2)]
    for (samples, out), (rewards, episodes, deals, keys, *_) in zip(played, seen):
        assert len(samples) >= 12 and all(pool.done)
        assert {frozenset(i for d, i in set(episodes) if d == deal) for deal in deals} <= {
            frozenset({0, 1}), frozenset({2, 3})}
        for episode in set(episodes):
            steps = [j for j, e in enumerate(episodes) if e == episode]
            env = gym.make(task.env_id)
            obs, info = env.reset(seed=100 + episode[0])
            for k, j in enumerate(steps):
                assert keys[j] == (hashlib.sha1(obs).digest(), task.prompt(info, True))
                obs, reward, terminated, truncated, info = env.step(samples[j].action)
                assert rewards[j] == reward - 0.5 * (not samples[j].format_ok)
                assert terminated or truncated if k == len(steps) - 1 else not (terminated or truncated)
        assert torch.equal(out["advantages"], compute(rewards, episodes, deals, keys, 0.9, 1.0)[0])
    first, second = ({d for d, _ in set(a[1])} for a in seen)
    assert max(first) < min(second) and first | second == set(range(pool.started))


@pytest.mark.parametrize("span", [None, (0, 1)])  # no "action" key; a key whose value is no legal action
def test_no_legal_action_plays_a_random_action_and_counts_as_thought(policy, monkeypatch, span):
    task, policy = envs.get_task("numberline"), replace(policy, max_new_tokens=6, thought_coef=0.5)
    monkeypatch.setattr(parse, "parse_action", lambda text, actions: (None, span))
    obs, infos = states(8)
    samples = rl4vlm.act(policy, task, obs, infos, np.random.default_rng(0))
    assert not any(x.format_ok for x in samples)
    assert all(set(x.weights.tolist()) == {0.5} for x in samples)
    assert [x.action for x in samples] == np.random.default_rng(0).integers(2, size=8).tolist()


# --- the warm start -------------------------------------------------------------------------


@pytest.mark.slow
def test_perception_heads_learn_the_labels_of_a_small_batch(policy):
    """The warm start's auxiliary loss: on one batch of 8 NumberLine states, its heads come to
    read each state's labels (current, target) off the image features and the last prompt token."""
    s, task = settings(sft_batch=8)
    batch = next(rl4vlm.states_batches(task, s, np.random.default_rng(0)))
    assert batch[3] == [task.labels(info) for info in rl4vlm.EnvPool(task.env_id, 8, rl4vlm.stream("warm_start", 1)).infos]
    torch.manual_seed(0)
    heads = rl4vlm.perception_heads(policy, task, batch)
    opt = torch.optim.Adam([p for head in heads.values() for p in head.parameters()], lr=0.1)
    for _ in range(100):  # both read all 8 from step 65 on; with lr 0, 1 and 3 of 8
        loss, stats = rl4vlm.sft_loss(policy, heads, task, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert stats["image_acc"] == stats["prompt_acc"] == 1.0, stats


@pytest.mark.slow
def test_warm_start_learns_the_answers_of_an_sft_data_file(llava, tmp_path):
    """After the warm start on a two-line file, greedy decoding writes each line's answer (the
    lines' prompts name their deal, so that the tiny random model can tell them apart)."""
    data = write_sft_data(tmp_path / "data", n=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert rows[0]["answer"] != rows[1]["answer"]
    data.write_text("".join(json.dumps(dict(r, prompt=f"Deal {k}. " + r["prompt"])) + "\n" for k, r in enumerate(rows)))
    s, task = settings(sft_data=str(data), sft_steps=80, sft_batch=2, sft_lr=1e-2)
    policy = rl4vlm.load_policy(str(llava), "cpu")
    torch.manual_seed(0)
    rl4vlm.warm_start(policy, task, s, False, np.random.default_rng(0), lambda *a: None)
    for row in lab.read_sft_data(s.sft_data):
        image = np.asarray(Image.open(row["image"]).convert("RGB"))
        prompt = rl4vlm.pad_prompts(rl4vlm.encode_prompts(policy.processor, [image], [row["prompt"]], "cpu"), policy.pad_id)
        out = policy.model.generate(**prompt, do_sample=False, max_new_tokens=60)
        text = policy.processor.tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text.strip() == row["answer"]


def test_the_warm_start_learning_rate_falls_to_0_on_a_cosine(llava, tmp_path, monkeypatch):
    """Step k of n (from 1) runs at sft_lr * (1 + cos(pi (k - 1) / n)) / 2, so the last steps barely move the model."""
    s, task = settings(sft_data=str(write_sft_data(tmp_path / "data", n=2)), sft_steps=4, sft_batch=2, sft_lr=1e-2)
    rates, adamw_step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda opt: (rates.append(opt.param_groups[0]["lr"]), adamw_step(opt)))
    rl4vlm.warm_start(rl4vlm.load_policy(str(llava), "cpu"), task, s, False, np.random.default_rng(0), lambda *a: None)
    assert rates == pytest.approx([1e-2, 1e-2 * (1 + 2 ** -0.5) / 2, 1e-2 / 2, 1e-2 * (1 - 2 ** -0.5) / 2], rel=1e-9)


@pytest.mark.slow
def test_a_run_warm_started_on_an_sft_data_file(llava, tmp_path):
    data = write_sft_data(tmp_path / "data")
    rl4vlm.main(fast_args(llava, tmp_path, "--sft-data", str(data), "--run-name", "sft"))
    warm, = (tmp_path / "cache").glob("sft-*")
    info = json.loads((warm / "warm_start.json").read_text())
    assert info["data"] == hashlib.sha256(data.read_bytes()).hexdigest() and info["aux"] is False and info["step"] == 2


@pytest.mark.slow
def test_a_task_without_the_papers_numbers_writes_its_tables_and_curves(llava, tmp_path, monkeypatch):
    task = envs.get_task("numberline")
    monkeypatch.setitem(envs.TASKS, task.env_id, replace(task, paper={}))  # a fork's task: the paper never ran it
    rl4vlm.main(fast_args(llava, tmp_path, "--seeds", "1", "--workers", "1", "--run-name", "suite"))
    run = tmp_path / "suite" / "seed1" / "NumberLine"
    assert "| rl |" in (run / "results.md").read_text() and (run / "curve.png").exists()  # the run's own
    table = (tmp_path / "suite" / "results.md").read_text()
    assert "| NumberLine | after RL |" in table and table.count("|  |") == 2  # the paper's column empty
    assert (tmp_path / "suite" / "results.csv").read_text().splitlines()[1].endswith(",")


@pytest.mark.slow
def test_sft_steps_0_starts_rl_from_the_model_itself(llava, tmp_path):
    results = rl4vlm.main(fast_args(llava, tmp_path, "--sft-steps", "0", "--run-name", "no-sft"))
    assert set(results) == {"warm_start", "rl"} and not list((tmp_path / "cache").glob("sft-*"))


# --- rollouts and the PPO update ---------------------------------------------------------


@pytest.mark.parametrize("env_id", IDS)
def test_env_pool_saves_its_state_as_json_and_continues_the_same(env_id):
    pool = rl4vlm.EnvPool(env_id, 32, range(5, 1000))
    for i in range(32):
        pool.step(i, 1)
    saved = json.dumps(lab.pool_state(pool))
    assert len(saved) < 64_000, f"{len(saved)} bytes: pictures or spaces were saved"
    copy = rl4vlm.EnvPool(env_id, 32, range(5, 1000))  # other deals, then the saved state over them
    lab.load_pool_state(copy, json.loads(saved))
    assert all(np.array_equal(a, b) for a, b in zip(pool.obs, copy.obs)) and copy.infos == pool.infos
    for action in (0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1):  # episodes end and begin again
        for i in range(32):
            a, b = pool.step(i, action), copy.step(i, action)
            assert a[:3] == b[:3] and (a[3] is None) == (b[3] is None)
    assert all(np.array_equal(a, b) for a, b in zip(pool.obs, copy.obs)) and copy.started == pool.started


@pytest.mark.parametrize("legal", [True, False])
def test_format_penalty_is_subtracted_only_when_the_text_names_no_action(policy, monkeypatch, legal):
    """The same rollout (same seeds, same actions) with penalty 0 and 0.3: the rewards differ by
    exactly 0.3 at every step when no answer names an action, and not at all when every one does."""
    monkeypatch.setattr(parse, "parse_action", lambda text, actions: (0, (0, 0)) if legal else (None, None))
    task = envs.get_task("numberline")

    def rewards(penalty):
        torch.manual_seed(0)
        pool = rl4vlm.EnvPool(task.env_id, 3, range(10**4))
        return rl4vlm.rollout(replace(policy, max_new_tokens=4), task, pool, 2, penalty, np.random.default_rng(0)).rewards
    assert torch.allclose(rewards(0.0) - rewards(0.3), torch.full((2, 3), 0.0 if legal else 0.3), atol=1e-6)


def test_nan_loss_is_an_error(policy):
    s, task = settings()
    samples = answer_samples(policy, task, ["a", "b"], ['{"action": "+"}', '{"action": "-"}'])
    for x in samples:
        x.logprob = math.nan
    opt = torch.optim.AdamW(trainable(policy), lr=0.0)
    with pytest.raises(FloatingPointError, match="PPO loss is nan"):
        rl4vlm.ppo_update(policy, opt, samples, torch.ones(1, 2), torch.ones(1, 2), s, np.random.default_rng(0))


def test_kl_guard_stops_before_a_step_on_a_minibatch_past_target_kl(policy):
    """Old log-probs set to the current ones + 0.5: the first minibatch's approx_kl is then
    (exp(-0.5) - 1) + 0.5 = 0.10653 by hand, before any step."""
    task, policy = envs.get_task("numberline"), replace(policy, temperature=0.2)
    samples = answer_samples(policy, task, ["a", "b", "c", "d"], ['{"action": "+"}', '{"action": "-"}'] * 2)
    prompt, gen_ids, gen_mask, weights = rl4vlm.collate(samples, policy.pad_id)
    with torch.no_grad():
        logprobs, values = rl4vlm.logprobs_and_values(policy, prompt, gen_ids, gen_mask)
    for x, lp, v in zip(samples, (logprobs * weights).sum(1).tolist(), values.tolist()):
        x.logprob, x.value = lp + 0.5, v
    params = trainable(policy)
    before = [p.detach().clone() for p in params]

    def update(target_kl):
        s, _ = settings(target_kl=target_kl, minibatch_size=2, micro_batch=1, update_epochs=2)
        opt = torch.optim.SGD(params, lr=1e-3)
        return rl4vlm.ppo_update(policy, opt, samples, torch.ones(1, 4), torch.ones(1, 4), s, np.random.default_rng(0))
    stats = update(target_kl=0.1)
    assert stats["optimizer_steps"] == 0 and abs(stats["approx_kl"] - (math.exp(-0.5) - 0.5)) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(before, params)), "no step may be taken past target_kl"
    stats = update(target_kl=0.2)  # under the guard: every minibatch of both epochs steps
    assert stats["optimizer_steps"] == 4 and not all(torch.equal(a, b) for a, b in zip(before, params))


def samples_at_the_policy(policy, task):
    """Four hand-made samples whose old log-probs and values are the policy's own now (ratio 1)."""
    samples = answer_samples(policy, task, ["a", "b", "c", "d"], ['{"action": "+"}', '{"action": "-"}'] * 2)
    prompt, gen_ids, gen_mask, weights = rl4vlm.collate(samples, policy.pad_id)
    with torch.no_grad():
        logprobs, values = rl4vlm.logprobs_and_values(policy, prompt, gen_ids, gen_mask)
    for x, lp, v in zip(samples, (logprobs * weights).sum(1).tolist(), values.tolist()):
        x.logprob, x.value = lp, v
    return samples, (prompt, gen_ids, gen_mask, weights)


def test_a_step_past_target_kl_is_undone_to_the_weights_and_optimizer_state_before_it(policy):
    """A first update gives AdamW moments; then, from the policy's own log-probs, a step at lr 0.1 overshoots
    target_kl 1e-4: it is undone, and the weights and the optimizer's state are those before it, to the bit."""
    task, policy = envs.get_task("numberline"), replace(policy, temperature=0.2)
    params = trainable(policy)
    optimizer = torch.optim.AdamW(params, lr=0.1)
    s, _ = settings(target_kl=0.0, minibatch_size=4, micro_batch=2, update_epochs=1)
    advantages = torch.tensor([[1.0, -1.0, 0.5, -0.5]])
    update = lambda s: rl4vlm.ppo_update(policy, optimizer, samples_at_the_policy(policy, task)[0], advantages,
                                         advantages.clone(), s, np.random.default_rng(0))
    assert update(s)["optimizer_steps"] == 1
    weights, state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())
    stats = update(replace(s, target_kl=1e-4, backtrack=0))
    assert stats["undone_steps"] == 1 and stats["optimizer_steps"] == 0 and stats["approx_kl"] < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(weights, params))
    after = optimizer.state_dict()["state"]
    assert after.keys() == state["state"].keys() and all(
        torch.equal(torch.as_tensor(after[i][k]), torch.as_tensor(v)) for i in after for k, v in state["state"][i].items())


def test_a_backtracked_step_is_the_step_at_half_the_length_for_each_undo(policy):
    """With --backtrack, a step past target_kl is undone and tried again at half the lr: the kept weights are, to the
    bit, those of one step from the same weights and AdamW state at lr 0.1 / 2^undone; the schedule's lr is put back."""
    task, policy = envs.get_task("numberline"), replace(policy, temperature=0.2)
    params = trainable(policy)
    optimizer = torch.optim.AdamW(params, lr=0.1)
    s, _ = settings(target_kl=0.0, minibatch_size=4, micro_batch=2, update_epochs=1)
    advantages = torch.tensor([[1.0, -1.0, 0.5, -0.5]])
    update = lambda s: rl4vlm.ppo_update(policy, optimizer, samples_at_the_policy(policy, task)[0], advantages,
                                         advantages.clone(), s, np.random.default_rng(0))
    update(s)  # AdamW moments
    weights, state = [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())

    def restore(lr):
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        optimizer.load_state_dict(copy.deepcopy(state))  # it adopts the tensors, and a step changes them
        optimizer.param_groups[0]["lr"] = lr

    full = update(s)["step_kls"][0]
    restore(0.1)
    stats = update(replace(s, target_kl=full / 10, backtrack=8))
    kept = [p.detach().clone() for p in params]
    assert stats["undone_steps"] >= 2 and stats["optimizer_steps"] == 1 and stats["step_kl_max"] <= full / 10
    assert optimizer.param_groups[0]["lr"] == 0.1
    restore(0.1 / 2 ** stats["undone_steps"])
    update(s)
    assert all(torch.equal(a, b) for a, b in zip(kept, params))
    # without backtracking the same step is undone and the update ends
    restore(0.1)
    stats = update(replace(s, target_kl=full / 10, backtrack=0))
    assert (stats["undone_steps"], stats["optimizer_steps"]) == (1, 0) and all(map(torch.equal, weights, params))


def test_token_kl_is_the_mean_k3_over_the_answer_tokens_by_hand():
    # r = pi_ref / pi = 0.5 and 2: (0.5 - 1 - log 0.5 + 2 - 1 - log 2) / 2 = 0.25; padding counts nothing
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), 0.0], [math.log(0.5), 0.0, 0.0]])
    ref = torch.tensor([[math.log(0.25), math.log(0.5), 5.0], [math.log(0.5), 5.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert ppo.token_kl(logprobs, ref, mask).tolist() == pytest.approx([0.25, 0.0], abs=1e-7)


def test_the_kl_penalty_has_the_gradient_of_kl_from_pi_to_the_warm_start_on_a_small_softmax():
    # tokens x ~ pi, the loss's per-token value at x with x held fixed: its expectation's gradient, sum_x pi(x) grad
    # loss(x), against the exact gradients of KL(pi || ref) = sum pi log(pi / ref) and of KL(ref || pi)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, generator=generator, dtype=torch.float64).requires_grad_()
    ref = torch.randn(6, generator=generator, dtype=torch.float64).log_softmax(0)
    logp, mask = logits.log_softmax(0), torch.ones(6, 1, dtype=torch.bool)
    penalty = ppo.kl_penalty(logp[:, None], ref[:, None], mask)  # (6,): each token as a one-token answer
    (grad,) = torch.autograd.grad((logp.exp().detach() * penalty).sum(), logits, retain_graph=True)
    (forward_kl,) = torch.autograd.grad((logp.exp() * (logp - ref)).sum(), logits, retain_graph=True)
    (reverse_kl,) = torch.autograd.grad((ref.exp() * (ref - logp)).sum(), logits)
    assert torch.allclose(grad, forward_kl, atol=1e-12)
    assert (grad - reverse_kl).abs().max() > 1e-2  # k3 (token_kl) as the loss has this one's gradient
    # the logged value stays k3's, an estimate of the same KL: its expectation is KL(pi || ref) exactly
    k3 = ppo.token_kl(logp[:, None].detach(), ref[:, None], mask)
    assert (logp.exp() * k3).sum().item() == pytest.approx((logp.exp() * (logp - ref)).sum().item(), abs=1e-12)


def test_the_kl_penalty_reads_the_warm_start_as_the_model_with_its_adapters_off(policy):
    """Adapters moved off zero: lora_off gives the log-probs of the adapters at zero, and the update's warm_kl is
    token_kl of the policy against those, computed by hand (lr 0: no step moves anything)."""
    task, policy = envs.get_task("numberline"), replace(policy, temperature=0.2)
    samples, batch = samples_at_the_policy(policy, task)
    with torch.no_grad():
        for _, m in ppo.lora_modules(policy.model):
            m.lora_B.weight.zero_()
        at_zero = rl4vlm.logprobs_and_values(policy, *batch[:3])[0]
        for _, m in ppo.lora_modules(policy.model):
            m.lora_B.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        with ppo.lora_off(policy.model):
            off = rl4vlm.logprobs_and_values(policy, *batch[:3])[0]
        moved = rl4vlm.logprobs_and_values(policy, *batch[:3])[0]
    assert torch.equal(off, at_zero) and not torch.allclose(moved, at_zero)
    assert all(m.scaling == 2.0 for _, m in ppo.lora_modules(policy.model))  # alpha 16 / rank 8, put back
    samples, batch = samples_at_the_policy(policy, task)
    s, _ = settings(target_kl=0.0, minibatch_size=4, micro_batch=4, update_epochs=1, kl_coef=0.1)
    stats = rl4vlm.ppo_update(policy, torch.optim.AdamW(trainable(policy), lr=0.0), samples,
                              torch.tensor([[1.0, -1.0, 0.5, -0.5]]), torch.zeros(1, 4), s, np.random.default_rng(0))
    by_hand = float(ppo.token_kl(moved, at_zero, batch[2]).mean())
    assert by_hand > 1e-3 and stats["warm_kl"] == pytest.approx(by_hand, rel=1e-5)


def test_a_kept_steps_approx_kl_is_measured_after_the_step(policy):
    """One step, kept: its logged approx_kl is the policy's after the step against the old log-probs, by hand."""
    task, policy = envs.get_task("numberline"), replace(policy, temperature=0.2)
    samples, batch = samples_at_the_policy(policy, task)
    s, _ = settings(target_kl=10.0, minibatch_size=4, micro_batch=2, update_epochs=1)
    advantages = torch.tensor([[1.0, -1.0, 0.5, -0.5]])
    stats = rl4vlm.ppo_update(policy, torch.optim.AdamW(trainable(policy), lr=1e-3), samples, advantages,
                              advantages.clone(), s, np.random.default_rng(0))
    with torch.no_grad():
        logprobs = (rl4vlm.logprobs_and_values(policy, *batch[:3])[0] * batch[3]).sum(1).double()
    logratio = logprobs - torch.tensor([x.logprob for x in samples], dtype=torch.float64)
    by_hand = float((logratio.exp() - 1 - logratio).mean())
    assert stats["optimizer_steps"] == 1 and by_hand > 1e-4
    assert stats["step_kls"] == [pytest.approx(by_hand, rel=1e-4)] == [stats["step_kl_max"]]


@pytest.mark.parametrize("legal", [None, False])  # the model's own answers; no answer names a legal action
def test_a_page_of_episodes_replays_to_its_pictures_and_rewards(policy, tmp_path, monkeypatch, legal):
    """Each step on the page, replayed in a fresh env from the episode's deal seed: the same
    picture, the page's action gives the page's reward, the returns add up; the answers are the
    sampled ones; the model-input pictures are 64 px; an answer with no legal action says so."""
    if legal is False:
        monkeypatch.setattr(parse, "parse_action", lambda text, actions: (None, None))
    answers, act = set(), rl4vlm.act
    monkeypatch.setattr(rl4vlm, "act", lambda *a: [answers.add(x.text) or x for x in act(*a)])
    s, task = settings(eval_episodes=4)
    rl4vlm.evaluate(replace(policy, max_new_tokens=8), task, s, lambda *a: None, "test", tmp_path / "episodes-test.md")
    episodes = read_page(tmp_path / "episodes-test.md")
    assert [seed for seed, _, _ in episodes] == list(rl4vlm.stream("eval", 1)[:4])  # the first deals, not picked
    env = gym.make(task.env_id)
    for seed, episode_return, steps in episodes:
        obs, _ = env.reset(seed=seed)
        for picture, model_input, answer, action, reward in steps:
            assert np.array_equal(np.asarray(Image.open(picture)), obs) and Image.open(model_input).size == (64, 64)
            assert answer in {" ".join(a.splitlines()).replace("|", "\\|").replace("`", "'") for a in answers}
            random_action = re.fullmatch(r"no legal action: random (\S+) played", action)
            assert (random_action is not None) == (legal is False or parse.parse_action(answer, task.actions)[0] is None)
            obs, r, *_ = env.step(task.actions.index(random_action[1] if random_action else action))
            assert r == reward
        assert sum(step[-1] for step in steps) == episode_return and len(steps) > 0


def test_diagnostics_on_a_hand_made_batch():
    x = lambda entropy, n_thought, thought, action: rl4vlm.Sample(
        prompt={}, gen_ids=torch.zeros(len(entropy)), weights=torch.ones(len(entropy)), logprob=0.0, value=0.0,
        entropy=torch.tensor(entropy), text=thought, n_thought=n_thought, thought=thought, action=action, format_ok=True)
    samples = [x([1.0, 2.0, 0.5], 2, '{"thoughts": "up", ', 1),   # thought tokens 1, 2; action token 0.5
               x([3.0, 0.1, 0.2], 1, '{"thoughts": "up", ', 1),   # thought 3; action 0.1, 0.2
               x([0.0, 0.6], 2, "no action at all", 0),           # no action value: all thought
               x([0.3], 0, "", 1)]                                # action only
    d = rl4vlm.diagnostics(samples, ("-", "+"))
    assert abs(d["thought_entropy"] - (1 + 2 + 3 + 0 + 0.6) / 5) < 1e-6
    assert abs(d["action_entropy"] - (0.5 + 0.1 + 0.2 + 0.3) / 4) < 1e-6
    assert d["distinct_thoughts"] == 3 / 4 and d["action_share"] == {"-": 0.25, "+": 0.75}


# --- runs: checkpoints, exact resume, seeds and tables -----------------------------------


def test_wilson_interval():
    low, high = lab.wilson(5, 10)
    assert abs(low - 0.2366) < 1e-4 and abs(high - 0.7634) < 1e-4  # textbook value
    assert lab.wilson(0, 10)[0] == 0.0 and abs(lab.wilson(10, 10)[1] - 1.0) < 1e-12


# The recorded run: FAST with a warm start long enough that its answers parse (format failures under 50% in every
# update), so that the thought/action split, the lambda weighting, read_right and the action shares run end to end.
# RECORDED holds what it computed on this project's CPU machines (seed 1, one thread): per update (counts and shares
# exactly, losses and KL to 1e-3), then the evaluations. A change that moves these numbers changes what a run learns.
# Record them again only when that is the change's purpose: `python test_all.py --record` runs it and rewrites the
# block below; review the change with `git diff test_all.py` and say why in the commit.
RECORDED_RUN = FAST + ["--sft-steps", "60", "--sft-batch", "8"]
COUNTS = ["episodes", "success", "mean_return", "format_fail", "optimizer_steps", "undone_steps", "read_right",
          "thought_right", "action_share"]
MEASURED = ["approx_kl", "clipfrac", "policy_loss", "value_loss", "grad_norm", "step_kl_max", "warm_kl"]
STAGE = ["success", "mean_return", "format_fail", "read_right", "thought_right", "expert_match"]
NaN = math.nan  # as JSON writes it: an update in which no episode ended has no success rate
# ---- recorded run: begin
RECORDED = {"updates": [
 [{"episodes": 1, "success": 0.0, "mean_return": 0.0, "format_fail": 0.0, "optimizer_steps": 3, "undone_steps": 0, "read_right": 0.0, "thought_right": 0.5625, "action_share": {"-": 0.125, "+": 0.875}}, {"approx_kl": 0.03352648, "clipfrac": 0.53125, "policy_loss": -0.02110836, "value_loss": 1.1109, "grad_norm": 3.122407, "step_kl_max": 0.04594457, "warm_kl": 0.0108577}],
 [{"episodes": 0, "success": NaN, "mean_return": NaN, "format_fail": 0.1875, "optimizer_steps": 8, "undone_steps": 0, "read_right": 0.0, "thought_right": 0.5625, "action_share": {"-": 0.5, "+": 0.5}}, {"approx_kl": 0.01091153, "clipfrac": 0.4375, "policy_loss": -0.02157405, "value_loss": 0.4806544, "grad_norm": 3.585103, "step_kl_max": 0.02243419, "warm_kl": 0.02721129}],
 [{"episodes": 4, "success": 0.0, "mean_return": -4.5, "format_fail": 0.0, "optimizer_steps": 8, "undone_steps": 0, "read_right": 0.0625, "thought_right": 0.5, "action_share": {"-": 0.25, "+": 0.75}}, {"approx_kl": 0.00411827, "clipfrac": 0.265625, "policy_loss": -0.0146858, "value_loss": 0.7637825, "grad_norm": 1.773209, "step_kl_max": 0.009650953, "warm_kl": 0.03133047}],
], "results": {
 "warm_start": {"success": 0.25, "mean_return": -3.75, "format_fail": 0.03448275862068961, "read_right": 0.034482758620689655, "thought_right": 0.4482758620689655, "expert_match": 0.25},
 "rl": {"success": 0.5, "mean_return": -1.75, "format_fail": 0.06666666666666665, "read_right": 0.0, "thought_right": 0.4, "expert_match": 0.25},
}}
# ---- recorded run: end


def check_recorded(rows, results):
    """What the method computed, against the recorded run: counts and shares exactly, losses and KL to 1e-3."""
    for row, (counts, measured) in zip(rows, RECORDED["updates"], strict=True):
        assert json.dumps({k: row[k] for k in counts}) == json.dumps(counts), row["update"]  # nan as NaN
        assert {k: row[k] for k in measured} == pytest.approx(measured, rel=1e-3), row["update"]
        assert row["format_fail"] < 0.5, "the recorded run must exercise parsed answers"
    for stage, recorded in RECORDED["results"].items():
        assert {k: results[stage][k] for k in recorded} == pytest.approx(recorded, rel=1e-6), stage


def record():
    """python test_all.py --record: the recorded run again, in a new cache; its numbers replace the RECORDED block."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        rl4vlm.main(RECORDED_RUN + ["--cache-dir", f"{tmp}/cache", "--out-dir", tmp, "--run-name", "run"])
        rows, results = lab.metrics(Path(tmp) / "run"), lab.finished(Path(tmp) / "run")
    updates = [[{k: r[k] for k in COUNTS}, {k: float(f"{r[k]:.7g}") for k in MEASURED}] for r in rows]
    stages = {stage: {k: r[k] for k in STAGE} for stage, r in results.items()}
    lines = ["RECORDED = {\"updates\": ["] + [f" {json.dumps(u)}," for u in updates] + ["], \"results\": {"]
    lines += [f" {json.dumps(stage)}: {json.dumps(r)}," for stage, r in stages.items()] + ["}}"]
    text, begin, end = HERE.joinpath("test_all.py").read_text(), "# ---- recorded run: begin\n", "# ---- recorded run: end\n"
    head, rest = text.split(begin)
    HERE.joinpath("test_all.py").write_text(head + begin + "\n".join(lines) + "\n" + end + rest.split(end)[1])
    print(f"recorded {len(updates)} updates and {len(stages)} evaluations; review: git diff test_all.py")


@pytest.mark.parametrize("keep", [1, 2, 4])
def test_the_newest_keep_checkpoints_stay(base_policy, tmp_path, keep):
    scheduler = torch.optim.lr_scheduler.ConstantLR(torch.optim.AdamW(base_policy.value_head.parameters()))
    pool, rng = rl4vlm.EnvPool("gym_cards/NumberLine-v0", 1, range(3)), np.random.default_rng(0)
    (tmp_path / "checkpoint-00009").mkdir()  # of an abandoned future (a resume from 3 wrote 4 on): deleted
    for update in (1, 2, 3):
        lab.save_checkpoint(tmp_path, update, base_policy, scheduler, pool, rng, keep)
    names = [f"checkpoint-{k:05d}" for k in (1, 2, 3)][-keep:]  # 4 keeps all three
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == names
    assert (tmp_path / "latest").read_text() == "checkpoint-00003"


@pytest.fixture(scope="session")
def recorded_run(cache, tmp_path_factory):
    """The recorded run, uninterrupted, in this process: the run that the SIGKILL and full-disk tests' runs must end
    as (made once for both). Returns its folder, its results and the updates after which it saved a checkpoint."""
    out = tmp_path_factory.mktemp("recorded")
    saved, save = [], lab.save_checkpoint
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lab, "save_checkpoint", lambda run_dir, update, *a: (saved.append(update), save(run_dir, update, *a)))
        results = rl4vlm.main(RECORDED_RUN + ["--cache-dir", str(cache), "--out-dir", str(out), "--run-name", "full"])
    return out / "full", results, saved


def kill_when(process, latest, name):
    """SIGKILL `process` as soon as the file `latest` reads `name` (at once if the process has ended)."""
    while process.poll() is None and not (latest.is_file() and latest.read_text() == name):
        time.sleep(0.01)
    process.kill()


@pytest.mark.slow
def test_end_to_end_run_writes_metrics_checkpoints_and_resumes_exactly_after_sigkill(request, cache, tmp_path):
    # the recorded run in another process, killed (SIGKILL) as soon as checkpoint 2 is complete, then resumed. It
    # starts first, to run beside the uninterrupted recorded run where that is made here (a run keeps one core busy).
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, str(HERE / "rl4vlm.py"), *RECORDED_RUN, "--cache-dir", str(cache),
                                "--out-dir", str(tmp_path), "--run-name", "killed"],
                               cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watcher = threading.Thread(target=kill_when, args=(process, killed / "latest", "checkpoint-00002"), daemon=True)
    watcher.start()
    try:
        full, results, saved = request.getfixturevalue("recorded_run")
        watcher.join(timeout=120)
        assert not watcher.is_alive(), "no checkpoint 2 within 2 minutes"
    finally:
        process.kill()
        process.wait()

    rows = lab.metrics(full)
    assert [r["update"] for r in rows] == [1, 2, 3]
    assert saved == [2, 3], "--checkpoint-every 2: after update 2 and after the last"
    # the cosine schedule: update k of N steps at lr_min + (lr - lr_min) (1 + cos(pi (k - 1) / N)) / 2
    lr, lr_min = 1e-3, 1e-9
    expected = [lr_min + (lr - lr_min) * (1 + math.cos(math.pi * (k - 1) / 3)) / 2 for k in (1, 2, 3)]
    assert all(abs(r["lr"] - e) < 1e-12 for r, e in zip(rows, expected)), [r["lr"] for r in rows]
    assert [r["env_steps"] for r in rows] == [16, 32, 48]
    check_recorded(rows, results)
    assert (full / "latest").read_text() == "checkpoint-00003"
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-00002", "checkpoint-00003"]  # keep 2
    assert sorted(p.name for p in (full / "checkpoint-00003").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "envs.json", "state.pt"]
    assert (full / "curve.png").exists() and (full / "results.md").exists()
    assert set(results) == {"warm_start", "rl"} and results["rl"]["episodes"] == 4

    assert "rl" not in json.loads((killed / "results.json").read_text()), "the run ended before it was killed"
    resumed = rl4vlm.main(["--resume", str(killed)])
    assert strip_timing(lab.metrics(killed)) == strip_timing(rows)
    assert strip_seconds(resumed) == strip_seconds(results)


@pytest.mark.slow
def test_every_tensor_is_made_on_the_device_it_is_used_on(cache, tmp_path, monkeypatch):
    """With torch's default device set to meta, a tensor made without naming its device lands on meta and raises
    where it meets the policy's (CPU) tensors, as a CPU tensor meets a GPU run's; only the processor and model
    loading make tensors of their own (on the CPU here). A whole run (warm start, rollout, update, evaluation,
    checkpoint), stopped in update 3 and resumed, gives the recorded run's numbers."""
    def on_cpu(function):
        def wrapped(*args, **kwargs):
            with torch.device("cpu"):
                return function(*args, **kwargs)
        return wrapped
    for name in ("encode_prompt", "load_policy", "build_builtin"):
        monkeypatch.setattr(rl4vlm, name, on_cpu(getattr(rl4vlm, name)))
    with torch.device("meta"):
        with monkeypatch.context() as patch, pytest.raises(SystemExit):
            patch.setattr(rl4vlm, "ppo_update", interrupting(rl4vlm.ppo_update, at_call=3))
            rl4vlm.main(RECORDED_RUN + ["--cache-dir", str(cache), "--out-dir", str(tmp_path), "--run-name", "run"])
        results = rl4vlm.main(["--resume", str(tmp_path / "run")])
    check_recorded(lab.metrics(tmp_path / "run"), results)


@pytest.mark.parametrize("kind", ["truncated state.pt", "missing envs.json", "latest names nothing",
                                  "damaged metrics line", "half-written cached model",
                                  "pickle payload in envs.json", "pickle payload in state.pt"])
@pytest.mark.slow
def test_a_damaged_run_folder_stops_with_one_line_and_changes_nothing(stopped_run, tmp_path, kind):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    shutil.copytree(stopped_run.parent / "cache", tmp_path / "cache")
    settings_file = run / "settings.json"
    settings_file.write_text(json.dumps(dict(json.loads(settings_file.read_text()), cache_dir=str(tmp_path / "cache"))))
    named = damage(run, kind)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        rl4vlm.main(["--resume", str(run)])
    message = str(e.value)
    assert message.startswith("rl4vlm.py: error: ") and "\n" not in message and named in message, message
    if kind not in ("half-written cached model", "damaged metrics line"):  # the newest sound checkpoint is offered
        assert ("checkpoint-00002" if kind == "latest names nothing" else "checkpoint-00001") in message, message
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "marker").exists(), "the payload ran"


@pytest.mark.slow
def test_a_full_disk_mid_checkpoint_stops_with_one_line_and_resume_gives_the_uninterrupted_run(recorded_run, cache,
                                                                                              tmp_path, monkeypatch):
    """torch.save runs out of space halfway through checkpoint 2's state.pt: one line (what, where, the free space,
    the resume command), checkpoint 1 and `latest` as they were, no temporary left. The resume then removes what a
    dead writer left in the run folder and the cache, keeps what a live one is writing, and ends as a run that never
    failed (the recorded run: it checkpoints every 2 updates, which changes no number)."""
    common = RECORDED_RUN + ["--cache-dir", str(cache), "--out-dir", str(tmp_path), "--checkpoint-every", "1"]
    full_dir, full, _ = recorded_run
    run, save, seen = tmp_path / "run", torch.save, []

    def full_disk(obj, path):
        if "checkpoint-00002" in str(path):
            seen.append({p: p.read_bytes() for p in run.rglob("*") if p.is_file() and ".tmp" not in str(p)})
            Path(path).write_bytes(b"half a state.pt")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path)
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as e:
        patch.setattr(torch, "save", full_disk)
        rl4vlm.main(common + ["--run-name", "run"])
    message = str(e.value)
    assert message.startswith(f"rl4vlm.py: error: could not write {run / 'checkpoint-00002'} (")
    assert "No space left on device" in message and "MB free there" in message and "\n" not in message
    assert message.endswith(f"continue with: python rl4vlm.py --resume {run}")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == seen[0], "only finished files, unchanged"
    assert (run / "latest").read_text() == "checkpoint-00001" and not list(run.glob(".*tmp*"))
    sleeper = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        for folder, pid in ((run, dead.pid), (cache, dead.pid), (cache, sleeper.pid)):
            (folder / f".checkpoint-00009.tmp{pid}").mkdir()
            (folder / f".checkpoint-00009.tmp{pid}" / "state.pt").write_bytes(b"left behind")
        resumed = rl4vlm.main(["--resume", str(run)])
        assert [p.name for p in (*run.glob(".*tmp*"), *cache.glob(".*tmp*"))] == [f".checkpoint-00009.tmp{sleeper.pid}"]
    finally:
        sleeper.kill()
        sleeper.wait()
        shutil.rmtree(cache / f".checkpoint-00009.tmp{sleeper.pid}")
    assert strip_timing(lab.metrics(run)) == strip_timing(lab.metrics(full_dir))
    assert strip_seconds(resumed) == strip_seconds(full)


def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_leaves_the_file_as_it_was_and_no_temporary(tmp_path):
    (tmp_path / "latest").write_text("checkpoint-00001")
    message = f"could not write {tmp_path / 'latest'} ([Errno 28] No space left on device)"
    with pytest.raises(lab.WriteFailed, match=re.escape(message)):
        lab.write_atomically(tmp_path / "latest", lambda tmp: (tmp.write_text("checkpoint-0"), no_space()))
    assert (tmp_path / "latest").read_text() == "checkpoint-00001" and os.listdir(tmp_path) == ["latest"]


def test_a_folder_replaced_is_never_lost_between_its_two_renames(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint-00002"
    folder.mkdir()
    (folder / "weights").write_text("old")
    renames = []

    def replace_then_fail(src, dst):  # the old folder goes aside, then the new one's rename fails
        renames.append(src)
        if len(renames) == 2:
            raise OSError(errno.EIO, "Input/output error")
        os.rename(src, dst)
    with monkeypatch.context() as patch:
        patch.setattr(lab.os, "replace", replace_then_fail)
        with pytest.raises(lab.WriteFailed):
            lab.write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "weights").write_text("new")))
    assert (folder / "weights").read_text() == "old" and os.listdir(tmp_path) == [folder.name]
    # a writer killed between the renames left the old folder aside: the next write in the folder puts it back
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.rename(folder, tmp_path / f".{folder.name}.old{int(dead.stdout)}")
    lab.write_text(tmp_path / "latest", folder.name)
    assert (folder / "weights").read_text() == "old" and sorted(os.listdir(tmp_path)) == [folder.name, "latest"]
    lab.write_atomically(folder, lambda tmp: (tmp.mkdir(), (tmp / "weights").write_text("new")))
    assert (folder / "weights").read_text() == "new" and sorted(os.listdir(tmp_path)) == [folder.name, "latest"]


@pytest.mark.slow
def test_a_failing_rank_stops_the_other_instead_of_hanging():
    """Two gloo processes: rank 1 raises, rank 0 waits for it in a gather and must fail too (a
    3-second process-group timeout), not hang."""
    job = ("import os, lab, rl4vlm; lab.init_distributed(rl4vlm.Settings(dist_timeout=0.05))\n"
           "if os.environ['RANK'] == '1': raise RuntimeError('rank 1 fails')\nlab.gather('rank 0 waits')")
    port = free_port()
    processes = [subprocess.Popen([sys.executable, "-c", job], cwd=HERE, stderr=subprocess.DEVNULL, env=dict(
        os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"))
        for r in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [1, 1], "rank 0 must fail too, not wait"


@pytest.mark.slow
def test_a_seed_of_several_gives_what_it_gives_alone(cache, tmp_path):
    """--seeds runs each seed as --seed would: the tables may gather runs made one seed at a time."""
    common = FAST + ["--cache-dir", str(cache), "--out-dir", str(tmp_path), "--total-steps", "16", "--env", "numberline"]
    both = rl4vlm.main(common + ["--run-name", "both", "--seeds", "2", "1", "--workers", "1"])
    alone = rl4vlm.main(common + ["--run-name", "alone", "--seed", "1"])
    assert strip_timing(lab.metrics(tmp_path / "both" / "seed1" / "NumberLine")) == strip_timing(lab.metrics(tmp_path / "alone"))
    assert strip_seconds(both["NumberLine", "", 1]) == strip_seconds(alone)
    assert (tmp_path / "both" / "results.md").read_text().count("| NumberLine |") == 3  # 2 stages + diagnostics


def cache_keys() -> tuple[str, str]:
    """The built-in model's key and NumberLine's warm-start key (its defaults), from the envs module rl4vlm uses."""
    task = rl4vlm.envs.get_task("numberline")
    s = task.with_defaults(rl4vlm.Settings())
    return rl4vlm.builtin_key(1), json.dumps(rl4vlm.warm_start_key(s, task, "base"), sort_keys=True)


@pytest.mark.slow
def test_cached_models_are_keyed_on_what_shapes_them_not_on_envs_py_bytes(tmp_path, monkeypatch):
    """envs.py with a comment and a docstring changed finds the same cached models; a changed prompt or answer does
    not: the built-in model's tokenizer and the warm start learn from them."""
    import importlib.util
    text = (HERE / "envs.py").read_text()
    edited = text.replace('"""A task by its env id', '"""Edited for this test. A task by its env id', 1) + "# a comment\n"
    assert edited != text and "Edited for this test" in edited
    (tmp_path / "envs.py").write_text(edited)
    spec = importlib.util.spec_from_file_location("envs", tmp_path / "envs.py")
    copy_of_envs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy_of_envs)  # its tasks, prompts and experts: the gym envs stay registered as they are
    here = cache_keys()
    with monkeypatch.context() as patch:
        patch.setattr(rl4vlm, "envs", copy_of_envs)
        assert rl4vlm.envs.get_task.__doc__.startswith("Edited") and cache_keys() == here
    prompt, answer = envs.Task.prompt, envs.Task.answer
    monkeypatch.setattr(envs.Task, "prompt", lambda task, info, cot: prompt(task, info, cot) + " Think first.")
    changed_prompt = cache_keys()
    monkeypatch.setattr(envs.Task, "prompt", prompt)
    monkeypatch.setattr(envs.Task, "answer", lambda task, info, action, cot: answer(task, info, action, cot) + " ")
    changed_answer = cache_keys()
    for changed in (changed_prompt, changed_answer):
        assert changed[0] != here[0] and changed[1] != here[1]


def test_a_warm_start_is_keyed_on_the_code_that_shapes_it_not_on_its_comments(monkeypatch):
    here, loss = cache_keys(), rl4vlm.sft_loss

    def sft_loss(policy, heads, task, batch):
        return loss(policy, heads, task, batch)

    def sft_loss_edited(policy, heads, task, batch):  # twice the loss: another warm start
        total, stats = loss(policy, heads, task, batch)
        return 2 * total, stats
    monkeypatch.setattr(rl4vlm, "sft_loss", sft_loss_edited)
    changed = cache_keys()
    assert changed[0] == here[0] and changed[1] != here[1]
    assert rl4vlm.code_key(sft_loss) != rl4vlm.code_key(sft_loss_edited)
    assert rl4vlm.code_key(plain()) == rl4vlm.code_key(commented())  # comments and blank lines are not code


def plain():
    def f(x):
        return x + 1
    return f


def commented():
    def f(x):  # a comment

        return x + 1  # and another
    return f


def test_another_model_saved_at_the_same_path_gets_a_warm_start_of_its_own(llava, tmp_path):
    task = envs.get_task("numberline")
    s = task.with_defaults(rl4vlm.Settings(model=str(llava), sft_steps=1, sft_batch=2, cache_dir=str(tmp_path)))
    rl4vlm.warm_started_policy(s, task, log=lambda *a: None)
    weights = load_file(llava / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.01  # retrained, saved where the first one was: same folder name, same config
    save_file(weights, llava / "model.safetensors", metadata={"format": "pt"})
    rl4vlm.warm_started_policy(s, task, log=lambda *a: None)
    assert len(list(tmp_path.glob("sft-*"))) == 2


@pytest.mark.slow
def test_a_process_waits_while_another_builds_a_cached_model(tmp_path):
    """lab.building: while this test holds the lock and builds, a second process that needs the same folder
    waits, then finds it built (without the lock it would see no folder and build it too)."""
    folder = tmp_path / "model"
    job = ("import sys, lab; from pathlib import Path\nfolder = Path(sys.argv[1])\nprint('ready', flush=True)\n"
           "with lab.building(folder):\n    print('built' if not folder.exists() else 'found', flush=True)")
    with lab.building(folder):
        other = subprocess.Popen([sys.executable, "-c", job, str(folder)], cwd=HERE, stdout=subprocess.PIPE, text=True)
        assert other.stdout.readline() == "ready\n"
        time.sleep(0.5)  # the other process is at the lock now
        folder.mkdir()
    assert other.communicate(timeout=120)[0] == "found\n" and other.returncode == 0


def command_lines() -> dict:
    """pid -> command line of every process (Linux's /proc), a process that ends meanwhile left out."""
    lines = {}
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines[int(path.parent.name)] = path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):  # it ended between the listing and the read
            continue
    return lines


@pytest.fixture(scope="module")
def parallel_suite(cache, tmp_path_factory):
    """Two runs (NumberLine with GAE and with GiGPO: --ablations advantage) with --workers 2: interrupted (SIGINT to the suite's process) once both had
    started, then resumed to the end. Returns the suite folder and what the interrupted process printed."""
    out = tmp_path_factory.mktemp("parallel")
    args = FAST + ["--cache-dir", str(cache), "--out-dir", str(out), "--ablations", "advantage",
                   "--group-size", "2", "--workers", "2", "--total-steps", "32"]
    # both runs wait at the built-in model's lock, held here until the interrupt, so neither can finish first
    # (released however this block ends: a later test's runs take the same lock)
    with open(cache / f".builtin-{rl4vlm.builtin_key(1)}-seed1.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # SIGINT as a terminal's Ctrl-C sends it, also where the tests run with it ignored (a background job)
        suite = subprocess.Popen([sys.executable, str(HERE / "rl4vlm.py"), *args, "--run-name", "suite"], cwd=HERE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        printed = []
        while sum("started" in line for line in printed) < 2:  # one line per stage: the suite ends if its output does
            line = suite.stdout.readline()
            assert line, "".join(printed)
            printed.append(line)
        suite.send_signal(signal.SIGINT)
        printed += suite.communicate(timeout=120)[0].splitlines(keepends=True)
    assert suite.returncode == 130, "".join(printed)
    left = [pid for pid, cmdline in command_lines().items() if f"--resume {out / 'suite'}" in cmdline]
    stopped = [task for task in ("NumberLine-GAE", "NumberLine-GiGPO") if "rl" not in lab.finished(out / "suite" / "seed1" / task)]
    # the same runs with --workers 1, what the resumed suite must give: in a process of their own beside it, as the
    # suite's two workers would leave a core idle once one of them has finished
    serial = subprocess.Popen([sys.executable, str(HERE / "rl4vlm.py"), *args, "--run-name", "serial", "--workers", "1"],
                              cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rl4vlm.main(["--resume", str(out / "suite")])
    finally:
        serial_printed = serial.communicate(timeout=300)[0]
    assert serial.returncode == 0, serial_printed
    return out, "".join(printed), stopped, left


@pytest.mark.slow
def test_gigpo_logs_the_env_steps_it_played_past_each_batch(parallel_suite):
    suite = parallel_suite[0] / "suite"
    rows = lab.metrics(suite / "seed1" / "NumberLine-GiGPO")  # interrupted and resumed: the count goes on
    assert [r["env_steps"] for r in rows] == list(itertools.accumulate(r["samples"] for r in rows))
    assert rows[-1]["env_steps"] > 4 * 4 * len(rows)  # batches of 16: the deals ran past them
    assert f"| NumberLine | GiGPO, after RL, {rows[-1]['env_steps']:,} env steps |" in (suite / "ablations.md").read_text()


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_prints_the_suites_resume_command(parallel_suite):
    out, printed, stopped, left = parallel_suite
    assert printed.splitlines()[-1] == f"interrupted; continue with: python rl4vlm.py --resume {out / 'suite'}"
    assert re.search(r"NumberLine GAE seed 1 +started +\[0 done, 1 running, 1 waiting\]", printed), printed
    assert re.search(r"NumberLine GiGPO seed 1 +started +\[0 done, 2 running, 0 waiting\]", printed), printed
    assert stopped == ["NumberLine-GAE", "NumberLine-GiGPO"] and not left, f"runs went on after the suite stopped: {left}"


@pytest.mark.slow
def test_workers_2_interrupted_and_resumed_give_what_workers_1_gives(parallel_suite):
    out, *_ = parallel_suite
    for task in ("NumberLine-GAE", "NumberLine-GiGPO"):
        parallel, serial = out / "suite" / "seed1" / task, out / "serial" / "seed1" / task
        assert strip_timing(lab.metrics(parallel)) == strip_timing(lab.metrics(serial)), task
        assert strip_seconds(lab.finished(parallel)) == strip_seconds(lab.finished(serial)), task
    assert (out / "suite" / "ablations.md").read_text() == (out / "serial" / "ablations.md").read_text()


@pytest.mark.slow
def test_a_run_that_fails_stops_no_other_and_the_suite_names_it(parallel_suite, tmp_path):
    """The GiGPO run's checkpoint pointer is damaged and both runs are made unfinished: the resumed suite finishes
    the GAE run, names the GiGPO run and its log's last line, and exits non-zero."""
    out, *_ = parallel_suite
    suite = tmp_path / "suite"
    shutil.copytree(out / "suite", suite)
    for task in ("NumberLine-GAE", "NumberLine-GiGPO"):
        results = suite / "seed1" / task / "results.json"
        results.write_text(json.dumps({"warm_start": json.loads(results.read_text())["warm_start"]}))
    (suite / "seed1" / "NumberLine-GiGPO" / "latest").write_text("checkpoint-00009")
    with pytest.raises(SystemExit) as e:
        rl4vlm.main(["--resume", str(suite)])
    message = str(e.value)
    assert message.startswith("rl4vlm.py: error: 1 of 2 runs failed: NumberLine GiGPO seed 1 (") and "\n" not in message
    assert "latest names no checkpoint folder" in message and f"--resume {suite}" in message, message
    assert strip_seconds(lab.finished(suite / "seed1" / "NumberLine-GAE")) == \
        strip_seconds(lab.finished(out / "suite" / "seed1" / "NumberLine-GAE"))


@pytest.mark.slow
def test_existing_run_folder_is_not_overwritten(cache, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "settings.json").write_text("{}")
    with pytest.raises(SystemExit, match="--resume"):
        rl4vlm.main(FAST + ["--cache-dir", str(cache), "--out-dir", str(tmp_path), "--run-name", "old"])


def test_an_answer_reads_right_with_the_states_fields_and_thinks_true_with_its_thought_exactly():
    numberline, blackjack = envs.get_task("numberline"), envs.get_task("blackjack")
    info = {"Current": 2, "Target": 4}
    right = '{"current": 2, "target": 4, "thoughts": "target is above current", "action": "+"}'
    assert numberline.answer(info, 1, cot=True) == right and numberline.answer_checks(info, right) == (True, True)
    assert numberline.answer_checks(info, right.replace('"target": 4', '"target": 5')) == (False, True)
    assert numberline.answer_checks(info, right.replace("above", "below")) == (True, False)
    assert numberline.answer_checks(info, '{"current": 2, "target": 4, "thoughts": "target is above') == (True, False)
    hand = {"Dealer": [10], "Player": [1, 6]}  # soft 17
    answer = blackjack.answer(hand, 0, cot=True)
    assert answer.startswith('{"dealer": 10, "player": 17, ') and blackjack.answer_checks(hand, answer) == (True, True)
    # the shares of a batch; without CoT there is nothing to check
    answers = lambda *checks: [SimpleNamespace(format_ok=f, read_ok=r, thought_ok=t) for f, r, t in checks]
    shares = rl4vlm.answer_shares(answers((True, True, False), (False, True, True), (True, False, True), (True, True, True)))
    assert shares == dict(format_fail=0.25, read_right=0.75, thought_right=0.75)
    assert all(math.isnan(v) for v in list(rl4vlm.answer_shares(answers((True, None, None))).values())[1:])


def test_suite_table_shows_each_seed_the_mean_and_the_range(tmp_path):
    tasks = list(envs.TASKS.values())
    r = lambda p, t: dict(success=p, ci_low=p - 0.05, ci_high=p + 0.05, episodes=500, expert_match=p / 2,
                          read_right=1 - p / 2, thought_right=1 - p / 5, format_fail=p / 10,
                          **({"solvable": 0.73} if t.solvable else {}))
    results = {}
    for seed, (ws, rl) in {1: (0.2, 0.6), 3: (0.1, 0.9)}.items():
        for t in tasks:
            results[t.name, seed] = {"warm_start": r(ws, t), "rl": r(rl, t)}
            folder = tmp_path / f"seed{seed}" / t.name
            folder.mkdir(parents=True)
            updates = [dict(step_kls=[0.01, 0.02], undone_steps=0, explained_variance=-0.1, value_loss=4.0),
                       dict(step_kls=[seed / 10], undone_steps=1, explained_variance=0.1 * seed, value_loss=2.0 / seed)]
            (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in updates))
    md, csv = lab.suite_tables(tasks, [1, 3], results, tmp_path)
    lines = md.splitlines()
    assert lines[2] == "| task | policy | seed 1 | seed 3 | mean | min-max | paper (7B) |"
    assert lines[4] == "| NumberLine | warm start only | 20.0 | 10.0 | 15.0 | 10.0-20.0 | 24.8 |"
    assert lines[5] == "| NumberLine | after RL | 60.0 | 90.0 | 75.0 | 60.0-90.0 | 89.4 |"
    assert lines[11] == "| Blackjack | after RL | 60.0 | 90.0 | 75.0 | 60.0-90.0 | 40.2 |"
    # expert match, reading, thoughts, format failures: means over seeds (warm start 0.15, after RL 0.75);
    # the kept steps' approx_kl median and max, and the undone steps, of both seeds; the critic's explained variance
    # and value loss over the first half of each seed's updates (-0.1, 4) and the second (0.1 and 0.3, 2 and 2/3)
    assert ("| EZPoints | 7.5 -> 37.5 | 92.5 -> 62.5 | 97.0 -> 85.0 | 1.5 -> 7.5 | 0.0200 | 0.3000 | 2 | -0.10 -> 0.20 "
            "| 4.00 -> 1.33 |") in lines
    assert "Points24: 73.0% of the evaluated deals can be won at all." in md
    rows = csv.splitlines()
    assert rows[0] == ("task,seed,stage,success,ci_low,ci_high,episodes,expert_match,read_right,thought_right,"
                       "format_fail,solvable,paper")
    assert rows[1] == "NumberLine,1,warm_start,0.2000,0.1500,0.2500,500,0.1000,0.9000,0.9600,0.0200,,24.8"
    assert len(rows) == 1 + 2 * 2 * len(tasks)


# --- other model families: LLaVA, Idefics3, Gemma3 through --model FOLDER, Qwen2-VL's model ---


@pytest.mark.slow
def test_a_run_with_the_model_folder(folder, tmp_path):
    results = rl4vlm.main(fast_args(folder, tmp_path, "--run-name", "run"))
    assert set(results) == {"warm_start", "rl"} and results["rl"]["episodes"] == 2
    assert (tmp_path / "run" / "checkpoint-00001" / "adapter_model.safetensors").exists()
    # a pretrained model's warm start trains LoRA adapters on the language model and merges them
    warm, = (tmp_path / "cache").glob("sft-*")
    assert json.loads((warm / "warm_start.json").read_text())["lora"][:3] == [8, 16.0, 0.0]
    base = AutoModelForImageTextToText.from_pretrained(folder)
    base_weights, tuned = base.state_dict(), AutoModelForImageTextToText.from_pretrained(warm).state_dict()
    assert base_weights.keys() == tuned.keys()
    changed = {k for k in tuned if not torch.equal(base_weights[k], tuned[k])}
    text = rl4vlm.lora_targets(base)  # the language model's linear layers
    assert changed and all(re.search(text, k) and k.endswith("proj.weight") for k in changed), sorted(changed)[:3]


def test_thought_action_split_with_the_models_tokenizer(folder):
    s, policy = load(folder)
    task, tokenizer = envs.get_task("numberline"), policy.processor.tokenizer
    stops = tokenizer.convert_ids_to_tokens(policy.stop_ids)
    info = {"Target": 4, "Current": 1}
    text = rl4vlm.answer_text(policy.processor, task.prompt(info, True), task.answer(info, 1, True), stops)
    assert any(text.endswith(stop) for stop in stops), f"the answer must end in a stop token: {text!r}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    index, span = parse.parse_action(decoded, task.actions)
    assert index == 1
    first_action = rl4vlm.action_start(tokenizer, ids, span)
    # the thought tokens decode to the text before the action value; the first action token is
    # the one holding the value's first character (with a merge such as ' "+' it holds the quote too)
    thought = tokenizer.decode(ids[:first_action], skip_special_tokens=True)
    assert decoded[:span[0]].startswith(thought)
    assert len(tokenizer.decode(ids[:first_action + 1], skip_special_tokens=True)) > span[0]


def test_prompt_cache_gives_each_familys_processor_tensors(folder):
    check_prompt_cache(rl4vlm.load_policy(str(folder), "cpu").processor)


def test_default_lora_targets_are_the_language_models_linear_layers(folder):
    names = {"llava": ("model.language_model.", "model.vision_tower."),  # as each family names them
             "idefics3": ("model.text_model.", "model.vision_model."),
             "gemma3": ("model.language_model.", "model.vision_tower.")}
    text, vision = names[json.loads((folder / "config.json").read_text())["model_type"]]
    model = AutoModelForImageTextToText.from_pretrained(folder)
    linear = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    in_text, in_vision = {n for n in linear if n.startswith(text)}, {n for n in linear if n.startswith(vision)}
    assert in_text and in_vision
    lora = lambda **kw: rl4vlm.add_lora(AutoModelForImageTextToText.from_pretrained(folder), rl4vlm.Settings(**kw))
    assert set(lora()) == in_text and set(lora(lora_vision=True)) == in_text | in_vision
    assert all(n.endswith("q_proj") for n in lora(lora_targets=r"q_proj$"))  # an explicit regex wins


def test_each_family_rollout_logprobs_and_values_equal_a_full_forward(folder):
    """The training forward sees what generation saw: per-token extras (Gemma3's
    token_type_ids), positions and image inputs, for a left-padded batch."""
    s, policy = load(folder, max_new_tokens=8, temperature=0.7)
    task = envs.get_task("numberline")
    obs, infos = states(3)
    torch.manual_seed(0)
    samples = rl4vlm.act(policy, task, obs, infos, np.random.default_rng(0))
    # a shorter prompt, so that the batch has padding
    samples[1].prompt = rl4vlm.encode_prompts(policy.processor, obs[1:2], ["a shorter prompt"], "cpu")[0]
    with torch.no_grad():
        prompt, gen_ids, gen_mask, weights = rl4vlm.collate(samples, policy.pad_id)
        logprobs, values = rl4vlm.logprobs_and_values(policy, prompt, gen_ids, gen_mask)
        for i in (0, 2):
            assert abs(float((logprobs[i] * weights[i]).sum()) - samples[i].logprob) < 1e-5
            assert abs(float(values[i]) - samples[i].value) < 1e-5
        alone = rl4vlm.logprobs_and_values(policy, *rl4vlm.collate(samples[1:2], policy.pad_id)[:3])
        n = len(samples[1].gen_ids)
        assert torch.allclose(logprobs[1, :n], alone[0][0], atol=1e-5)
        assert torch.allclose(values[1], alone[1][0], atol=1e-5)


def test_one_bos_whether_the_template_or_the_tokenizer_writes_it(folder):
    processor = rl4vlm.load_policy(str(folder), "cpu").processor
    assert processor.tokenizer.pad_token is not None  # LLaVA's has none and pads with EOS
    obs, infos = states(1)
    ids = rl4vlm.encode_prompts(processor, obs, [envs.get_task("numberline").prompt(infos[0], True)], "cpu")
    ids = ids[0]["input_ids"][0].tolist()
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1, processor.tokenizer.decode(ids)


def test_a_ppo_step_changes_only_lora_and_value_head_weights(folder):
    s, policy = load(folder, max_new_tokens=8)
    obs, infos = states(4)
    samples = rl4vlm.act(policy, envs.get_task("numberline"), obs, infos, np.random.default_rng(0))
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    head_before = {k: v.clone() for k, v in policy.value_head.state_dict().items()}
    stats = ppo_step(policy, s, samples)
    assert np.isfinite(stats["policy_loss"]) and np.isfinite(stats["value_loss"])
    after = policy.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed and changed <= lora, f"base weights changed: {sorted(changed - lora)[:5]}"
    assert all(not torch.equal(v, policy.value_head.state_dict()[k]) for k, v in head_before.items())


def test_bfloat16_weights_with_float32_log_probs_values_and_ppo(llava):
    s, policy = load(llava, dtype="bfloat16", max_new_tokens=8, num_envs=2, num_steps=2)
    base = [p for n, p in policy.model.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert {p.dtype for p in trainable(policy)} == {torch.float32}
    task = envs.get_task("numberline")
    pool = rl4vlm.EnvPool(task.env_id, s.num_envs, range(10**4))
    batch = rl4vlm.rollout(policy, task, pool, s.num_steps, s.format_penalty, np.random.default_rng(0))
    assert batch.values.dtype == batch.next_values.dtype == torch.float32 and torch.isfinite(batch.next_values).all()
    with torch.no_grad():
        prompt, gen_ids, gen_mask, _ = rl4vlm.collate(batch.samples, policy.pad_id)
        logprobs, v = rl4vlm.logprobs_and_values(policy, prompt, gen_ids, gen_mask)
        logits = rl4vlm.forward(policy.model, prompt, gen_ids, gen_mask)[2].logits
    assert logprobs.dtype == v.dtype == torch.float32
    assert logits.dtype == torch.float32 and not torch.equal(logits, logits.bfloat16().float()), "rounded to bf16"
    assert all(np.isfinite(x.logprob) for x in batch.samples)
    stats = ppo_step(policy, s, batch.samples)
    assert np.isfinite(stats["policy_loss"]) and np.isfinite(stats["grad_norm"])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_update_runs_without_dropout_as_sampling_does(llava, checkpointing):
    """--lora-dropout 0.05: the update's forward gives exactly what sampling's mode (eval) gives, so the first
    epoch's ratio is 1; with --grad-checkpointing its layers still run again in the backward pass."""
    s, policy = load(llava, lora_dropout=0.05, max_new_tokens=8)
    model = policy.model
    if checkpointing:
        model.activation_checkpointing_enable()
    obs, infos = states(4)
    samples = rl4vlm.act(policy, envs.get_task("numberline"), obs, infos, np.random.default_rng(0))
    batch = rl4vlm.collate(samples, policy.pad_id)[:3]
    with torch.no_grad():
        sampling = rl4vlm.logprobs_and_values(policy, *batch)
        model.train()
        dropped = rl4vlm.logprobs_and_values(policy, *batch)
    calls = []
    model.get_decoder().layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    rl4vlm.update_mode(model)
    update = rl4vlm.logprobs_and_values(policy, *batch)
    (update[0].sum() + update[1].sum()).backward()
    assert torch.equal(update[0], sampling[0]) and torch.equal(update[1], sampling[1])
    assert not torch.allclose(dropped[0], sampling[0]), "in train mode LoRA's dropout acts"
    assert len(calls) == 1 + checkpointing


def test_grad_checkpointing_gives_the_same_gradients(llava):
    s, policy = load(llava, max_new_tokens=8)
    model = policy.model
    obs, infos = states(2)
    samples = rl4vlm.act(policy, envs.get_task("numberline"), obs, infos, np.random.default_rng(0))
    batch = rl4vlm.collate(samples, policy.pad_id)[:3]

    def gradients():
        model.train()
        model.zero_grad()
        logprobs, values = rl4vlm.logprobs_and_values(policy, *batch)
        (logprobs.sum() + values.sum()).backward()
        return [p.grad.clone() for p in ppo.lora_parameters(model)]
    calls = []
    model.get_decoder().layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    plain = gradients()
    assert len(calls) == 1
    model.activation_checkpointing_enable()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, gradients()))
    assert len(calls) == 3, "with checkpointing the layer runs again in the backward pass"


def test_qwen2_vl_log_probs_and_a_ppo_step():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil
    tok = bpe_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                         "<|image_pad|>", "<|video_pad|>"], pad_token="<|endoftext|>", eos_token="<|im_end|>")
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = Qwen2VLStandIn(Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=8, merge_size=2,
                                                        temporal_patch_size=2), tok, template)
    config = Qwen2VLConfig(
        text_config=dict(**TINY, num_key_value_heads=1, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=None, eos_token_id=tok.eos_token_id,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert rl4vlm.lora_targets(model) == r"^(model\.language_model\.)"
    ppo.add_lora(model, 4, 8.0, 0.0, rl4vlm.lora_targets(model))
    for _, m in ppo.lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    model.eval()
    policy = rl4vlm.Policy(model, processor, ppo.ValueHead(model.config.get_text_config().hidden_size),
                           temperature=0.7, max_new_tokens=8)
    s, _ = settings()
    obs, infos = states(4)
    samples = rl4vlm.act(policy, envs.get_task("numberline"), obs, infos, np.random.default_rng(0))
    samples[1].prompt = rl4vlm.encode_prompts(processor, obs[1:2], ["short"], "cpu")[0]  # padding in the batch
    with torch.no_grad():
        prompt, gen_ids, gen_mask, weights = rl4vlm.collate(samples, tok.pad_token_id)
        logprobs, values = rl4vlm.logprobs_and_values(policy, prompt, gen_ids, gen_mask)
    # 1-D positions instead of the 3-D ones would be off by about 1e-4 here
    for i in (0, 2, 3):
        assert abs(float((logprobs[i] * weights[i]).sum()) - samples[i].logprob) < 1e-5
        assert abs(float(values[i]) - samples[i].value) < 1e-5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ppo_step(policy, s, samples)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)


def test_pictures_with_different_crop_counts_batch_as_each_alone(tmp_path):
    """Idefics3 splits a picture into crops by its shape: a batch zero-pads the crop dimension
    (the model drops all-zero crops) and gives each sample what it gets alone."""
    from transformers import Idefics3ImageProcessorPil
    torch.manual_seed(0)
    model, processor = build_idefics3(tmp_path)
    processor.image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                          do_image_splitting=True)
    model.eval()
    policy = rl4vlm.Policy(model, processor, ppo.ValueHead(model.config.get_text_config().hidden_size))
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (20, 60, 3), dtype=np.uint8)]
    rows = rl4vlm.encode_prompts(processor, pictures, ["square", "wide"], "cpu")
    assert [r["pixel_values"].shape[1] for r in rows] == [5, 3]  # 4 crops + the whole, 2 crops + the whole
    gen_ids = torch.tensor(processor.tokenizer([' {"action": "+"}', ' {"action": "-"}'], add_special_tokens=False)["input_ids"])
    gen_mask = torch.ones_like(gen_ids, dtype=torch.bool)
    with torch.no_grad():
        batch = rl4vlm.logprobs_and_values(policy, rl4vlm.pad_prompts(rows, policy.pad_id), gen_ids, gen_mask)
        for i, row in enumerate(rows):
            alone = rl4vlm.logprobs_and_values(policy, row, gen_ids[i:i + 1], gen_mask[i:i + 1])
            assert torch.allclose(batch[0][i], alone[0][0], atol=1e-5)
            assert torch.allclose(batch[1][i], alone[1][0], atol=1e-5)


# --- data parallel, last: its two ranks run beside every test above (two_ranks_started) ---


@pytest.mark.parametrize("advantage", ["gae", "gigpo"])
@pytest.mark.slow
def test_two_ranks_take_the_step_one_process_takes_on_the_whole_batch(policy, two_ranks, advantage):
    """One PPO update (2 epochs of 2 minibatches, SGD) on 8 samples in one process, and on 4 samples in each of two
    gloo processes (gigpo: 3 and 5, as whole episodes make them): the same weights within 1e-6, on both ranks alike."""
    (rank0, rank1), _ = two_ranks
    rank0, rank1 = rank0[advantage], rank1[advantage]
    policy = replace(policy, temperature=0.2)
    samples, advantages, returns = update_batch(policy)
    before = [p.detach().clone() for p in trainable(policy)]
    s, _ = settings(minibatch_size=4, micro_batch=1, update_epochs=2, target_kl=0, advantage=advantage)
    stats = rl4vlm.ppo_update(policy, torch.optim.SGD(trainable(policy), lr=1e-2), samples, advantages, returns, s,
                              np.random.default_rng(0))
    after = [p.detach().clone() for p in trainable(policy)]
    assert all(torch.equal(a, b) for a, b in zip(rank0["weights"], rank1["weights"]))
    assert max(float((a - b).abs().max()) for a, b in zip(rank0["weights"], after)) < 1e-6
    assert not all(torch.equal(a, b) for a, b in zip(before, after)) and stats["optimizer_steps"] == 4
    assert rank0["stats"] == rank1["stats"]
    # a step's KL is a float32 mean over many tokens: summed in another order on two ranks, it moved by 1.01e-6 here
    bad = {k: (v, rank0["stats"][k]) for k, v in stats.items()
           if rank0["stats"][k] != pytest.approx(v, rel=1e-5, abs=2e-6)}
    assert not bad, bad


@pytest.mark.parametrize("name", ["", "-gigpo"])
@pytest.mark.slow
def test_two_ranks_resume_exactly(two_ranks, name):
    """A two-rank run stopped during update 2 and resumed writes the update-2 metrics of the
    uninterrupted two-rank run; only rank 0 writes. With gigpo too (each rank one group of 2 envs)."""
    (rank0, rank1), out = two_ranks
    assert rank0["stopped_code" + name] == rank1["stopped_code" + name] == 130
    assert strip_timing(lab.metrics(out / ("stopped" + name))) == strip_timing(lab.metrics(out / ("full" + name)))
    assert len(lab.metrics(out / ("full" + name))) == 2
    assert len(json.loads((out / ("full" + name) / "checkpoint-00002" / "envs.json").read_text())) == 2, "both ranks"
    assert rank0["resumed" + name]["rl"]["success"] == rank0["full" + name]["rl"]["success"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python test_all.py --record  (the tests run with: python -m pytest -q test_all.py)")
    record()
