"""Fixed word vocabularies: the tokenizers of the synthetic tasks (graphs, numbers, group elements)."""

from __future__ import annotations


class WordTokenizer:
    """Token ids are positions in a fixed word list; text is those words joined by ``sep``.

    Subclasses pass their words and a description of the vocabulary (used in the error for an
    unknown word) and may override :meth:`split` for text that is not space-separated.
    """

    sep = " "

    def __init__(self, words: list[str], description: str):
        self.itos = list(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError(f"the {description} lists a word twice")
        self.vocab_size = len(self.itos)
        self.description = description

    def split(self, text: str) -> list[str]:
        return text.split()

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in self.split(text):
            if word not in self.stoi:
                raise ValueError(f"token {word!r} is not in the {self.description}")
            ids.append(self.stoi[word])
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.sep.join(self.itos[i] if 0 <= i < self.vocab_size else f"<{i}?>" for i in ids)
