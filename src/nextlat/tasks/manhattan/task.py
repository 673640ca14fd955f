"""Manhattan world model (Vafa et al., arXiv 2406.03689; NextLat paper Table 1).

A model learns to navigate a street graph from traversals written ``origin destination dir ...
dir end`` (see :mod:`nextlat.tasks.manhattan.graph`). The graph is a JSON file given by ``task.graph`` (the real
Manhattan graph has 4579 intersections) or, when empty, a small procedural city.

**Corpora.** ``shortest``: canonical shortest routes between uniformly random origin/destination
pairs. ``random_walk``: from a uniformly random origin, uniformly random legal moves for a length
drawn uniformly from 1..``walk_max_len`` (shorter only at a dead end); the destination is where the
walk stops (walks that return to their origin are redrawn). ``mixed``: half of each, shuffled.
A seeded ``held_out_frac`` of all (origin, destination) pairs never appears in training; those
pairs give the validation walks and the out-of-distribution traversal tests.

**Training sequences.** Walks are closed by ``<eos>`` and packed whole into windows of
``seq_len + 1`` tokens (first fit over the last few open windows; what is left is padding with
doc id -1). ``doc_ids`` restart attention and positions at every walk. Token losses score every
move and the final ``end``; the origin and destination (the prompt), ``<eos>`` and padding are
not scored (the next-latent term still sees every position of a walk).

**Evaluation** (cheap sizes from the config so it can run during training): ``next_token`` (share
of legal top-1 predictions, teacher-forced on held-out walks) and ``val_loss``; ``valid`` (greedy
traversals for held-out pairs at most ``valid_max_dist`` moves apart); ``compression``;
``eff_rank``; ``detour``; ``map_*`` counts of true and invented streets in the valid-trajectory
traversals. Definitions in :mod:`nextlat.tasks.manhattan.metrics`. Predictions come from the objective's
next-token head: the backbone's LM head, or JTP's fetch module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nextlat.config import ConfigError, TaskConfig
from nextlat.data import IGNORE, Batch
from nextlat.decoding.reference import objective_head
from nextlat.tasks.base import Task
from nextlat.tasks.manhattan.graph import (
    HeldOutPairs,
    StreetGraph,
    Walks,
    WalkTokenizer,
    procedural_city,
    random_walks,
    sample_pairs,
    shortest_walks,
)
from nextlat.tasks.manhattan.metrics import (
    as_walk_model,
    compression_pairs,
    detour_robustness,
    hidden_effective_rank,
    map_reconstruction,
    next_token_test,
    sequence_compression,
    valid_trajectories,
)

CORPORA = ("shortest", "random_walk", "mixed")
GRAPH_ARTIFACT = "graph.json"


@dataclass
class ManhattanConfig(TaskConfig):
    name: str = "manhattan"
    graph: str = ""
    """Street-graph JSON file (format in nextlat.tasks.manhattan.graph); empty: the procedural city of the city_* keys."""
    city_width: int = 12
    """Procedural city: intersections per east-west street."""
    city_height: int = 12
    """Procedural city: intersections per north-south avenue."""
    city_one_way_frac: float = 0.3
    """Procedural city: probability that a street is one-way."""
    city_missing_frac: float = 0.1
    """Procedural city: probability that a block-long segment is missing."""
    city_diagonals: int = 1
    """Procedural city: number of NE-SW diagonal boulevards."""
    city_seed: int = 0
    """Procedural city: layout seed (the largest strongly connected part of the grid is kept)."""
    corpus: str = "shortest"
    """Training walks: shortest | random_walk | mixed (half of each)."""
    num_train_walks: int = 100_000
    """Training walks (fixed set, drawn once from data_seed)."""
    walk_max_len: int = 60
    """random_walk / mixed: each walk's number of moves is drawn uniformly from 1..walk_max_len (<= seq_len - 3)."""
    held_out_frac: float = 0.1
    """Fraction of (origin, destination) pairs kept out of training for out-of-distribution tests."""
    seq_len: int = 128
    """Tokens per packed training window; shortest routes longer than seq_len - 3 moves are not trained on."""
    data_seed: int = 0
    """Seed of the held-out pairs, the corpora and the evaluation pairs (fixed across training seeds)."""
    eval_next_token: int = 500
    """Held-out walks of the next-token test (0 skips it)."""
    eval_valid: int = 200
    """Held-out pairs for valid trajectories and the map (0 skips them)."""
    valid_max_dist: int = 50
    """Held-out test pairs are at most this many moves apart (shortest route)."""
    eval_compression: int = 20
    """Sequence-compression trials (paper: 100; 0 skips it)."""
    compression_suffixes: int = 30
    """Suffixes sampled per compression trial."""
    compression_threshold: float = 0.01
    """A suffix token is accepted after the other prefix when its probability exceeds this."""
    eval_rank_seqs: int = 32
    """Sequences of held-out walks whose final hidden states give the effective rank (paper: 256; 0 skips it)."""
    rank_tokens: int = 256
    """Tokens per effective-rank sequence (packed held-out walks; paper: 256)."""
    eval_detour: int = 200
    """Held-out pairs for detour robustness (0 skips it)."""
    detour_prob: float = 0.75
    """Probability of replacing the model's move with a random one that can still reach the destination."""
    max_len: int = 150
    """Move cap of generated traversals (the model needs max_seq_len >= max_len + 2)."""

    def validate(self) -> None:
        if self.corpus not in CORPORA:
            raise ConfigError(f"task.corpus={self.corpus!r}: must be one of {', '.join(CORPORA)}")
        if not self.graph:
            for key in ("city_width", "city_height"):
                if getattr(self, key) < 2:
                    raise ConfigError(f"task.{key}={getattr(self, key)}: must be >= 2")
            for key in ("city_one_way_frac", "city_missing_frac"):
                if not 0 <= getattr(self, key) < 1:
                    raise ConfigError(f"task.{key}={getattr(self, key)}: must be in [0, 1)")
            if self.city_diagonals < 0:
                raise ConfigError(f"task.city_diagonals={self.city_diagonals}: must be >= 0")
        if not 8 <= self.seq_len < 32767:
            raise ConfigError(f"task.seq_len={self.seq_len}: must be in 8..32766")
        if self.num_train_walks < 1:
            raise ConfigError(f"task.num_train_walks={self.num_train_walks}: must be >= 1")
        if self.corpus != "shortest" and not 1 <= self.walk_max_len <= self.seq_len - 3:
            raise ConfigError(f"task.walk_max_len={self.walk_max_len}: must be in 1..seq_len - 3 = {self.seq_len - 3} "
                              "(a walk plus its origin, destination, end and <eos> must fit one window)")
        if not 0 < self.held_out_frac < 1:
            raise ConfigError(f"task.held_out_frac={self.held_out_frac}: must be in (0, 1)")
        for key in ("eval_next_token", "eval_valid", "eval_compression", "eval_rank_seqs", "eval_detour"):
            if getattr(self, key) < 0:
                raise ConfigError(f"task.{key}={getattr(self, key)}: must be >= 0 (0 skips the metric)")
        for key in ("valid_max_dist", "compression_suffixes", "max_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.{key}={getattr(self, key)}: must be >= 1")
        if not 0 < self.compression_threshold < 1:
            raise ConfigError(f"task.compression_threshold={self.compression_threshold}: must be in (0, 1)")
        if not 2 <= self.rank_tokens < 32767:
            raise ConfigError(f"task.rank_tokens={self.rank_tokens}: must be in 2..32766")
        if not 0 <= self.detour_prob <= 1:
            raise ConfigError(f"task.detour_prob={self.detour_prob}: must be in [0, 1]")


# ----------------------------------------------------------------------------- packing


def pack_documents(tokens: Tensor, offsets: Tensor, eos_id: int, window: int, open_limit: int = 16,
                   chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Pack documents ``tokens[offsets[i]:offsets[i+1]]``, each closed by ``eos_id``, into rows of ``window`` tokens.

    Documents stay whole; each goes to the first of the ``open_limit`` most recently opened rows
    with room for it, else opens a new row (a deterministic first-fit that leaves little padding).
    Returns (rows (R, window) int16/int32, doc_ids (R, window) int16): doc_ids number the documents
    of a row from 0 and are -1 on padding (whose token is ``eos_id``).
    """
    lengths = (offsets[1:] - offsets[:-1] + 1).tolist()  # with the EOS
    if lengths and max(lengths) > window:
        raise ValueError(f"a document of {max(lengths)} tokens (with <eos>) does not fit a window of {window}")
    rows, cols, nums = [], [], []
    open_rows: list[list[int]] = []  # [row, tokens used, documents] of the rows still being filled
    R = 0
    for n in lengths:
        for slot in open_rows:  # first fit among the open rows
            if slot[1] + n <= window:
                break
        else:
            slot = [R, 0, 0]
            R += 1
            open_rows.append(slot)
            if len(open_rows) > open_limit:
                open_rows.pop(0)  # the oldest row is closed: it keeps its padding
        rows.append(slot[0])
        cols.append(slot[1])
        nums.append(slot[2])
        slot[1] += n
        slot[2] += 1
    dtype = torch.int16 if eos_id < 32767 else torch.int32
    out = torch.full((R, window), eos_id, dtype=dtype)
    docs = torch.full((R, window), -1, dtype=torch.int16)
    if not lengths:
        return out, docs
    all_n, all_first = torch.tensor(lengths), torch.tensor(rows) * window + torch.tensor(cols)  # flat start
    all_nums = torch.tensor(nums, dtype=torch.int16)
    for s in range(0, len(lengths), chunk):  # chunks bound the int64 temporaries of large corpora
        n, first = all_n[s : s + chunk], all_first[s : s + chunk]
        doc = torch.repeat_interleave(torch.arange(len(n)), n)  # document (in the chunk) of every packed token
        within = torch.arange(int(n.sum())) - torch.repeat_interleave(n.cumsum(0) - n, n)
        flat = first[doc] + within
        # token j of document i is tokens[offsets[i] + j], or the EOS after its last token
        body = within < n[doc] - 1
        vals = torch.full((len(flat),), eos_id, dtype=torch.long)
        vals[body] = tokens[(offsets[s : s + chunk][doc] + within)[body]].long()
        out.view(-1)[flat] = vals.to(dtype)
        docs.view(-1)[flat] = all_nums[s : s + chunk][doc]
    return out, docs


class PackedWalks:
    """Training windows of packed walks; ``get`` returns inputs, scored targets and doc ids."""

    def __init__(self, rows: Tensor, docs: Tensor, tok: WalkTokenizer):
        self.rows, self.docs, self.tok = rows, docs, tok  # (R, seq_len + 1) each

    def __len__(self) -> int:
        return self.rows.shape[0]

    def get(self, indices: Tensor) -> Batch:
        indices = torch.as_tensor(indices, dtype=torch.long)
        window = self.rows[indices].long()  # (B, T + 1)
        inputs, targets = window[:, :-1], window[:, 1:].clone()  # (B, T)
        doc_ids = self.docs[indices, :-1].long()  # (B, T)
        # Score moves and `end` only: destinations (prompt), next origins, <eos> and padding are not predicted.
        scored = self.tok.is_move(targets) | (targets == self.tok.end_id)
        targets[~scored] = IGNORE
        return Batch(inputs, targets, doc_ids)


# ----------------------------------------------------------------------------- task


class ManhattanTask(Task):
    config_class = ManhattanConfig

    def __init__(self, cfg: ManhattanConfig, graph: StreetGraph | None = None):
        super().__init__(cfg)
        self.cfg: ManhattanConfig = cfg
        self._graph = graph
        self._tok: WalkTokenizer | None = None
        self._train: PackedWalks | None = None
        self._cache: dict[str, object] = {}

    @classmethod
    def from_checkpoint(cls, cfg: ManhattanConfig, ckpt_dir: str | Path) -> ManhattanTask:
        """The task of a saved model: the graph stored in the checkpoint, so the original file is not needed."""
        path = Path(ckpt_dir) / GRAPH_ARTIFACT
        return cls(cfg, StreetGraph.load(path) if path.is_file() else None)

    @property
    def graph(self) -> StreetGraph:
        if self._graph is None:
            c = self.cfg
            if c.graph:
                self._graph = StreetGraph.load(c.graph)
            else:
                self._graph = procedural_city(c.city_width, c.city_height, c.city_seed, c.city_one_way_frac,
                                              c.city_missing_frac, c.city_diagonals)
        return self._graph

    @property
    def tokenizer(self) -> WalkTokenizer:
        if self._tok is None:
            self._tok = WalkTokenizer(self.graph)
        return self._tok

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    @property
    def held_out(self) -> HeldOutPairs:
        """Held-out (origin, destination) pairs, hashed on original node ids (dense indices in, bool out)."""
        return self._cached("held_out", lambda: HeldOutPairs(self.cfg.held_out_frac, self.cfg.data_seed, self.graph.ids))

    def artifacts(self) -> dict[str, bytes]:
        return {GRAPH_ARTIFACT: self.graph.to_json().encode()}

    # ------------------------------------------------------------------ data

    def _seed(self, purpose: int) -> int:
        """Seed of one data stream (1 train, 2 val, 3 test pairs, 4 compression, 5 rank); each may use +0..+99."""
        return self.cfg.data_seed * 1000 + 100 * purpose

    def walks(self, n: int, *, split: str, seed: int) -> Walks:
        """``n`` walks of the configured corpus: pairs outside (``train``) or inside (``val``) the held-out set."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}: must be 'train' or 'val'")
        c, held = self.cfg, self.held_out
        keep = (lambda o, d: ~held(o, d)) if split == "train" else held
        max_moves = c.seq_len - 3

        def shortest(m: int, s: int) -> Walks:
            return shortest_walks(self.graph, sample_pairs(self.graph, m, seed=s, keep=keep, max_dist=max_moves))

        def walk(m: int, s: int) -> Walks:
            return random_walks(self.graph, m, seed=s, max_moves=c.walk_max_len, keep=keep)

        if c.corpus == "shortest":
            return shortest(n, seed)
        if c.corpus == "random_walk":
            return walk(n, seed)
        mixed = Walks.cat([shortest(n // 2, seed), walk(n - n // 2, seed + 1)])
        return mixed.select(torch.randperm(n, generator=torch.Generator().manual_seed(seed + 2)))

    def train_data(self) -> PackedWalks:
        if self._train is None:
            walks = self.walks(self.cfg.num_train_walks, split="train", seed=self._seed(1))
            tokens, offsets = self.tokenizer.encode_walks(walks)
            rows, docs = pack_documents(tokens, offsets, self.tokenizer.eos_id, self.cfg.seq_len + 1)
            self._train = PackedWalks(rows, docs, self.tokenizer)
        return self._train

    def _cached(self, key: str, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def val_walks(self, n: int) -> list[list[int]]:
        """The first ``n`` held-out walks as token lists ``origin destination dirs end``."""
        walks = self._cached(f"val{n}", lambda: self.walks(n, split="val", seed=self._seed(2)))
        tokens, offsets = self.tokenizer.encode_walks(walks)
        return [tokens[a:b].tolist() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]

    def test_pairs(self, n: int) -> Tensor:
        """The first ``n`` held-out (origin, destination) pairs at most ``valid_max_dist`` moves apart: (n, 2)."""
        key = f"pairs{n}"
        return self._cached(key, lambda: sample_pairs(self.graph, n, seed=self._seed(3),
                                                      keep=self.held_out, max_dist=self.cfg.valid_max_dist))

    def rank_windows(self, n: int, tokens: int) -> tuple[Tensor, Tensor]:
        """``n`` sequences of ``tokens`` packed held-out walks: (ids (n, tokens) int64, doc_ids (n, tokens) int64)."""

        def make() -> tuple[Tensor, Tensor]:
            tok, seed = self.tokenizer, self._seed(5)
            rows, docs, m = [], [], max(16, n)
            while sum(len(r) for r in rows) < n:
                walks = self.walks(m, split="val", seed=seed)
                t, o = tok.encode_walks(walks)
                t_len = (o[1:] - o[:-1]).max()
                if int(t_len) + 1 > tokens:  # keep only walks that fit one sequence
                    fits = torch.nonzero(o[1:] - o[:-1] + 1 <= tokens).flatten()
                    t, o = tok.encode_walks(walks.select(fits))
                r, d = pack_documents(t, o, tok.eos_id, tokens)
                rows.append(r)
                docs.append(d)
                seed, m = seed + 1, 2 * m
            return torch.cat(rows)[:n].long(), torch.cat(docs)[:n].long()

        return self._cached(f"rank{n}x{tokens}", make)

    def prompts(self, n: int, length: int | None = None, seed: int = 0) -> list[Tensor]:
        """``n`` prompts ``origin destination`` of held-out pairs (``length`` is always 2)."""
        pairs = sample_pairs(self.graph, n, seed=seed * 1000 + 11, keep=self.held_out,
                             max_dist=self.cfg.valid_max_dist)
        return [p.clone() for p in pairs]

    # ------------------------------------------------------------------ evaluation

    def move_cap(self, model) -> int:
        """Move cap of generated traversals: ``task.max_len``, lowered (with a warning) to what the model holds."""
        max_len, limit = self.cfg.max_len, model.cfg.max_seq_len
        if max_len + 2 > limit:
            warnings.warn(f"task.max_len={max_len} needs model.max_seq_len >= {max_len + 2}; "
                          f"traversals are capped at {limit - 2} moves", stacklevel=3)
            max_len = limit - 2
        return max_len

    @torch.no_grad()
    def evaluate(self, model, objective=None, *, device="cpu", seed: int = 0,
                 max_examples: int | None = None) -> dict[str, float]:
        """The world-model metrics (see the module docstring); ``max_examples`` caps every metric's size.

        Test pairs and walks depend on ``data_seed`` only, so evaluations are comparable across a
        run; ``seed`` drives the sampling of compression suffixes and detours.
        """
        c, graph, tok = self.cfg, self.graph, self.tokenizer
        size = lambda k: min(k, max_examples) if max_examples else k  # noqa: E731
        lm = as_walk_model(model, objective_head(model, objective))
        limit = model.cfg.max_seq_len
        max_len = self.move_cap(model)
        out: dict[str, float] = {}
        if size(c.eval_next_token):
            r = next_token_test(lm, graph, tok, self.val_walks(size(c.eval_next_token)))
            out["next_token"], out["val_loss"] = r.legal, r.loss
        n_pairs = max(size(c.eval_valid), size(c.eval_detour))
        pairs = self.test_pairs(n_pairs) if n_pairs else None
        if size(c.eval_valid):
            res = valid_trajectories(lm, graph, tok, pairs[: size(c.eval_valid)], max_len=max_len)
            m = map_reconstruction(graph, res.traversals)
            out["valid"] = res.valid
            out["map_true_edges"], out["map_invented_edges"] = float(len(m.true_edges)), float(len(m.invented))
            out["map_precision"] = m.precision
        if size(c.eval_compression):
            trials = self._cached(f"comp{size(c.eval_compression)}x{max_len}", lambda: compression_pairs(
                graph, size(c.eval_compression), seed=self._seed(4), max_moves=max_len // 2))
            out["compression"] = sequence_compression(lm, graph, tok, trials, max_len=max_len,
                                                      suffixes=c.compression_suffixes,
                                                      threshold=c.compression_threshold, seed=seed)
        if size(c.eval_rank_seqs):
            tokens = min(c.rank_tokens, limit)
            ids, docs = self.rank_windows(size(c.eval_rank_seqs), tokens)
            out["eff_rank"] = hidden_effective_rank(lm, ids, docs)
        if size(c.eval_detour):
            res = detour_robustness(lm, graph, tok, pairs[: size(c.eval_detour)], max_len=max_len,
                                    prob=c.detour_prob, seed=seed)
            out["detour"] = res.valid
        return out
