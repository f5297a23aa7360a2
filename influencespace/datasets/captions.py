"""Caption vocabulary for Fashion-MNIST classes: class names, WordNet synonyms and glosses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from influencespace.datasets.fashion_mnist import CLASS_NAMES
from influencespace.datasets.wordnet import WordNetNouns

# The WordNet lemma whose first sense is the class (checked in tests against the real database).
CLASS_LEMMAS = ("tee_shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")

TEMPLATES = (
    "a photo of {a_name}.",
    "{a_synonym}.",
    "a picture of {a_synonym}.",
    "{gloss}.",
    "product photo: {synonym}, {gloss}.",
    "a black and white photo of {a_name}.",
)

PROMPT_TEMPLATE = "a photo of {a_name}."


def with_article(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


@dataclass(frozen=True)
class ClassVocabulary:
    name: str
    synonyms: tuple[str, ...]
    gloss: str

    def captions(self) -> list[str]:
        out: list[str] = []
        for template in TEMPLATES:
            for synonym in self.synonyms:
                text = template.format(
                    a_name=with_article(self.name.lower()), a_synonym=with_article(synonym), synonym=synonym, gloss=self.gloss
                )
                if text not in out:
                    out.append(text)
        return out


def _clean_gloss(gloss: str) -> str:
    # Glosses carry usage examples after '; "'; the definition alone reads better as a caption.
    return gloss.split('; "')[0].split(";")[0].strip().rstrip(".")


def build_vocabulary(wordnet_dir: str) -> list[ClassVocabulary]:
    wordnet = WordNetNouns(wordnet_dir)
    vocab = []
    for name, lemma in zip(CLASS_NAMES, CLASS_LEMMAS, strict=True):
        synset = wordnet.first_sense(lemma)
        synonyms = [w.lower() for w in synset.words] if synset else []
        base = name.lower().split("/")[0]
        if base not in synonyms:
            synonyms.insert(0, base)
        gloss = _clean_gloss(synset.gloss) if synset else base
        vocab.append(ClassVocabulary(name=name, synonyms=tuple(synonyms), gloss=gloss))
    return vocab


def class_prompts(vocab: list[ClassVocabulary]) -> list[str]:
    """One zero-shot prompt per class, in class order."""
    return [PROMPT_TEMPLATE.format(a_name=with_article(v.name.lower())) for v in vocab]


def sample_captions(vocab: list[ClassVocabulary], labels: np.ndarray, rng: np.random.Generator) -> list[str]:
    """One caption per label, drawn uniformly from that class's caption list."""
    per_class = [v.captions() for v in vocab]
    return [per_class[label][rng.integers(len(per_class[label]))] for label in labels]
