"""Procedural task families: small skills a character-level model can learn in seconds.

Every family maps a random input drawn from a large space to one short answer, so that
train / validation / test splits can be disjoint by prompt and still test the skill
(not a memorised table). A prompt is ``"<instruction> <input>="`` and the answer
follows the ``=`` directly; examples end with a newline, which is also where
generation stops during evaluation.

Families are grouped in skill clusters (string, number, sequence, comparison). Which
family is held-in (an expert trains on it) and which is held-out (no expert does) is
decided by the config, not here.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
DIGITS = string.digits


@dataclass(frozen=True)
class TaskFamily:
    name: str
    cluster: str
    instruction: str  # the words before the input; short, because every char costs compute
    sample_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    description: str

    def prompt(self, x: str) -> str:
        return f"{self.instruction} {x}="

    def example(self, rng: random.Random) -> dict[str, str]:
        x = self.sample_input(rng)
        return {"prompt": self.prompt(x), "answer": self.solve(x)}


def _word(rng: random.Random, low: int = 3, high: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _number(rng: random.Random, low: int = 5, high: int = 8) -> str:
    n = rng.randint(low, high)
    return rng.choice(DIGITS[1:]) + "".join(rng.choice(DIGITS) for _ in range(n - 1))


def _pair(rng: random.Random) -> str:
    a, b = rng.sample(range(10, 100), 2)  # distinct, so "larger" is always defined
    return f"{a},{b}"


def _shift(letter: str, by: int) -> str:
    return LETTERS[(LETTERS.index(letter) + by) % 26]


FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in [
        # string cluster
        TaskFamily("first_letter", "string", "first", _word, lambda x: x[0],
                   "first letter of a word"),
        TaskFamily("last_letter", "string", "last", _word, lambda x: x[-1],
                   "last letter of a word"),
        TaskFamily("second_letter", "string", "second", _word, lambda x: x[1],
                   "second letter of a word"),
        TaskFamily("reverse_word", "string", "reverse", lambda r: _word(r, 3, 3),
                   lambda x: x[::-1], "a three-letter word reversed"),
        # number cluster
        TaskFamily("max_digit", "number", "max", _number, lambda x: max(x),
                   "largest digit of a number"),
        TaskFamily("min_digit", "number", "min", _number, lambda x: min(x),
                   "smallest digit of a number"),
        TaskFamily("parity", "number", "parity", _number,
                   lambda x: "even" if int(x[-1]) % 2 == 0 else "odd",
                   "whether a number is even or odd"),
        # sequence cluster
        TaskFamily("word_length", "sequence", "length", lambda r: _word(r, 1, 9),
                   lambda x: str(len(x)), "number of letters in a word"),
        TaskFamily("next_letter", "sequence", "next", _word,
                   lambda x: _shift(x[-1], 1), "the letter after the word's last letter"),
        TaskFamily("prev_letter", "sequence", "prev", _word,
                   lambda x: _shift(x[0], -1), "the letter before the word's first letter"),
        # comparison cluster
        TaskFamily("larger_number", "comparison", "larger", _pair,
                   lambda x: max(x.split(","), key=int), "the larger of two numbers"),
        TaskFamily("smaller_number", "comparison", "smaller", _pair,
                   lambda x: min(x.split(","), key=int), "the smaller of two numbers"),
    ]
}

# Every character any family can emit; the tokenizer is built from this alphabet.
ALPHABET = sorted(set(LETTERS + DIGITS + " =,\n"))


def get_family(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, FAMILIES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(
            f"unknown task family {name!r}.{hint} Known: {', '.join(sorted(FAMILIES))}"
        ) from None
