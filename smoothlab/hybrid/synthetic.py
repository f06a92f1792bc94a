"""The built-in synthetic sentiment set: short movie-review sentences from small word lists,
with labels that follow the lexicon (and a negation that flips them).
"""

from __future__ import annotations

import random

from smoothlab.errors import UsageError

from .tasks import Example

__all__ = ["synthetic_sentiment"]

_POSITIVE = (
    "wonderful",
    "great",
    "delightful",
    "moving",
    "charming",
    "brilliant",
    "engaging",
    "funny",
    "beautiful",
    "clever",
    "gripping",
    "heartfelt",
    "superb",
    "enjoyable",
    "fresh",
    "memorable",
    "touching",
    "impressive",
)
_NEGATIVE = (
    "dull",
    "boring",
    "awful",
    "tedious",
    "clumsy",
    "bland",
    "predictable",
    "messy",
    "lifeless",
    "painful",
    "shallow",
    "forgettable",
    "tiresome",
    "annoying",
    "weak",
    "pointless",
    "flat",
    "disappointing",
)
_NOUNS = (
    "movie",
    "film",
    "plot",
    "script",
    "acting",
    "story",
    "ending",
    "cast",
    "soundtrack",
    "dialogue",
    "direction",
    "pacing",
    "lead performance",
    "screenplay",
    "cinematography",
    "final act",
    "premise",
    "humor",
)
_INTENSIFIERS = ("really", "very", "truly", "quite", "remarkably", "rather", "utterly", "so")
_OPENERS = ("", "", "", "Honestly, ", "Overall, ", "In the end, ", "To be fair, ", "Frankly, ")
_TEMPLATES = (
    "{opener}the {noun} was {intens}{adj}.",
    "{opener}the {noun} is {intens}{adj}.",
    "{opener}I found the {noun} {intens}{adj}.",
    "{opener}this {noun} felt {intens}{adj}.",
    "{opener}the {noun} seemed {intens}{adj} to me.",
    "{opener}what {a} {intens}{adj} {noun}.",
    "{opener}{a} {intens}{adj} {noun} from start to finish.",
    "{opener}it has {a} {intens}{adj} {noun}.",
)
_NEGATED_TEMPLATES = (
    "{opener}the {noun} was not {intens}{adj}.",
    "{opener}the {noun} is not {intens}{adj}.",
    "{opener}I did not find the {noun} {intens}{adj}.",
    "{opener}this {noun} did not feel {intens}{adj}.",
    "{opener}the {noun} was not {intens}{adj} at all.",
)
_NEGATION_RATE = 0.15
_MAX_TRIES = 20


def synthetic_sentiment(n: int, seed: int = 0) -> list[Example]:
    """``n`` short movie-review sentences with sentiment labels (0 negative, 1 positive),
    generated from small word lists; deterministic given ``seed`` (``random.Random(seed)``).

    Labels are balanced (``n // 2`` and ``n - n // 2``, shuffled). Each sentence has one
    polar adjective; in about 15% of sentences a ``"not"`` flips it, so
    ``label = polarity(adjective) XOR negated``: a bag of adjectives alone scores about 85%.
    Sentences are distinct while the word lists allow (up to 20 redraws per sentence).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise UsageError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(seed)
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    seen: set[str] = set()
    out = []
    for label in labels:
        negated = rng.random() < _NEGATION_RATE
        for _ in range(_MAX_TRIES):  # avoid duplicates (which would leak across splits)
            template = rng.choice(_NEGATED_TEMPLATES if negated else _TEMPLATES)
            positive = bool(label) != negated
            adj = rng.choice(_POSITIVE if positive else _NEGATIVE)
            intens = rng.choice(_INTENSIFIERS) + " " if rng.random() < 0.5 else ""
            sentence = template.format(
                opener=rng.choice(_OPENERS),
                noun=rng.choice(_NOUNS),
                intens=intens,
                adj=adj,
                a="an" if (intens or adj)[0] in "aeiou" else "a",
            )
            sentence = sentence[0].upper() + sentence[1:]
            if sentence not in seen:
                break
        seen.add(sentence)
        out.append(Example(sentence, label))
    return out
