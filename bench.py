"""Speed of rl4vlm on the built-in model, against a paper-style loop; checks that say PASS or FAIL.

    python bench.py                 # tables on stdout, numbers in bench.json; exit 1 if a check fails
    python bench.py --experts       # the experts' and random actions' success, Points24 solvability, and
                                    # the Blackjack expert on the evaluation deals of run seeds 1-6
    python bench.py --pictures DIR  # a sample picture of each task (300 px, and shrunk to 96 and 64 px)
    python bench.py --gpu           # the real-model path on CUDA in bfloat16, a few minutes (see gpu())

Measures, in one process (the warm-started built-in NumberLine policy, cached in .cache):
- env steps per second of our batched rollout (1, 8, 32 envs) and of a paper-style loop at 32
  envs: one env at a time, every picture drawn afresh, the processor run on every prompt, then a
  second full forward for the log-probs and the value, as the official code does;
- where our 32-env rollout spends its time (each second counted once, in the innermost part);
- an env step of ours against an env that draws every picture afresh, on each task;
- PPO update samples per second at several micro-batch sizes, and evaluation episodes per second
  at several numbers of envs in parallel;
- the log-probs and values the rollout keeps from generation against a separate full forward;
- this process's peak resident memory.
"""
import rl4vlm  # first: it pins torch's CPU kernels (CPU_PINS) before torch loads
import argparse
import itertools
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from unittest import mock

import gymnasium as gym
import numpy as np
import torch
from PIL import Image

import envs
import parse
import ppo


class Profile:
    """Seconds per part, each second counted once: while a wrapped function runs inside another,
    the outer one's clock stops."""

    def __init__(self):
        self.seconds, self.stack = defaultdict(float), []

    def wrap(self, fn, part):
        def timed(*args, **kwargs):
            self.pause()
            self.stack.append([part, time.perf_counter()])
            try:
                return fn(*args, **kwargs)
            finally:
                self.pause()
                self.stack.pop()
                if self.stack:
                    self.stack[-1][1] = time.perf_counter()
        return timed

    def pause(self):
        if self.stack:
            part, start = self.stack[-1]
            self.seconds[part] += time.perf_counter() - start


def painted(env):
    """The picture painted afresh onto one canvas, every sprite, no cache."""
    image = Image.new("RGB", (envs.SIZE, envs.SIZE), env.background)
    for x, y, *sprite in env.sprites():
        envs.paint(image, x, y, *sprite)
    return np.asarray(image)


def drawing_afresh(pool):
    """The pool's envs draw every picture anew, as environments without a picture cache do."""
    for env in pool.envs:
        env.unwrapped.render = lambda env=env.unwrapped: painted(env)
    pool.obs = [env.unwrapped.render() for env in pool.envs]
    return pool


def paper_style_rollout(policy, task, pool, rng, steps):
    """One env at a time, no caches; after generating, a second full forward gives log-probs and value."""
    uncached = lambda processor, images, prompts, device: [
        rl4vlm.encode_prompt(processor, image, prompt, device) for image, prompt in zip(images, prompts)]
    with mock.patch.object(rl4vlm, "encode_prompts", uncached):
        for _ in range(steps):
            for i in range(len(pool.envs)):
                samples = rl4vlm.act(policy, task, [pool.obs[i]], [pool.infos[i]], rng)
                with torch.no_grad():
                    rl4vlm.logprobs_and_values(policy, *rl4vlm.collate(samples, policy.pad_id)[:3])
                pool.step(i, samples[0].action)


def env_step_seconds(env, steps, rng):
    """Seconds per step (resets included) of random play."""
    env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        if terminated or truncated:
            env.reset()
    return (time.perf_counter() - t0) / steps


def expert_returns(task, episodes, seed, policy=None):
    """Episode returns when the expert (or policy(info, np_random) -> action) plays, on the env's
    own rules but without drawing pictures."""
    env = task.env_class()
    env.reset(seed=seed)  # deals the first episode; the same deals as reset(seed=seed), reset(), reset(), ...
    policy = policy or (lambda info, rng: task.expert(info))
    returns = []
    for episode in range(episodes):
        if episode > 0:
            env.deal()
        episode_return, done = 0.0, False
        while not done and (action := policy(env.info(), env.np_random)) is not None:
            reward, terminated, truncated = env.play(action)
            episode_return, done = episode_return + reward, terminated or truncated
        returns.append(episode_return)
    return returns


def experts(episodes, seed):
    for task in envs.TASKS.values():
        rate = np.mean([envs.is_success(r) for r in expert_returns(task, episodes, seed)])
        chance = np.mean([envs.is_success(r) for r in expert_returns(task, episodes, seed,
                                                                           lambda info, rng: task.random_action(rng))])
        print(f"{task.name}: expert success {rate:.4f}, random actions {chance:.4f}, over {episodes} episodes (seed {seed})")
    env, played = envs.Points24Env(), []
    env.reset(seed=seed)  # the deals the expert played
    for episode in range(episodes):
        if episode > 0:
            env.deal()
        played.append(envs.points24_solvable(env.numbers))
    deals = list(itertools.product(range(1, 14), repeat=4))
    share = np.mean([envs.points24_solvable([envs.card_value(r) for r in deal]) for deal in deals])
    print(f"Points24: solvable share {np.mean(played):.4f} of the deals played, {share:.4f} of all {len(deals)} deals")
    _, expected, win = envs.blackjack_optimum()
    print(f"Blackjack: best fixed policy (DP) wins {win:.4f}, expected return {expected:.4f}")
    task = envs.get_task("blackjack")
    for run_seed in range(1, 7):  # each deal reset on its own seed, as rl4vlm's evaluation deals it
        deals = rl4vlm.stream("eval", run_seed)[:rl4vlm.Settings().eval_episodes]
        won = [envs.is_success(sum(expert_returns(task, 1, deal))) for deal in deals]
        print(f"Blackjack: the expert wins {np.mean(won):.4f} of run seed {run_seed}'s {len(deals)} evaluation deals")


def pictures(folder, seed):
    os.makedirs(folder, exist_ok=True)
    for task in envs.TASKS.values():
        env = gym.make(task.env_id)
        obs, info = env.reset(seed=seed)
        for _ in range(2):  # a couple of expert moves, so the Points pictures show a formula
            action = task.expert(info)
            if action is None or task.actions[action] in ("=", "stand"):
                break
            obs, _, _, _, info = env.step(action)
        for size in (envs.SIZE, 96, 64):
            suffix = "" if size == envs.SIZE else f"_{size}"
            Image.fromarray(obs).resize((size, size), Image.BICUBIC).save(os.path.join(folder, f"{task.name}{suffix}.png"))
        print(f"{task.name}: {info}")


def bpe_tokenizer(specials, add_bos=False, **special_tokens):
    """A byte-level BPE tokenizer trained on the tasks' text, with `specials` as special tokens, for the tiny models of
    other families (build_gemma3 here, the others in test_all.py); with add_bos it puts BOS before every text, as
    Llama's and Gemma's tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(rl4vlm.task_corpus(0, episodes=3), trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if add_bos:
        bos = special_tokens["bos_token"]
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, padding_side="left", **special_tokens)


TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def build_gemma3(folder):
    """Gemma3: SigLIP vision tower, pooled projector, token_type_ids for bidirectional attention
    over the image, a turn that ends in <end_of_turn> while the tokenizer's EOS is <eos>."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)
    tok = bpe_tokenizer(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                         "<end_of_image>", "<image_soft_token>"], add_bos=True,
                        pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                              "image_token": "<image_soft_token>", "sot_token": "<start_of_turn>",
                                              "eot_token": "<end_of_turn>"})
    template = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' "
                "else m['role']) + '\n' }}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<start_of_image>' }}"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
    px, patch, tokens = 32, 8, 4
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**TINY, image_size=px, patch_size=patch),
        text_config=Gemma3TextConfig(**TINY, num_key_value_heads=1, head_dim=16, vocab_size=len(tok), sliding_window=16,
                                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=stop),
        mm_tokens_per_image=tokens, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": px, "width": px}),
                                tokenizer=tok, image_seq_length=tokens, chat_template=template)
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = stop  # as the hub checkpoints have it
    return model, processor


def gpu(device, folder):
    """The GPU path, end to end in bfloat16: the built-in model and a tiny Gemma3 (random weights, built from a
    config by build_gemma3, as the tests build it) each through a warm start, two updates and evaluation, and the built-in under a
    one-GPU torchrun (NCCL), each with its peak GPU memory; then, in this process, the peak memory of a rollout at
    32 envs, the first epoch's |log ratio| (the update's forward against sampling's) and a check that evaluation
    leaves the GPU's generator where it was. --device cpu runs the same on the CPU (gloo), to try it anywhere."""
    folder = Path(folder).resolve()
    if not (folder / "gemma3" / "config.json").exists():
        torch.manual_seed(0)
        model, processor = build_gemma3(folder / "gemma3")
        model.save_pretrained(folder / "gemma3")
        processor.save_pretrained(folder / "gemma3")
    common = ["--env", "numberline", "--device", device, "--dtype", "bfloat16", "--num-envs", "8", "--num-steps", "4",
              "--total-steps", "64", "--sft-steps", "20", "--sft-batch", "8", "--eval-episodes", "16",
              "--minibatch-size", "16", "--micro-batch", "8", "--cache-dir", str(folder / "cache"),
              "--out-dir", str(folder / "runs")]
    here, stamp = Path(__file__).resolve().parent, str(int(time.time()))
    runs = {"built-in": [sys.executable, "rl4vlm.py"],
            "tiny Gemma3": [sys.executable, "rl4vlm.py", "--model", str(folder / "gemma3"), "--max-new-tokens", "24"],
            "built-in, torchrun 1 GPU": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                                         "rl4vlm.py"]}
    ok, metrics = True, {}
    print("| run | exit | minutes | warm start % | after RL % | peak GPU memory |\n|---|---|---|---|---|---|")
    for name, command in runs.items():
        run_dir = folder / "runs" / f"{name.replace(' ', '-').replace(',', '')}-{stamp}"
        metrics[name] = run_dir / "metrics.jsonl"
        t0 = time.time()
        done = subprocess.run(command + common + ["--run-name", run_dir.name], cwd=here, capture_output=True, text=True)
        peak = re.findall(r"peak GPU memory: ([\d.]+) GiB", done.stdout)
        results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
        success = [f"{100 * results[k]['success']:.1f}" if k in results else "-" for k in ("warm_start", "rl")]
        print(f"| {name} | {done.returncode} | {(time.time() - t0) / 60:.1f} | {success[0]} | {success[1]} | "
              f"{peak[-1] + ' GiB' if peak else '-'} |", flush=True)
        if done.returncode:
            print((done.stdout + done.stderr)[-3000:])
        ok &= done.returncode == 0
    # the torchrun run found the built-in run's cached models, the first built them: the same numbers if the GPU's
    # kernels are deterministic (some are not), and the same seeding either way
    keys = ("success", "approx_kl", "policy_loss", "value_loss", "thought_entropy")
    first, second = ([[r[k] for k in keys] for r in map(json.loads, metrics[name].read_text().splitlines())]
                     if metrics[name].exists() else [] for name in ("built-in", "built-in, torchrun 1 GPU"))
    gap = np.abs(np.array(first, float) - np.array(second, float)).max() if first and len(first) == len(second) else math.nan
    print(f"\nbuilt-in with cached models against built-in that built them: largest difference in {keys}: {gap:.3g}")

    task = envs.get_task("numberline")
    s = task.with_defaults(rl4vlm.parse_settings(common))
    torch.manual_seed(s.seed)
    policy = rl4vlm.warm_started_policy(s, task, lambda *a: None)  # the built-in run's, from the cache
    rl4vlm.add_trainable(policy, s)
    for _, m in ppo.lora_modules(policy.model):  # B as after some RL, so that LoRA takes part
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(policy.device)
    batch = rl4vlm.rollout(policy, task, rl4vlm.EnvPool(task.env_id, 32, range(10**6)), 2, 0.0, np.random.default_rng(0))
    peak = torch.cuda.max_memory_allocated(policy.device) / 2**30 if cuda else math.nan
    rl4vlm.update_mode(policy.model)
    logratio = []
    with torch.no_grad():
        for k in range(0, len(batch.samples), s.micro_batch):
            chunk = batch.samples[k:k + s.micro_batch]
            prompt, gen_ids, gen_mask, weights = rl4vlm.collate(chunk, policy.pad_id)
            logprobs = (rl4vlm.logprobs_and_values(policy, prompt, gen_ids, gen_mask)[0] * weights).sum(1)
            logratio += (logprobs.cpu() - torch.tensor([x.logprob for x in chunk])).abs().tolist()
    policy.model.eval()
    generator = torch.cuda.get_rng_state if cuda else torch.get_rng_state
    before = generator()
    rl4vlm.evaluate(policy, task, replace(s, eval_episodes=8, eval_envs=8), lambda *a: None, "")
    same = torch.equal(before, generator())
    print(f"\nrollout, 32 envs x 2 steps: peak GPU memory {peak:.2f} GiB; first epoch |log ratio| mean "
          f"{np.mean(logratio):.2e}, max {np.max(logratio):.2e} ({len(logratio)} samples, bfloat16)")
    print(f"{'PASS' if same else 'FAIL'}  evaluation leaves the {device} generator where it was")
    sys.exit(0 if ok and same else 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="rollout steps per env per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (the median is shown)")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--experts", action="store_true", help="print the experts' success rates and stop")
    parser.add_argument("--pictures", metavar="DIR", help="save a sample picture of each task and stop")
    parser.add_argument("--episodes", type=int, default=20_000, help="--experts: episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="--experts, --pictures: the first deal's seed")
    parser.add_argument("--gpu", action="store_true", help="check the real-model path on CUDA in bfloat16 and stop")
    parser.add_argument("--device", default="cuda", help="--gpu: the device (cpu to try the check here)")
    parser.add_argument("--gpu-dir", default=".cache/gpu-check", help="--gpu: its model, cache and runs")
    args = parser.parse_args()
    if args.gpu:
        return gpu(args.device, args.gpu_dir)
    if args.experts or args.pictures:
        return experts(args.episodes, args.seed) if args.experts else pictures(args.pictures, args.seed)

    task = envs.get_task("numberline")
    s = task.with_defaults(rl4vlm.Settings())
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    policy = rl4vlm.warm_started_policy(s, task, print)
    model, params = policy.model, rl4vlm.add_trainable(policy, s)
    seeds = range(10**6)

    def median_rate(run, count):
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            rates.append(count / (time.perf_counter() - t0))
        return float(np.median(rates))

    # rollouts; a warm-up rollout first fills the caches, as the first update of a run does
    rollout_rates = {}
    for n in (1, 8, 32):
        pool = rl4vlm.EnvPool(task.env_id, n, seeds)
        rl4vlm.rollout(policy, task, pool, args.steps, 0.0, rng)
        rollout_rates[f"ours, {n} envs"] = median_rate(lambda: rl4vlm.rollout(policy, task, pool, args.steps, 0.0, rng),
                                                       n * args.steps)
    pool = drawing_afresh(rl4vlm.EnvPool(task.env_id, 32, seeds))
    steps = max(1, args.steps // 4)  # its rate does not grow with steps or envs
    rollout_rates["paper-style, 32 envs"] = median_rate(
        lambda: paper_style_rollout(policy, task, pool, rng, steps), 32 * steps)
    speedup = rollout_rates["ours, 32 envs"] / rollout_rates["paper-style, 32 envs"]

    # where our rollout's time goes, at 32 envs
    profile = Profile()
    parts = [(rl4vlm, "encode_prompts", "image processing + tokenizing"), (rl4vlm.SamplingRecord, "__call__", "log-probs"),
             (parse, "parse_action", "parsing"), (rl4vlm, "action_start", "parsing"),
             (rl4vlm.EnvPool, "step", "env stepping"), (rl4vlm, "prompt_values", "bootstrap values")]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in parts]
    for obj, name, part in parts:
        setattr(obj, name, profile.wrap(getattr(obj, name), part))
    model.generate = profile.wrap(model.generate, "generation")
    pool = rl4vlm.EnvPool(task.env_id, 32, seeds)
    t0 = time.perf_counter()
    batch = rl4vlm.rollout(policy, task, pool, args.steps, 0.0, rng)
    samples = batch.samples
    total = time.perf_counter() - t0
    for obj, name, fn in originals:
        setattr(obj, name, fn)
    del model.generate
    shares = {part: seconds / total for part, seconds in profile.seconds.items()}
    shares["other (Python glue, padding, tensors)"] = 1 - sum(shares.values())

    # an env step: ours against drawing every picture afresh, random play
    env_ms = {}
    for t in envs.TASKS.values():
        ours, fresh = gym.make(t.env_id), drawing_afresh(rl4vlm.EnvPool(t.env_id, 1, seeds)).envs[0]
        env_step_seconds(ours, 2000, np.random.default_rng(0))  # warm-up: fill the caches
        env_ms[t.name] = dict(ours=1e3 * env_step_seconds(ours, 2000, np.random.default_rng(1)),
                              fresh=1e3 * env_step_seconds(fresh, 200, np.random.default_rng(1)))

    # the shortcut: log-probs and values kept from generation against a separate full forward
    diff_logprob = diff_value = 0.0
    with torch.no_grad():
        for k in range(0, len(samples), 32):
            chunk = samples[k:k + 32]
            prompt, gen_ids, gen_mask, weights = rl4vlm.collate(chunk, policy.pad_id)
            logprobs, v = rl4vlm.logprobs_and_values(policy, prompt, gen_ids, gen_mask)
            diff_logprob = max(diff_logprob, float(((logprobs * weights).sum(1) - torch.tensor([x.logprob for x in chunk])).abs().max()))
            diff_value = max(diff_value, float((v - torch.tensor([x.value for x in chunk])).abs().max()))

    # PPO update, one epoch over the rollout's samples, at several micro-batch sizes
    advantages, returns = ppo.compute_gae(batch.rewards, batch.values, batch.next_values, batch.terminated,
                                          batch.truncated, s.gamma, s.gae_lambda)
    optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: every measurement sees the same weights
    update_rates = {}
    for micro in (8, 16, 32, 64, 128):
        us = replace(s, update_epochs=1, micro_batch=micro)
        update_rates[micro] = median_rate(lambda: rl4vlm.ppo_update(policy, optimizer, samples, advantages, returns, us, rng),
                                          len(samples))

    # evaluation: the training batch against the evaluation default
    eval_rates = {}
    for n in sorted({s.num_envs, 64, 128, 256, s.eval_envs}):
        es = replace(s, eval_envs=n, eval_episodes=256)
        eval_rates[n] = median_rate(lambda: rl4vlm.evaluate(policy, task, es, lambda *a: None, ""), es.eval_episodes)

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Generation's cached pass and a full pass round differently in float32 (about 2.5e-6 in logit
    # units); temperature 0.2 multiplies that by 5 and a sum over about 10 tokens by up to 10 more.
    # A real mismatch (a shifted position, a missing mask) is 1e-1 or more.
    checks = {"rollout at 32 envs >= 10x the paper-style loop": speedup >= 10,
              "env stepping under 5% of the rollout at 32 envs": shares.get("env stepping", 0.0) < 0.05,
              "kept log pi within 1e-4 of a full forward": diff_logprob < 1e-4,
              "kept value within 1e-5 of a full forward": diff_value < 1e-5}
    result = dict(env_steps_per_second=rollout_rates, speedup_32_envs=speedup, rollout_time_shares=shares,
                  env_step_ms=env_ms, ppo_update_samples_per_second_by_micro_batch=update_rates,
                  eval_episodes_per_second_by_envs=eval_rates, max_abs_diff_logprob=diff_logprob,
                  max_abs_diff_value=diff_value, peak_rss_mb=peak_mb, threads=torch.get_num_threads(),
                  steps=args.steps, repeats=args.repeats, checks=checks)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n| rollout | env steps / s (median of {args.repeats}) |\n|---|---|")
    for name, rate in rollout_rates.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"\nours at 32 envs / paper-style: {speedup:.1f}x")
    print("our rollout's time at 32 envs: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]))
          + f" (sum {100 * sum(shares.values()):.0f}%)")
    print("\n| task | env step, ours (ms) | drawing afresh (ms) | ratio |\n|---|---|---|---|")
    for name, ms in env_ms.items():
        print(f"| {name} | {ms['ours']:.4f} | {ms['fresh']:.3f} | {ms['fresh'] / ms['ours']:.0f}x |")
    print("\nPPO update, one epoch, samples / s by micro-batch: "
          + ", ".join(f"{m}: {r:.0f}" for m, r in update_rates.items()) + f" (default {s.micro_batch})")
    print("evaluation, episodes / s by envs in parallel: " + ", ".join(f"{n}: {r:.1f}" for n, r in eval_rates.items())
          + f" (default {s.eval_envs})")
    print(f"kept vs full forward: log pi {diff_logprob:.2e}, value {diff_value:.2e}")
    print(f"peak resident memory of this process: {peak_mb:.0f} MB; threads {torch.get_num_threads()}; written {args.out}\n")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
