"""texts.py: cleaning, and one check of texts for data files and callers alike."""

import pytest

from lightune import texts
from lightune.errors import DataError


def test_clean_text_removes_html_breaks():
    assert texts.clean_text("Great.<br /><br />Loved it<BR>  really") == "Great. Loved it really"


@pytest.mark.parametrize("given, where, message", [
    ("a string", None, "predict() takes a list of texts, not a single string"),
    (["ok", 3], None, "text 2 is not a string (int)"),
    (["ok", "  "], None, "text 2 is empty"),
    (["ok", None], "reviews.csv", "reviews.csv: row 2 has an empty text"),
    (["ok", 3.5], "reviews.csv", "reviews.csv: row 2 has a non-string text (float: 3.5)"),
    ([], "reviews.csv", "reviews.csv: no rows"),
])
def test_one_check_of_texts_for_data_files_and_callers(given, where, message):
    with pytest.raises(DataError) as error:
        texts.check_texts(given, where)
    assert str(error.value) == message
    assert texts.check_texts([], None) == [] and texts.check_texts(("a", "b"), "f") == ["a", "b"]


def test_clean_text_drops_zero_width_spaces_and_keeps_the_rest():
    assert texts.clean_text("a\u200bb<br>c\ufeff d\u2060e") == "ab c de"
    # what real reviews hold stays as it was: IMDb's cp1252 dashes, joiners that shape scripts, accents
    for kept in ("dash\x96here", "\u0646\u200c\u0645", "caf\u00e9", "a\u200db", "soft\u00adhyphen"):
        assert texts.clean_text(kept) == kept


@pytest.mark.parametrize("blank", ["<br />", "\u200b", "\u2060", "\ufeff", "\ufeff<br>\u200b", "\x01\x7f", "\x96",
                                   "\u200e \u200f", " \t<BR/>\n", "\U000e0001\U000e0020"])
def test_texts_with_nothing_visible_once_cleaned_are_empty(blank):
    """Like whitespace: they used to be classified (the model saw [CLS] [SEP] only)."""
    assert texts.is_blank(blank)
    for where, message in ((None, "text 2 is empty"), ("reviews.csv", "reviews.csv: row 2 has an empty text")):
        with pytest.raises(DataError) as error:
            texts.check_texts(["fine", blank], where)
        assert str(error.value) == message


@pytest.mark.parametrize("text", ["a", "<b>", "\x01a", "\u200b\u00e9", "<br>x", "\U000e0001 y", "\u200bfine<br />"])
def test_texts_with_something_visible_are_not_blank(text):
    assert not texts.is_blank(text)
    assert texts.check_texts([text]) == [text]
