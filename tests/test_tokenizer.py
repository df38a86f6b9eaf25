"""BertTokenizer against transformers' AutoTokenizer on the real all-MiniLM-L6-v2 files."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from minibert import BatchEncoding, BertTokenizer

AWKWARD = [
    "Hello, world!",
    "Crème brûlée à la façon de Zoë — naïve café",
    "東京は日本の首都です。北京欢迎你",
    "emoji 😀👍🏽 and 🇫🇷 flags",
    "zero\u200bwidth\u200djoiner\ufeff and soft\u00adhyphen",
    "a" * 150 + " supercalifragilisticexpialidocious " + "x" * 99,
    "",
    "   ",
    "tabs\tand\nnewlines\r\n",
    "[CLS] literal [SEP] special [MASK] tokens [PAD]",
    "UPPER lower MiXeD 12345 3.14159 $100 #hashtag @user http://example.com/a?b=c",
    "Ελληνικά, русский, العربية, עברית, हिन्दी",
    "don't won't can't it's",
]
PAIRS = [("What is the capital?", "Paris is the capital of France."), ("", "second only"),
         ("a much longer first sentence " * 10, "short")]


@pytest.fixture(scope="module")
def ours(minilm_dir):
    return BertTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def theirs(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


def same(a, b, what):
    assert set(a) == set(b) - {"special_tokens_mask"}, what
    for k in a:
        np.testing.assert_array_equal(a[k], np.asarray(b[k]), err_msg=f"{what}: {k}")


@pytest.mark.parametrize("text", AWKWARD)
def test_single_strings_identical(ours, theirs, text):
    a = ours(text)
    b = theirs(text, return_tensors="np")
    same(a, b, repr(text))
    assert a["input_ids"].dtype == np.int64 and a["input_ids"].shape[0] == 1
    assert ours.encode(text) == theirs.encode(text)
    assert ours.tokenize(text) == theirs.tokenize(text)


@pytest.mark.parametrize("kwargs", [
    dict(padding=True),
    dict(padding=True, truncation=True, max_length=16),
    dict(padding="longest", truncation=True),
    dict(padding="max_length", max_length=40, truncation=True),
    dict(padding="max_length", truncation=True),
    dict(padding=True, truncation="longest_first", max_length=9),
    dict(padding=True, pad_to_multiple_of=8),
])
def test_batches_identical(ours, theirs, kwargs):
    same(ours(AWKWARD, **kwargs), theirs(AWKWARD, return_tensors="np", **kwargs), str(kwargs))


@pytest.mark.parametrize("kwargs", [
    dict(padding=True),
    dict(padding=True, truncation=True, max_length=12),
    dict(padding=True, truncation="only_first", max_length=14),
    dict(padding="max_length", truncation=True, max_length=24),
])
def test_pairs_identical(ours, theirs, kwargs):
    first, second = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    a = ours(first, second, **kwargs)
    same(a, theirs(first, second, return_tensors="np", **kwargs), str(kwargs))
    assert a["token_type_ids"].max() == 1
    single = ours(PAIRS[0][0], PAIRS[0][1])
    same(single, theirs(PAIRS[0][0], PAIRS[0][1], return_tensors="np"), "one pair")


@pytest.mark.parametrize("pad,cut", [("left", "right"), ("right", "left"), ("left", "left")])
def test_padding_and_truncation_sides_as_transformers(minilm_dir, tmp_path, pad, cut):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(minilm_dir), padding_side=pad, truncation_side=cut)
    plain = BertTokenizer.from_pretrained(minilm_dir)
    plain.padding_side, plain.truncation_side = pad, cut  # set after loading, as transformers allows
    for f in ("tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / f, tmp_path)
    cfg = json.loads((minilm_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": pad, "truncation_side": cut}))
    first, second = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    for ours in (BertTokenizer.from_pretrained(minilm_dir, padding_side=pad, truncation_side=cut), plain,
                 BertTokenizer.from_pretrained(tmp_path)):  # by argument, by attribute, from the config
        assert (ours.padding_side, ours.truncation_side) == (pad, cut)
        for kwargs in (dict(padding=True, truncation=True, max_length=16),
                       dict(padding="max_length", truncation=True, max_length=40)):
            same(ours(AWKWARD, **kwargs), theirs(AWKWARD, return_tensors="np", **kwargs), f"{pad}/{cut} {kwargs}")
        kwargs = dict(padding=True, truncation=True, max_length=12)
        same(ours(first, second, **kwargs), theirs(first, second, return_tensors="np", **kwargs), f"{pad}/{cut} pairs")


def test_a_side_other_than_left_or_right_is_an_error(minilm_dir):
    with pytest.raises(ValueError, match=r"padding_side='top'; expected 'right' or 'left'"):
        BertTokenizer.from_pretrained(minilm_dir, padding_side="top")
    tok = BertTokenizer.from_pretrained(minilm_dir)
    tok.truncation_side = "middle"
    with pytest.raises(ValueError, match=r"truncation_side='middle'; expected 'right' or 'left'"):
        tok(["a b c"], truncation=True, max_length=2)


def test_max_length_with_padding_but_no_truncation_warns_and_is_ignored(ours, theirs):
    with pytest.warns(UserWarning, match="max_length is ignored"):
        a = ours(AWKWARD, padding=True, max_length=12)
    with pytest.warns(UserWarning):
        b = theirs(AWKWARD, padding=True, max_length=12, return_tensors="np")
    same(a, b, "padding=True, max_length=12")
    assert a["input_ids"].shape[1] > 12


def test_pair_truncation_only_second(ours, theirs):
    first, second = ["short question", "another one?"], ["a long answer " * 20, "brief"]
    kwargs = dict(padding=True, truncation="only_second", max_length=20)
    a = ours(first, second, **kwargs)
    same(a, theirs(first, second, return_tensors="np", **kwargs), "only_second")
    assert a["input_ids"].shape == (2, 20)


def test_max_length_alone_truncates_like_transformers(ours, theirs):
    long = "word " * 100
    same(ours(long, max_length=10), theirs(long, max_length=10, return_tensors="np"), "max_length alone")
    assert ours(long, max_length=10)["input_ids"].shape == (1, 10)


def test_truncation_true_uses_model_max_length(ours, theirs):
    long = "token " * 700
    a = ours(long, truncation=True)
    assert a["input_ids"].shape == (1, 512) == theirs(long, truncation=True, return_tensors="np")["input_ids"].shape


def test_padding_stored_in_tokenizer_json_is_ignored(ours, minilm_dir):
    """all-MiniLM-L6-v2's tokenizer.json pads everything to 128; the call's arguments decide."""
    import json

    stored = json.loads((minilm_dir / "tokenizer.json").read_text())["padding"]
    assert stored and stored["strategy"] == {"Fixed": 128}
    assert ours("hello")["input_ids"].shape == (1, 3)
    assert ours(["hello", "hello there"], padding=True)["input_ids"].shape == (2, 4)


def test_decode_and_convert(ours, theirs):
    for text in AWKWARD:
        ids = theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(101) == "[CLS]"
    assert ours.convert_tokens_to_ids(["[CLS]", "hello", "notaword@@"]) == theirs.convert_tokens_to_ids(["[CLS]", "hello", "notaword@@"])
    assert ours.batch_decode([[101, 7592, 102]]) == theirs.batch_decode([[101, 7592, 102]])


def test_vocab_and_special_tokens(ours, theirs):
    assert ours.vocab_size == theirs.vocab_size and len(ours) == len(theirs)
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.model_max_length == theirs.model_max_length == 512


def test_vocab_txt_only(minilm_dir, tmp_path, theirs):
    """Built from vocab.txt + tokenizer_config.json when tokenizer.json is absent: same ids."""
    for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / f, tmp_path)
    tok = BertTokenizer.from_pretrained(tmp_path)
    kwargs = dict(padding=True, truncation=True, max_length=32)
    same(tok(AWKWARD, **kwargs), theirs(AWKWARD, return_tensors="np", **kwargs), "vocab.txt only")
    first, second = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    same(tok(first, second, **kwargs), theirs(first, second, return_tensors="np", **kwargs), "vocab.txt pairs")
    assert tok.decode(theirs.encode(AWKWARD[1])) == theirs.decode(theirs.encode(AWKWARD[1]))


def test_vocab_txt_cased(minilm_dir, tmp_path):
    shutil.copy(minilm_dir / "vocab.txt", tmp_path)
    assert BertTokenizer.from_pretrained(tmp_path).tokenize("Hello") == ["hello"]  # do_lower_case defaults to True
    cased = BertTokenizer.from_pretrained(tmp_path, do_lower_case=False)
    assert cased.tokenize("hello") == ["hello"] and cased.tokenize("Hello") != ["hello"]


def test_result_is_a_mapping_with_attribute_access(ours):
    x = ours(["a", "b c"], padding=True)
    assert isinstance(x, BatchEncoding)
    assert x.attention_mask is x["attention_mask"]
    assert list(x) == ["input_ids", "token_type_ids", "attention_mask"]
    assert all(v.dtype == np.int64 for v in x.values())
    x2 = ours(["a"], return_token_type_ids=False, return_attention_mask=False)
    assert list(x2) == ["input_ids"]
    assert ours([], padding=True)["input_ids"].shape == (0, 0)
    assert ours(["a"], return_tensors="np")["input_ids"].shape == (1, 3)


@pytest.mark.parametrize("call, exc, phrase", [
    (lambda t: t("a", return_tensors="pt"), ValueError, "return_tensors='pt' is not supported: minibert returns NumPy arrays"),
    (lambda t: t("a", return_tensors="tf"), ValueError, "return_tensors='tf'"),
    (lambda t: t(["a", "b c d"]), ValueError, "different lengths.*padding=True"),
    (lambda t: t(["a"], padding="sideways"), ValueError, "padding='sideways'"),
    (lambda t: t(["a"], truncation="middle"), ValueError, "truncation='middle'"),
    (lambda t: t(["a"], max_length=0), ValueError, "max_length=0"),
    (lambda t: t(["a"], max_length=2.5), ValueError, "max_length=2.5"),
    (lambda t: t(["a"], padding=True, pad_to_multiple_of=0), ValueError, "pad_to_multiple_of=0"),
    (lambda t: t(123), TypeError, "text must be a string or a list of strings, got int"),
    (lambda t: t(["a", 5]), TypeError, r"text\[1\] is int"),
    (lambda t: t(["a", "b"], ["c"]), ValueError, "text has 2 items but text_pair has 1"),
    (lambda t: t("a", ["b"]), TypeError, "text_pair must be one string"),
    (lambda t: t(["a b c d e f"], ["g h i j k"], truncation="only_second", max_length=6), ValueError, "tokenization failed"),
    (lambda t: t.decode([[1, 2]]), ValueError, "batch_decode"),
    (lambda t: t.encode(["a"]), TypeError, "text must be a string"),
])
def test_bad_tokenizer_input(ours, call, exc, phrase):
    with pytest.raises(exc, match=phrase):
        call(ours)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.txt"):
        BertTokenizer.from_pretrained(tmp_path)


def test_corrupt_tokenizer_json_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json could not be read as a tokenizer"):
        BertTokenizer.from_pretrained(tmp_path)


def test_each_padding_and_truncation_setting_shares_the_vocabulary(minilm_dir):
    """Each setting gets a tokenizer of its own (threads tokenize at once), sharing the model: ten
    settings cost little memory, where ten full copies of BERT's vocabulary took ~60 MB."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import minibert
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
        tok = minibert.BertTokenizer.from_pretrained({str(minilm_dir)!r})
        tok(["warm"], padding=True)
        before = rss()
        for n in range(10):
            tok(["hello world"], padding="max_length", truncation=True, max_length=20 + n)
        print(len(tok._configs), rss() - before)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    n, grew = r.stdout.split()
    assert int(n) == 11 and float(grew) < 15, f"{n} settings; memory grew {grew} MB"
