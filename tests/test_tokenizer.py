"""The torch-free tokenizer must give exactly open_clip's token ids, on any text.

open_clip is imported here, in the test, only: cliplora.core.tokenizer itself never
imports it (checked in a subprocess below, and by the import-linter contract).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cliplora.core.tokenizer as tokenizer_module
from cliplora.core.errors import FailedPrecondition, InvalidArgument, NotFound
from cliplora.core.tokenizer import (
    CLIP_VOCAB_SHA256,
    VOCAB_ENV,
    ClipTokenizer,
    default_vocab_path,
    get_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
EXACT = settings(max_examples=500, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

CLASS_NAMES = ["cat", "dog", "red_panda", "golden_retriever", "tabby", "great_white_shark", "jack-o'-lantern",
               "yellow_lady's_slipper", "Crock_Pot", "carpenter's_kit", "T-shirt", "CD_player", "three-toed_sloth",
               "potter's_wheel", "African_elephant", "espresso_maker", "Shih-Tzu", "école", "crème_brûlée", "小猫"]
LONG_TEXT = " ".join(f"word{i % 37} lorem ipsum" for i in range(167))  # 501 words
CORPUS = [
    "", " ", "   \t\n  ", "\t", "\n\n", "a\tb\nc\r\nd", "a  photo   of\u00a0a\u2003cat",
    "a photo of a cat.", "A PHOTO OF A CAT.", "a photo of a 🐱.", "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷", "🐱🐶🐭",
    "一只猫的照片", "東京タワー", "한국어 텍스트", "שלום עולם", "مرحبا بالعالم", "\u202eevil\u202c", "\u200fRTL\u200e",
    "café naïve résumé", "cafe\u0301", "Ångström", "straße STRASSE ẞ", "İstanbul ıi", "ΣΊΣΥΦΟΣ σίσυφος",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeff\u2060", "ctrl\x00\x01\x07\x1b[31mred\x1b[0m\x7f", "\x1c\x1d\x1e\x1f", "\x85\x96\x97",
    "3.14159", "1,000,000", "2024-01-31", "½ ² ① ٣٤٥ ४२", "$100.00 €5 ¥10", "x=1+2*3/4",
    "don't I'd we've they're she'll he's it'd you'm", "DON'T I'D WE'VE", "don’t I’d we‘ve", "don`t", "it''s", "'s",
    "o'clock rock'n'roll", "'ſ ſtart", "<start_of_text>", "<end_of_text>", "a <start_of_text> b <end_of_text> c",
    "<START_OF_TEXT>", "＜start_of_text＞", "<ſtart_of_text>", "x<end_of_text>y", "<start_of_text><end_of_text>",
    "<start_of_text", "start_of_text>", "&amp;", "&amp;lt;", "&amp;amp;lt;", "&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b> &amp;",
    "&#39;quoted&#39;", "&#x27;", "&nbsp;&nbsp;", "&#0;", "&#xD800;", "&#128512;", "&notanentity;",
    "Ã©", "cafÃ©", "â€™", "â€œquotedâ€\x9d", "Ã¶Ã¤Ã¼", "ï¿½", "Â\xa0", "\ufffd", "ﬁﬂ ﬅ", "ＦＵＬＬＷＩＤＴＨ １２３",
    "K\u212a", "\U0001e030\U00010d50", "a" * 300, "supercalifragilisticexpialidocious", "....!!!???", "___---",
    LONG_TEXT, "🐱" * 100, "一" * 200,
    *(f"a photo of a {name.replace('_', ' ')}." for name in CLASS_NAMES),
    *(f"a blurry photo of the {name.replace('_', ' ')}" for name in CLASS_NAMES[:5]),
]
AWKWARD_PIECES = [
    "a", "photo", " of ", "cat", "CAT", ".", ",", "'", "'s", "'S", "'ll", "'ſ", "’", "`", "\"", " ", "  ", "\t", "\n",
    "\r\n", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u1680", "\u2000", "\u2007", "\u200a", "\u2028", "\u2029",
    "\u202f", "\u205f", "\u3000", "\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", "\u200e", "\u200f", "\u202e",
    "\u0301", "\u0308", "\u0327", "\u20dd", "e\u0301", "🐱", "👍", "🏽", "👨\u200d👩\u200d👧", "🏳️\u200d🌈", "\ufe0f",
    "🇯🇵", "猫", "写真", "カタカナ", "한", "שלום", "مرحبا", "ـ", "Ã©", "â€™", "Ã", "©", "Â", "ï¿½", "&amp;", "&amp;lt;",
    "&lt;", "&gt;", "&#39;", "&#x27;", "&nbsp;", "&quot;", "&#0;", "&#xD800;", "&", ";", "#", "<", ">",
    "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "<ſtart_of_text>", "＜", "＞", "ﬁ", "ﬅ", "K", "İ",
    "ß", "ẞ", "Σ", "ς", "0", "7", "3.14", "1,000", "½", "²", "①", "٣", "\x00", "\x07", "\x1b[0m", "\x7f", "\x96",
    "\ud7ff", "\ue000", "\U0010fffd", "\U0001e030",
]


def awkward_text() -> st.SearchStrategy[str]:
    """Texts glued from awkward pieces and characters of awkward Unicode categories."""
    awkward_char = st.characters(categories=["Mn", "Mc", "Me", "Zs", "Zl", "Zp", "Cc", "Cf", "Co", "Cn", "Sk", "So",
                                             "Pd", "Pi", "Pf", "Nd", "Nl", "No", "Lm", "Lo"])
    cjk = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
    emoji = st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
    part = st.one_of(st.sampled_from(AWKWARD_PIECES), awkward_char, cjk, emoji, st.text(max_size=4))
    return st.lists(part, max_size=30).map("".join)


def mojibake_text() -> st.SearchStrategy[str]:
    """UTF-8 text read back as Latin-1 or Windows-1252, as ftfy's fix_encoding sees it."""
    def garble(text: str, codec: str) -> str:
        return text.encode("utf-8").decode(codec, errors="replace")
    return st.builds(garble, st.text(max_size=20), st.sampled_from(["latin-1", "cp1252"]))


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def assert_same_as_open_clip(tokenizer: ClipTokenizer, texts: list[str], context_length: int = 77) -> None:
    ours = tokenizer(texts, context_length=context_length)
    theirs = open_clip.tokenize(texts, context_length=context_length).numpy()
    assert ours.dtype == np.int32 and ours.shape == theirs.shape == (len(texts), context_length)
    for text, our_row, their_row in zip(texts, ours.astype(np.int64), theirs, strict=True):
        assert np.array_equal(our_row, their_row), f"{text!r}: {our_row.tolist()} != {their_row.tolist()}"


@EXACT
@given(texts=st.lists(st.text(), min_size=1, max_size=4))
def test_random_unicode_matches_open_clip(tokenizer: ClipTokenizer, texts: list[str]) -> None:
    assert_same_as_open_clip(tokenizer, texts)


@settings(EXACT, max_examples=800)
@given(texts=st.lists(awkward_text(), min_size=1, max_size=3))
def test_awkward_unicode_matches_open_clip(tokenizer: ClipTokenizer, texts: list[str]) -> None:
    assert_same_as_open_clip(tokenizer, texts)


@settings(EXACT, max_examples=300)
@given(texts=st.lists(mojibake_text(), min_size=1, max_size=3))
def test_mojibake_matches_open_clip(tokenizer: ClipTokenizer, texts: list[str]) -> None:
    assert_same_as_open_clip(tokenizer, texts)


@settings(EXACT, max_examples=150)
@given(words=st.lists(st.one_of(st.sampled_from(AWKWARD_PIECES), st.from_regex(r"[a-z]{1,12}", fullmatch=True)),
                      min_size=20, max_size=120),
       context_length=st.sampled_from([77, 77, 16, 2, 1]))
def test_long_texts_truncate_like_open_clip(tokenizer: ClipTokenizer, words: list[str], context_length: int) -> None:
    assert_same_as_open_clip(tokenizer, [" ".join(words), "".join(words)], context_length)


@settings(EXACT, max_examples=100)
@given(text=st.lists(st.one_of(st.characters(categories=["Cs"]), st.sampled_from(AWKWARD_PIECES)), max_size=10).map("".join))
def test_lone_surrogates_match_open_clip(tokenizer: ClipTokenizer, text: str) -> None:
    """ftfy turns lone surrogates into U+FFFD before anything is encoded, on both sides."""
    assert_same_as_open_clip(tokenizer, [text])


def test_fixed_corpus_matches_open_clip(tokenizer: ClipTokenizer) -> None:
    assert len(CORPUS) > 100
    assert_same_as_open_clip(tokenizer, CORPUS)
    for context_length in (1, 2, 3, 10):
        assert_same_as_open_clip(tokenizer, CORPUS, context_length)


def test_encode_has_no_start_or_end_tokens(tokenizer: ClipTokenizer) -> None:
    for text in ("a photo of a cat.", "", "<end_of_text>", LONG_TEXT):
        assert tokenizer.encode(text) == open_clip.tokenizer._tokenizer.encode(text)
    assert tokenizer.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]
    assert tokenizer.encode("") == []


def test_vocabulary_and_special_tokens_are_open_clips(tokenizer: ClipTokenizer) -> None:
    reference = open_clip.tokenizer._tokenizer
    assert dict(tokenizer.vocabulary) == reference.encoder
    assert tokenizer.vocab_size == reference.vocab_size == 49408
    assert (tokenizer.start_token, tokenizer.end_token) == (reference.sot_token_id, reference.eot_token_id) == (49406, 49407)


def test_special_token_strings_in_text(tokenizer: ClipTokenizer) -> None:
    """After cleaning, the exact special-token strings become the special ids; a piece the
    case-insensitive pattern matches otherwise (long s) stays one plain piece."""
    assert tokenizer.encode("a <end_of_text> b") == [320, 49407, 321]
    assert tokenizer.encode("<START_OF_TEXT>") == tokenizer.encode("＜start_of_text＞") == [49406]
    long_s = tokenizer.encode("<ſtart_of_text>")
    assert 49406 not in long_s and len(long_s) > 1
    assert long_s == open_clip.tokenizer._tokenizer.encode("<ſtart_of_text>")


def test_long_text_keeps_the_end_token_last(tokenizer: ClipTokenizer) -> None:
    assert len(LONG_TEXT.split()) > 500
    row = tokenizer([LONG_TEXT])[0]
    assert row.shape == (77,) and row[0] == tokenizer.start_token and row[-1] == tokenizer.end_token
    assert (row != 0).all()
    assert row[1:76].tolist() == tokenizer.encode(LONG_TEXT)[:75]


def test_batch_shape_dtype_and_padding(tokenizer: ClipTokenizer) -> None:
    rows = tokenizer(["a", "a photo of a cat.", ""])
    assert rows.dtype == np.int32 and rows.shape == (3, 77)
    assert rows[0, :3].tolist() == [49406, 320, 49407] and not rows[0, 3:].any()
    assert rows[1, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407] and not rows[1, 8:].any()
    assert rows[2, :2].tolist() == [49406, 49407] and not rows[2, 2:].any()
    assert tokenizer([]).shape == (0, 77)
    assert np.array_equal(tokenizer("a photo"), tokenizer(["a photo"]))  # one string is a batch of one
    assert tokenizer(("x", "y"), context_length=5).shape == (2, 5)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(InvalidArgument):
            tokenizer(["x"], context_length=bad)


def test_vocab_sha256_is_the_files_and_stable(tokenizer: ClipTokenizer) -> None:
    path = default_vocab_path()
    assert tokenizer.vocab_path == path
    assert tokenizer.vocab_sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == CLIP_VOCAB_SHA256
    assert ClipTokenizer(path).vocab_sha256 == tokenizer.vocab_sha256


def test_the_default_vocabulary_is_shipped_with_cliplora_and_is_open_clips_file() -> None:
    path = default_vocab_path()
    assert path == tokenizer_module.PACKAGED_VOCAB and path.is_relative_to(Path(tokenizer_module.__file__).parent)
    assert path.read_bytes() == (Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz").read_bytes()


@pytest.mark.subprocess
def test_tokenizing_imports_neither_torch_nor_open_clip() -> None:
    script = (
        "import sys\n"
        "from cliplora.core.tokenizer import ClipTokenizer, default_vocab_path\n"
        "path = default_vocab_path()\n"
        "ids = ClipTokenizer()(['a photo of a cat.'])\n"
        "assert 'torch' not in sys.modules and 'open_clip' not in sys.modules, sorted(sys.modules)\n"
        "print(path, ids[0, :8].tolist())\n"
    )
    env = {key: value for key, value in os.environ.items() if key != VOCAB_ENV}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-8:] == "[49406, 320, 1125, 539, 320, 2368, 269, 49407]".split()


def test_environment_variable_overrides_the_vocabulary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy with another header line: same ids, another sha256 (the hash is of the bytes)."""
    lines = gzip.decompress(default_vocab_path().read_bytes()).decode("utf-8").split("\n")
    copy = tmp_path / "vocab.txt.gz"
    copy.write_bytes(gzip.compress("\n".join(["#version: copy", *lines[1:]]).encode("utf-8")))
    monkeypatch.setenv(VOCAB_ENV, str(copy))
    assert default_vocab_path() == copy
    other = ClipTokenizer()
    assert other.vocab_path == copy and other.vocab_sha256 == hashlib.sha256(copy.read_bytes()).hexdigest()
    assert other.vocab_sha256 != CLIP_VOCAB_SHA256
    assert np.array_equal(other(CORPUS[:40]), open_clip.tokenize(CORPUS[:40]).numpy())


def test_missing_vocabulary_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "missing.txt.gz"
    monkeypatch.setenv(VOCAB_ENV, str(missing))
    with pytest.raises(NotFound, match=VOCAB_ENV):
        default_vocab_path()
    with pytest.raises(NotFound, match=VOCAB_ENV):
        ClipTokenizer(missing)
    monkeypatch.delenv(VOCAB_ENV)
    monkeypatch.setattr(tokenizer_module, "PACKAGED_VOCAB", missing)  # a broken installation
    with pytest.raises(FailedPrecondition, match=f"shipped with cliplora cannot be read.*{VOCAB_ENV}"):
        default_vocab_path()


def test_an_altered_shipped_vocabulary_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped copy is checked by its sha256: another file there is a broken installation,
    refused rather than tokenized with (the ids would mean other words)."""
    lines = gzip.decompress(default_vocab_path().read_bytes()).decode("utf-8").split("\n")
    altered = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    altered.write_bytes(gzip.compress("\n".join([lines[0], lines[2], lines[1], *lines[3:]]).encode("utf-8")))
    monkeypatch.delenv(VOCAB_ENV, raising=False)
    monkeypatch.setattr(tokenizer_module, "PACKAGED_VOCAB", altered)
    with pytest.raises(FailedPrecondition, match="not CLIP's 924691ac288e"):
        default_vocab_path()


def test_broken_vocabulary_is_invalid_argument(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("#version: 0.2\na b\n")
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\na b\n"))
    malformed = tmp_path / "malformed.txt.gz"
    malformed.write_bytes(gzip.compress(b"#version\n" + b"a b c\n" * 50_000))
    for path, message in ((plain, "gzip"), (short, "too short"), (malformed, "line 2")):
        with pytest.raises(InvalidArgument, match=message):
            ClipTokenizer(path)
    with pytest.raises(InvalidArgument, match="folder"):
        ClipTokenizer(tmp_path)


def test_get_tokenizer_loads_once_and_is_thread_safe(tokenizer: ClipTokenizer) -> None:
    with ThreadPoolExecutor(8) as pool:
        shared = set(pool.map(lambda _: id(get_tokenizer()), range(16)))
    assert len(shared) == 1 and get_tokenizer() is get_tokenizer(default_vocab_path())
    fresh = ClipTokenizer()  # empty caches: threads race to fill them
    texts = CORPUS * 4
    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(lambda text: fresh([text])[0], texts))
    assert np.array_equal(np.stack(rows), tokenizer(texts))


def test_comparison_fails_without_ftfy(tokenizer: ClipTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a variant that skips ftfy.fix_text differs from open_clip."""
    monkeypatch.setattr(tokenizer_module, "ftfy", types.SimpleNamespace(fix_text=lambda text: text))
    variant = ClipTokenizer()(CORPUS)
    reference = open_clip.tokenize(CORPUS).numpy()
    differing = [text for text, a, b in zip(CORPUS, variant, reference, strict=True) if not np.array_equal(a, b)]
    assert {"don’t I’d we‘ve", "cafÃ©", "＜start_of_text＞", "ﬁﬂ ﬅ"} <= set(differing)


def test_comparison_fails_without_the_end_token_rule(tokenizer: ClipTokenizer) -> None:
    """Plain truncation (the end token cut off) differs exactly on the over-long texts."""
    def plain_cut(text: str) -> list[int]:
        ids = [tokenizer.start_token, *tokenizer.encode(text), tokenizer.end_token][:77]
        return ids + [0] * (77 - len(ids))

    variant = np.array([plain_cut(text) for text in CORPUS])
    reference = open_clip.tokenize(CORPUS).numpy()
    differing = {text for text, a, b in zip(CORPUS, variant, reference, strict=True) if not np.array_equal(a, b)}
    assert LONG_TEXT in differing and "a" * 300 not in differing  # "aaa..." is few tokens
    assert differing == {text for text in CORPUS if len(tokenizer.encode(text)) > 75}
