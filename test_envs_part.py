"""Tests for envs.py: every rule of shared/gym-cards-rules.md, the task table, the solvers and the experts."""
import json
import random
import time
import warnings
from collections import Counter
from itertools import combinations_with_replacement

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.envs.toy_text.blackjack import BlackjackEnv as GymnasiumBlackjack
from gymnasium.utils import seeding
from gymnasium.utils.env_checker import check_env

import envs

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


# --- gymnasium frame ---------------------------------------------------------------------------------

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


def rollout(env_id, seed, steps=12):
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


@pytest.mark.parametrize("env_id", IDS)
def test_same_seed_same_pictures_and_rewards_different_seeds_differ(env_id):
    pictures, rewards = rollout(env_id, seed=7)
    random.seed(99)  # the global generators must play no part
    np.random.seed(99)
    pictures2, rewards2 = rollout(env_id, seed=7)
    assert rewards == rewards2 and len(pictures) == len(pictures2)
    assert all(np.array_equal(a, b) for a, b in zip(pictures, pictures2))
    first_pictures = {rollout(env_id, seed=s, steps=0)[0][0].tobytes() for s in range(8)}
    assert len(first_pictures) > 1, "different seeds gave the same first picture"


@pytest.mark.parametrize("env_id", IDS)
def test_info_is_a_snapshot(env_id):
    env = gym.make(env_id)
    _, info = env.reset(seed=3)
    before = json.dumps(info)
    env.step(0)
    assert json.dumps(info) == before, "a stored info changed when the env moved on"


# --- NumberLine ----------------------------------------------------------------------------------------

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


# --- Points (EZPoints, Points24) ---------------------------------------------------------------------

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
def test_points_truncated_with_minus_1_once_formula_is_too_long(env_id, limit):
    env = make(env_id, formula=["+"] * limit)
    assert press(env, "+") == (0.0, False, False) and len(env.formula) == limit + 1
    assert press(env, "=") == (-1.0, False, True), "'=' comes after the length check"
    env.formula = ["+"] * limit
    assert press(env, "=")[1] is True, f"{limit} entries may still be evaluated"


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
    assert envs.evaluate("".join(["2", "10"])) == 210
    assert press(make("gym_cards/EZPoints-v0", ranks=[2, 10], formula=[]), "2", "10", "=") == (-1.0, True, False)
    # 2 then 4 is 24: every card used once, so the env accepts it, as eval would
    assert press(make("gym_cards/Points24-v0", ranks=[2, 4, 1, 1], formula=[]), "2", "4", "*", "1", "*", "1", "=")[0] == 10.0
    assert envs.evaluate("2**3") == 8
    assert press(make("gym_cards/Points24-v0", ranks=[2, 3, 3, 1], formula=[]), "2", "*", "*", "3", "*", "3", "*", "1", "=")[0] == 10.0
    assert envs.evaluate("8//3") == 2, "'/' twice is a floor division"


def test_points_division_compared_exactly_in_floats():
    assert envs.evaluate("8/(3-8/3)") == eval("8/(3-8/3)") != 24
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


def test_evaluate_matches_eval_and_does_not_hang_on_huge_powers():
    start = time.time()
    assert envs.evaluate("10**10**10") is None and envs.evaluate("1**10**10**10") is None
    assert time.time() - start < 1
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
        assert envs.evaluate(text) == expected, text


# --- Solvers and experts for the Points tasks ---------------------------------------------------------

def test_points_solver_writes_env_formulas_that_the_env_accepts():
    for numbers in [(1, 2, 3, 4), (1, 5, 5, 5), (3, 3, 7, 7), (1, 1, 10, 10), (2, 2, 2, 9)]:
        for entries in envs.solutions(numbers, 24, "+-*/")[:40]:
            assert all(e in envs.Points24Env.actions for e in entries) and len(entries) <= 20
            assert not any(a.isdigit() and b.isdigit() for a, b in zip(entries, entries[1:])), entries
            env = make("gym_cards/Points24-v0", ranks=list(numbers), formula=[])
            assert press(env, *entries, "=") == (10.0, True, False), entries


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
    assert envs.evaluate("".join(moves)) == 24 and actions[a] == "="
    assert expert({"Numbers": [4, 6, 1, 1], "Formula": ["(", "("]}) is None
    assert expert({"Numbers": [1, 1, 1, 1], "Formula": []}) is None, "no expert move on an unsolvable deal"
    assert envs.get_task("ezpoints").expert({"Numbers": [6, 6], "Formula": ["6", "+", "6"]}) == 12  # "="


def test_expert_success_number_line_and_ez_points_100_percent():
    for name in ("numberline", "ezpoints"):
        returns = envs.expert_returns(envs.get_task(name), 3000, seed=0)
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
    assert returns == envs.expert_returns(task, 30, seed=0), "the fast expert loop plays other games"


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


# --- Blackjack -----------------------------------------------------------------------------------------

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
    start = time.time()
    returns = envs.expert_returns(envs.get_task("blackjack"), 20_000, seed=0)
    win_rate = np.mean([envs.is_success(r) for r in returns])
    assert abs(win_rate - envs.blackjack_optimum()[2]) < 0.01, win_rate
    assert time.time() - start < 20


# --- The task table ------------------------------------------------------------------------------------

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
    assert json.loads(ez.answer(info, 9, True)) == {"cards": [2, 10], "formula": "2 +", "thoughts": "unused: 10", "action": "10"}
    assert ez.labels(info) == [1, 9]
    info = {"Dealer": [1, 10], "Player": [1, 6]}
    assert json.loads(bj.answer(info, 0, True)) == {"dealer": 1, "player": 17, "thoughts": "soft 17 against 1", "action": "stand"}
    assert bj.labels(info) == [0, 17, 1]


def test_blackjack_expert_and_labels_use_only_the_face_up_card():
    bj = envs.get_task("blackjack")
    for hidden in range(1, 11):
        info = {"Dealer": [6, hidden], "Player": [10, 2]}
        assert bj.expert(info) == bj.expert({"Dealer": [6, 1], "Player": [10, 2]}) == 0
        assert bj.labels(info) == [5, 12, 0] and bj.answer(info, 1, True) == bj.answer({"Dealer": [6], "Player": [10, 2]}, 1, True)
