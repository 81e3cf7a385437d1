"""Rollout and update speed of rl4vlm on the built-in model, against a paper-style loop.

    python bench.py                 # table on stdout, numbers in bench.json

Measures, in one process: env steps per second of our batched rollout at 1, 8 and 32 envs and
of a paper-style loop (one env at a time: generate, then a second full forward pass for the
log-probs and the value, as the official code does); PPO update samples per second; where
rollout time goes (image processing, generation, log-probs, parsing, env stepping); the largest
difference between the log-probs and values our rollout keeps from its own generation pass and
a separate full forward; and this process's peak resident memory. The model is the
warm-started built-in NumberLine policy (cached in .cache, made on first use).
"""
import argparse
import json
import resource
import time
from collections import defaultdict

import numpy as np
import torch

import envs
import parse
import ppo
import rl4vlm


def timed(fn, totals, key):
    """fn, with the seconds it spends added to totals[key]."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0
    return wrapper


def paper_style_rollout(model, value_head, processor, task, pool, s, suppress, rng, steps):
    """One env at a time; after generating, a second full forward gives log-probs and value."""
    pad = processor.tokenizer.pad_token_id
    for _ in range(steps):
        for i in range(len(pool.envs)):
            samples, actions = rl4vlm.act(model, value_head, processor, task, [pool.obs[i]], [pool.infos[i]],
                                          s, suppress, rng)
            with torch.no_grad():
                prompt, gen_ids, gen_mask, weights = rl4vlm.collate(samples, pad)
                rl4vlm.forward(model, value_head, prompt, gen_ids, gen_mask, s.temperature, suppress)
            pool.step(i, actions[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="rollout steps per env per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (the median is shown)")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args()

    task = envs.get_task("numberline")
    s = rl4vlm.with_task_defaults(rl4vlm.Settings(), task)
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    model, processor = rl4vlm.warm_started_policy(s, task, print)
    model.eval()
    ppo.add_lora(model, s.lora_rank, s.lora_alpha, s.lora_dropout, rl4vlm.lora_targets(model, s))
    value_head = ppo.ValueHead(model.config.get_text_config().hidden_size)
    suppress = rl4vlm.suppressed_ids(model, processor)

    def median_rate(run, env_steps):
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            rates.append(env_steps / (time.perf_counter() - t0))
        return float(np.median(rates))

    rows = {}
    for n in (1, 8, 32):
        ss = rl4vlm.Settings(**{**vars(s), "num_envs": n, "num_steps": args.steps})
        pool = rl4vlm.EnvPool(task.env_id, n, first_seed=0)
        rows[f"ours, {n} envs"] = median_rate(
            lambda: rl4vlm.rollout(model, value_head, processor, task, pool, ss, suppress, rng), n * args.steps)
    for n in (1, 32):  # the paper's loop does one env at a time, so its rate does not grow with envs
        ss = rl4vlm.Settings(**{**vars(s), "num_envs": n})
        pool = rl4vlm.EnvPool(task.env_id, n, first_seed=0)
        steps = max(1, args.steps * 8 // n)
        rows[f"paper-style, {n} envs"] = median_rate(
            lambda: paper_style_rollout(model, value_head, processor, task, pool, ss, suppress, rng, steps), n * steps)

    # where rollout time goes, at 32 envs
    totals = defaultdict(float)
    patches = [(rl4vlm, "encode_prompts", "image processing + tokenizing"), (rl4vlm, "token_logprobs", "log-probs"),
               (parse, "parse_action", "parsing"), (rl4vlm, "token_weights", "parsing"),
               (rl4vlm.EnvPool, "step", "env stepping"), (rl4vlm, "prompt_values", "bootstrap values")]
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, key in patches:
        setattr(obj, name, timed(getattr(obj, name), totals, key))
    model.generate = timed(model.generate, totals, "generation")
    ss = rl4vlm.Settings(**{**vars(s), "num_envs": 32, "num_steps": args.steps})
    pool = rl4vlm.EnvPool(task.env_id, 32, first_seed=0)
    t0 = time.perf_counter()
    samples, (rewards, values, next_values, terminated, truncated), _ = rl4vlm.rollout(
        model, value_head, processor, task, pool, ss, suppress, rng)
    total = time.perf_counter() - t0
    for obj, name, fn in originals:
        setattr(obj, name, fn)
    del model.generate
    shares = {k: v / total for k, v in totals.items()}
    shares["other"] = 1 - sum(shares.values())

    # the shortcut: log-probs and values kept from generation vs a separate full forward
    pad = processor.tokenizer.pad_token_id
    diff_logprob = diff_value = 0.0
    with torch.no_grad():
        for k in range(0, len(samples), 32):
            batch = samples[k:k + 32]
            prompt, gen_ids, gen_mask, weights = rl4vlm.collate(batch, pad)
            logprobs, v, _ = rl4vlm.forward(model, value_head, prompt, gen_ids, gen_mask, s.temperature, suppress)
            diff_logprob = max(diff_logprob, float(((logprobs * weights).sum(1) - torch.tensor([x["logprob"] for x in batch])).abs().max()))
            diff_value = max(diff_value, float((v - torch.tensor([x["value"] for x in batch])).abs().max()))

    # PPO update: one epoch over the rollout's samples
    advantages, returns = ppo.compute_gae(rewards, values, next_values, terminated, truncated, s.gamma, s.gae_lambda)
    params = ppo.lora_parameters(model) + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    us = rl4vlm.Settings(**{**vars(s), "update_epochs": 1})
    update_rate = median_rate(lambda: rl4vlm.ppo_update(model, value_head, optimizer, params, samples, advantages,
                                                        returns, us, suppress, pad, rng), len(samples))

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = dict(env_steps_per_second=rows, speedup_32_envs=rows["ours, 32 envs"] / rows["paper-style, 32 envs"],
                  rollout_time_shares=shares, ppo_update_samples_per_second=update_rate,
                  max_abs_diff_logprob=diff_logprob, max_abs_diff_value=diff_value, peak_rss_mb=peak_mb,
                  threads=torch.get_num_threads(), steps=args.steps, repeats=args.repeats)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n| rollout | env steps / s (median of {args.repeats}) |\n|---|---|")
    for name, rate in rows.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"\nours at 32 envs / paper-style: {result['speedup_32_envs']:.1f}x")
    print(f"PPO update: {update_rate:.1f} samples / s (one epoch, minibatch {s.minibatch_size}, micro-batch {s.micro_batch})")
    print("rollout time at 32 envs: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])))
    print(f"kept vs full forward: log-prob {diff_logprob:.2e}, value {diff_value:.2e} (must be < 1e-5)")
    print(f"peak resident memory of this process: {peak_mb:.0f} MB; threads {torch.get_num_threads()}; written {args.out}")


if __name__ == "__main__":
    main()
