"""PPO for a vision-language policy: GAE or GiGPO, the clipped loss, LoRA written by hand, the value head.

Everything here sees per-sample numbers; rl4vlm.py computes log pi(a|s) from the answer's tokens.
Departures from textbook PPO (Schulman et al. 2017) and from CleanRL's ppo.py:
1. Truncation bootstraps from V of the episode's final observation; only termination cuts it.
2. ppo_loss does not normalise advantages (the caller does, per minibatch): at ratio 1 it is -mean(adv).
3. The value loss is clipped with clip_coef only if asked (clip_vloss, CleanRL's switch; the RL4VLM code clips):
   a clip in raw reward units lets V move at most clip_coef per update, too little to reach a win's +10.
4. LoRA adapters and the value head (H -> 1024 -> 512 -> 1, as in the RL4VLM code) stay float32 whatever
   the base model's dtype, so that small updates are not rounded away.
5. The KL penalty's loss is k2 = (log pi - log pi_ref)^2 / 2 per token, whose gradient on samples from pi is that of
   KL(pi || pi_ref); the KL logged is k3, which estimates the same KL's value without bias (token_kl).
"""
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# ---- GAE and the PPO loss

def compute_gae(rewards, values, next_values, terminated, truncated, gamma, gae_lambda):
    """Generalised advantage estimation on (num_steps, num_envs) tensors -> (advantages, returns).

    values[t] = V(s_t); next_values[t] = V(s_{t+1}), after a truncation of the episode's final observation (before
    the reset). A terminated step does not bootstrap, a truncated one does; both end the recursion."""
    tensors = (rewards, values, next_values, terminated, truncated)
    assert len({x.shape for x in tensors}) == 1, f"shapes differ: {[tuple(x.shape) for x in tensors]}"
    assert values.dim() == 2, f"expected (num_steps, num_envs), got {tuple(values.shape)}"
    nextnonterminal = 1.0 - terminated.to(values.dtype)  # (num_steps, num_envs)
    nextnotdone = 1.0 - (terminated.bool() | truncated.bool()).to(values.dtype)
    advantages = torch.zeros_like(values)
    lastgaelam = torch.zeros_like(values[0])  # (num_envs,), nothing to add after the last step
    for t in reversed(range(values.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * nextnonterminal[t] - values[t]
        advantages[t] = lastgaelam = delta + gamma * gae_lambda * nextnotdone[t] * lastgaelam
    returns = advantages + values
    return advantages, returns


def compute_gigpo(rewards, episodes, groups, states, gamma, step_coef=1.0, norm="std", mixed_only=False):
    """GiGPO's advantages (Feng et al. 2025, arXiv 2505.10978): no critic; copies of one deal, played whole, compared.

    Per step, in time order within each episode: rewards (N,), and the step's episode, group (its deal) and state
    (any key equal for identical states, e.g. the picture's hash and the prompt). Returns (advantages, returns) (N,):
    - episode level (eq. 3): A^E = the episode's return R = sum of rewards, relative to its group's episodes;
    - step level (eqs. 5-7): G_t = r_t + gamma * G_{t+1}, relative to the G of every step taken from the same
      anchor state (the same state in the same group, reached by any copy at any step);
    - A = A^E + step_coef * A^S (eq. 8, omega). norm "std": `relative` is (x - mean) / (std + 1e-6) (eq. 3's
      F_norm = std): the advantages' scale stays near GAE's normalised one, so lr and target_kl carry over;
      "mean": x - mean (F_norm = 1), so a group's small differences stay small beside a win's large one.
    mixed_only: 0 for every step of a group whose copies all won or all lost (R > 0 is a win), as DAPO's dynamic
    sampling drops such groups (arXiv 2503.14476): no credit for losing more cheaply where nothing was won."""
    n, later = len(rewards), {}  # later: each episode's G of the step after
    returns = torch.zeros(n, dtype=torch.float64)
    totals = dict.fromkeys(episodes, 0.0)  # R per episode, in order of first step
    for j in reversed(range(n)):
        returns[j] = later[episodes[j]] = float(rewards[j]) + gamma * later.get(episodes[j], 0.0)
        totals[episodes[j]] += float(rewards[j])
    group_of = {e: g for e, g in zip(episodes, groups)}
    episode_adv = dict(zip(totals, relative(torch.tensor(list(totals.values()), dtype=torch.float64),
                                            [group_of[e] for e in totals], norm)))
    step_adv = relative(returns, list(zip(groups, states)), norm)
    advantages = torch.stack([episode_adv[e] for e in episodes]) + step_coef * step_adv
    if mixed_only:
        outcomes = {}  # group -> the set of its copies' outcomes
        for e, total in totals.items():
            outcomes.setdefault(group_of[e], set()).add(total > 0)
        advantages = advantages * torch.tensor([len(outcomes[g]) > 1 for g in groups], dtype=advantages.dtype)
    return advantages.float(), returns.float()


def relative(values, keys, norm="std") -> torch.Tensor:
    """Each value against the others with the same key: value - mean over them, divided by (std + 1e-6) (sample std)
    if norm is "std"; 0 where they all tie or a value has none to be compared with."""
    out, members = torch.zeros_like(values), {}
    for j, key in enumerate(keys):
        members.setdefault(key, []).append(j)
    for places in members.values():
        v = values[places]
        if len(places) > 1 and not (v == v[0]).all():
            out[places] = (v - v.mean()) / (v.std() + 1e-6 if norm == "std" else 1.0)
    return out


def explained_variance(values, returns):
    """1 - Var[R - V] / Var[R]: 1 is a perfect critic, 0 no better than a constant; nan if Var[R] = 0."""
    values, returns = values.detach().double().flatten(), returns.detach().double().flatten()
    var_returns = returns.var(correction=0)
    return float("nan") if var_returns == 0 else 1.0 - ((returns - values).var(correction=0) / var_returns).item()


def ppo_loss(new_logprobs, old_logprobs, advantages, new_values, old_values, returns,
             clip_coef=0.1, vf_coef=0.5, clip_vloss=False):
    """The clipped PPO loss on one minibatch of (B,) tensors -> (loss, stats of floats). clip_vloss: the value loss
    too is clipped to old_values +- clip_coef (past it, no gradient)."""
    tensors = (new_logprobs, old_logprobs, advantages, new_values, old_values, returns)
    assert len({x.shape for x in tensors}) == 1, f"shapes differ: {[tuple(x.shape) for x in tensors]}"
    logratio = new_logprobs - old_logprobs
    ratio = logratio.exp()
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)
    pg_loss = torch.max(pg_loss1, pg_loss2).mean()  # pessimistic bound: clipping only ever removes gain

    v_loss = (new_values - returns) ** 2
    if clip_vloss:
        v_clipped = old_values + torch.clamp(new_values - old_values, -clip_coef, clip_coef)
        v_loss = torch.max(v_loss, (v_clipped - returns) ** 2)
    v_loss = 0.5 * v_loss.mean()
    loss = pg_loss + vf_coef * v_loss

    with torch.no_grad():
        stats = dict(policy_loss=pg_loss.item(), value_loss=v_loss.item(),
                     approx_kl=((ratio - 1) - logratio).mean().item(),  # http://joschu.net/blog/kl-approx.html
                     clipfrac=((ratio - 1).abs() > clip_coef).float().mean().item())
    return loss, stats


def token_kl(logprobs, ref_logprobs, mask):
    """The value of KL(pi || pi_ref) of each sample, the mean over its tokens of k3 = r - 1 - log r, r = pi_ref / pi
    (unbiased and >= 0 for tokens drawn from pi, http://joschu.net/blog/kl-approx.html): (B, G) -> (B,). Logged, not
    a loss: on samples from pi its gradient is that of the other KL, KL(pi_ref || pi)."""
    log_r = (ref_logprobs - logprobs).where(mask, 0.0)
    return ((log_r.exp() - 1 - log_r) * mask).sum(1) / mask.sum(1)


def kl_penalty(logprobs, ref_logprobs, mask):
    """The KL penalty's loss of each sample, the mean over its tokens of k2 = (log pi - log pi_ref)^2 / 2: on tokens
    drawn from pi its gradient is that of KL(pi || pi_ref) (E_pi[(log pi - log pi_ref) grad log pi]). (B, G) -> (B,)."""
    log_ratio = (logprobs - ref_logprobs).where(mask, 0.0)
    return (0.5 * log_ratio ** 2).sum(1) / mask.sum(1)


# ---- LoRA (Hu et al. 2021): W x + (alpha / rank) * B A x, with B = 0 at the start

class LoRALinear(nn.Module):
    """Takes the place of an nn.Linear; keeps its weight and bias under the same names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        assert isinstance(base, nn.Linear), f"LoRA wraps nn.Linear, got {type(base).__name__}"
        assert rank > 0, f"rank must be positive, got {rank}"
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters, so state_dict keys do not change
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Linear(base.in_features, rank, **kw)  # weight (rank, in)
        self.lora_B = nn.Linear(rank, base.out_features, **kw)  # weight (out, rank)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT does
        nn.init.zeros_(self.lora_B.weight)  # so the wrapped model starts exactly as the base model
        self.lora_dropout = nn.Dropout(dropout)
        self.train(base.training)  # new modules start in training mode; follow the model's (dropout!)

    def forward(self, x):  # (..., in) -> (..., out)
        result = F.linear(x, self.weight, self.bias)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)


def lora_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def lora_off(model):
    """The base model for a block: every adapter's update scaled by 0."""
    scalings = {m: m.scaling for _, m in lora_modules(model)}
    for m in scalings:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, scaling in scalings.items():
            m.scaling = scaling


def lora_parameters(model):
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def add_lora(model, rank, alpha, dropout, targets):
    """Wrap the nn.Linear layers (exactly that type) whose full name matches `targets`.

    targets: a regex searched in each name (r"language_model.*_proj$") or a list of final names like PEFT's
    target_modules (["q_proj", "v_proj"]). It freezes every base parameter: call it before adding trainable modules."""
    assert not lora_modules(model), "the model already has LoRA layers"
    if not isinstance(targets, str):
        targets = r"(^|\.)(" + "|".join(map(re.escape, targets)) + r")$"
    names = [n for n, m in model.named_modules() if n and type(m) is nn.Linear and re.search(targets, n)]
    if not names:
        raise ValueError(f"no nn.Linear module name matches {targets!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


@torch.no_grad()
def merge_lora(model):
    """Fold scaling * B @ A into each base weight and put plain nn.Linear layers back, for inference."""
    for name, m in lora_modules(model):
        m.weight += (m.lora_B.weight @ m.lora_A.weight * m.scaling).to(m.weight.dtype)  # (out, in)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight, linear.bias = m.weight, m.bias
        model.set_submodule(name, linear)


# ---- Adapters on disk in PEFT's format, so `PeftModel.from_pretrained(base, folder)` loads them

CONFIG_NAME, WEIGHTS_NAME, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."


def lora_weights(model):
    """{key in PEFT's file: LoRA weight}; PEFT leaves the adapter name ("default") out of the keys."""
    return {f"{PREFIX}{n}.{ab}.weight": getattr(m, ab).weight
            for n, m in lora_modules(model) for ab in ("lora_A", "lora_B")}


def save_adapter(model, folder, base_model_name_or_path=None):
    """folder/adapter_config.json and adapter_model.safetensors as PEFT writes them (not atomic: the caller renames)."""
    modules = lora_modules(model)
    assert modules, "the model has no LoRA layers; call add_lora first"
    _, first = modules[0]
    settings = {(m.rank, m.alpha, m.lora_dropout.p) for _, m in modules}
    assert len(settings) == 1, f"one rank/alpha/dropout for all layers expected, got {settings}"
    names = [n for n, _ in modules]
    # PEFT matches a list of final names against every module; fall back to an exact regex if that would over-match
    suffixes = sorted({n.rpartition(".")[2] for n in names})
    would_match = [n for n, _ in model.named_modules() if n.rpartition(".")[2] in suffixes]
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.lora_dropout.p,
        "target_modules": suffixes if sorted(would_match) == sorted(names) else "|".join(map(re.escape, names)),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    tensors = {k: w.detach().contiguous() for k, w in lora_weights(model).items()}
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(tensors, Path(folder, WEIGHTS_NAME), metadata={"format": "pt"})
    Path(folder, CONFIG_NAME).write_text(json.dumps(config, indent=2))


@torch.no_grad()
def load_adapter(model, folder):
    """Load a PEFT LoRA adapter; if the model has no LoRA layers yet, add them as the config says."""
    config = json.loads(Path(folder, CONFIG_NAME).read_text())
    options = ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
    unsupported = {k: config[k] for k in options if config.get(k)} | ({} if config.get("bias", "none") == "none" else
                                                                       {"bias": config["bias"]})
    tensors = load_file(Path(folder, WEIGHTS_NAME))
    bad = [k for k in tensors if not (k.startswith(PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")))]
    if config.get("peft_type") != "LORA" or unsupported or bad:
        raise ValueError(f"not a plain LoRA adapter: peft_type {config.get('peft_type')!r}, unsupported options "
                         f"{unsupported}, keys that are not LoRA weights {bad[:5]}")
    if not lora_modules(model):
        names = sorted({k[len(PREFIX):].rsplit(".", 2)[0] for k in tensors})
        targets = "^(" + "|".join(map(re.escape, names)) + ")$"
        add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets)
    weights = lora_weights(model)
    missing, unexpected = sorted(weights.keys() - tensors.keys()), sorted(tensors.keys() - weights.keys())
    wrong = [k for k, w in weights.items() if k in tensors and w.shape != tensors[k].shape]
    wrong += [n for n, m in lora_modules(model) if m.scaling != config["lora_alpha"] / config["r"]]
    if missing or unexpected or wrong:
        raise ValueError(f"adapter does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"other shape or scaling {wrong[:5]}")
    for k, w in weights.items():
        w.copy_(tensors[k])


# ---- The critic

class ValueHead(nn.Module):
    """V(s) from a hidden state, e.g. the last layer's at the prompt's final token."""

    def __init__(self, hidden_size, width=1024, device=None):
        super().__init__()
        kw = dict(device=device, dtype=torch.float32)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width, **kw), nn.ReLU(), nn.Linear(width, width // 2, **kw),
                                 nn.ReLU(), nn.Linear(width // 2, 1, **kw))

    def forward(self, hidden):  # (..., H) in any dtype -> (...) float32
        return self.mlp(hidden.float()).squeeze(-1)
