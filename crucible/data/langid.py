"""Optional language identification with a model that ships inside its pip package.

The back-end is `langid` (langid.py, BSD; ``pip install langid``): its model is embedded in the
package, so nothing is downloaded at run time, unlike datatrove's fastText ``lid.176.bin``. A
document is kept when its top language is in `languages` with probability >= `min_score`
(0.65, datatrove's default), computed on the text with newlines replaced by spaces.

Probabilities are normalised over langid's 97 languages (``norm_probs=True``); without it langid
returns an unnormalised log-probability, which no `min_score` in [0, 1] could be compared with.
The model takes about 2 s to load, so it is loaded once per process and shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from crucible.data.filters import FilterResult

Classifier = Callable[[str], tuple[str, float]]  # text -> (ISO 639-1 code, probability)


@cache
def langid_classifier() -> Classifier:
    """langid.py's embedded model with normalised probabilities, loaded once per process."""
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError:
        raise ValueError(
            "the language step needs the optional `langid` package (pip install langid)"
        ) from None
    ident = LanguageIdentifier.from_modelstring(model, norm_probs=True)

    def classify(text: str) -> tuple[str, float]:
        lang, prob = ident.classify(text)
        return str(lang), float(prob)  # plain types: the results may go to JSON

    return classify


@dataclass
class LanguageFilter:
    languages: tuple[str, ...]
    min_score: float = 0.65
    name: str = "language"
    classify: Classifier | None = field(default=None, repr=False)  # injectable for tests

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"language: min_score must be in [0, 1], got {self.min_score}")
        if self.classify is None:
            self.classify = langid_classifier()

    def __call__(self, text: str) -> FilterResult:
        assert self.classify is not None
        lang, score = self.classify(text.replace("\n", " "))
        if lang not in self.languages:
            return FilterResult(False, f"{self.name}:{lang}")
        if score < self.min_score:
            return FilterResult(False, f"{self.name}:low_score")
        return FilterResult(True)
