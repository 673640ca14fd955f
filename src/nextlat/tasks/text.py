"""Language modelling on plain text files (the paper's language-modelling set-up, arXiv 2511.05963).

Files are read and split into documents; whole documents are held out for validation (a seeded
shuffle); a byte-level BPE tokenizer is trained on the training documents (or loaded); every
document is encoded and closed with ``<eos>``; the two token streams are stored as flat
memory-mapped ``.bin`` files in a cache folder keyed by everything that determines them::

    <cache_dir>/<key>/train.bin  val.bin  tokenizer.json  meta.json

Training examples are non-overlapping packed windows of ``seq_len + 1`` tokens, cut from the stream
with one more EOS in front of the first document, so that every document reads ``<eos> x_1 .. x_n``
and is followed by the next one's EOS. By default (``eos_position: start``, the official NextLat
code's convention) the EOS *opens* its document: it sits at the document's position 0 like a BOS and
predicts the first token x_1, and x_n predicts the EOS of the next document (the end of this one).
Every target of a window is then scored; ``doc_ids`` keep attention inside each document and restart
RoPE positions at each EOS. ``eos_position: end`` is the convention of nextlat before it (runs saved
without the setting read back with it): the EOS closes its document, the next token opens a new one
at position 0 and is never a target (the target at an EOS position is ignored), so x_1 of every
document goes unpredicted. The cached token streams are the same for both.

The trained tokenizer travels with every checkpoint (:meth:`TextTask.artifacts`), so a saved
model can be used for generation from its checkpoint folder alone.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import sysconfig
import time
from array import array
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from nextlat.config import ConfigError, TaskConfig, cache_home
from nextlat.data import IGNORE, Batch, doc_ids_from_eos
from nextlat.decoding.reference import objective_head
from nextlat.tasks.base import Task

EOS = "<eos>"
CACHE_FORMAT = "nextlat-text-cache-v1"
STDLIB = "stdlib"
MIN_VOCAB = 257  # 256 byte symbols + <eos>: a byte-level BPE cannot be smaller
DEFAULT_PROMPT_LEN = 64
EOS_POSITIONS = ("start", "end")
# Files of an imported Hugging Face model that its checkpoints carry along (nextlat.interop.hf writes them):
# the tokenizer's settings and chat template, its special tokens, generation defaults and the original config.json.
HF_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json",
            "hf_config.json")


@dataclass
class TextConfig(TaskConfig):
    name: str = "text"
    files: list[str] = field(default_factory=lambda: [STDLIB])
    """Text files, folders (every non-hidden file below them) or glob patterns (``**`` recurses); relative
    paths start from the current folder (a run saves them absolute). The entry ``stdlib`` means the ``.py``
    files directly in Python's standard-library folder (not recursive, never site-packages): a real code
    corpus on every machine."""
    doc_separator: str = ""
    """String that splits a file into documents (e.g. ``"\\n\\n"``); empty: each file is one document."""
    max_bytes: int = 0
    """Read at most this many bytes of text in total (files in order, the last one cut); 0 = no cap."""
    vocab_size: int = 1024
    """Size of the trained byte-level BPE vocabulary, ``<eos>`` included (ignored when ``tokenizer`` is set)."""
    tokenizer: str = ""
    """Path to a saved ``tokenizer.json`` (HF tokenizers) to use as is; empty: train one on the training split."""
    eos_token: str = EOS
    """The token between documents (which one it belongs to: ``eos_position``); it also stops generation. A
    tokenizer without ``<eos>`` gets it added (one more id); any other name must already be in the tokenizer,
    e.g. ``<|im_end|>`` of an imported model."""
    seq_len: int = 256
    """Tokens per training window (the model sees seq_len inputs and seq_len shifted targets)."""
    val_fraction: float = 0.1
    """Fraction of the documents held out for validation (whole documents, never split)."""
    split_seed: int = 0
    """Seed of the document shuffle that chooses the validation documents (independent of train.seed)."""
    cache_dir: str = ""
    """Folder of the tokenized corpora; empty: ``$NEXTLAT_CACHE/text``, or ``~/.cache/nextlat/text`` when unset."""
    eval_tokens: int = 65536
    """Validation targets scored per evaluation: the first ceil(eval_tokens / seq_len) windows; 0 = all."""
    eos_position: str = "start"
    """Where a document's EOS belongs in packed windows: ``start`` (it opens the document at position 0 and
    predicts its first token; the official NextLat convention) or ``end`` (it closes the document and the
    first token is never predicted; nextlat before this setting, and imported models, which keep their
    own conventions). Text prompts of a ``start`` model begin with the EOS (:meth:`TextTask.prompt_prefix`)."""

    def validate(self) -> None:
        if not self.files:
            raise ConfigError("task.files=[]: list at least one text file, folder, glob pattern or 'stdlib'")
        bad = [f for f in self.files if not f.strip()]
        if bad:
            raise ConfigError(f"task.files={self.files!r}: contains an empty entry")
        if self.max_bytes < 0:
            raise ConfigError(f"task.max_bytes={self.max_bytes}: must be >= 0 (0 = no cap)")
        if not self.tokenizer and self.vocab_size < MIN_VOCAB:
            raise ConfigError(f"task.vocab_size={self.vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} "
                              "(256 bytes + <eos>)")
        if self.seq_len < 1:
            raise ConfigError(f"task.seq_len={self.seq_len}: must be >= 1")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"task.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.eval_tokens < 0:
            raise ConfigError(f"task.eval_tokens={self.eval_tokens}: must be >= 0 (0 = every validation window)")
        if self.eos_position not in EOS_POSITIONS:
            raise ConfigError(f"task.eos_position={self.eos_position!r}: must be one of {', '.join(EOS_POSITIONS)}")

    def with_absolute_paths(self) -> TextConfig:
        def absolute(path: str) -> str:
            return os.path.abspath(os.path.expanduser(path)) if path else path

        return replace(self, files=[f if f == STDLIB else absolute(f) for f in self.files],
                                   tokenizer=absolute(self.tokenizer), cache_dir=absolute(self.cache_dir))


# ----------------------------------------------------------------------------- tokenizer


class BPETokenizer:
    """An HF ``tokenizers`` tokenizer (a trained byte-level BPE, or any ``tokenizer.json``) with an EOS token.

    The trained BPE round-trips any text exactly (byte level). A literal special token inside the text
    (``<eos>``) is encoded as ordinary characters, never as its id, so documents cannot forge a document
    boundary; ``encode(text, special=True)`` parses them, for chat prompts.
    """

    def __init__(self, tok, eos: str = EOS):
        if tok.token_to_id(eos) is None:
            if eos != EOS:
                raise ConfigError(f"task.eos_token={eos!r} is not in the tokenizer's vocabulary")
            # A foreign tokenizer.json: give it the EOS that document packing needs (one more id).
            tok.add_special_tokens([EOS])
        tok.encode_special_tokens = True  # not serialised by tokenizers: set on every load
        self._tok = tok
        self.eos_token = eos
        self.eos_id: int = tok.token_to_id(eos)
        self.vocab_size: int = tok.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        """Train on ``texts``; deterministic (same texts and size -> same merges, in any process)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer, length=len(texts))
        out = cls(tok)
        # A small corpus runs out of merges first; the model keeps vocab_size rows either way.
        assert out.vocab_size <= vocab_size, (out.vocab_size, vocab_size)
        return out

    @classmethod
    def from_json(cls, text: str, eos: str = EOS) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text), eos)

    @classmethod
    def load(cls, path: str | Path, eos: str = EOS) -> BPETokenizer:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"tokenizer file {str(path)!r} does not exist") from None
        try:
            return cls.from_json(text, eos)
        except ConfigError:
            raise
        except Exception as e:  # tokenizers raises plain Exception subclasses for malformed JSON
            raise ConfigError(f"{path}: not a tokenizers tokenizer.json ({e})") from None

    def to_json(self) -> str:
        return self._tok.to_str(pretty=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special``: special tokens written in the text (``<|im_start|>``) become their ids."""
        if not special:
            return self._tok.encode(text, add_special_tokens=False).ids
        self._tok.encode_special_tokens = False
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = True

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once (parallel inside tokenizers: much faster than a Python loop)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; ``<eos>`` is written out, ids outside the vocabulary are dropped."""
        return self._tok.decode(list(ids), skip_special_tokens=False)


# ----------------------------------------------------------------------------- corpus files


def resolve_files(entries: list[str]) -> list[Path]:
    """The files named by ``task.files``, in order, without duplicates; every entry must match something."""
    out: dict[Path, None] = {}
    for entry in entries:
        if entry == STDLIB:
            folder = Path(sysconfig.get_paths()["stdlib"])
            found = sorted(p for p in folder.glob("*.py") if p.is_file())
            if not found:
                raise ConfigError(f"task.files: 'stdlib' matched no .py files in {str(folder)!r}")
        elif any(c in entry for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(entry), recursive=True) if Path(p).is_file())
            if not found:
                raise ConfigError(f"task.files: pattern {entry!r} matched no files (from {os.getcwd()})")
        else:
            path = Path(entry).expanduser()
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.is_file()
                               and not any(part.startswith(".") for part in p.relative_to(path).parts))
                if not found:
                    raise ConfigError(f"task.files: folder {entry!r} holds no files")
            elif path.is_file():
                found = [path]
            else:
                raise ConfigError(f"task.files: {entry!r} does not exist (relative paths start from {os.getcwd()})")
        for p in found:
            out.setdefault(p.resolve(), None)
    return list(out)


def read_documents(files: list[Path], separator: str, max_bytes: int) -> tuple[list[str], int]:
    """Documents of ``files`` in order (empty ones dropped) and the number of bytes read."""
    docs: list[str] = []
    total = 0
    for path in files:
        if max_bytes and total >= max_bytes:
            break
        with open(path, "rb") as f:
            raw = f.read(max_bytes - total if max_bytes else -1)
        total += len(raw)
        text = raw.decode("utf-8", errors="replace")  # a few bad bytes should not abort a corpus
        parts = text.split(separator) if separator else [text]
        docs.extend(d for d in parts if d.strip())
    return docs, total


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Document indices (train, val), each in corpus order; val is a seeded random ``val_fraction`` of them."""
    if n < 2:
        raise ConfigError(f"the corpus has {n} document(s): at least 2 are needed to hold out validation documents "
                          "(set task.doc_separator to split files into documents, or list more files)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return train, val


# ----------------------------------------------------------------------------- token streams

_DTYPES = {"uint16": (torch.uint16, "H", 2), "uint32": (torch.uint32, "I", 4)}


def stream_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_stream(path: Path, chunks, dtype: str) -> int:
    """Write token-id lists to a flat native-endian file; returns the number of tokens."""
    _, code, size = _DTYPES[dtype]
    assert array(code).itemsize == size, f"array type {code!r} is not {size} bytes on this platform"
    n = 0
    with open(path, "wb") as f:
        for ids in chunks:
            array(code, ids).tofile(f)
            n += len(ids)
        f.flush()
        os.fsync(f.fileno())
    return n


def read_stream(path: Path, n_tokens: int, dtype: str) -> Tensor:
    """Memory-map a token stream (read lazily by the OS, so corpora larger than RAM work): (N,)."""
    tdtype, _, _ = _DTYPES[dtype]
    if n_tokens == 0:
        return torch.empty(0, dtype=tdtype)
    return torch.from_file(str(path), shared=False, size=n_tokens, dtype=tdtype)


def _encode_docs(tok: BPETokenizer, docs: list[str], what: str, chunk_bytes: int = 1 << 20):
    """Yield token ids of ``docs`` (each followed by EOS), encoded in batches, printing progress."""
    total = sum(len(d) for d in docs)
    done, last_report, start, t0 = 0, 0, 0, time.perf_counter()
    while start < len(docs):
        end, size = start, 0
        while end < len(docs) and (size < chunk_bytes or end == start):
            size += len(docs[end])
            end += 1
        ids: list[int] = []
        for doc in tok.encode_batch(docs[start:end]):
            ids += doc
            ids.append(tok.eos_id)
        yield ids
        done += size
        start = end
        if done - last_report >= 8 * chunk_bytes or start == len(docs):
            last_report = done
            _say(f"encoded {what}: {done / 1e6:.1f}/{total / 1e6:.1f} M chars ({time.perf_counter() - t0:.1f}s)")


def _say(msg: str) -> None:
    # stderr: `nextlat eval` prints its JSON result on stdout
    print(f"[nextlat] text: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- cache


def cache_root(cfg: TextConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return cache_home() / "text"


def cache_key(cfg: TextConfig, files: list[Path], tokenizer: BPETokenizer | None) -> dict:
    """Everything that determines the token streams (a file's identity is its path, size and mtime)."""
    stamps = []
    for p in files:
        st = p.stat()
        stamps.append([str(p), st.st_size, st.st_mtime_ns])
    if tokenizer is None:
        tok = {"train_bpe": cfg.vocab_size}
    else:
        tok = {"sha256": hashlib.sha256(tokenizer.to_json().encode()).hexdigest()}
        if tokenizer.eos_token != EOS:
            tok["eos"] = tokenizer.eos_token
    return {"format": CACHE_FORMAT, "files": stamps, "doc_separator": cfg.doc_separator, "max_bytes": cfg.max_bytes,
            "tokenizer": tok, "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}


def key_folder(root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return root / digest


@dataclass
class Corpus:
    """A prepared cache folder: the tokenizer and the memory-mapped train / val token streams."""

    path: Path
    meta: dict
    tokenizer: BPETokenizer
    train: Tensor  # (N_train,) uint16 / uint32, memory-mapped
    val: Tensor  # (N_val,)


def load_corpus(folder: Path, eos: str = EOS) -> Corpus | None:
    """Open a cache folder, or None when it is absent, foreign or incomplete (it is then never trusted)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("dtype") not in _DTYPES:
            return None
        size = _DTYPES[meta["dtype"]][2]
        for split in ("train", "val"):
            if (folder / f"{split}.bin").stat().st_size != int(meta[f"{split}_tokens"]) * size:
                return None
        tok = BPETokenizer.from_json((folder / "tokenizer.json").read_text(encoding="utf-8"), eos)
        if tok.eos_id != meta["eos_id"] or tok.vocab_size != meta["vocab_size"]:
            return None
    except Exception:  # any unreadable part: treat the folder as not there
        return None
    train = read_stream(folder / "train.bin", meta["train_tokens"], meta["dtype"])
    val = read_stream(folder / "val.bin", meta["val_tokens"], meta["dtype"])
    return Corpus(folder, meta, tok, train, val)


def prepare_corpus(cfg: TextConfig, tokenizer: BPETokenizer | None = None) -> Corpus:
    """Open the cached corpus of ``cfg``, tokenizing it first if needed.

    ``tokenizer`` (or ``cfg.tokenizer``) fixes the tokenizer; otherwise one is trained on the
    training documents. The folder is built under a temporary name and renamed into place, so an
    interrupted preparation leaves nothing that a later run would trust.
    """
    files = resolve_files(cfg.files)
    if tokenizer is None and cfg.tokenizer:
        tokenizer = BPETokenizer.load(cfg.tokenizer, cfg.eos_token)
    key = cache_key(cfg, files, tokenizer)
    root = cache_root(cfg)
    folder = key_folder(root, key)
    corpus = load_corpus(folder, cfg.eos_token)
    if corpus is not None:
        return corpus
    if folder.exists():  # stale or half-deleted: move it out of the way, never trust it
        _say(f"ignoring incomplete cache folder {folder}")
        stale = folder.with_name(f".stale-{folder.name}-{os.getpid()}")
        folder.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{folder.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _build(cfg, files, tokenizer, key, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same corpus first: use theirs
            if load_corpus(folder, cfg.eos_token) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    corpus = load_corpus(folder, cfg.eos_token)
    assert corpus is not None, f"freshly prepared cache {folder} does not load"
    return corpus


def _build(cfg: TextConfig, files: list[Path], tokenizer: BPETokenizer | None, key: dict, out: Path) -> None:
    t0 = time.perf_counter()
    docs, n_bytes = read_documents(files, cfg.doc_separator, cfg.max_bytes)
    _say(f"preparing {len(files)} file(s), {n_bytes / 1e6:.1f} MB, {len(docs)} documents -> {out.parent}")
    train_idx, val_idx = split_documents(len(docs), cfg.val_fraction, cfg.split_seed)
    train_docs, val_docs = [docs[i] for i in train_idx], [docs[i] for i in val_idx]
    if tokenizer is None:
        tokenizer = BPETokenizer.train(train_docs, cfg.vocab_size)
        _say(f"trained a {tokenizer.vocab_size}-token BPE in {time.perf_counter() - t0:.1f}s")
    dtype = stream_dtype(tokenizer.vocab_size)
    n_train = write_stream(out / "train.bin", _encode_docs(tokenizer, train_docs, "train"), dtype)
    n_val = write_stream(out / "val.bin", _encode_docs(tokenizer, val_docs, "val"), dtype)
    tokenizer.save(out / "tokenizer.json")
    meta = {"format": CACHE_FORMAT, "dtype": dtype, "train_tokens": n_train, "val_tokens": n_val,
            "train_docs": len(train_docs), "val_docs": len(val_docs), "bytes": n_bytes,
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "key": key,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(out / "meta.json", "w") as f:  # written last: marks the folder complete
        f.write(json.dumps(meta, indent=2))
        f.flush()
        os.fsync(f.fileno())
    _say(f"{n_train} train + {n_val} val tokens ({n_bytes / max(n_train + n_val, 1):.2f} bytes/token) "
         f"in {time.perf_counter() - t0:.1f}s")


# ----------------------------------------------------------------------------- dataset


class PackedWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens over a token stream (stride ``seq_len``).

    ``eos_position="start"``: the windows cut ``[EOS] + stream`` (the first document gets its opening EOS
    too, without copying the stream), every target is scored and an EOS opens its document.
    ``"end"``: they cut the stream itself, an EOS closes its document and the target after it is ignored.
    """

    def __init__(self, stream: Tensor, seq_len: int, eos_id: int, eos_position: str = "start"):
        if eos_position not in EOS_POSITIONS:
            raise ValueError(f"eos_position={eos_position!r}: must be one of {', '.join(EOS_POSITIONS)}")
        self.stream, self.seq_len, self.eos_id, self.eos_position = stream, seq_len, eos_id, eos_position
        self.lead = 1 if eos_position == "start" else 0  # the EOS in front of the first document
        self.n = max(0, (len(stream) + self.lead - 1) // seq_len)
        self._offsets = torch.arange(seq_len + 1) - self.lead

    def __len__(self) -> int:
        return self.n

    def get(self, indices: Tensor) -> Batch:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"window index out of range [0, {self.n})")
        idx = indices[:, None] * self.seq_len + self._offsets  # (B, T + 1) stream positions; -1: the leading EOS
        window = self.stream[idx.clamp(min=0)].long()  # (B, T + 1)
        window[idx < 0] = self.eos_id
        inputs, targets = window[:, :-1], window[:, 1:].clone()  # (B, T) each
        opens = self.eos_position == "start"
        if not opens:
            # After a closing EOS comes the next document, which document masking keeps out of sight.
            targets[inputs == self.eos_id] = IGNORE
        return Batch(inputs, targets, doc_ids_from_eos(inputs, self.eos_id, eos_opens=opens))


class TextTask(Task):
    config_class = TextConfig
    EVAL_CHUNK_TOKENS = 16384  # tokens per evaluation forward pass: bounds the (B, T, V) logits

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.cfg: TextConfig = cfg
        self._tok: BPETokenizer | None = None
        self._saved_tok: BPETokenizer | None = None  # the tokenizer a checkpoint was trained with
        self._corpus: Corpus | None = None
        self._doc_spans: list[tuple[int, int]] | None = None
        self._hf_files: dict[str, bytes] = {}  # the files of an imported model (HF_FILES), kept in every checkpoint

    @classmethod
    def from_checkpoint(cls, cfg: TextConfig, ckpt_dir: str | Path) -> TextTask:
        """The task of a saved model: its tokenizer comes from the checkpoint, the corpus is only read when needed."""
        task = cls(cfg)
        path = Path(ckpt_dir) / "tokenizer.json"
        if path.is_file():
            task._saved_tok = BPETokenizer.load(path, cfg.eos_token)
        for name in HF_FILES:
            if (Path(ckpt_dir) / name).is_file():
                task._hf_files[name] = (Path(ckpt_dir) / name).read_bytes()
        return task

    @property
    def vocab_size(self) -> int:
        """Model vocabulary: ``task.vocab_size`` for a trained BPE (known without reading the corpus; a small
        corpus may leave some ids unused), else the size of the given tokenizer."""
        if not self.cfg.tokenizer:
            return self.cfg.vocab_size
        return self.tokenizer.vocab_size

    @property
    def tokenizer(self) -> BPETokenizer:
        if self._tok is None:
            if self._saved_tok is not None:
                self._tok = self._saved_tok
            elif self.cfg.tokenizer:
                self._tok = BPETokenizer.load(self.cfg.tokenizer, self.cfg.eos_token)
            else:
                self._tok = self.corpus().tokenizer
        return self._tok

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    def artifacts(self) -> dict[str, bytes]:
        return {"tokenizer.json": self.tokenizer.to_json().encode(), **self._hf_files}

    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = self._open_corpus()
            if self._tok is not None and self._tok.to_json() != self._corpus.tokenizer.to_json():
                raise ConfigError(f"the tokenizer in use differs from the one of the corpus cache {self._corpus.path}")
        return self._corpus

    def _open_corpus(self) -> Corpus:
        if self._saved_tok is None:
            return prepare_corpus(self.cfg)
        if not self.cfg.tokenizer:
            # The checkpoint's tokenizer was trained on this corpus: the cache made in training holds the same one.
            trained = load_corpus(key_folder(cache_root(self.cfg), cache_key(self.cfg, resolve_files(self.cfg.files),
                                                                             None)))
            if trained is not None and trained.tokenizer.to_json() == self._saved_tok.to_json():
                return trained
        return prepare_corpus(self.cfg, self._saved_tok)

    def _windows(self, split: str) -> PackedWindows:
        corpus = self.corpus()
        stream = corpus.train if split == "train" else corpus.val
        data = PackedWindows(stream, self.cfg.seq_len, corpus.tokenizer.eos_id, self.cfg.eos_position)
        if len(data) == 0:
            raise ConfigError(f"task.seq_len={self.cfg.seq_len}: the {split} split has only {len(stream)} tokens, "
                              f"fewer than one window of seq_len + 1 (use more text, a larger task.val_fraction "
                              "or a shorter task.seq_len)")
        return data

    def train_data(self) -> PackedWindows:
        return self._windows("train")

    def val_data(self) -> PackedWindows:
        return self._windows("val")

    @torch.no_grad()
    def evaluate(self, model, objective=None, *, device="cpu", seed: int = 0,
                 max_examples: int | None = None) -> dict[str, float]:
        """Validation cross-entropy (mean over every scored target, document-masked) and perplexity.

        Scores the first ``max_examples`` windows (default: enough for ``task.eval_tokens``), so every
        evaluation of a run sees the same tokens. ``seed`` is unused: nothing is sampled.
        """
        data = self.val_data()
        n = max_examples or (math.ceil(self.cfg.eval_tokens / self.cfg.seq_len) if self.cfg.eval_tokens else len(data))
        n = min(n, len(data))
        chunk = max(1, self.EVAL_CHUNK_TOKENS // self.cfg.seq_len)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        head = objective_head(model, objective)  # the LM head, or the objective's own next-token module (JTP)
        for start in range(0, n, chunk):
            batch = data.get(torch.arange(start, min(n, start + chunk))).to(device)
            h, _ = model(batch.input_ids, batch.doc_ids)
            logits = head(h, batch.input_ids).float()  # (B, T, V)
            total += F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE,
                                     reduction="sum").item()
            count += int((batch.targets != IGNORE).sum())
        model.train(was_training)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(loss), "val_tokens": count}

    def _val_documents(self) -> list[tuple[int, int]]:
        """(start, length without EOS) of every validation document, in stream order."""
        if self._doc_spans is None:
            val, eos = self.corpus().val, self.corpus().tokenizer.eos_id
            ends = []
            step = 1 << 20
            for start in range(0, len(val), step):  # chunked: a large val split never becomes one int64 tensor
                part = val[start : start + step].to(torch.int64)
                ends += (torch.nonzero(part == eos).flatten() + start).tolist()
            starts = [0] + [e + 1 for e in ends[:-1]]
            self._doc_spans = [(s, e - s) for s, e in zip(starts, ends)]
        return self._doc_spans

    def prompt_prefix(self) -> list[int]:
        """[EOS] when documents open with their EOS (``eos_position: start``): a prompt then starts as a document
        did in training. Nothing with ``end``."""
        return [self.tokenizer.eos_id] if self.cfg.eos_position == "start" else []

    def prompts(self, n: int, length: int | None = None, seed: int = 0) -> list[Tensor]:
        """``n`` prompts of ``length`` tokens (default 64), each the start of a different validation document,
        opened by :meth:`prompt_prefix` (which counts in ``length``).

        Documents too short for ``length`` are skipped; which documents are used is a pure function of
        ``seed``. Returns 1-D int64 tensors.
        """
        length = length or DEFAULT_PROMPT_LEN
        prefix = self.prompt_prefix()
        if n < 1 or length < 1 + len(prefix):
            raise ValueError(f"prompts: n={n} must be >= 1 and length={length} >= {1 + len(prefix)}")
        body = length - len(prefix)
        eligible = [s for s, size in self._val_documents() if size >= body]
        if len(eligible) < n:
            raise ValueError(f"only {len(eligible)} validation documents have at least {body} tokens (prompts of "
                             f"{length} tokens{', EOS included' if prefix else ''}); ask for fewer than n={n} "
                             "prompts or a shorter length")
        chosen = sorted(random.Random(seed).sample(eligible, n))
        val = self.corpus().val
        head = torch.tensor(prefix, dtype=torch.int64)
        return [torch.cat([head, val[s : s + body].to(torch.int64)]) for s in chosen]
