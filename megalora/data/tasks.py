"""A small instruction task, generated deterministically: short questions, terse answers.

Every example is a question with a one-word or one-number answer drawn from a
structure a small model can pick up from a few hundred examples: capitals,
two-digit arithmetic, unit conversions, the next day/month/letter, spelling a
word backwards or in capitals. An instruction-tuned model already knows much of
this but answers in full sentences; fine-tuning teaches the terse format and the
rules, so the eval loss on the answer tokens drops well below the base model's.

The train and eval splits never share a question. The same seed gives the same
examples on every machine and every rank, so no rank needs to send data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Russia", "Moscow"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"),
    ("Australia", "Canberra"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Czechia", "Prague"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Israel", "Jerusalem"), ("Ukraine", "Kyiv"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Iceland", "Reykjavik"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("Ghana", "Accra"),
    ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Pakistan", "Islamabad"),
    ("Afghanistan", "Kabul"), ("Venezuela", "Caracas"), ("Uruguay", "Montevideo"),
    ("New Zealand", "Wellington"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"),
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
WORDS = ("cat", "dog", "sun", "tree", "bird", "fish", "book", "lamp", "milk", "rain", "star", "moon",
         "road", "ship", "frog", "cake", "door", "hand", "king", "leaf", "rock", "salt", "wind", "gold",
         "blue", "red", "pen", "cup", "map", "box", "hat", "key", "egg", "ice", "owl", "fox")
UNITS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("days", "hours", 24),
         ("weeks", "days", 7), ("liters", "milliliters", 1000))

CATEGORIES = ("capital", "add", "subtract", "multiply", "convert", "next_day", "next_month",
              "next_letter", "reverse", "upper")


@dataclass(frozen=True)
class Example:
    """One question and its terse answer."""

    question: str
    answer: str
    category: str


def _pool(category: str, rng: random.Random, cap: int) -> list[Example]:
    """Every candidate of a category (sampled down to ``cap`` for the big ones)."""
    def ex(q, a):
        return Example(q, str(a), category)

    if category == "capital":
        return [ex(f"What is the capital of {c}?", a) for c, a in CAPITALS]
    if category == "next_day":
        return [ex(f"What day comes after {d}?", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    if category == "next_month":
        return [ex(f"What month comes after {m}?", MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    if category == "next_letter":
        return [ex(f"Which letter comes after {chr(65 + i)}?", chr(66 + i)) for i in range(25)]
    if category == "reverse":
        return [ex(f"Spell the word '{w}' backwards.", w[::-1]) for w in WORDS]
    if category == "upper":
        return [ex(f"Write the word '{w}' in capital letters.", w.upper()) for w in WORDS]
    if category == "add":
        pairs = [(a, b) for a in range(10, 60) for b in range(10, 40)]
        return [ex(f"What is {a} plus {b}?", a + b) for a, b in rng.sample(pairs, cap)]
    if category == "subtract":
        pairs = [(a, b) for a in range(20, 100) for b in range(1, 20)]
        return [ex(f"What is {a} minus {b}?", a - b) for a, b in rng.sample(pairs, cap)]
    if category == "multiply":
        return [ex(f"What is {a} times {b}?", a * b) for a in range(2, 13) for b in range(2, 10)]
    if category == "convert":
        items = [(n, u) for n in range(2, 10) for u in UNITS]
        return [ex(f"How many {small} are in {n} {big}?", n * factor) for n, (big, small, factor) in items]
    raise ValueError(f"data.categories: unknown category {category!r}; choose from {list(CATEGORIES)}")


def make_splits(num_train: int, num_eval: int, seed: int = 0,
                categories: tuple[str, ...] | list[str] = CATEGORIES) -> tuple[list[Example], list[Example]]:
    """Disjoint train and eval examples, the categories interleaved round-robin.

    Args:
        num_train: Train examples wanted; a category's pool is reused (same
            question, another epoch) when there are not enough distinct ones.
        num_eval: Eval examples; drawn first, so growing ``num_train`` never
            changes the eval set.
        seed: Fixes the draw.
        categories: Which of :data:`CATEGORIES` to use.

    Returns:
        ``(train, eval)`` lists of :class:`Example`.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"data.num_train={num_train} and data.num_eval={num_eval} must both be >= 1")
    categories = list(categories)
    if not categories:
        raise ValueError("data.categories is empty; list at least one of " + ", ".join(CATEGORIES))
    rng = random.Random(seed)
    pools = []
    for cat in categories:
        pool = _pool(cat, rng, cap=120)
        rng.shuffle(pool)
        pools.append(pool)
    # Held-out quotas round-robin over the categories; a category gives at most a
    # quarter of its pool, so every category keeps most of its questions for training.
    caps = [max(1, len(pool) // 4) for pool in pools]
    quota = [0] * len(pools)
    while sum(quota) < num_eval and any(q < c for q, c in zip(quota, caps)):
        for i in range(len(pools)):
            if quota[i] < caps[i] and sum(quota) < num_eval:
                quota[i] += 1
    if sum(quota) < num_eval:
        raise ValueError(f"data.num_eval={num_eval} is more than the {sum(quota)} held-out questions these "
                         "categories have; lower data.num_eval or add categories")
    eval_set = _round_robin([pool[:q] for pool, q in zip(pools, quota)], num_eval, cycle=False)
    trains = [pool[q:] for pool, q in zip(pools, quota)]
    return _round_robin(trains, num_train, cycle=True), eval_set


def _round_robin(lists: list[list[Example]], n: int, cycle: bool) -> list[Example]:
    out, i = [], 0
    total = sum(len(x) for x in lists)
    while len(out) < n and (cycle or i < max(len(x) for x in lists)):
        for items in lists:
            if items and (cycle or i < len(items)):
                out.append(items[i % len(items)])
                if len(out) == n:
                    break
        i += 1
        if not cycle and len(out) >= total:
            break
    return out
