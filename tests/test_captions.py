from data.captions import clean_caption


def test_lowercases_and_replaces_each_listed_punctuation_mark():
    assert clean_caption('A Dog. Runs! "Fast" (really) *now* #1: yes; ok~') == "a dog runs fast really now 1 yes ok"


def test_keeps_other_punctuation_and_collapses_spaces():
    assert clean_caption("  Two  dogs,  one's   brown - ok?  ") == "two dogs, one's brown - ok?"


def test_truncates_to_thirty_words():
    words = [f"w{i}" for i in range(40)]
    assert clean_caption(" ".join(words)) == " ".join(words[:30])
    assert clean_caption("a b c", max_words=2) == "a b"


def test_flickr_style_trailing_period():
    assert clean_caption("A black dog is running after a white dog in the snow .") == \
        "a black dog is running after a white dog in the snow"
