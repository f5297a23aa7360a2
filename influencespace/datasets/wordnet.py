"""A small reader for WordNet's noun database (``index.noun`` / ``data.noun``), no NLTK.

``index.noun`` lines: ``lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offset...``
(offsets ordered by sense frequency). ``data.noun`` lines start with the byte offset of the line:
``offset lex_filenum ss_type w_cnt(hex) word lex_id ... p_cnt pointers... | gloss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from influencespace.errors import MissingDependencyError

INSTALL_HINT = "install Debian's package 'wordnet-base' (apt-get install wordnet-base) or set data.benchmark.wordnet_dir"


@dataclass(frozen=True)
class Synset:
    offset: str
    words: tuple[str, ...]
    gloss: str


class WordNetNouns:
    def __init__(self, directory: str | Path = "/usr/share/wordnet"):
        self.directory = Path(directory)
        for name in ("index.noun", "data.noun"):
            if not (self.directory / name).is_file():
                raise MissingDependencyError(f"WordNet file {self.directory / name} not found: {INSTALL_HINT}")

    def synset_offsets(self, lemma: str) -> list[str]:
        """Synset offsets of a noun lemma, most frequent sense first (empty if unknown)."""
        key = lemma.lower().replace(" ", "_") + " "
        with open(self.directory / "index.noun", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    fields = line.split()
                    synset_cnt = int(fields[2])
                    return fields[-synset_cnt:]
        return []

    def synset(self, offset: str) -> Synset:
        """Read one synset by seeking to its byte offset, as WordNet's own tools do."""
        with open(self.directory / "data.noun", "rb") as f:
            f.seek(int(offset))
            line = f.readline().decode("utf-8")
        head, _, gloss = line.partition("|")
        fields = head.split()
        if fields[0] != offset:
            raise MissingDependencyError(f"{self.directory / 'data.noun'} has no synset at offset {offset}: is it complete?")
        word_count = int(fields[3], 16)
        words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(word_count))
        return Synset(offset=offset, words=words, gloss=gloss.strip())

    def first_sense(self, lemma: str) -> Synset | None:
        offsets = self.synset_offsets(lemma)
        return self.synset(offsets[0]) if offsets else None
