"""Quality filters: each rule on a small text whose counts can be checked by hand."""

from crucible.data.filters import (
    C4Lines,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
    SpanRepeats,
    _dup_ngram_chars,
    _top_ngram_chars,
    max_span_repeats,
)

# 14 real words + "." per line; stop words present: the, and, to.
LINE = "The quick brown fox jumps over the lazy dog and runs to the barn."
GOOD = "\n".join([LINE] * 4)  # 56 real words


def test_gopher_quality_keeps_good_text():
    assert GopherQuality()(GOOD).keep


def test_gopher_quality_word_count():
    words = GOOD.replace(".", "").split()
    assert GopherQuality()(" ".join(words[:50]) + " the").keep  # 51 words
    assert GopherQuality()(" ".join(words[:49])).reason == "gopher_quality:below_min_words"
    assert GopherQuality(max_doc_words=55)(GOOD).reason == "gopher_quality:above_max_words"


def test_gopher_quality_average_word_length():
    text = " ".join(["to the a an"] * 15)  # mean length (2 + 3 + 1 + 2) / 4 = 2.0
    assert GopherQuality()(text).reason == "gopher_quality:below_avg_word_length"


def test_gopher_quality_hash_and_ellipsis():
    # 60 words (56 + 4 periods) + 7 "#" words = 67; 7 / 67 = 0.104 > 0.1.
    assert GopherQuality()(GOOD + "\n# # # # # # #").reason == "gopher_quality:hash_ratio"
    assert GopherQuality()(GOOD + "\n# # # # # #").keep  # 6 / 66 = 0.091
    # 3 of 10 lines end with "..." (0.3 is allowed), 4 of 10 is not.
    ok = "\n".join([LINE] * 7 + ["And so on..."] * 3)
    bad = "\n".join([LINE] * 6 + ["And so on..."] * 4)
    assert GopherQuality()(ok).keep
    assert GopherQuality()(bad).reason == "gopher_quality:ellipsis_lines"


def test_gopher_quality_stop_words_and_bullets():
    # 10 real words a line, 60 in all; of the stop words only "to" is present.
    no_stop = "\n".join(["Quick brown fox jumps over lazy dog runs to barn."] * 6)
    assert GopherQuality()(no_stop).reason == "gopher_quality:stop_words"
    bullets = "\n".join(["- " + LINE] * 10)
    assert GopherQuality()(bullets).reason == "gopher_quality:bullet_lines"


def test_gopher_repetition_lines():
    # One paragraph; 1 of 3 lines repeats an earlier one: 0.33 > 0.30.
    text = "alpha beta gamma\nalpha beta gamma\ndelta epsilon zeta"
    assert GopherRepetition()(text).reason == "gopher_repetition:dup_line_frac"
    paras = "one two three\n\none two three\n\nfour five six"
    assert GopherRepetition()(paras).reason == "gopher_repetition:dup_para_frac"


def test_gopher_repetition_ngram_helpers():
    assert _top_ngram_chars(["a", "b", "a", "b", "a"], 2) == 4  # "ab" twice, 2 chars each
    # Greedy, non-overlapping: (a,b) new, (b,a) new, (a,b) seen -> 2 chars, then stop.
    assert _dup_ngram_chars(["a", "b", "a", "b"], 2) == 2
    assert _dup_ngram_chars(["a", "b", "c"], 2) == 0


def test_c4_lines():
    lines = [
        f"This is sentence number {w} of the text." for w in ["one", "two", "three", "four", "five"]
    ]
    text = "\n".join([*lines, "no punctuation here", "Enable javascript to view it.", "Hi."])
    result = C4Lines()(text)
    assert result.keep and result.text == "\n".join(lines)  # 5 sentences left
    assert C4Lines()("\n".join(lines[:4])).reason == "c4:too_few_sentences"
    assert C4Lines()(text + "\nLorem ipsum dolor sit amet.").reason == "c4:lorem_ipsum"
    assert C4Lines()(text + "\nf(x) { return 1; }").reason == "c4:curly_bracket"
    cited = C4Lines()("\n".join(lines) + "\nA cited claim is here.[1]")
    assert cited.text.endswith("A cited claim is here.")
    relaxed = C4Lines(filter_no_terminal_punct=False)(text)
    assert "no punctuation here" in relaxed.text


def test_fineweb_quality():
    long_line = "This line is long enough to not count as a short line at all"
    # 1 of 8 distinct lines ends in punctuation: 0.125 >= 0.12.
    assert FineWebQuality()("\n".join([f"{long_line} {i}" for i in range(7)] + ["End."])).keep
    no_punct = "\n".join(f"{long_line} {i}" for i in range(10))  # 0 of 10 end in punctuation
    assert FineWebQuality()(no_punct).reason == "fineweb_quality:line_punct_ratio"
    # 3 lines of at most 30 characters out of 4: 0.75 > 0.67.
    short = f"{long_line}.\nShort line.\nTiny.\nSmall."
    assert FineWebQuality()(short).reason == "fineweb_quality:short_line_ratio"
    dup = f"{long_line}.\n{long_line}.\nAnother different sentence that is long enough."
    assert FineWebQuality()(dup).reason == "fineweb_quality:char_dup_ratio"


def test_span_repeats():
    assert max_span_repeats(["a", "b", "a", "b", "a", "b", "c"], 13) == (3, 2)
    assert max_span_repeats(["x"] * 5, 13) == (5, 1)
    f = SpanRepeats()
    assert f(" ".join(["a b"] * 31)).keep  # 31 copies of a 2-token span
    assert f(" ".join(["a b"] * 32)).reason == "span_repeats:2_token_span"
    thirteen = " ".join(f"w{i}" for i in range(13))
    assert f(" ".join([thirteen] * 32)).reason == "span_repeats:13_token_span"
    fourteen = " ".join(f"w{i}" for i in range(14))
    assert f(" ".join([fourteen] * 40)).keep  # spans longer than 13 are not counted
