"""Tokenizers that can be built offline.

Stable Diffusion's CLIP tokenizer is the OpenAI BPE vocabulary; clip-anytorch ships that file, so the
real tokenizer is rebuilt from it here (no hub download). Small BERT-style word vocabularies serve the
toy captioners and VQA judges.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

from transformers import BertTokenizer, CLIPTokenizer

from comat.core.io import atomic_write_text
from comat.core.runtime import cache_dir

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]


def bytes_to_unicode() -> dict[int, str]:
    # Same table as OpenAI CLIP / GPT-2: reversible byte -> printable-unicode mapping.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _clip_vocab_files() -> Path:
    import clip.simple_tokenizer as st

    bpe_path = Path(st.default_bpe())
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = cache_dir() / "clip-bpe-16e6"
    atomic_write_text(out / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (identical ids to ``clip.tokenize``), built from clip-anytorch's vocabulary."""
    d = _clip_vocab_files()
    return CLIPTokenizer(
        str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=model_max_length, pad_token="<|endoftext|>"
    )


def word_tokenizer(words: list[str], directory: str | Path | None = None) -> BertTokenizer:
    """A lower-cased BERT WordPiece tokenizer whose vocabulary is exactly ``words`` plus BERT/BLIP specials.

    BLIP uses ``[DEC]`` as decoder start (bos) and ``[ENC]`` for VQA; they are part of the vocabulary.
    """
    directory = Path(directory or tempfile.mkdtemp(prefix="comat-words-"))
    directory.mkdir(parents=True, exist_ok=True)
    seen = dict.fromkeys(BERT_SPECIAL_TOKENS + sorted({w.lower() for w in words} | set("abcdefghijklmnopqrstuvwxyz0123456789.,'-")))
    (directory / "vocab.txt").write_text("\n".join(seen) + "\n")
    return BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
