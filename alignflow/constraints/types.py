"""The constraint types: IFEval's instruction ids (Zhou et al. 2023, google-research/instruction_following_eval),
each check written out from IFEval's definition, plus `startend:start_checker` (alignflow's own, IFBench has
its like). A type without a `rewrite` can be asked and checked (held out, or in a user's file) but not
demonstrated by the embedded suite."""

from __future__ import annotations

import json
import random
import re
from typing import Literal

from pydantic import Field

from alignflow.constraints.base import Constraint, register

Relation = Literal["less than", "at least"]


def compare(count: int, relation: str, target: int) -> bool:
    return count < target if relation == "less than" else count >= target


def words(text: str) -> list[str]:
    """IFEval's word count tokens (NLTK's RegexpTokenizer(r"\\w+"))."""
    return re.findall(r"\w+", text)


# IFEval's split_into_sentences (instructions_util), used in place of NLTK's punkt (a run-time download)
_ALPHA, _DIGITS = "([A-Za-z])", "([0-9])"
_PREFIXES, _SUFFIXES = "(Mr|St|Mrs|Ms|Dr)[.]", "(Inc|Ltd|Jr|Sr|Co)"
_STARTERS = (r"(Mr|Mrs|Ms|Dr|Prof|Capt|Cpt|Lt|He\s|She\s|It\s|They\s|Their\s|Our\s|We\s|But\s|However\s|That\s|"
             r"This\s|Wherever)")
_ACRONYMS, _WEBSITES = "([A-Z][.][A-Z][.](?:[A-Z][.])?)", "[.](com|net|org|io|gov|edu|me)"


def sentences(text: str) -> list[str]:
    text = " " + text + "  "
    text = text.replace("\n", " ")
    text = re.sub(_PREFIXES, "\\1<prd>", text)
    text = re.sub(_WEBSITES, "<prd>\\1", text)
    text = re.sub(_DIGITS + "[.]" + _DIGITS, "\\1<prd>\\2", text)
    text = re.sub(r"\.{2,}", lambda m: "<prd>" * len(m.group(0)) + "<stop>", text)
    text = text.replace("Ph.D.", "Ph<prd>D<prd>")
    text = re.sub(r"\s" + _ALPHA + "[.] ", " \\1<prd> ", text)
    text = re.sub(_ACRONYMS + " " + _STARTERS, "\\1<stop> \\2", text)
    text = re.sub(_ALPHA + "[.]" + _ALPHA + "[.]" + _ALPHA + "[.]", "\\1<prd>\\2<prd>\\3<prd>", text)
    text = re.sub(_ALPHA + "[.]" + _ALPHA + "[.]", "\\1<prd>\\2<prd>", text)
    text = re.sub(" " + _SUFFIXES + "[.] " + _STARTERS, " \\1<stop> \\2", text)
    text = re.sub(" " + _SUFFIXES + "[.]", " \\1<prd>", text)
    text = re.sub(" " + _ALPHA + "[.]", " \\1<prd>", text)
    text = text.replace(".”", "”.").replace(".\"", "\".").replace("!\"", "\"!").replace("?\"", "\"?")
    text = text.replace(".", ".<stop>").replace("?", "?<stop>").replace("!", "!<stop>").replace("<prd>", ".")
    found = [s.strip() for s in text.split("<stop>")]
    return [s for s in found if s]


def _join(parts: list[str]) -> str:
    return " ".join(parts)


def _one(rng: random.Random, *phrasings: str) -> str:
    return rng.choice(phrasings)


# ---- change_case -------------------------------------------------------------------------------------

@register
class Lowercase(Constraint):
    id = "change_case:english_lowercase"

    def check(self, response, prompt=""):
        return response.islower()  # IFEval also asks langdetect for English: the suite is English only

    def describe(self, rng):
        return _one(rng, "Your entire response should be in English, and in all lowercase letters. No capital "
                         "letters are allowed.", "Write everything in lowercase letters only.")

    def rewrite(self, text, rng):
        return text.lower()


@register
class Capitals(Constraint):
    id = "change_case:english_capital"

    def check(self, response, prompt=""):
        return response.isupper()

    def describe(self, rng):
        return _one(rng, "Your entire response should be in English, and in all capital letters.",
                    "Write your whole answer in capital letters.")

    def rewrite(self, text, rng):
        return text.upper()


@register
class CapitalWordFrequency(Constraint):
    id = "change_case:capital_word_frequency"
    capital_frequency: int = Field(gt=0)
    capital_relation: Relation

    def check(self, response, prompt=""):
        return compare(sum(w.isupper() for w in words(response)), self.capital_relation, self.capital_frequency)

    def describe(self, rng):
        return (f"In your response, words with all capital letters should appear {self.capital_relation} "
                f"{self.capital_frequency} times.")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(capital_frequency=rng.randint(2, 4), capital_relation="at least")

    def rewrite(self, text, rng):
        longest = sorted({w for w in words(text) if len(w) > 3 and w.isalpha()}, key=len, reverse=True)
        if self.capital_relation == "less than":
            return re.sub(r"\w+", lambda m: m.group(0).capitalize() if m.group(0).isupper() else m.group(0), text)
        for w in longest[: self.capital_frequency]:
            text = re.sub(rf"\b{w}\b", w.upper(), text)
        return text


# ---- punctuation ---------------------------------------------------------------------------------------

@register
class NoComma(Constraint):
    id = "punctuation:no_comma"

    def check(self, response, prompt=""):
        return "," not in response

    def describe(self, rng):
        return _one(rng, "In your entire response, refrain from the use of any commas.", "Do not use any commas.")

    def rewrite(self, text, rng):
        return re.sub(r"\s*,", "", text)


# ---- length_constraints -------------------------------------------------------------------------------

@register
class NumberWords(Constraint):
    id = "length_constraints:number_words"
    num_words: int = Field(gt=0)
    relation: Relation

    def check(self, response, prompt=""):
        return compare(len(words(response)), self.relation, self.num_words)

    def describe(self, rng):
        return _one(rng, f"Answer with {self.relation} {self.num_words} words.",
                    f"Your response should contain {self.relation} {self.num_words} words.")

    @classmethod
    def draw(cls, rng, text=None):
        if rng.random() < 0.7:  # for a given answer, a limit its first sentence fits under
            first = len(words(sentences(text)[0])) if text and sentences(text) else 0
            fits = [n for n in (15, 20, 25, 30, 40) if n > first]
            if fits:
                return cls(num_words=rng.choice(fits[:3]), relation="less than")
        return cls(num_words=rng.choice([20, 30, 40]), relation="at least")

    def rewrite(self, text, rng):
        if self.relation == "at least":
            return text if len(words(text)) >= self.num_words else None
        kept: list[str] = []
        for s in sentences(text):
            if len(words(_join(kept + [s]))) >= self.num_words:
                break
            kept.append(s)
        return _join(kept) or None


@register
class NumberSentences(Constraint):
    id = "length_constraints:number_sentences"
    num_sentences: int = Field(gt=0)
    relation: Relation

    def check(self, response, prompt=""):
        return compare(len(sentences(response)), self.relation, self.num_sentences)

    def describe(self, rng):
        return _one(rng, f"Your response should contain {self.relation} {self.num_sentences} sentences.",
                    f"Answer in {self.relation} {self.num_sentences} sentences.")

    @classmethod
    def draw(cls, rng, text=None):
        if rng.random() < 0.6:
            return cls(num_sentences=rng.choice([2, 3]), relation="less than")
        return cls(num_sentences=rng.choice([4, 5]), relation="at least")

    def rewrite(self, text, rng):
        found = sentences(text)
        if self.relation == "at least":
            return text if len(found) >= self.num_sentences else None
        return _join(found[: self.num_sentences - 1]) or None


def _paragraphs(response: str, separator: str) -> list[str] | None:
    """IFEval's paragraph count: split on `separator`; an empty first or last part is dropped, an empty
    one in between fails the check (None)."""
    parts = re.split(separator, response)
    if any(not part.strip() for part in parts[1:-1]):
        return None
    return [part for i, part in enumerate(parts) if part.strip() or i not in (0, len(parts) - 1)]


def _paragraph_groups(text: str, n: int) -> list[str] | None:
    found = sentences(text)
    if len(found) < n:
        return None
    size = len(found) // n
    return [_join(found[i * size: (i + 1) * size if i < n - 1 else len(found)]) for i in range(n)]


@register
class NumberParagraphs(Constraint):
    id = "length_constraints:number_paragraphs"
    num_paragraphs: int = Field(gt=0)

    def check(self, response, prompt=""):
        paragraphs = _paragraphs(response, r"\s?\*\*\*\s?")
        return paragraphs is not None and len(paragraphs) == self.num_paragraphs

    def describe(self, rng):
        return (f"There should be {self.num_paragraphs} paragraphs. Paragraphs are separated with the markdown "
                "divider: ***")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(num_paragraphs=rng.choice([2, 3]))

    def rewrite(self, text, rng):
        groups = _paragraph_groups(text, self.num_paragraphs)
        return "\n***\n".join(groups) if groups else None


CONNECTIVES = ["however", "moreover", "overall", "also", "finally", "indeed"]


@register
class NthParagraphFirstWord(Constraint):
    id = "length_constraints:nth_paragraph_first_word"
    num_paragraphs: int = Field(gt=0)
    nth_paragraph: int = Field(gt=0)
    first_word: str = Field(min_length=1)

    def check(self, response, prompt=""):
        paragraphs = _paragraphs(response, r"\n\n")
        if paragraphs is None or len(paragraphs) != self.num_paragraphs or self.nth_paragraph > len(paragraphs):
            return False
        first = paragraphs[self.nth_paragraph - 1].strip().split()[0].strip().lstrip("'\"")
        word = "".join(c for c in first if c not in ".,?!'\"").lower()
        return word == self.first_word.lower()

    def describe(self, rng):
        return (f"There should be {self.num_paragraphs} paragraphs. Paragraphs and only paragraphs are separated "
                f"with each other by two new lines. The {_ordinal(self.nth_paragraph)} paragraph must start with "
                f"the word {self.first_word}.")

    @classmethod
    def draw(cls, rng, text=None):
        n = rng.choice([2, 3])
        return cls(num_paragraphs=n, nth_paragraph=rng.randint(2, n), first_word=rng.choice(CONNECTIVES))

    def rewrite(self, text, rng):
        groups = _paragraph_groups(text, self.num_paragraphs)
        if not groups:
            return None
        nth = groups[self.nth_paragraph - 1]
        groups[self.nth_paragraph - 1] = f"{self.first_word.capitalize()} {nth[:1].lower()}{nth[1:]}"
        return "\n\n".join(groups)


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


# ---- detectable_format ---------------------------------------------------------------------------------

@register
class NumberBullets(Constraint):
    id = "detectable_format:number_bullet_lists"
    num_bullets: int = Field(gt=0)

    def check(self, response, prompt=""):
        stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
        dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
        return len(stars) + len(dashes) == self.num_bullets

    def describe(self, rng):
        return _one(rng, f"Your answer must contain exactly {self.num_bullets} bullet points. Use the markdown "
                         "bullet points such as:\n* This is point 1.\n* This is point 2",
                    f"Answer with exactly {self.num_bullets} bullet points, each starting with *.")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(num_bullets=rng.choice([2, 3, 3, 4]))

    def rewrite(self, text, rng):
        found = sentences(text)
        if len(found) < self.num_bullets:  # too few sentences: a point per clause
            found = [c.strip().rstrip(".") + "." for c in re.split(r",\s+", " ".join(found)) if c.strip()]
        if len(found) < self.num_bullets:
            return None
        return "\n".join(f"* {s[:1].upper()}{s[1:]}" for s in found[: self.num_bullets])


@register
class Sections(Constraint):
    id = "detectable_format:multiple_sections"
    section_spliter: str = Field(min_length=1)  # IFEval's spelling
    num_sections: int = Field(gt=0)

    def check(self, response, prompt=""):
        parts = re.split(r"\s?" + re.escape(self.section_spliter) + r"\s?\d+\s?", response)
        return len(parts) - 1 >= self.num_sections

    def describe(self, rng):
        return (f"Your response must have {self.num_sections} sections. Mark the beginning of each section with "
                f"{self.section_spliter} X, such as: {self.section_spliter} 1")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(section_spliter=rng.choice(["Section", "SECTION", "Part"]), num_sections=rng.choice([2, 3]))

    def rewrite(self, text, rng):
        groups = _paragraph_groups(text, self.num_sections)
        if not groups:
            return None
        return "\n\n".join(f"{self.section_spliter} {i + 1}\n{g}" for i, g in enumerate(groups))


@register
class Highlights(Constraint):
    id = "detectable_format:number_highlighted_sections"
    num_highlights: int = Field(gt=0)

    def check(self, response, prompt=""):
        count = sum(bool(h.strip("*").strip()) for h in re.findall(r"\*[^\n\*]*\*", response))
        count += sum(bool(h.removeprefix("**").removesuffix("**").strip())
                     for h in re.findall(r"\*\*[^\n\*]*\*\*", response))
        return count >= self.num_highlights

    def describe(self, rng):
        return (f"Highlight at least {self.num_highlights} sections in your answer with markdown, i.e. "
                "*highlighted section*.")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(num_highlights=rng.choice([1, 2, 3]))

    def rewrite(self, text, rng):
        found = sentences(text)
        if len(found) < self.num_highlights + 1:
            return None
        # the first sentence stays plain: a line that starts with * would read as a bullet
        return _join([found[0]] + [f"*{s}*" if i < self.num_highlights else s for i, s in enumerate(found[1:])])


@register
class Title(Constraint):
    id = "detectable_format:title"

    def check(self, response, prompt=""):
        return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))

    def describe(self, rng):
        return ("Your answer must contain a title, wrapped in double angular brackets, such as "
                "<<poem of joy>>.")

    def rewrite(self, text, rng):
        title = " ".join(words(sentences(text)[0])[:4]) if sentences(text) else ""
        return f"<<{title}>>\n{text}" if title else None


@register
class JsonFormat(Constraint):
    id = "detectable_format:json_format"

    def check(self, response, prompt=""):
        value = response.strip()
        value = re.sub(r"^```(?:json|Json|JSON)?", "", value).removesuffix("```").strip()
        try:
            json.loads(value)
        except ValueError:
            return False
        return True

    def describe(self, rng):
        return _one(rng, "Entire output should be wrapped in JSON format. You can use markdown ticks such as ```.",
                    "Give your whole answer as JSON.")

    def rewrite(self, text, rng):
        return json.dumps({"answer": text}, ensure_ascii=False)


OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@register
class ConstrainedResponse(Constraint):
    id = "detectable_format:constrained_response"

    def check(self, response, prompt=""):
        return any(option in response.strip() for option in OPTIONS)

    def describe(self, rng):
        return f"Answer with one of the following options: {OPTIONS}"


@register
class TwoResponses(Constraint):
    id = "combination:two_responses"

    def check(self, response, prompt=""):
        parts = response.split("******")
        valid = [p.strip() for i, p in enumerate(parts) if p.strip() or i not in (0, len(parts) - 1)]
        return len(valid) == 2 and all(valid) and valid[0] != valid[1]

    def describe(self, rng):
        return ("Give two different responses. Responses and only responses should be separated by 6 asterisk "
                "symbols: ******.")

    def rewrite(self, text, rng):
        found = sentences(text)
        if len(found) < 2:
            return None
        half = len(found) // 2
        return f"{_join(found[:half])}\n******\n{_join(found[half:])}"


@register
class RepeatPrompt(Constraint):
    id = "combination:repeat_prompt"
    prompt_to_repeat: str = Field(min_length=1)

    def check(self, response, prompt=""):
        return response.strip().lower().startswith(self.prompt_to_repeat.strip().lower())

    def describe(self, rng):
        return ("First repeat the request word for word without change, then give your answer (1. do not say any "
                "words or characters before repeating the request; 2. the request you need to repeat does not "
                "include this sentence)")

    def rewrite(self, text, rng):
        return f"{self.prompt_to_repeat}\n{text}"


# ---- keywords -----------------------------------------------------------------------------------------

@register
class Keywords(Constraint):
    id = "keywords:existence"
    keywords: list[str] = Field(min_length=1)

    def check(self, response, prompt=""):
        return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in self.keywords)

    def describe(self, rng):
        return _one(rng, f"Include keywords {', '.join(self.keywords)} in the response.",
                    f"Make sure your answer uses the words {' and '.join(self.keywords)}.")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(keywords=rng.sample(KEYWORDS, rng.choice([1, 2])))

    def rewrite(self, text, rng):
        missing = [k for k in self.keywords if not re.search(re.escape(k), text, flags=re.IGNORECASE)]
        if not missing:
            return text
        return f"{text} {_one(rng, 'It is a matter of', 'It comes down to', 'Think of')} {' and '.join(missing)}."


KEYWORDS = ["balance", "history", "future", "community", "patience", "curiosity", "energy", "detail", "value",
            "change", "nature", "practice", "family", "health", "science", "design", "freedom", "quality"]


@register
class ForbiddenWords(Constraint):
    id = "keywords:forbidden_words"
    forbidden_words: list[str] = Field(min_length=1)

    def check(self, response, prompt=""):
        return not any(re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE)
                       for w in self.forbidden_words)

    def describe(self, rng):
        return _one(rng, f"Do not include keywords {', '.join(self.forbidden_words)} in the response.",
                    f"Avoid the words {' and '.join(self.forbidden_words)}.")

    @classmethod
    def draw(cls, rng, text=None):
        common = ["very", "also", "important", "many", "can", "the best", "really", "like"]
        present = [w for w in common if text and re.search(rf"\b{w}\b", text, flags=re.IGNORECASE)]
        return cls(forbidden_words=rng.sample(present or common, min(2, len(present or common))))

    def rewrite(self, text, rng):
        for w in self.forbidden_words:
            text = re.sub(r"\s*\b" + re.escape(w) + r"\b", "", text, flags=re.IGNORECASE)
        return text


@register
class KeywordFrequency(Constraint):
    id = "keywords:frequency"
    keyword: str = Field(min_length=1)
    frequency: int = Field(gt=0)
    relation: Relation

    def check(self, response, prompt=""):
        return compare(len(re.findall(re.escape(self.keyword), response, flags=re.IGNORECASE)), self.relation,
                       self.frequency)

    def describe(self, rng):
        return f"In your response, the word {self.keyword} should appear {self.relation} {self.frequency} times."

    @classmethod
    def draw(cls, rng, text=None):
        return cls(keyword=rng.choice(KEYWORDS), frequency=rng.choice([2, 3]), relation="at least")


@register
class LetterFrequency(Constraint):
    id = "keywords:letter_frequency"
    letter: str = Field(pattern=r"^[a-zA-Z]$")
    let_frequency: int = Field(gt=0)
    let_relation: Relation

    def check(self, response, prompt=""):
        return compare(response.lower().count(self.letter.lower()), self.let_relation, self.let_frequency)

    def describe(self, rng):
        return (f"In your response, the letter {self.letter} should appear {self.let_relation} {self.let_frequency} "
                "times.")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(letter=rng.choice("zqxjk"), let_frequency=rng.choice([2, 3]), let_relation="less than")


# ---- startend ------------------------------------------------------------------------------------------

END_PHRASES = ["Is there anything else I can help with?", "Let me know if you have additional questions.",
               "That is all.", "Any other questions?", "Hope this helps."]


@register
class EndPhrase(Constraint):
    id = "startend:end_checker"
    end_phrase: str = Field(min_length=1)

    def check(self, response, prompt=""):
        return response.strip().strip('"').lower().endswith(self.end_phrase.strip().lower())

    def describe(self, rng):
        return _one(rng, f"Finish your response with this exact phrase {self.end_phrase}. No other words should "
                         "follow this phrase.", f"End your answer with the exact words \"{self.end_phrase}\".")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(end_phrase=rng.choice(END_PHRASES))

    def rewrite(self, text, rng):
        return f"{text.rstrip()} {self.end_phrase}"


START_PHRASES = ["Here is my answer:", "Sure.", "Of course!", "Great question.", "In short:"]


@register
class StartPhrase(Constraint):
    id = "startend:start_checker"
    ifeval = False  # alignflow's own: IFEval checks ends only
    start_phrase: str = Field(min_length=1)

    def check(self, response, prompt=""):
        return response.strip().strip('"').lower().startswith(self.start_phrase.strip().lower())

    def describe(self, rng):
        return _one(rng, f"Start your response with the exact phrase \"{self.start_phrase}\".",
                    f"Begin your answer with the words {self.start_phrase}")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(start_phrase=rng.choice(START_PHRASES))

    def rewrite(self, text, rng):
        return f"{self.start_phrase} {text.lstrip()}"


@register
class Quotation(Constraint):
    id = "startend:quotation"

    def check(self, response, prompt=""):
        value = response.strip()
        return len(value) > 1 and value[0] == '"' and value[-1] == '"'

    def describe(self, rng):
        return _one(rng, "Wrap your entire response with double quotation marks.",
                    "Put your whole answer inside double quotes.")

    def rewrite(self, text, rng):
        return f"\"{text.strip()}\""


# ---- detectable_content --------------------------------------------------------------------------------

@register
class Postscript(Constraint):
    id = "detectable_content:postscript"
    postscript_marker: str = Field(min_length=1)

    def check(self, response, prompt=""):
        marker = self.postscript_marker.strip()
        if marker == "P.P.S":
            pattern = r"\s*p\.\s?p\.\s?s.*$"
        elif marker == "P.S.":
            pattern = r"\s*p\.\s?s\..*$"
        else:
            pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
        return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))

    def describe(self, rng):
        return f"At the end of your response, please explicitly add a postscript starting with {self.postscript_marker}"

    @classmethod
    def draw(cls, rng, text=None):
        return cls(postscript_marker=rng.choice(["P.S.", "P.P.S"]))

    def rewrite(self, text, rng):
        return f"{text.rstrip()}\n\n{self.postscript_marker} {_one(rng, 'Thanks for asking.', 'Have a good day.')}"


@register
class Placeholders(Constraint):
    id = "detectable_content:number_placeholders"
    num_placeholders: int = Field(gt=0)

    def check(self, response, prompt=""):
        return len(re.findall(r"\[.*?\]", response)) >= self.num_placeholders

    def describe(self, rng):
        return (f"The response must contain at least {self.num_placeholders} placeholders represented by square "
                "brackets, such as [address].")

    @classmethod
    def draw(cls, rng, text=None):
        return cls(num_placeholders=rng.choice([1, 2]))

    def rewrite(self, text, rng):
        names = ["[name]", "[date]", "[place]", "[time]"][: self.num_placeholders]
        return f"{text.rstrip()} Written by {' on '.join(names)}." if names else None
