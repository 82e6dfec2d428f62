"""A word-level CLIP tokenizer built locally from a word list.

CLIP's BPE tokenizer needs ``vocab.json`` and ``merges.txt``.  We write a vocab of
all 256 byte symbols (alone and word-final, ``</w>``) plus one token per known
word, and merges that build each known word from its letters.  BPE applies merges
by global rank, so a merge added for one word can cut another word into pieces
that the second word's own chain never joins ("orange" -> "or" + "an" + ...,
after "an" from "and"); such words get extra merges of their actual pieces, until
every known word is one token.  An unknown word is spelled in pieces; nothing is lost.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map, in byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = [], 0
    for b in range(256):
        if b in printable:
            codes.append(b)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly apply the lowest-ranked merge present."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def save_word_level_clip_tokenizer(directory: str | Path, words: list[str], max_length: int = 77) -> None:
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: list[str] = symbols + [s + "</w>" for s in symbols]
    known = set(vocab)
    merges: list[str] = []
    for word in sorted({w.lower() for w in words if w.isascii() and " " not in w}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merged = current + nxt
            if merged not in known:
                merges.append(f"{current} {nxt}")
                vocab.append(merged)
                known.add(merged)
            current = merged
    # Close the gaps: apply the merges as BPE does and join whatever pieces remain.
    for _ in range(10):
        ranks = {tuple(m.split(" ")): i for i, m in enumerate(merges)}
        added = False
        for word in sorted({w.lower() for w in words if w.isascii() and " " not in w}):
            pieces = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            while len(pieces) > 1:
                merged = pieces[0] + pieces[1]
                merges.append(f"{pieces[0]} {pieces[1]}")
                if merged not in known:
                    vocab.append(merged)
                    known.add(merged)
                pieces = [merged] + pieces[2:]
                added = True
        if not added:
            break
    vocab += list(SPECIALS)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)
    tokenizer.save_pretrained(directory)
