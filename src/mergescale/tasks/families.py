"""Procedural task families: small skills a character-level model can learn in seconds.

Every family maps a random input drawn from a large space to one short answer, so that
train / validation / test splits can be disjoint by prompt and still test the skill
(not a memorised table). Examples end with a newline, which is also where generation
stops during evaluation.

The world has the structure of "What Matters for Model Merging at Scale?" (Yadav et al.
2024); a family's *role* says which stage may ever read it (docs/tiny-world.md):

- ``task``: benchmark families, asked ``"<keyword> <input>="``, in skill clusters
  (string, number, sequence, comparison). The config makes each one held-in (an expert
  trains on it) or held-out (nothing trains on it).
- ``pretrain``: what pretraining reads. Generic text (word lists, alphabet and digit
  runs); every benchmark skill in another format, ``"<keyword> <input>:"`` (its
  ``_of`` twin); and a few other skills in both formats, which teach that the two
  formats ask the same thing. No benchmark family's format appears, so a base answers
  a benchmark prompt, held-in or held-out, zero-shot only by carrying a pretrained skill
  over to a format it learned from other skills.
- ``instruct``: the instruction-tuning mixture (the paper's PaLM-2-IT): other skills
  in the benchmark format, answers only; disjoint from every benchmark family.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
DIGITS = string.digits

ROLES = ("task", "pretrain", "instruct")
BENCHMARK_FORMAT = "{keyword} {x}="  # every benchmark prompt; no pretraining prompt
PRETRAIN_FORMAT = "{keyword} {x}:"  # the same skills as pretraining asks them
TEXT = "{x}"  # generic text: the whole line is the "answer", the prompt is empty


@dataclass(frozen=True)
class TaskFamily:
    name: str
    cluster: str
    instruction: str  # the keyword; short, because every char costs compute
    sample_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    description: str
    role: str = "task"
    template: str = BENCHMARK_FORMAT

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"task family {self.name!r}: role must be one of {ROLES}")

    def prompt(self, x: str) -> str:
        if self.template == TEXT:
            return ""
        return self.template.format(keyword=self.instruction, x=x)

    def example(self, rng: random.Random) -> dict[str, str]:
        x = self.sample_input(rng)
        return {"prompt": self.prompt(x), "answer": self.solve(x)}

    def parse_input(self, prompt: str) -> str:
        """The input ``x`` of one of this family's prompts (the inverse of ``prompt``)."""
        head, tail = self.template.split("{x}")
        head, tail = head.format(keyword=self.instruction), tail.format(keyword=self.instruction)
        if not (prompt.startswith(head) and prompt.endswith(tail)):
            raise ValueError(f"{prompt!r} is not a prompt of task family {self.name!r}")
        return prompt[len(head): len(prompt) - len(tail)]


def _word(rng: random.Random, low: int = 3, high: int = 7) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _long_word(rng: random.Random) -> str:
    return _word(rng, 4, 8)


def _number(rng: random.Random, low: int = 5, high: int = 8) -> str:
    n = rng.randint(low, high)
    return rng.choice(DIGITS[1:]) + "".join(rng.choice(DIGITS) for _ in range(n - 1))


def _pair(rng: random.Random) -> str:
    a, b = rng.sample(range(10, 100), 2)  # distinct, so "larger" is always defined
    return f"{a},{b}"


def _shift(letter: str, by: int) -> str:
    return LETTERS[(LETTERS.index(letter) + by) % 26]


def _text(rng: random.Random) -> str:
    """Generic text: a line of random words, an alphabet run or a digit run."""
    kind = rng.random()
    if kind < 0.5:
        return " ".join(_word(rng, 1, 8) for _ in range(rng.randint(3, 6)))
    if kind < 0.8:
        start, n = rng.randrange(26), rng.randint(5, 12)
        return "".join(_shift("a", start + i) for i in range(n))
    start, n = rng.randrange(10), rng.randint(5, 12)
    return "".join(DIGITS[(start + i) % 10] for i in range(n))


def _skill(name, cluster, keyword, sample, solve, description, role="task",
           template=BENCHMARK_FORMAT):
    return TaskFamily(name, cluster, keyword, sample, solve, description, role, template)


# Skills: (keyword, input sampler, solver, description). Each benchmark skill is a
# benchmark family (prefix format) and a pretraining family (the "of" format).
SKILLS = {
    # string cluster
    "first_letter": ("first", _word, lambda x: x[0], "first letter of a word"),
    "last_letter": ("last", _word, lambda x: x[-1], "last letter of a word"),
    "second_letter": ("second", _word, lambda x: x[1], "second letter of a word"),
    "reverse_word": ("reverse", lambda r: _word(r, 3, 3), lambda x: x[::-1],
                     "a three-letter word reversed"),
    # number cluster
    "max_digit": ("max", _number, lambda x: max(x), "largest digit of a number"),
    "min_digit": ("min", _number, lambda x: min(x), "smallest digit of a number"),
    # sequence cluster
    "word_length": ("length", lambda r: _word(r, 1, 9), lambda x: str(len(x)),
                    "number of letters in a word"),
    "next_letter": ("next", _word, lambda x: _shift(x[-1], 1),
                    "the letter after the word's last letter"),
    "prev_letter": ("prev", _word, lambda x: _shift(x[0], -1),
                    "the letter before the word's first letter"),
    # comparison cluster
    "larger_number": ("larger", _pair, lambda x: max(x.split(","), key=int),
                      "the larger of two numbers"),
    "smaller_number": ("smaller", _pair, lambda x: min(x.split(","), key=int),
                       "the smaller of two numbers"),
}
CLUSTERS = {"first_letter": "string", "last_letter": "string", "second_letter": "string",
            "reverse_word": "string", "max_digit": "number", "min_digit": "number",
            "word_length": "sequence", "next_letter": "sequence", "prev_letter": "sequence",
            "larger_number": "comparison", "smaller_number": "comparison"}
# Skills pretraining shows in both formats: they teach that the two formats ask the same
# thing, and that a prefix prompt's answer depends on its keyword.
BILINGUAL = {
    "third_letter": ("string", "third", _word, lambda x: x[2], "third letter of a word"),
    "penult_letter": ("string", "penult", _word, lambda x: x[-2], "the letter before a word's last"),
    "units_digit": ("number", "units", _number, lambda x: x[-1], "last digit of a number"),
    "parity_number": ("number", "parity", _number,
                      lambda x: "even" if int(x[-1]) % 2 == 0 else "odd",
                      "whether a number is even or odd"),
}
# Skills that only instruction tuning teaches, in the prefix format.
INSTRUCT = {
    "fourth_letter": ("string", "fourth", lambda r: _word(r, 4, 8), lambda x: x[3],
                      "fourth letter of a word"),
    "fifth_letter": ("string", "fifth", lambda r: _word(r, 5, 8), lambda x: x[4],
                     "fifth letter of a word"),
    "tail_letters": ("string", "tail", _word, lambda x: x[-2:], "the last two letters of a word"),
    "lead_digit": ("number", "lead", _number, lambda x: x[0], "first digit of a number"),
}
# The pretraining twin of a skill ("first_letter_of": first_letter asked in the
# pretraining format) is named by this suffix.
PRETRAIN_SUFFIX = "_of"


def _all_families() -> list[TaskFamily]:
    out = [_skill("text", "text", "", _text, lambda x: x, "generic text: words and runs",
                  role="pretrain", template=TEXT)]
    for name, (keyword, sample, solve, description) in SKILLS.items():
        cluster = CLUSTERS[name]
        out.append(_skill(name, cluster, keyword, sample, solve, description))
        out.append(_skill(name + PRETRAIN_SUFFIX, cluster, keyword, sample, solve, description,
                          role="pretrain", template=PRETRAIN_FORMAT))
    for name, (cluster, keyword, sample, solve, description) in BILINGUAL.items():
        out.append(_skill(name, cluster, keyword, sample, solve, description, role="pretrain"))
        out.append(_skill(name + PRETRAIN_SUFFIX, cluster, keyword, sample, solve, description,
                          role="pretrain", template=PRETRAIN_FORMAT))
    for name, (cluster, keyword, sample, solve, description) in INSTRUCT.items():
        out.append(_skill(name, cluster, keyword, sample, solve, description, role="instruct"))
    return out


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in _all_families()}

# Every character any family can emit; the tokenizer is built from this alphabet.
ALPHABET = sorted(set(LETTERS + DIGITS + " =,:\n"))


def families_with_role(role: str) -> list[str]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return sorted(name for name, f in FAMILIES.items() if f.role == role)


def get_family(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        from mergescale.errors import did_you_mean

        raise KeyError(
            f"unknown task family {name!r}{did_you_mean(name, FAMILIES)}. Known: {', '.join(sorted(FAMILIES))}"
        ) from None
