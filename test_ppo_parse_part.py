"""Tests for parse.py and ppo.py: the maths exactly, LoRA against the base model, the parser on every task."""
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import parse
import ppo

# -----------------------------------------------------------------------------
# GAE


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


# -----------------------------------------------------------------------------
# PPO loss


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
    loss, stats = ppo.ppo_loss(zeros, zeros, zeros, new, old_values, returns, clip_coef=clip, vf_coef=1.0)
    loss.backward()
    assert torch.allclose(loss, 0.5 * per_sample.mean())
    assert (new.grad == 0).tolist() == [True, False, False, True, False]
    new.grad = None
    loss, _ = ppo.ppo_loss(zeros, zeros, zeros, new, old_values, returns, clip_coef=clip, clip_vloss=False)
    loss.backward()
    assert torch.allclose(loss, 0.5 * 0.5 * ((values - returns) ** 2).mean())
    assert (new.grad != 0).all()


def test_ppo_entropy_and_explained_variance():
    zeros, ones = torch.zeros(4), torch.ones(4)
    entropy = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss, stats = ppo.ppo_loss(zeros, zeros, zeros, zeros, zeros, zeros, entropy=entropy, ent_coef=0.1)
    assert loss.item() == pytest.approx(-0.25) and stats["entropy"] == 2.5
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert ppo.explained_variance(returns, returns) == 1.0
    assert ppo.explained_variance(torch.full((4,), 2.5), returns) == 0.0
    assert math.isnan(ppo.explained_variance(zeros, ones))


# -----------------------------------------------------------------------------
# LoRA and the value head

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
        with ppo.lora_disabled(model):
            assert torch.equal(model(x), base(x))
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
    with ppo.lora_disabled(model):
        assert torch.equal(logits(model), base_logits)
    assert torch.equal(logits(model), lora_logits)  # switched back on

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
    with pytest.raises(AssertionError, match="does not fit"):
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
    with pytest.raises(AssertionError, match="no nn.Linear"):
        ppo.add_lora(tiny_llama(), 4, 8, 0.0, ["no_such_proj"])


def test_value_head_float32():
    head = ppo.ValueHead(32, width=16)
    hidden = torch.randn(2, 3, 32).to(torch.bfloat16)
    value = head(hidden)
    assert value.dtype == torch.float32 and value.shape == (2, 3)
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert torch.equal(value, head(hidden.float()))


# -----------------------------------------------------------------------------
# The parser. «» mark the expected span of the value in each answer (the markers are removed).

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


def test_parse_cases_cover_every_task():
    assert len(CASES) >= 30 and {id(c[1]) for c in CASES} == {id(NL), id(BJ), id(EZ), id(P24)}


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
