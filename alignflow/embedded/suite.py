"""The embedded instruction suite: six task types whose answers a program can check.

    python -c "from alignflow.embedded.suite import make_splits; print(make_splits({'demo': 6}, seed=0))"

Each example is Alpaca-shaped (instruction, input, output) plus its task type. Instructions come in
several phrasings per task so the model learns to follow requests, not one template (the seed's
point about diversity).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from alignflow.stats import FLAWS

WORDS = (
    "apple bread chair dance eagle fable grape house igloo jelly kite lemon mango night ocean "
    "pearl queen river stone tiger umbra voice water xenon yacht zebra amber blaze cloud delta "
    "ember frost glade heron ivory jewel koala lunar maple noble olive piano quill robin solar "
    "tulip unity vivid wheat yodel zesty acorn basil cedar daisy elbow flame ghost honey index "
    "juice knack lilac moose nerve orbit plaza raven sugar toast ultra vapor whale yeast bison "
    "cabin dunes entry fairy giant hotel inlet joker kayak llama medal nacho opera patio rhino "
    "salsa tango urban viper waltz cat dog sun map pen cup hat box fox owl bee ant cow pig"
).split()

ORDINALS = ["first", "second", "third", "fourth", "fifth"]


# A closed vocabulary: every word is seen in SFT and in pre-training, so a held-out question is a
# new combination of known words (new pairs, lists, letters), not a word the model never met.
# Two-word inputs keep the single-word skills' question space large enough for disjoint splits.
def _two_words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, 2)


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = _two_words(rng)
    phrasing = rng.choice(["Reverse each word.", "Write these words backwards.", "Spell each word in reverse."])
    return phrasing, " ".join(words), " ".join(w[::-1] for w in words)


def _uppercase(rng: random.Random) -> tuple[str, str, str]:
    words = _two_words(rng)
    phrasing = rng.choice(["Write the words in capital letters.", "Convert the words to uppercase.",
                           "Shout these words."])
    return phrasing, " ".join(words), " ".join(words).upper()


def _sort_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, 3)
    phrasing = rng.choice(["Sort these words alphabetically.", "Put the words in alphabetical order.",
                           "Arrange the words from A to Z."])
    return phrasing, " ".join(words), " ".join(sorted(words))


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    phrasing = rng.choice(["Add the two numbers.", "What is the sum?", "Compute the total."])
    return phrasing, f"{a} + {b}", str(a + b)


def _count_letter(rng: random.Random) -> tuple[str, str, str]:
    # Answers balanced between 1 and 2 (a letter drawn at random occurs once ~80% of the time, so
    # always answering "1" would otherwise score 0.8).
    want = rng.choice([1, 2])
    while True:
        words = _two_words(rng)
        joined = "".join(words)
        letters = sorted(c for c in set(joined) if joined.count(c) == want)
        if letters:
            break
    letter = rng.choice(letters)
    phrasing = rng.choice([f"How many times does the letter {letter} appear?", f"Count the letter {letter}.",
                           f"Count how often {letter} occurs in the words."])
    return phrasing, " ".join(words), str("".join(words).count(letter))


def _nth_word(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    n = rng.randrange(len(words))
    phrasing = rng.choice([f"What is the {ORDINALS[n]} word?", f"Give the {ORDINALS[n]} word of the list.",
                           f"Extract word number {n + 1}."])
    return phrasing, " ".join(words), words[n]


def _first_letters(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    phrasing = rng.choice(["Write the first letter of each word.", "Give the initials of the words.",
                           "Make an acronym from the first letters."])
    return phrasing, " ".join(words), "".join(w[0] for w in words)


def _last_word(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    phrasing = rng.choice(["What is the last word?", "Give the final word of the list.", "Which word comes last?"])
    return phrasing, " ".join(words), words[-1]


def _word_order(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, 3)
    phrasing = rng.choice(["Reverse the order of the words.", "List the words from last to first.",
                           "Write the words in the opposite order."])
    return phrasing, " ".join(words), " ".join(reversed(words))


def _count_words(rng: random.Random) -> tuple[str, str, str]:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
    phrasing = rng.choice(["How many words are there?", "Count the words.", "How many words does the list have?"])
    return phrasing, " ".join(words), str(len(words))


def _vowels(text: str) -> int:
    return sum(c in "aeiou" for c in text)


def _count_vowels(rng: random.Random) -> tuple[str, str, str]:
    want = rng.choice([3, 4, 5])  # balanced: the natural distribution is over half "4"
    words = _two_words(rng)
    while _vowels("".join(words)) != want:
        words = _two_words(rng)
    phrasing = rng.choice(["How many vowels are there?", "Count the vowels.", "How many of the letters are vowels?"])
    return phrasing, " ".join(words), str(_vowels("".join(words)))


def _parity(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 999)
    phrasing = rng.choice(["Is the number even or odd?", "Even or odd?", "Say whether the number is even or odd."])
    return phrasing, str(n), "even" if n % 2 == 0 else "odd"


def _larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100), 2)
    phrasing = rng.choice(["Which number is larger, the first or the second?", "Is the first or the second bigger?",
                           "Which is greater: first or second?"])
    return phrasing, f"{a} {b}", "first" if a > b else "second"


def _has_letter(rng: random.Random) -> tuple[str, str, str]:
    words = _two_words(rng)
    present = sorted(set("".join(words)))
    absent = [c for c in "abcdefghijklmnoprstuvwy" if c not in present]
    letter = rng.choice(present if rng.random() < 0.5 else absent)  # yes and no equally often
    phrasing = rng.choice([f"Do the words contain the letter {letter}?", f"Is there an {letter} in the words?",
                           f"Does the letter {letter} occur?"])
    return phrasing, " ".join(words), "yes" if letter in "".join(words) else "no"


TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "reverse": _reverse,
    "uppercase": _uppercase,
    "sort_words": _sort_words,
    "add": _add,
    "count_letter": _count_letter,
    "nth_word": _nth_word,
    "first_letters": _first_letters,
    "last_word": _last_word,
    "word_order": _word_order,
    "count_words": _count_words,
    "count_vowels": _count_vowels,
    "parity": _parity,
    "larger": _larger,
    "has_letter": _has_letter,
}


# Every answer of a two-or-more-answer task type is about equally likely, so a model that learned
# only the answer prior scores chance (1/2, 1/3), not the majority share. Bump when tasks change.
SUITE_VERSION = 2


def make_splits(sizes: dict[str, int], seed: int, tasks: list[str] | None = None) -> dict[str, list[dict]]:
    """Disjoint splits: no question (task, input, answer) appears twice, in any phrasing."""
    names = list(tasks or TASKS)
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    splits: dict[str, list[dict]] = {}
    attempts = 0
    for name, size in sizes.items():
        rows: list[dict] = []
        while len(rows) < size:
            task = names[len(rows) % len(names)]  # round-robin keeps task types balanced
            instruction, input_text, output = TASKS[task](rng)
            key = (task, input_text, output)  # the question itself, whatever its phrasing
            if key in seen:
                attempts += 1
                if attempts > 100 * sum(sizes.values()):
                    raise ValueError(f"task {task!r} has too few distinct questions for splits of {sizes}")
                continue
            seen.add(key)
            rows.append({"instruction": instruction, "input": input_text, "output": output, "task": task})
        rng.shuffle(rows)
        splits[name] = rows
    return splits


# The prompt is the whole question: each task type's phrasings (as written above) and how to answer
# them from the input alone. A checker that needs no reference answer (alignflow.rankers.Checker),
# as math and code verifiers check an answer from the problem itself.
_L = r"(?P<letter>[a-z])"
_ORD = "(?P<ordinal>" + "|".join(ORDINALS) + ")"
_SOLVERS: list[tuple[str, list[str], Callable[[re.Match, str], str]]] = [
    ("reverse", [r"Reverse each word\.", r"Write these words backwards\.", r"Spell each word in reverse\."],
     lambda m, x: " ".join(w[::-1] for w in x.split())),
    ("uppercase", [r"Write the words in capital letters\.", r"Convert the words to uppercase\.",
                   r"Shout these words\."], lambda m, x: x.upper()),
    ("sort_words", [r"Sort these words alphabetically\.", r"Put the words in alphabetical order\.",
                    r"Arrange the words from A to Z\."], lambda m, x: " ".join(sorted(x.split()))),
    ("add", [r"Add the two numbers\.", r"What is the sum\?", r"Compute the total\."],
     lambda m, x: str(sum(int(n) for n in x.split("+")))),
    ("count_letter", [rf"How many times does the letter {_L} appear\?", rf"Count the letter {_L}\.",
                      rf"Count how often {_L} occurs in the words\."],
     lambda m, x: str("".join(x.split()).count(m["letter"]))),
    ("nth_word", [rf"What is the {_ORD} word\?", rf"Give the {_ORD} word of the list\.",
                  r"Extract word number (?P<number>\d+)\."],
     lambda m, x: x.split()[int(m["number"]) - 1 if m.groupdict().get("number") else ORDINALS.index(m["ordinal"])]),
    ("first_letters", [r"Write the first letter of each word\.", r"Give the initials of the words\.",
                       r"Make an acronym from the first letters\."], lambda m, x: "".join(w[0] for w in x.split())),
    ("last_word", [r"What is the last word\?", r"Give the final word of the list\.", r"Which word comes last\?"],
     lambda m, x: x.split()[-1]),
    ("word_order", [r"Reverse the order of the words\.", r"List the words from last to first\.",
                    r"Write the words in the opposite order\."], lambda m, x: " ".join(reversed(x.split()))),
    ("count_words", [r"How many words are there\?", r"Count the words\.", r"How many words does the list have\?"],
     lambda m, x: str(len(x.split()))),
    ("count_vowels", [r"How many vowels are there\?", r"Count the vowels\.", r"How many of the letters are vowels\?"],
     lambda m, x: str(_vowels("".join(x.split())))),
    ("parity", [r"Is the number even or odd\?", r"Even or odd\?", r"Say whether the number is even or odd\."],
     lambda m, x: "even" if int(x) % 2 == 0 else "odd"),
    ("larger", [r"Which number is larger, the first or the second\?", r"Is the first or the second bigger\?",
                r"Which is greater: first or second\?"],
     lambda m, x: "first" if int(x.split()[0]) > int(x.split()[1]) else "second"),
    ("has_letter", [rf"Do the words contain the letter {_L}\?", rf"Is there an {_L} in the words\?",
                    rf"Does the letter {_L} occur\?"],
     lambda m, x: "yes" if m["letter"] in "".join(x.split()) else "no"),
]
_PATTERNS = [(re.compile(pattern), solve) for _task, patterns, solve in _SOLVERS for pattern in patterns]


def solve(prompt: str) -> str | None:
    """The answer to a suite question (instruction, blank line, input) from the question alone, or
    None when it is not one of the suite's phrasings or its input does not fit the task."""
    instruction, _, input_text = prompt.partition("\n\n")
    for pattern, answer in _PATTERNS:
        match = pattern.fullmatch(instruction.strip())
        if match:
            try:
                return answer(match, input_text.strip())
            except (ValueError, IndexError):
                return None
    return None


RAMBLES = ("because that is what the words say", "as far as I can tell from looking at it",
           "which I worked out by reading it twice", "if I understood the question right")


def add_flaws(rows: list[dict], shares: dict[str, float], seed: int) -> list[dict]:
    """A copy of `rows` where each flaw kind (`wrong`, `verbose`, `runon`) takes its share of the rows,
    disjoint, drawn with `seed`; a flawed row names its kind in `flaw`. A wrong answer is another row's
    answer of the same task type (so it is a plausible value: the other of yes/no, a neighbouring count)."""
    rng = random.Random(f"flaws-{seed}")
    order = list(range(len(rows)))
    rng.shuffle(order)
    by_task: dict[str, list[str]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row["output"])
    out = [dict(row) for row in rows]
    start = 0
    for kind in FLAWS:
        count = round(shares.get(kind, 0.0) * len(rows))
        for i in order[start:start + count]:
            row, answer = out[i], out[i]["output"]
            if kind == "wrong":
                others = sorted({a for a in by_task[row["task"]] if a != answer})
                if not others:
                    continue  # a task type with one answer only cannot be answered wrongly by another row's
                row["output"] = rng.choice(others)
            elif kind == "verbose":
                row["output"] = f"{answer}, {rng.choice(RAMBLES)}"
            else:
                row["output"] = " ".join([answer] * 12)
            row["flaw"] = kind
        start += count
    return out


def pretraining_text(seed: int, n_docs: int) -> list[str]:
    """Plain prose about the suite's words and numbers: knowledge without the chat format.

    A base model trained on this knows that 'apple' reversed is 'elppa', but has never seen a
    request followed by an answer, so asked an instruction it continues text (the seed's base model).
    """
    rng = random.Random(seed)
    return [" ".join(_fact(rng) for _ in range(rng.randint(3, 8))) for _ in range(n_docs)]


def _fact(rng: random.Random) -> str:
    """One sentence of prose exercising a skill on random known words (never the chat format)."""
    pair, words = rng.sample(WORDS, 2), rng.sample(WORDS, rng.randint(3, 5))
    kind = rng.randrange(15)
    if kind == 0:
        return f"Backwards, {' '.join(pair)} reads {' '.join(w[::-1] for w in pair)}."
    if kind == 1:
        return f"In capital letters {' '.join(pair)} becomes {' '.join(pair).upper()}."
    if kind == 2:
        return f"In alphabetical order, {' '.join(words[:3])} is {' '.join(sorted(words[:3]))}."
    if kind == 3:
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        return f"{a} plus {b} makes {a + b}."
    if kind == 4:
        letter = rng.choice("".join(pair))
        return f"The letter {letter} occurs {''.join(pair).count(letter)} times in {' '.join(pair)}."
    if kind == 5:
        n = rng.randrange(len(words))
        return f"In the list {' '.join(words)}, the {ORDINALS[n]} word is {words[n]}."
    if kind == 6:
        return f"The initials of {' '.join(words)} are {''.join(w[0] for w in words)}."
    if kind == 7:
        return f"The list {' '.join(words)} ends with {words[-1]}."
    if kind == 8:
        return f"From last to first, {' '.join(words[:3])} is {' '.join(reversed(words[:3]))}."
    if kind == 9:
        return f"The list {' '.join(words)} has {len(words)} words."
    if kind == 10:
        return f"There are {sum(c in 'aeiou' for c in ''.join(pair))} vowels in {' '.join(pair)}."
    if kind == 11:
        n = rng.randint(0, 999)
        return f"The number {n} is {'even' if n % 2 == 0 else 'odd'}."
    if kind == 12:
        a, b = rng.sample(range(100), 2)
        return f"Of {a} and {b}, the larger is {max(a, b)}."
    if kind == 13:
        letter = rng.choice("abcdefghijklmnoprstuvwy")
        return f"The letter {letter} {'is' if letter in ''.join(pair) else 'is not'} in {' '.join(pair)}."
    return " ".join(rng.sample(WORDS, rng.randint(4, 9))).capitalize() + "."
