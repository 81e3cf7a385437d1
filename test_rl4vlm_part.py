import json
import math
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
import parse
import ppo
import rl4vlm

HERE = Path(__file__).parent
# a few tiny updates: 4 envs x 4 steps, a 3-step warm start, 4 evaluation episodes
FAST = ["--num-envs", "4", "--num-steps", "4", "--total-steps", "48", "--sft-steps", "3", "--sft-batch", "4",
        "--eval-episodes", "4", "--minibatch-size", "8", "--micro-batch", "4", "--max-new-tokens", "16"]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def policy(cache):
    """The built-in tiny VLM (random weights, no warm start) with LoRA and a value head."""
    folder = cache / "builtin-seed1"
    if not folder.exists():
        rl4vlm.build_builtin(folder, seed=1)
    model, processor = rl4vlm.load_policy(str(folder), "cpu")
    torch.manual_seed(0)
    ppo.add_lora(model, 4, 8.0, 0.0, r"language_model\.")
    for m in model.modules():  # random B so that LoRA takes part in every check below
        if isinstance(m, ppo.LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    model.eval()
    value_head = ppo.ValueHead(model.config.get_text_config().hidden_size)
    return model, processor, value_head


def settings(**kw):
    task = envs.get_task(kw.pop("env", "numberline"))
    return rl4vlm.with_task_defaults(rl4vlm.Settings(**kw), task), task


class PiecesTokenizer:
    """A stand-in tokenizer: token i decodes to pieces[i]."""
    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_lambda_split_by_hand():
    pieces = ['{"thoughts": "go', ' up", ', '"action": "', '+', '"}']
    text = "".join(pieces)
    _, span = parse.parse_action(text, ["-", "+"])
    assert text[span[0]:span[1]] == "+"
    weights = rl4vlm.token_weights(PiecesTokenizer(pieces), list(range(5)), span, 0.5)
    logprobs = [-1.0, -2.0, -3.0, -4.0, -5.0]
    # thought tokens 0..2, action tokens 3..4: 0.5 * (-1 - 2 - 3) + (-4 - 5) = -12
    assert sum(w * lp for w, lp in zip(weights, logprobs)) == -12.0
    # a token holding the value's first character counts as action, even with the key in it
    pieces = ['{"thoughts": "go up", ', '"action": "+', '"}']
    _, span = parse.parse_action("".join(pieces), ["-", "+"])
    assert rl4vlm.token_weights(PiecesTokenizer(pieces), [0, 1, 2], span, 0.25) == [0.25, 1.0, 1.0]
    # no "action" key: every token is thought
    assert rl4vlm.token_weights(PiecesTokenizer(["no", " json"]), [0, 1], None, 0.5) == [0.5, 0.5]
    # lambda = 1 is the plain sum of all tokens
    assert rl4vlm.token_weights(PiecesTokenizer(pieces), [0, 1, 2], span, 1.0) == [1.0, 1.0, 1.0]


def test_lambda_split_with_the_builtin_tokenizer(policy):
    _, processor, _ = policy
    task = envs.get_task("numberline")
    info = {"Target": 4, "Current": 1}
    text = rl4vlm.answer_text(processor, task.prompt(info, True), task.answer(info, 1, True))
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = processor.tokenizer.decode(ids, skip_special_tokens=True)
    index, span = parse.parse_action(decoded, task.actions)
    assert index == 1
    weights = rl4vlm.token_weights(processor.tokenizer, ids, span, 0.5)
    first_action = weights.index(1.0)
    # the thought tokens decode to exactly the text before the action value
    assert processor.tokenizer.decode(ids[:first_action], skip_special_tokens=True) == decoded[:span[0]]
    assert weights[:first_action] == [0.5] * first_action and set(weights[first_action:]) == {1.0}


def test_suppressed_tokens(policy):
    _, processor, _ = policy
    suppress = rl4vlm.suppressed_ids(processor)
    tok = processor.tokenizer
    assert tok.eos_token_id not in suppress
    assert tok.convert_tokens_to_ids("<image>") in suppress and tok.pad_token_id in suppress


def encoded_samples(processor, task, prompts, answers):
    """Samples as act() makes them, for given prompt texts and answers."""
    env = gym.make(task.env_id)
    samples = []
    for k, (prompt, answer) in enumerate(zip(prompts, answers)):
        obs, _ = env.reset(seed=k)
        enc = rl4vlm.encode_prompts(processor, [obs], [prompt], "cpu")
        ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        samples.append(dict(prompt=enc, gen_ids=torch.tensor(ids), weights=torch.ones(len(ids))))
    return samples


def test_batch_of_different_lengths_equals_each_alone(policy):
    model, processor, value_head = policy
    task = envs.get_task("numberline")
    prompts = ["short", "a somewhat longer prompt about the target number", task.prompt({"Target": 1, "Current": 2}, True)]
    answers = ['{"action": "+"}', '{"current": 2, "target": 1, "thoughts": "x", "action": "-"}', "+"]
    samples = encoded_samples(processor, task, prompts, answers)
    assert len({x["prompt"]["input_ids"].shape[1] for x in samples}) == 3, "prompts must differ in length"
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        batch = rl4vlm.forward(model, value_head, *rl4vlm.collate(samples, pad)[:3], 1.0, [])
        for i, x in enumerate(samples):
            alone = rl4vlm.forward(model, value_head, *rl4vlm.collate([x], pad)[:3], 1.0, [])
            n = len(x["gen_ids"])
            assert torch.allclose(batch[0][i, :n], alone[0][0], atol=1e-5)
            assert (batch[0][i, n:] == 0).all()
            assert torch.allclose(batch[1][i], alone[1][0], atol=1e-5)


def test_rollout_logprobs_and_values_equal_a_full_forward(policy):
    model, processor, value_head = policy
    s, task = settings(max_new_tokens=12, temperature=0.7)
    env = gym.make(task.env_id)
    obs, infos = zip(*[env.reset(seed=k) for k in range(4)])
    torch.manual_seed(0)
    suppress = rl4vlm.suppressed_ids(processor)
    samples, actions = rl4vlm.act(model, value_head, processor, task, list(obs), list(infos), s, suppress,
                                  np.random.default_rng(0))
    assert all(0 <= a < len(task.actions) for a in actions)
    with torch.no_grad():
        for x in samples:
            prompt, gen_ids, gen_mask, weights = rl4vlm.collate([x], processor.tokenizer.pad_token_id)
            logprobs, values, _ = rl4vlm.forward(model, value_head, prompt, gen_ids, gen_mask, s.temperature, suppress)
            assert abs(float((logprobs * weights).sum()) - x["logprob"]) < 1e-5
            assert abs(float(values[0]) - x["value"]) < 1e-5


def test_no_action_plays_a_random_action_and_counts_as_thought(policy, monkeypatch):
    model, processor, value_head = policy
    s, task = settings(max_new_tokens=6)
    monkeypatch.setattr(parse, "parse_action", lambda text, actions: (None, None))
    env = gym.make(task.env_id)
    obs, infos = zip(*[env.reset(seed=k) for k in range(8)])
    samples, actions = rl4vlm.act(model, value_head, processor, task, list(obs), list(infos), s,
                                  rl4vlm.suppressed_ids(processor), np.random.default_rng(0))
    assert not any(x["format_ok"] for x in samples)
    assert all(set(x["weights"].tolist()) == {s.thought_coef} for x in samples)
    assert actions == np.random.default_rng(0).integers(2, size=8).tolist()


def test_nan_loss_is_an_error(policy):
    model, processor, value_head = policy
    s, task = settings()
    samples = encoded_samples(processor, task, ["a", "b"], ['{"action": "+"}', '{"action": "-"}'])
    for x in samples:
        x.update(logprob=math.nan, value=0.0)
    params = ppo.lora_parameters(model) + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=0.0)
    with pytest.raises(FloatingPointError, match="PPO loss is nan"):
        rl4vlm.ppo_update(model, value_head, opt, params, samples, torch.ones(1, 2), torch.ones(1, 2), s,
                          [], processor.tokenizer.pad_token_id, np.random.default_rng(0))


def test_wilson_interval():
    low, high = rl4vlm.wilson(5, 10)
    assert abs(low - 0.2366) < 1e-4 and abs(high - 0.7634) < 1e-4  # textbook value
    assert rl4vlm.wilson(0, 10)[0] == 0.0 and abs(rl4vlm.wilson(10, 10)[1] - 1.0) < 1e-12


@pytest.mark.parametrize("argv, message", [
    (["--num-envs", "-1"], "--num-envs must be > 0"),
    (["--env", "chess"], "chess"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--sft-actions", "oracle"], "--sft-actions must be random or expert"),
    (["--num-steps", "ten"], "invalid int value"),
    (["--model", str(HERE)], "no config.json"),
    (["--resume", str(HERE)], "not a run folder"),
])
def test_bad_settings_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        rl4vlm.parse_settings(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_flag_exits_nonzero_with_one_line():
    out = subprocess.run([sys.executable, str(HERE / "rl4vlm.py"), "--lora-rank", "0"],
                         capture_output=True, text=True, cwd=HERE)
    assert out.returncode != 0
    assert out.stderr.strip() == "rl4vlm.py: error: --lora-rank must be > 0, got 0"


def test_a_model_that_is_not_a_vlm_is_rejected(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="not an image-text-to-text"):
        rl4vlm.load_policy(str(tmp_path), "cpu")


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("rollout_seconds", "steps_per_second")} for r in rows]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_end_to_end_run_writes_metrics_checkpoint_and_resumes_exactly(cache, tmp_path, monkeypatch):
    common = FAST + ["--cache-dir", str(cache), "--out-dir", str(tmp_path)]
    results = rl4vlm.main(common + ["--run-name", "full"])
    full = tmp_path / "full"
    rows = read_metrics(full)
    assert [r["update"] for r in rows] == [1, 2, 3]
    for key in ("env_steps", "success", "mean_return", "format_fail", "approx_kl", "clipfrac",
                "explained_variance", "steps_per_second"):
        assert key in rows[0]
    assert (full / "latest").read_text() == "checkpoint-00003"
    assert (full / "checkpoint-00003" / "adapter_config.json").exists()
    assert (full / "curve.png").exists() and (full / "results.md").exists()
    assert set(results) == {"warm_start", "rl"} and results["rl"]["episodes"] == 4

    # the same run, stopped during update 3, then resumed: the same numbers
    real_update, calls = rl4vlm.ppo_update, []

    def stop_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_update(*args, **kwargs)
    monkeypatch.setattr(rl4vlm, "ppo_update", stop_at_third)
    with pytest.raises(SystemExit) as e:
        rl4vlm.main(common + ["--run-name", "stopped"])
    assert e.value.code == 130
    stopped = tmp_path / "stopped"
    assert (stopped / "latest").read_text() == "checkpoint-00002" and len(read_metrics(stopped)) == 2
    monkeypatch.setattr(rl4vlm, "ppo_update", real_update)
    resumed = rl4vlm.main(["--resume", str(stopped)])
    assert strip_timing(read_metrics(stopped)) == strip_timing(rows)
    assert resumed == results or {k: {m: v for m, v in r.items() if m != "seconds"} for k, r in resumed.items()} == \
        {k: {m: v for m, v in r.items() if m != "seconds"} for k, r in results.items()}


def test_existing_run_folder_is_not_overwritten(cache, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "latest").write_text("checkpoint-00001")
    with pytest.raises(SystemExit, match="--resume"):
        rl4vlm.main(FAST + ["--cache-dir", str(cache), "--out-dir", str(tmp_path), "--run-name", "old"])
