"""The four gym-cards tasks of RL4VLM (Zhai et al. 2024) as gymnasium envs, their prompts, labels and experts.

NumberLine-v0, EZPoints-v0, Points24-v0 and Blackjack-v0 follow the original gym-cards rules (state distribution,
action indices, step order, rewards, info keys); importing this module registers them with a 300-step time limit.
Every observation is a 300x300 RGB picture drawn with Pillow's built-in font. TASKS holds one table entry per task:
legal actions, prompt and answer builders, perception labels, and an expert computed from the true state (a Points
solver that uses the env's own evaluator, a dynamic programme for Blackjack). Choices the rules leave open:
1. A Points formula is evaluated by walking its syntax tree (eval's results), but an integer power above 2**65536
   is no number instead of a hang (formula_value).
2. Blackjack draws exactly as gymnasium's Blackjack-v1 (tested); only the dealer's face-up card draws a suit.
3. A Points deal is solvable if some formula with + - * / and parentheses, in the env's actions, is accepted.
4. A Points formula past max_entries ends the episode terminated, -1, where the original flags it truncated (its
   name for a time limit): nothing moves there and every further step would end the same way, so it is an end, and
   PPO must not bootstrap it from the state it came from (the paper's PPO bootstraps no ending at all).
"""
import ast
import functools
import json
import math
import operator
from collections import Counter
from dataclasses import dataclass, field, replace
from itertools import product
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from PIL import Image, ImageDraw, ImageFont

SIZE = 300  # pictures are SIZE x SIZE RGB
TABLE = "#35654d"  # green card table
RED = (200, 0, 0)
SUITS = "SHCD"  # spades, hearts, clubs, diamonds
RANK_TEXT = {1: "A", 11: "J", 12: "Q", 13: "K"}  # other ranks show their number


def card_value(rank):
    return min(rank, 10)  # J, Q, K count as 10, an ace as 1


# ---- Pictures

@functools.cache
def font(size):
    return ImageFont.load_default(size=size)


def draw_suit(d, x, y, s, suit, color):
    """A small suit sign in the s-by-s square at (x, y); the built-in font has no suit glyphs."""
    h, q = s / 2, s / 4
    if suit == "D":
        d.polygon([(x + h, y), (x + s, y + h), (x + h, y + s), (x, y + h)], fill=color)
    elif suit == "H":
        d.ellipse([x, y, x + h, y + h], fill=color)
        d.ellipse([x + h, y, x + s, y + h], fill=color)
        d.polygon([(x, y + q), (x + s, y + q), (x + h, y + s)], fill=color)
    elif suit == "S":
        d.polygon([(x + h, y), (x + s, y + h + q / 2), (x, y + h + q / 2)], fill=color)
        d.ellipse([x, y + q, x + h, y + 3 * q], fill=color)
        d.ellipse([x + h, y + q, x + s, y + 3 * q], fill=color)
        d.polygon([(x + h, y + h), (x + 3 * q, y + s), (x + q, y + s)], fill=color)
    else:  # clubs
        d.ellipse([x + q, y, x + 3 * q, y + h], fill=color)
        d.ellipse([x, y + q + 1, x + h, y + 3 * q + 1], fill=color)
        d.ellipse([x + h, y + q + 1, x + s, y + 3 * q + 1], fill=color)
        d.polygon([(x + h, y + h), (x + 3 * q, y + s), (x + q, y + s)], fill=color)


def draw_card(image, box, rank, suit, rank_size):
    """A white card with its rank as large as the card allows (red for hearts and diamonds)."""
    x0, y0, x1, y1 = box
    color = RED if suit in "HD" else (0, 0, 0)
    d = ImageDraw.Draw(image)
    d.rounded_rectangle(box, radius=6, fill="white", outline="black", width=2)
    corner = max(10, (x1 - x0) // 6)
    draw_suit(d, x0 + 4, y0 + 4, corner, suit, color)
    # the rank drawn apart and squeezed sideways where wider than the card ("10"): every rank keeps the full height
    text, stroke = RANK_TEXT.get(rank, str(rank)), 1 + rank_size // 50
    left, top, right, bottom = font(rank_size).getbbox(text, stroke_width=stroke)
    glyphs = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(glyphs).text((-left, -top), text, fill=255, font=font(rank_size), stroke_width=stroke)
    glyphs = glyphs.resize((min(glyphs.width, x1 - x0 - 8), glyphs.height), Image.BICUBIC)
    centre_x, centre_y = (x0 + x1) // 2, (y0 + y1 + corner // 2) // 2
    image.paste(color, (centre_x - glyphs.width // 2, centre_y - glyphs.height // 2), glyphs)


@functools.cache
def advance(text, size):
    return font(size).getlength(text)


def formula_sprites(entries, top, size):
    """`Formula:` and the entries, each its own sprite, spaced like words and wrapped to fit the width."""
    space, x, y = advance(" ", size), 8, top
    sprites = [(x, y, "text", "Formula:", size, "white", 0)]
    x += advance("Formula:", size)
    for entry in entries:
        width = advance(entry, size)
        if x + space + width > SIZE - 8:
            x, y = 8 - space, y + size + 4
        if entry.strip():  # a blank entry (an illegal number) is a gap
            sprites.append((round(x + space), y, "text", entry, size, "white", 0))
        x += space + width
    return sprites


# A picture is a background and sprites (cards, card backs, words) at fixed places. Each sprite is painted once into
# its own tile (a bounded cache keyed by what it shows); render() copies the tiles onto the blank picture: the pixels
# of one canvas (the tests' reference) in microseconds. Caching whole pictures would not help: copying costs as much.

def paint(image, x, y, kind, *args):
    """Paint one sprite onto a PIL image, its anchor at (x, y)."""
    if kind == "card":
        rank, suit, w, h, rank_size = args
        draw_card(image, (x, y, x + w, y + h), rank, suit, rank_size)
    elif kind == "back":
        w, h = args
        d = ImageDraw.Draw(image)
        d.rounded_rectangle((x, y, x + w, y + h), radius=6, fill=(30, 60, 140), outline="white", width=2)
        for line_x in range(x + 8, x + w - 4, 8):  # a checked pattern tells the back from a face
            d.line([(line_x, y + 6), (line_x, y + h - 6)], fill=(150, 170, 230))
        for line_y in range(y + 8, y + h - 4, 8):
            d.line([(x + 6, line_y), (x + w - 6, line_y)], fill=(150, 170, 230))
    else:
        text, size, fill, stroke, *anchor = args
        ImageDraw.Draw(image).text((x, y), text, fill=fill, font=font(size), stroke_width=stroke, stroke_fill=fill,
                                   anchor=anchor[0] if anchor else None)


@functools.cache
def blank(background):
    return np.asarray(Image.new("RGB", (SIZE, SIZE), background))  # read-only: every picture copies it


@functools.lru_cache(maxsize=1024)
def tile(background, kind, *args):
    """A sprite painted on its own over the background colour: (pixels (h, w, 3), left, top)."""
    if kind == "text":  # the box it paints in, relative to its anchor; right and bottom exclusive
        text, size, fill, stroke, *anchor = args
        left, top, right, bottom = font(size).getbbox(text, stroke_width=stroke, anchor=anchor[0] if anchor else None)
    else:  # a rectangle's outline includes its right and bottom edge
        w, h = args[-2:] if kind == "back" else args[2:4]
        left, top, right, bottom = 0, 0, w + 1, h + 1
    image = Image.new("RGB", (right - left, bottom - top), background)
    paint(image, -left, -top, kind, *args)
    pixels = np.asarray(image)
    pixels.flags.writeable = False  # shared by every picture that shows this sprite
    return pixels, left, top


# ---- Environments

class GymCardsEnv(gym.Env):
    """reset = deal + picture, step = play + picture; subclasses define deal() (from self.np_random), play(action) ->
    (reward, terminated, truncated), info() and sprites(). Tests set states after reset(); simulations skip render."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 1}
    actions: tuple[str, ...] = ()
    background = TABLE

    def __init__(self, render_mode=None):
        assert render_mode in (None, "rgb_array"), f"unsupported render_mode {render_mode!r}"
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, (SIZE, SIZE, 3), np.uint8)
        self.action_space = spaces.Discrete(len(self.actions))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.deal()
        return self.render(), self.info()

    def step(self, action):
        assert isinstance(action, (int, np.integer)) and 0 <= action < len(self.actions), \
            f"action {action!r} not in 0..{len(self.actions) - 1}"
        reward, terminated, truncated = self.play(int(action))
        return self.render(), reward, terminated, truncated, self.info()

    def render(self):
        """The picture, (SIZE, SIZE, 3) uint8, a new array each time."""
        pixels = blank(self.background).copy()
        for x, y, *sprite in self.sprites():
            tile_pixels, left, top = tile(self.background, *sprite)
            (h, w, _), x, y = tile_pixels.shape, x + left, y + top
            assert 0 <= x and x + w <= SIZE and 0 <= y and y + h <= SIZE, f"sprite {sprite} leaves the picture"
            pixels[y:y + h, x:x + w] = tile_pixels
        return pixels


class NumberLineEnv(GymCardsEnv):
    actions = ("-", "+")
    max_position = 5

    def deal(self):
        self.position = int(self.np_random.integers(0, self.max_position + 1))
        self.target = int(self.np_random.integers(0, self.max_position + 1))
        if self.target == self.position:
            self.target = (self.target + 1) % self.max_position  # the original's quirk: 5 and 5 give target 1
        self.steps = 0

    def play(self, action):
        distance = abs(self.target - self.position)
        self.position = min(max(self.position + (1 if action == 1 else -1), 0), self.max_position)
        self.steps += 1
        if self.position == self.target:
            return 1.0, True, False
        reward = -1.0 if abs(self.target - self.position) >= distance else 0.0  # away, or blocked at an end
        return reward, False, self.steps >= 2 * self.max_position

    def info(self):
        return {"Target": self.target, "Current": self.position}

    background = "white"

    def sprites(self):
        return [(18, 50, "text", f"Target: {self.target}", 60, "black", 1),
                (18, 170, "text", f"Current: {self.position}", 60, "black", 1)]


# Python operators a formula can hold: "*" twice is a power and "/" twice a floor division.
BINARY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow}
UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_POWER_BITS = 1 << 16


def formula_value(text):
    """What eval(text) gives for a formula's joined text, or None where eval fails or gives no number.

    Python's own operators over the syntax tree, so results (float rounding, int exactness, division by zero) are
    eval's, but an integer power above 2**MAX_POWER_BITS is None (eval would hang): it takes three of the at most four
    numbers (base 10 needs an exponent over 19,000), and no operation with the one left brings it back to 12 or 24."""
    try:
        tree = ast.parse(text.lstrip(" "), mode="eval")  # eval drops leading blanks, ast.parse would not
    except SyntaxError:
        return None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
            return UNARY_OPS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
            a, b = value(node.left), value(node.right)
            if (isinstance(node.op, ast.Pow) and type(a) is int and type(b) is int and abs(a) > 1
                    and b * math.log2(abs(a)) > MAX_POWER_BITS):
                raise OverflowError("integer power too large to compute")
            return BINARY_OPS[type(node.op)](a, b)
        raise TypeError(f"not arithmetic: {ast.dump(node)}")  # e.g. (2)(3), which eval fails on too

    try:
        return value(tree.body)
    except (ArithmeticError, TypeError, ValueError):  # division by zero, overflow, calls, complex //
        return None


def number_entries(formula):
    return [int(e) for e in formula if e.isdigit()]


class PointsEnv(GymCardsEnv):
    """Append numbers and operators to a formula, then "=" to have it checked against the target."""

    # subclasses set: target, max_entries (the episode ends beyond), card_boxes, rank_size, formula_top, formula_size

    @property
    def numbers(self):
        return [card_value(r) for r in self.ranks]

    def play(self, action):
        entry = self.actions[action]
        if len(self.formula) > self.max_entries:
            return -1.0, True, False  # terminated, not the original's truncated: choice 4 above
        if entry.isdigit() and number_entries(self.formula).count(int(entry)) >= self.numbers.count(int(entry)):
            self.formula.append(" ")  # a number used more often than the cards allow leaves a blank
            return -1.0, False, False
        if entry == "=":
            solved = (formula_value("".join(self.formula)) == self.target
                      and sorted(number_entries(self.formula)) == sorted(self.numbers))
            return (10.0 if solved else -1.0), True, False
        self.formula.append(entry)
        return 0.0, False, False

    def info(self):
        return {"Cards": [RANK_TEXT.get(r, str(r)) + s for r, s in zip(self.ranks, self.suits)],
                "Numbers": self.numbers, "Formula": list(self.formula)}

    def sprites(self):
        cards = [(x0, y0, "card", rank, suit, x1 - x0, y1 - y0, self.rank_size)
                 for (x0, y0, x1, y1), rank, suit in zip(self.card_boxes, self.ranks, self.suits)]
        return cards + formula_sprites(self.formula, self.formula_top, self.formula_size)


class EZPointsEnv(PointsEnv):
    actions = tuple(str(n) for n in range(1, 11)) + ("+", "*", "=")
    target, max_entries = 12, 5
    card_boxes = ((24, 10, 144, 190), (156, 10, 276, 190))  # two large cards side by side
    rank_size, formula_top, formula_size = 120, 204, 30

    def deal(self):
        rank = int(self.np_random.integers(2, 14))
        first = card_value(rank)
        product_solution = first in (1, 2, 3, 4, 6) and self.np_random.random() < 0.5
        second = 12 // first if product_solution else 12 - first  # shown as a plain number card
        self.ranks = [rank, second]
        self.suits = [SUITS[i] for i in self.np_random.integers(0, 4, size=2)]
        if self.np_random.random() < 0.5:
            self.ranks, self.suits = self.ranks[::-1], self.suits[::-1]
        self.formula = []


class Points24Env(PointsEnv):
    actions = tuple(str(n) for n in range(1, 11)) + ("+", "-", "*", "/", "(", ")", "=")
    target, max_entries = 24, 20
    card_boxes = ((16, 6, 144, 108), (156, 6, 284, 108), (16, 116, 144, 218), (156, 116, 284, 218))  # 2x2
    rank_size, formula_top, formula_size = 96, 226, 20

    def deal(self):
        self.ranks = [int(r) for r in self.np_random.integers(1, 14, size=4)]
        self.suits = [SUITS[i] for i in self.np_random.integers(0, 4, size=4)]
        self.formula = []


DECK = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10, 10)  # infinite deck: every draw is one of these, equally likely


def hand_total(values):
    """(total, usable ace): an ace counts 11 when that does not bust the hand."""
    usable = 1 in values and sum(values) + 10 <= 21
    return sum(values) + 10 * usable, int(usable)


class BlackjackEnv(GymCardsEnv):
    actions = ("stand", "hit")
    card_w, card_h, gap, left = 54, 84, 4, 7  # five cards fill a row
    rank_size = 64

    def draw_rank(self):
        # gymnasium's choice(DECK) (integers(0, n) is choice(n), only faster): index i is rank i + 1, value DECK[i]
        return int(self.np_random.integers(0, len(DECK))) + 1

    def deal(self):
        self.dealer = [self.draw_rank(), self.draw_rank()]  # gymnasium's order: dealer, then player
        self.player = [self.draw_rank(), self.draw_rank()]
        # then gymnasium's draws of the face-up card's suit and of a ten's face: later cards match for the same seed
        self.up_suit = SUITS[int(self.np_random.integers(0, 4))]
        if self.dealer[0] >= 10:
            self.dealer[0] = 11 + int(self.np_random.integers(0, 3))

    def play(self, action):
        if action == 1:  # hit
            self.player.append(self.draw_rank())
            bust = self.total(self.player) > 21
            return (-1.0 if bust else 0.0), bust, False
        while self.total(self.dealer) < 17:  # a usable ace counts 11 here, so the dealer stands on soft 17
            self.dealer.append(self.draw_rank())
        dealer = self.total(self.dealer) if self.total(self.dealer) <= 21 else 0  # a bust dealer scores 0
        return float(np.sign(self.total(self.player) - dealer)), True, False

    @staticmethod
    def total(ranks):
        return hand_total([card_value(r) for r in ranks])[0]

    def info(self):
        return {"Dealer": [card_value(r) for r in self.dealer], "Player": [card_value(r) for r in self.player]}

    def sprites(self):
        w, h, size, step, left = self.card_w, self.card_h, self.rank_size, self.card_w + self.gap, self.left
        dealer = [(left, 8, "card", self.dealer[0], self.up_suit, w, h, size), (left + step, 8, "back", w, h),
                  (left + 2 * step + 12, 50, "text", "Dealer", 36, "white", 0, "lm")]
        return dealer + [(left + (i % 5) * step, 112 + (i // 5) * (h + 8), "card", rank, SUITS[i % 4], w, h, size)
                         for i, rank in enumerate(self.player)]  # five cards a row


# ---- Solvers behind the experts
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}  # a single number binds tightest (3)
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def splits(numbers):
    """Each way to share a multiset of numbers between a left and a right operand."""
    n = len(numbers)
    return sorted({(tuple(numbers[i] for i in range(n) if mask >> i & 1),
                    tuple(numbers[i] for i in range(n) if not mask >> i & 1)) for mask in range(1, 2**n - 1)})


def write(op, left, pa, right, pb):
    """The entries of `left op right`, with just the parentheses that make Python parse this very tree. A right
    operand of equal precedence keeps its parentheses: a-(b-c), and a+(b+c) too (float sums depend on the order)."""
    p = PRECEDENCE[op]
    return (*(left if pa >= p else ("(", *left, ")")), op, *(right if pb > p else ("(", *right, ")")))


def joins(numbers, ops):
    """(value, left, pa, op, right, pb) for each way to join two expressions over a split of `numbers`."""
    for left_numbers, right_numbers in splits(numbers):
        pairs = product(expressions(left_numbers, ops), expressions(right_numbers, ops), ops)
        for (a, left, pa), (b, right, pb), op in pairs:
            if not (op == "/" and b == 0):
                yield APPLY[op](a, b), left, pa, op, right, pb


@functools.cache
def expressions(numbers, ops):
    """Every expression tree over all of the sorted `numbers` with binary `ops`: (value, entries, precedence).
    The value is computed operation for operation as the env's evaluator computes it from the entries."""
    if len(numbers) == 1:
        return ((numbers[0], (str(numbers[0]),), 3),)
    return tuple((value, write(op, left, pa, right, pb), PRECEDENCE[op])
                 for value, left, pa, op, right, pb in joins(numbers, ops))


@functools.cache
def solutions(numbers, target, ops):
    """Every formula (a tuple of entries, shortest first) over all of the sorted `numbers` equal to `target`."""
    found = {write(op, left, pa, right, pb)
             for value, left, pa, op, right, pb in joins(numbers, ops) if value == target}
    return tuple(sorted(found, key=lambda entries: (len(entries), entries)))


def points24_solvable(numbers):
    """Whether four card values (1..10) can make 24 with + - * / and parentheses, as the env checks it."""
    assert len(numbers) == 4 and all(1 <= n <= 10 for n in numbers), f"need four card values 1..10: {numbers}"
    return bool(solutions(tuple(sorted(numbers)), 24, "+-*/"))


def points_plan(actions, target, info):
    """The first solution (a tuple of entries) that continues the formula so far, or None if none does."""
    ops = "".join(a for a in actions if a in PRECEDENCE)
    formula = tuple(info["Formula"])
    plans = solutions(tuple(sorted(info["Numbers"])), target, ops)
    return next((p for p in plans if p[:len(formula)] == formula and all(e in actions for e in p)), None)


def points_expert(actions, target, info):
    """The plan's next entry, "=" once the plan is written, and "=" in a dead end (no plan left): no move can win
    there, and ending the deal costs the least, one -1."""
    plan, written = points_plan(actions, target, info), len(info["Formula"])
    return actions.index(plan[written] if plan and len(plan) > written else "=")


def add_card(total, usable, card):
    """Blackjack hand state (total, usable ace) after one more card."""
    hard = total - 10 * usable + card
    soft = (usable or card == 1) and hard + 10 <= 21  # a hand whose ace counts 1 has hard >= 12 anyway
    return hard + 10 * soft, int(soft)


@functools.cache
def dealer_finals(total, usable):
    """Probability of each final dealer total (22 = bust) from a dealer hand state."""
    if total >= 17:
        return {min(total, 22): 1.0}
    finals = Counter()
    for card in DECK:
        for final, p in dealer_finals(*add_card(total, usable, card)).items():
            finals[final] += p / len(DECK)
    return dict(finals)


@functools.cache
def best_play(total, usable, up):
    """(expected return, win probability, action) of the best policy from a player state against `up`."""
    finals = dealer_finals(*add_card(0, 0, up))  # the hidden card is one more draw from the deck
    stand_win = sum(p for f, p in finals.items() if f > 21 or f < total)
    stand_value = stand_win - sum(p for f, p in finals.items() if total < f <= 21)
    hit_value = hit_win = 0.0
    for card in DECK:
        next_total, next_usable = add_card(total, usable, card)
        if next_total > 21:
            hit_value -= 1 / len(DECK)
        else:
            value, win, _ = best_play(next_total, next_usable, up)
            hit_value, hit_win = hit_value + value / len(DECK), hit_win + win / len(DECK)
    return (stand_value, stand_win, 0) if stand_value >= hit_value else (hit_value, hit_win, 1)


@functools.cache
def blackjack_optimum():
    """(policy {(total, usable ace, dealer up card): action}, expected return, win rate) of the best fixed policy."""
    policy = {(t, u, up): best_play(t, u, up)[2]
              for t in range(4, 22) for u in (0, 1) if t >= 12 or not u for up in range(1, 11)}
    deals = [(add_card(*add_card(0, 0, a), b), up) for a, b, up in product(DECK, repeat=3)]
    expected = sum(best_play(*hand, up)[0] for hand, up in deals) / len(deals)
    win = sum(best_play(*hand, up)[1] for hand, up in deals) / len(deals)
    return policy, expected, win


def blackjack_expert(info):
    total, usable = hand_total(info["Player"])
    if total > 21:
        return None  # the game is over
    return blackjack_optimum()[0][(total, usable, info["Dealer"][0])]  # only the face-up card


# ---- The task table: what the training loop needs from each task

@dataclass(frozen=True)
class Task:
    env_id: str
    env_class: type
    goal: str  # the task description in the prompt
    read_spec: str  # the JSON fields read off the picture, as the prompt asks for them
    read: Callable[[dict], dict]  # their true values for a state
    thought: Callable[[dict], str]  # a short true thought: what the right action follows from
    labels: Callable[[dict], list]  # what the picture shows, as class indices
    label_classes: tuple
    expert: Callable[[dict], int | None]
    context: Callable[[dict], str] = lambda info: ""  # state given as text in the prompt
    # per-task training settings (rl4vlm.Settings fields the command line leaves unset)
    defaults: dict = field(default_factory=dict)
    # the paper's success rates (%, LLaVA-1.6-7B), where it has them: after SFT + RL, without CoT, SFT only
    paper: dict = field(default_factory=dict)
    solvable: Callable[[dict], bool] | None = None  # can this deal be won at all (Points24)

    @property
    def actions(self):
        return self.env_class.actions

    @property
    def name(self):
        return self.env_id.split("/")[1].split("-")[0]

    def prompt(self, info, cot):
        legal = ", ".join(json.dumps(a) for a in self.actions)
        fields = f'{self.read_spec}, "thoughts": "...", ' if cot else ""
        return (f"You are playing {self.name}. {self.goal} {self.context(info)}Legal actions: {legal}. "
                f'Answer in JSON: {{{fields}"action": "<legal action>"}}')

    def with_defaults(self, s):
        """Settings s (rl4vlm.Settings) with this task's defaults in the fields that s leaves None."""
        return replace(s, **{k: v for k, v in self.defaults.items() if getattr(s, k) is None})

    def random_action(self, rng):
        """A uniformly random legal action (the paper's fallback when the text names none)."""
        return int(rng.integers(len(self.actions)))

    def follow_or_random(self, expert, share, rng):
        """The expert's action with probability `share` (where it has one), else a random one."""
        return expert if expert is not None and rng.random() < share else self.random_action(rng)

    def answer_checks(self, info, text: str) -> tuple[bool, bool]:
        """Whether an answer holds the state's read fields, and its true thought, as the warm start writes them."""
        read = json.dumps(self.read(info))[1:-1]  # '"current": 2, "target": 4'
        return read in text, f'"thoughts": {json.dumps(self.thought(info))}' in text

    def answer(self, info, action, cot):
        assert 0 <= action < len(self.actions), f"action {action} not in 0..{len(self.actions) - 1}"
        fields = {**self.read(info), "thoughts": self.thought(info)} if cot else {}
        return json.dumps({**fields, "action": self.actions[action]})


def number_line_thought(info):
    where = "above" if info["Target"] > info["Current"] else "below"
    return f"target is {where} current" if info["Target"] != info["Current"] else "current is at target"


def points_thought(actions, target, info):
    """The cards in order, the plan the expert follows and what is left of it to write: `sorted: 2 6, plan: 2 * 6,
    to write: * 6`. Sorted first, the cards help the plans get learnt (measured: docs/points24-study.md)."""
    plan, cards = points_plan(actions, target, info), f"sorted: {' '.join(map(str, sorted(info['Numbers'])))}, "
    if plan is None:
        return cards + "plan: none, to write: ="  # a dead end: every move from here loses
    return cards + f"plan: {' '.join(plan)}, to write: {' '.join(plan[len(info['Formula']):] or ('=',))}"


def blackjack_thought(info):
    total, usable = hand_total(info["Player"])
    return f"{'soft' if usable else 'hard'} {total} against {info['Dealer'][0]}"


def points_task(env_id, env_class, cards, ace, read_cards, defaults, **more):
    """The table entry of a Points task, from its env's actions and target and how its prompt names the cards."""
    actions, target = env_class.actions, env_class.target
    goal = f"Append numbers and operators to make a formula equal to {target} that uses {cards} once; J, Q, K count as"
    return Task(env_id, env_class, f"{goal} 10{ace}.", read_spec=f'"cards": [{read_cards}], "formula": "<formula>"',
                read=lambda info: {"cards": info["Numbers"], "formula": " ".join(info["Formula"])},
                context=lambda info: f'Formula: {json.dumps(" ".join(info["Formula"]))}. ',
                thought=functools.partial(points_thought, actions, target),
                labels=lambda info: [v - 1 for v in info["Numbers"]], label_classes=(10,) * len(env_class.card_boxes),
                expert=functools.partial(points_expert, actions, target), defaults=defaults, **more)


TASKS = {task.env_id: task for task in (
    Task("gym_cards/NumberLine-v0", NumberLineEnv, "Move the current number to the target number.",
         read_spec='"current": <number>, "target": <number>',
         read=lambda info: {"current": info["Current"], "target": info["Target"]}, thought=number_line_thought,
         labels=lambda info: [info["Current"], info["Target"]], label_classes=(6, 6),
         expert=lambda info: None if info["Current"] == info["Target"] else int(info["Target"] > info["Current"]),
         defaults=dict(num_steps=16, max_new_tokens=24, sft_steps=600, sft_expert=0.0, sft_follow=0.75, kl_coef=0.1),
         paper=dict(rl=89.4, no_cot=26.9, sft=24.8)),
    points_task("gym_cards/EZPoints-v0", EZPointsEnv, "both card values", "", "<value>, <value>",
                dict(num_steps=16, max_new_tokens=48, sft_steps=1200, sft_expert=0.7, sft_follow=0.75, kl_coef=0.1),
                paper=dict(rl=50.0, no_cot=29.9, sft=23.0)),
    points_task("gym_cards/Points24-v0", Points24Env, "all four card values", ", an ace 1", "<4 values>",
                dict(num_steps=32, max_new_tokens=72, sft_steps=2400, sft_expert=1.0, sft_follow=1.0, kl_coef=0.1),
                paper=dict(rl=2.3, no_cot=0.0, sft=2.6), solvable=lambda info: points24_solvable(info["Numbers"])),
    Task("gym_cards/Blackjack-v0", BlackjackEnv,
         "Get closer to 21 than the dealer without going over; J, Q, K count as 10, an ace 1 or 11.",
         read_spec='"dealer": <face-up card value>, "player": <your total>', thought=blackjack_thought,
         read=lambda info: {"dealer": info["Dealer"][0], "player": hand_total(info["Player"])[0]},
         labels=lambda info: [info["Dealer"][0] - 1, *hand_total(info["Player"])],
         label_classes=(10, 32, 2), expert=blackjack_expert,
         defaults=dict(num_steps=16, max_new_tokens=32, sft_steps=3600, sft_expert=0.0, sft_follow=0.75, kl_coef=0.3),
         paper=dict(rl=40.2, no_cot=40.4, sft=23.1)),
)}

# The gym-cards suite (--env gym-cards) and the built-in model's tokenizer corpus: these four whatever a fork adds to
# TASKS, so that a new task changes neither the four tasks' built-in model nor their numbers.
GYM_CARDS = ("gym_cards/NumberLine-v0", "gym_cards/EZPoints-v0", "gym_cards/Points24-v0", "gym_cards/Blackjack-v0")

for _task in TASKS.values():
    if _task.env_id not in gym.registry:  # running this file as a script imports it a second time
        gym.register(_task.env_id, entry_point=_task.env_class, max_episode_steps=300)


def get_task(name):
    """A task by its env id or short name, case-insensitive ("numberline", "gym_cards/Blackjack-v0")."""
    for task in TASKS.values():
        if name.lower() in (task.env_id.lower(), task.name.lower()):
            return task
    raise ValueError(f"unknown task {name!r}; choose one of {[t.name.lower() for t in TASKS.values()]}")


def is_success(episode_return):
    return episode_return > 0
