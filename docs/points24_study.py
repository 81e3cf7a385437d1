"""Points24 warm starts, measured (issue 24): the thought format, the built-in model's text width and depth, the
warm-start length and its mix of states, each against what the answers do on held-out deals. A study, not part of
the method: it swaps the task's thought, dead-end move and text model size from outside, so envs.py and rl4vlm.py
stay as they are. One thread; OUT holds a cache per format, size and dead-end rule, pages of episodes, rows.jsonl.

    python docs/points24_study.py --format sorted --width 128 --layers 2 --sft-steps 3000 --sft-follow 1 --seed 1

Formats of the thought (the read fields and the action stay the same):
    plan    the first:            plan: 10 * 4 - 7 - 9, to write: - 7 - 9
    sorted  the cards sorted:     sorted: 4 7 9 10, plan: ..., to write: ...   (envs.py's since commit b671ae8)
    pairs   and the plan's steps: sorted: 4 7 9 10, steps: 10 * 4 = 40; 40 - 7 = 33; 33 - 9 = 24, plan: ..., ...
--dead-end: the warm start's move where the deal can no longer be won: random (before b671ae8) or "=" (ends the deal,
envs.py's since). The rows in docs/points24-study.md were measured at commit 8986a3e, when EZPoints' thoughts were
unsorted; its texts are in the built-in tokenizer's corpus, so this code gives other numbers for the same command.
Prints one JSON row (appended to OUT/rows.jsonl): minutes per 1,000 warm-start steps, wins over --episodes held-out
deals (sampled as in training), and on 400 states of the expert's path through held-out deals the greedy answer's
action = the expert's, its thought = the true one (overall and at the first step), all four cards read right.
"""
import argparse
import ast
import dataclasses
import json
import sys
from fractions import Fraction
from pathlib import Path
from unittest import mock

import gymnasium as gym
import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import envs  # noqa: E402
import parse  # noqa: E402
import ppo  # noqa: E402
import rl4vlm  # noqa: E402

ID = "gym_cards/Points24-v0"
OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def steps_of(plan):
    """The plan's operations in the order they are computed: ('(', '8', '-', '5', ')', ...) -> '8 - 5 = 3; ...'."""
    out = []

    def walk(node):
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        a, b, op = walk(node.left), walk(node.right), OPS[type(node.op)]
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
        out.append(f"{a} {op} {b} = {value}")
        return value

    walk(ast.parse("".join(plan), mode="eval").body)
    return "; ".join(out)


def thought_of(form, actions, target):
    def thought(info):
        if form == "sorted":
            return envs.points_thought(actions, target, info)  # the code's since commit b671ae8
        plan = envs.points_plan(actions, target, info)
        head = f"sorted: {' '.join(map(str, sorted(info['Numbers'])))}, " if form == "pairs" else ""
        if plan is None:
            return head + "plan: none, to write: ="
        rest = f"plan: {' '.join(plan)}, to write: {' '.join(plan[len(info['Formula']):] or ('=',))}"
        return head + (f"steps: {steps_of(plan)}, " if form == "pairs" else "") + rest
    return thought


def on_path_checks(policy, task, n=400):
    """Greedy answers on n states of the expert's path in held-out deals, a row each: action = expert's, thought
    true, first step (empty formula), all four cards read right."""
    env, states, seed = gym.make(ID, disable_env_checker=True), [], rl4vlm.stream("eval", 1).start
    while len(states) < n:
        (obs, info), done = env.reset(seed=seed), False
        seed += 1
        # rl4vlm.expert_match's walk, kept here for the per-state columns it does not return; stops at a dead end
        while not done and len(states) < n and envs.points_plan(task.actions, task.env_class.target, info):
            expert = task.expert(info)
            states.append((obs, info, expert))
            obs, _, terminated, truncated, info = env.step(expert)
            done = terminated or truncated
    rows = []
    for k in range(0, n, 100):
        chunk = states[k:k + 100]
        prompt = rl4vlm.state_prompts(policy, task, [x[0] for x in chunk], [x[1] for x in chunk])[1]
        out = policy.model.generate(**prompt, do_sample=False, max_new_tokens=policy.max_new_tokens,
                                    suppress_tokens=policy.suppress or None)
        texts = policy.processor.tokenizer.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        rows += [(parse.parse_action(text, task.actions)[0] == expert,
                  f'"thoughts": {json.dumps(task.thought(info))}' in text, not info["Formula"],
                  f'"cards": {json.dumps(info["Numbers"])}' in text)
                 for text, (_, info, expert) in zip(texts, chunk)]
    return np.array(rows, dtype=float)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", default="plan", choices=("plan", "sorted", "pairs"))
    p.add_argument("--width", type=int, default=128, help="text model hidden size (MLP: twice it)")
    p.add_argument("--layers", type=int, default=2, help="text model layers")
    p.add_argument("--sft-steps", type=int, default=3000)
    p.add_argument("--sft-expert", type=float, default=1.0)
    p.add_argument("--sft-follow", type=float, default=0.75, help="the expert's share of the warm start's moves")
    p.add_argument("--dead-end", default="random", choices=("random", "equals"),
                   help="the warm start's move where no plan is left: random (before b671ae8) or = (ends the deal)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--episodes", type=int, default=200, help="held-out deals played")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the task's (pairs needs about 112)")
    p.add_argument("--out", default="runs/points24-study", help="caches, pages of episodes, rows.jsonl")
    a = p.parse_args()
    task = envs.TASKS[ID]
    expert = task.expert  # "=" in a dead end (one -1 and the deal ends, the most a dead end can return)
    if a.dead_end == "random":  # no expert move there, so a random one: the code's before commit b671ae8
        target = task.env_class.target
        expert = lambda info, base=task.expert: base(info) if envs.points_plan(task.actions, target, info) else None
    thought = thought_of(a.format, task.actions, task.env_class.target)
    task = envs.TASKS[ID] = dataclasses.replace(task, thought=thought, expert=expert)
    name = f"{a.format}-w{a.width}-l{a.layers}-s{a.sft_steps}-e{a.sft_expert}-f{a.sft_follow}-{a.dead_end}-seed{a.seed}"
    out = Path(a.out)
    argv = ["--env", "points24", "--seed", str(a.seed), "--sft-steps", str(a.sft_steps), "--sft-expert",
            str(a.sft_expert), "--sft-follow", str(a.sft_follow), "--eval-episodes", str(a.episodes),
            "--cache-dir", str(out / f"cache-{a.format}-w{a.width}-l{a.layers}{'-equals' * (a.dead_end == 'equals')}")]
    # a cache per format and size, and dead-end rule (the keys see the corpus and data, not the model's size)
    s = task.with_defaults(rl4vlm.parse_settings(argv + ["--max-new-tokens", str(a.max_new_tokens)] * bool(
        a.max_new_tokens)))
    torch.set_num_threads(1)
    text_config = transformers.LlamaConfig
    sized = lambda **kw: text_config(**dict(kw, hidden_size=a.width, intermediate_size=2 * a.width,
                                            num_hidden_layers=a.layers))
    said = []
    log = lambda text: (said.append(text), print(text, flush=True))
    with mock.patch("transformers.LlamaConfig", sized):
        policy = rl4vlm.warm_started_policy(s, task, log)
    folder = Path(said[-1].removeprefix("warm-started model: "))  # its warm_start.json has the training's seconds
    seconds = json.loads((folder / "warm_start.json").read_text())["seconds"]
    policy.value_head = ppo.ValueHead(policy.model.config.get_text_config().hidden_size)  # act() computes V(s)
    result = rl4vlm.evaluate(policy, task, s, log, "warm start", out / f"episodes-{name}.md")
    checks = on_path_checks(policy, task)
    first = checks[checks[:, 2] == 1]
    row = dict(name=name, params=sum(p.numel() for p in policy.model.parameters()),
               minutes_per_1000=round(seconds / 60 / a.sft_steps * 1000, 2),
               wins=result["success"], solvable=result["solvable"], read_right=result["read_right"],
               format_fail=result["format_fail"], match=checks[:, 0].mean(), true_thought=checks[:, 1].mean(),
               match_first=first[:, 0].mean(), true_thought_first=first[:, 1].mean(), cards_right=checks[:, 3].mean())
    print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rows.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
