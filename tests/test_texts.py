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
