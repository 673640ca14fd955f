"""World-model metrics of Vafa et al. (arXiv 2406.03689) as used in the NextLat paper's Table 1.

Every metric talks to the model through a narrow interface, :class:`WalkModel`, so it works on
any checkpoint (wrap a nextlat ``Transformer`` with :func:`as_walk_model`) and on hand-written
stand-ins in tests (e.g. an oracle that always takes a shortest route):

- ``score(ids, doc_ids=None) -> (B, T, V)`` teacher-forced next-token logits;
- ``start(prompt) -> (B, V)`` and ``step(tokens) -> (B, V)``: incremental decoding of B rows in
  lockstep (one session at a time; for a ``Transformer`` this is the decoding engine's
  :class:`~nextlat.decoding.engine.Stepper`, the loop of ``decode``); the metrics choose tokens
  with :class:`~nextlat.decoding.sampling.Sampling` and their own rules (legality, detours);
- ``hidden(ids, doc_ids=None) -> (B, T, D)`` final hidden states (effective rank only).

Legality: a predicted token is legal at intersection u of a walk towards destination d when it is
a direction with a street leaving u, or ``end`` when u == d. Node tokens and ``<eos>`` are never
legal moves. A traversal is valid when every token is legal and it emits ``end`` (necessarily at
the destination) within ``max_len`` moves.

All functions run under ``torch.no_grad`` with the model in eval mode and restore its mode.
Random choices use explicit ``torch.Generator`` seeds, so results are reproducible.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextlat.decoding.engine import Stepper
from nextlat.decoding.reference import Head, lm_head
from nextlat.decoding.sampling import GREEDY, Sampling
from nextlat.tasks.manhattan.graph import DIRECTIONS, UNIT, StreetGraph, WalkTokenizer

SAMPLE = Sampling(temperature=1.0)  # suffixes of the compression test

# ----------------------------------------------------------------------------- model interface


class WalkModel(Protocol):
    def score(self, ids: Tensor, doc_ids: Tensor | None = None) -> Tensor: ...

    def start(self, prompt: Tensor) -> Tensor: ...

    def step(self, tokens: Tensor) -> Tensor: ...

    def hidden(self, ids: Tensor, doc_ids: Tensor | None = None) -> Tensor: ...


class RecomputeModel:
    """Base for stand-ins that only implement :meth:`score`: decoding recomputes the whole prefix."""

    def score(self, ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def start(self, prompt: Tensor) -> Tensor:
        self._seq = prompt
        return self.score(prompt)[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        self._seq = torch.cat([self._seq, tokens[:, None]], dim=1)
        return self.score(self._seq)[:, -1]

    def hidden(self, ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} exposes no hidden states")


class TransformerWalkModel:
    """A nextlat ``Transformer`` (any objective's backbone) behind the :class:`WalkModel` interface.

    Decoding goes through the engine's KV-cached :class:`~nextlat.decoding.engine.Stepper`, so a
    traversal costs one token per step. Inputs are CPU tensors and are moved to the model's
    device; outputs come back as float32 CPU tensors.
    """

    def __init__(self, model, head: Head | None = None):
        self.module = model
        self.device = next(model.parameters()).device
        self.max_seq_len: int = model.cfg.max_seq_len
        self.head = head or lm_head(model)  # the objective's next-token head (JTP: its fetch module)
        self._stepper = Stepper(model, head=self.head)

    def hidden(self, ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        doc = None if doc_ids is None else doc_ids.to(self.device)
        h, _ = self.module(ids.to(self.device), doc)
        return h.float().cpu()  # (B, T, D)

    def score(self, ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        doc = None if doc_ids is None else doc_ids.to(self.device)
        ids = ids.to(self.device)
        h, _ = self.module(ids, doc)
        return self.head(h, ids).float().cpu()  # (B, T, V)

    def start(self, prompt: Tensor) -> Tensor:
        return self._stepper.start(prompt.to(self.device), self.max_seq_len).float().cpu()  # (B, V)

    def step(self, tokens: Tensor) -> Tensor:
        return self._stepper.step(tokens.to(self.device)).float().cpu()  # (B, V)


def as_walk_model(model, head: Head | None = None) -> WalkModel:
    """Wrap a nextlat ``Transformer`` (predicting through ``head``, default its LM head); anything that already
    has ``score``/``start``/``step`` is used as is."""
    if hasattr(model, "score") and hasattr(model, "start") and hasattr(model, "step"):
        return model
    if hasattr(model, "logits") and hasattr(model, "new_cache"):
        return TransformerWalkModel(model, head)
    raise TypeError(f"{type(model).__name__} is neither a nextlat Transformer nor a WalkModel "
                    "(score/start/step methods)")


@contextmanager
def evaluating(model) -> Iterator[None]:
    """No gradients and eval mode for the underlying module (if any); its previous mode is restored."""
    module = getattr(model, "module", model)
    was = module.training if isinstance(module, nn.Module) else None
    if was is not None:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was is not None:
            module.train(was)


def legal(graph: StreetGraph, tok: WalkTokenizer, pred: Tensor, cur: Tensor, dest: Tensor) -> tuple[Tensor, Tensor]:
    """Legality of predicted tokens at intersections ``cur`` heading to ``dest`` (all (...) int64).

    Returns (ok, nxt): ok (...) bool; nxt (...) the intersection after a legal move (``cur`` otherwise).
    """
    is_move = tok.is_move(pred)
    k = (pred - tok.dir0).clamp(0, len(DIRECTIONS) - 1)
    reached = graph.succ[cur, k]
    moved = is_move & (reached >= 0)
    ok = moved | ((pred == tok.end_id) & (cur == dest))
    return ok, torch.where(moved, reached, cur)


# ----------------------------------------------------------------------------- next-token test


@dataclass
class NextTokenResult:
    legal: float  # share of top-1 predictions that are legal
    loss: float  # mean cross-entropy of the true next move / end
    positions: int  # predictions scored


def next_token_test(model, graph: StreetGraph, tok: WalkTokenizer, walks: list[list[int]], *,
                    batch_size: int = 64) -> NextTokenResult:
    """Teacher-forced on ``walks`` (token lists ``origin dest dirs end``): share of legal top-1 predictions.

    Every prediction of a move or of ``end`` is scored (one per move plus the final ``end``); the
    predictions after the origin token (the destination, a prompt) are not.
    """
    lm = as_walk_model(model)
    legal_count, loss_sum, count = 0, 0.0, 0
    with evaluating(lm):
        for start in range(0, len(walks), batch_size):
            chunk = walks[start : start + batch_size]
            T = max(len(w) for w in chunk) - 1
            ids = torch.full((len(chunk), T), tok.eos_id, dtype=torch.long)
            rows, pos, cur, dest, target = [], [], [], [], []
            for r, w in enumerate(chunk):
                _check_walk(graph, tok, w)
                ids[r, : len(w) - 1] = torch.tensor(w[:-1])
                u, d = w[0], w[1]
                for t in range(1, len(w) - 1):  # input w[t] (dest or a move) -> predict w[t + 1]
                    if t > 1:
                        u = graph.step(u, w[t] - tok.dir0) if tok.dir0 <= w[t] < tok.end_id else -1
                        if u < 0:
                            raise ValueError(f"walk {tok.decode(w)!r}: token {t} is not a legal move")
                    rows.append(r)
                    pos.append(t)
                    cur.append(u)
                    dest.append(d)
                    target.append(w[t + 1])
            logits = lm.score(ids)[torch.tensor(rows), torch.tensor(pos)]  # (P, V)
            ok, _ = legal(graph, tok, logits.argmax(-1), torch.tensor(cur), torch.tensor(dest))
            legal_count += int(ok.sum())
            loss_sum += float(F.cross_entropy(logits, torch.tensor(target), reduction="sum"))
            count += len(rows)
    return NextTokenResult(legal_count / max(count, 1), loss_sum / max(count, 1), count)


def _check_walk(graph: StreetGraph, tok: WalkTokenizer, w: list[int]) -> None:
    if len(w) < 3 or w[-1] != tok.end_id or not (0 <= w[0] < tok.num_nodes and 0 <= w[1] < tok.num_nodes):
        raise ValueError(f"not a walk 'origin destination dirs end': {tok.decode(w)!r}")


# ----------------------------------------------------------------------------- traversals


ARRIVED, ILLEGAL, TOO_LONG = "arrived", "illegal", "too_long"


@dataclass
class Traversal:
    origin: int
    dest: int
    tokens: list[int]  # generated tokens after the prompt, up to the first illegal one or `end`
    status: str  # "arrived" | "illegal" | "too_long"
    moves: list[tuple[int, int]] = field(default_factory=list)  # (node, direction) tried, the illegal one included
    detours: int = 0  # forced random moves

    @property
    def valid(self) -> bool:
        return self.status == ARRIVED


@dataclass
class TraversalResult:
    valid: float  # share of valid traversals
    traversals: list[Traversal]


def traverse(model, graph: StreetGraph, tok: WalkTokenizer, pairs: Tensor, *, max_len: int,
             detour_prob: float = 0.0, generator: torch.Generator | None = None,
             batch_size: int = 256) -> list[Traversal]:
    """Greedy traversals from (P, 2) dense (origin, destination) pairs, prompted with ``origin destination``.

    A traversal stops at its first illegal token, at ``end`` (valid when all moves were legal and it
    is at the destination), or after ``max_len`` moves. With ``detour_prob`` > 0, at every step
    away from the destination the argmax is replaced, with that probability, by a uniformly random
    legal move from which the destination can still be reached; the model must then recover.
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be >= 1")
    if not 0 <= detour_prob <= 1:
        raise ValueError(f"detour_prob={detour_prob} must be in [0, 1]")
    _check_pairs(graph, pairs)
    lm = as_walk_model(model)
    limit = getattr(lm, "max_seq_len", None)
    if limit is not None and max_len + 2 > limit:
        raise ValueError(f"max_len={max_len} moves need {max_len + 2} positions; the model holds max_seq_len={limit}")
    out: list[Traversal] = []
    with evaluating(lm):
        for part in pairs.split(batch_size):
            out += _traverse(lm, graph, tok, part, max_len, detour_prob, generator)
    return out


def _check_pairs(graph: StreetGraph, pairs: Tensor) -> None:
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (P, 2), got {tuple(pairs.shape)}")
    if pairs.numel() and (pairs.min() < 0 or pairs.max() >= graph.num_nodes):
        raise ValueError(f"pairs hold node indices outside 0..{graph.num_nodes - 1}")


def _traverse(lm, graph: StreetGraph, tok: WalkTokenizer, pairs: Tensor, max_len: int, detour_prob: float,
              generator: torch.Generator | None) -> list[Traversal]:
    B = pairs.shape[0]
    origins, dests = pairs[:, 0].long(), pairs[:, 1].long()
    logits = lm.start(torch.stack([origins, dests], 1))  # (B, V)
    cur, alive = origins.clone(), torch.ones(B, dtype=torch.bool)
    status = [TOO_LONG] * B
    detours = torch.zeros(B, dtype=torch.long)
    dist = graph.dest_tables(dests)[0] if detour_prob > 0 else None  # (B, N)
    chosen, active = [], []
    for i in range(max_len + 1):
        choice = GREEDY.choose(logits)  # (B,)
        if dist is not None:
            nxt_all = graph.succ[cur]  # (B, 8)
            can = (nxt_all >= 0) & (dist.gather(1, nxt_all.clamp(min=0)) >= 0)  # legal and dest still reachable
            coin = torch.rand(B, generator=generator) < detour_prob
            swap = alive & (cur != dests) & can.any(1) & coin
            if bool(swap.any()):
                pick = torch.multinomial(can[swap].float(), 1, generator=generator).squeeze(1)
                choice = choice.clone()
                choice[swap] = tok.dir0 + pick
                detours += swap.long()
        ok, nxt = legal(graph, tok, choice, cur, dests)
        chosen.append(choice)
        active.append(alive.clone())
        for b in torch.nonzero(alive & ~ok).flatten().tolist():
            status[b] = ILLEGAL
        for b in torch.nonzero(alive & ok & (choice == tok.end_id)).flatten().tolist():
            status[b] = ARRIVED
        alive &= ok & (choice != tok.end_id)
        cur = nxt
        if not bool(alive.any()) or i == max_len:
            break
        logits = lm.step(choice)
    toks, act = torch.stack(chosen, 1), torch.stack(active, 1)  # (B, S)
    out = []
    for b in range(B):
        row = toks[b][act[b]].tolist()
        u, moves = int(origins[b]), []
        for t in row:
            if tok.dir0 <= t < tok.end_id:
                moves.append((u, t - tok.dir0))
                u = graph.step(u, t - tok.dir0)
                if u < 0:
                    break
        out.append(Traversal(int(origins[b]), int(dests[b]), row, status[b], moves, int(detours[b])))
    return out


def valid_trajectories(model, graph: StreetGraph, tok: WalkTokenizer, pairs: Tensor, *, max_len: int,
                       batch_size: int = 256) -> TraversalResult:
    """Share of greedy traversals for ``pairs`` (P, 2) that are legal throughout and end at the destination."""
    trav = traverse(model, graph, tok, pairs, max_len=max_len, batch_size=batch_size)
    return TraversalResult(sum(t.valid for t in trav) / max(len(trav), 1), trav)


def detour_robustness(model, graph: StreetGraph, tok: WalkTokenizer, pairs: Tensor, *, max_len: int,
                      prob: float = 0.75, seed: int = 0, batch_size: int = 256) -> TraversalResult:
    """Share of valid arrivals when each step away from the destination is, with probability ``prob``,
    replaced by a uniformly random legal move that can still reach the destination (see :func:`traverse`)."""
    g = torch.Generator().manual_seed(seed)
    trav = traverse(model, graph, tok, pairs, max_len=max_len, detour_prob=prob, generator=g, batch_size=batch_size)
    return TraversalResult(sum(t.valid for t in trav) / max(len(trav), 1), trav)


# ----------------------------------------------------------------------------- sequence compression


@dataclass(frozen=True)
class PrefixPair:
    """Two different walk prefixes towards ``dest`` that both stand at intersection ``node``."""

    dest: int
    node: int
    origin_a: int
    moves_a: tuple[int, ...]
    origin_b: int
    moves_b: tuple[int, ...]


def compression_pairs(graph: StreetGraph, n: int, *, seed: int, max_moves: int | None = None) -> list[PrefixPair]:
    """``n`` prefix pairs: two different origins whose canonical shortest routes to a random destination
    meet; both prefixes stop at a random shared intersection before the destination.

    Canonical routes to one destination form a tree, so from the meeting point on the two routes
    coincide: both prefixes are starts of ordinary shortest-path walks, equally in-distribution for
    shortest-path and random-walk training. ``max_moves`` bounds the prefix lengths.
    """
    rng = random.Random(seed)
    N = graph.num_nodes
    out: list[PrefixPair] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * (n + 10):
            raise ValueError(f"could not find {n} pairs of routes that meet before their destination "
                             f"(found {len(out)}; is the graph this small or this disconnected?)")
        dest, oa, ob = rng.randrange(N), rng.randrange(N), rng.randrange(N)
        if len({dest, oa, ob}) < 3:
            continue
        dist = graph.dist_to(dest)
        if dist[oa] < 0 or dist[ob] < 0:
            continue
        path_a, path_b = _route_nodes(graph, oa, dest), _route_nodes(graph, ob, dest)
        on_b = set(path_b[:-1])
        shared = [u for u in path_a[:-1] if u in on_b]  # the common tail, destination excluded
        if not shared:
            continue
        node = rng.choice(shared)
        ia, ib = path_a.index(node), path_b.index(node)
        if max_moves is not None and max(ia, ib) > max_moves:
            continue
        route_a, route_b = graph.shortest_path(oa, dest), graph.shortest_path(ob, dest)
        out.append(PrefixPair(dest, node, oa, tuple(route_a[:ia]), ob, tuple(route_b[:ib])))
    return out


def _route_nodes(graph: StreetGraph, origin: int, dest: int) -> list[int]:
    nodes = [origin]
    for k in graph.shortest_path(origin, dest):
        nodes.append(graph.step(nodes[-1], k))
    return nodes


def sequence_compression(model, graph: StreetGraph, tok: WalkTokenizer, pairs: list[PrefixPair], *,
                         max_len: int, suffixes: int = 30, threshold: float = 0.01, seed: int = 0,
                         batch_size: int = 512) -> float:
    """Share of prefix pairs the model treats as the same state.

    For each pair, ``suffixes`` continuations are sampled after prefix A (temperature 1, until
    ``end`` or ``<eos>``, at most ``max_len`` + 1 tokens minus the longer prefix's moves); the
    trial succeeds when every token of every suffix has probability > ``threshold`` after prefix B.
    Trials are batched (about ``batch_size`` rows at a time).
    """
    lm = as_walk_model(model)
    limit = getattr(lm, "max_seq_len", None)
    if limit is not None and max_len + 2 > limit:
        raise ValueError(f"max_len={max_len} moves need {max_len + 2} positions; the model holds max_seq_len={limit}")
    g = torch.Generator().manual_seed(seed)
    per_chunk = max(1, batch_size // suffixes)
    wins = 0
    with evaluating(lm):
        for c in range(0, len(pairs), per_chunk):
            chunk = pairs[c : c + per_chunk]
            prompts, budgets, others = [], [], []
            for p in chunk:
                budget = max_len + 1 - max(len(p.moves_a), len(p.moves_b))  # suffix tokens allowed
                if budget < 1:
                    raise ValueError(f"prefixes of {len(p.moves_a)} and {len(p.moves_b)} moves leave no room "
                                     f"within max_len={max_len}")
                a = tok.walk(p.origin_a, p.dest, list(p.moves_a), end=False)
                b = tok.walk(p.origin_b, p.dest, list(p.moves_b), end=False)
                prompts += [a] * suffixes
                budgets += [budget] * suffixes
                others += [b] * suffixes
            sampled = _sample(lm, tok, prompts, budgets, g)
            probs = _continuation_probs(lm, tok, others, sampled)
            ok = [bool((p > threshold).all()) for p in probs]
            wins += sum(all(ok[i : i + suffixes]) for i in range(0, len(ok), suffixes))
    return wins / max(len(pairs), 1)


def _sample(lm, tok: WalkTokenizer, prompts: list[list[int]], budgets: list[int],
            g: torch.Generator) -> list[list[int]]:
    """Sample a continuation of every prompt (temperature 1), up to ``budgets[r]`` tokens, stopping at ``end``/``<eos>``.

    Prompts may differ in length: every row advances one token per step from the shortest prompt's
    length on, and a row still inside its prompt is fed its next prompt token instead of a sample.
    """
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts])
    P0 = int(lens.min())
    width = int((lens + torch.tensor(budgets)).max())
    forced = torch.full((B, width), tok.eos_id, dtype=torch.long)
    for r, p in enumerate(prompts):
        forced[r, : len(p)] = torch.tensor(p)
    budget = torch.tensor(budgets)
    logits = lm.start(forced[:, :P0])  # (B, V)
    out = torch.full((B, width), -1, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    for t in range(P0, width):
        sample = SAMPLE.choose(logits.double(), g)  # (B,)
        inside = t < lens
        live = ~inside & ~done & (t - lens < budget)
        nxt = torch.where(inside, forced[:, t], sample)
        out[:, t] = torch.where(live, sample, torch.full_like(sample, -1))
        done |= live & ((sample == tok.end_id) | (sample == tok.eos_id))
        done |= ~inside & (t + 1 - lens >= budget)
        if bool(done.all()) or t == width - 1:
            break
        logits = lm.step(nxt)
    return [row[row >= 0].tolist() for row in out]


def _continuation_probs(lm, tok: WalkTokenizer, prefixes: list[list[int]], suffixes: list[list[int]],
                        batch_size: int = 64) -> list[Tensor]:
    """Probability of each suffix token after its prefix, teacher-forced: one (len(suffix),) tensor per row."""
    out: list[Tensor] = []
    for s in range(0, len(prefixes), batch_size):
        pre, suf = prefixes[s : s + batch_size], suffixes[s : s + batch_size]
        T = max(len(a) + len(b) for a, b in zip(pre, suf)) - 1
        ids = torch.full((len(pre), T), tok.eos_id, dtype=torch.long)
        for r, (a, b) in enumerate(zip(pre, suf)):
            row = (a + b)[:T]
            ids[r, : len(row)] = torch.tensor(row)
        logp = torch.log_softmax(lm.score(ids).double(), -1)  # (b, T, V)
        for r, (a, b) in enumerate(zip(pre, suf)):
            pos = torch.arange(len(a) - 1, len(a) - 1 + len(b))  # position len(a) - 1 + j predicts b[j]
            out.append(logp[r, pos, torch.tensor(b, dtype=torch.long)].exp())
    return out


# ----------------------------------------------------------------------------- effective rank


def effective_rank(h: Tensor) -> float:
    """exp(Shannon entropy) of the singular values of ``h`` (M, D) normalised to sum 1 (Roy & Vetterli 2007).

    Singular values below the rounding noise of ``h``'s dtype (``torch.linalg.matrix_rank``'s default
    tolerance: max(M, D) * eps * largest) count as zero, so a rank-k matrix scores at most k.
    """
    if h.dim() != 2 or h.numel() == 0:
        raise ValueError(f"effective_rank needs a non-empty (M, D) matrix, got shape {tuple(h.shape)}")
    eps = torch.finfo(h.dtype).eps if h.dtype.is_floating_point else torch.finfo(torch.float64).eps
    s = torch.linalg.svdvals(h.double())
    if float(s.max()) <= 0:
        return 0.0
    s = s[s > max(h.shape) * eps * s.max()]
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def hidden_effective_rank(model, ids: Tensor, doc_ids: Tensor | None = None, *, batch_size: int = 16) -> float:
    """Effective rank of the final hidden states of (B, T) sequences, all positions but padding (doc id -1)."""
    lm = as_walk_model(model)
    states = []
    with evaluating(lm):
        for s in range(0, ids.shape[0], batch_size):
            doc = None if doc_ids is None else doc_ids[s : s + batch_size]
            h = lm.hidden(ids[s : s + batch_size], doc)  # (b, T, D)
            states.append(h[doc >= 0] if doc is not None else h.flatten(0, 1))
    return effective_rank(torch.cat(states))


# ----------------------------------------------------------------------------- map reconstruction


@dataclass
class MapResult:
    """Street segments implied by a model's traversals."""

    true_edges: set[tuple[int, int]]  # (node, direction) moves that exist in the graph
    invented: set[tuple[int, int]]  # (node, direction) moves along streets that do not exist

    @property
    def precision(self) -> float:
        n = len(self.true_edges) + len(self.invented)
        return len(self.true_edges) / n if n else 1.0


def map_reconstruction(graph: StreetGraph, traversals: Iterable[Traversal]) -> MapResult:
    """Classify every (node, direction) move the traversals made as a true street or an invented one.

    A traversal is followed up to its first illegal token; an illegal direction there is an invented
    street (after it the model's position is unknown, so nothing later is used).
    """
    true_edges, invented = set(), set()
    for t in traversals:
        for u, k in t.moves:
            (true_edges if graph.step(u, k) >= 0 else invented).add((u, k))
    return MapResult(true_edges, invented)


def draw_map(graph: StreetGraph, moves: MapResult | Iterable[tuple[int, int]], path: str | Path, *,
             title: str = "") -> Path:
    """Draw the true graph (left) and the model-implied streets over it (right) to a PNG.

    Left: two-way streets in grey, one-way streets in blue. Right: the true graph in light grey,
    true streets the model used in green, invented streets as red stubs leaving their node in the
    claimed compass direction.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    result = moves if isinstance(moves, MapResult) else map_reconstruction_from_moves(graph, moves)
    pos = graph.positions().float()  # (N, 2)
    edges = graph.edges()
    segs = [(pos[u].tolist(), pos[v].tolist()) for u, _, v in edges]
    lengths = [float((pos[v] - pos[u]).norm()) for u, _, v in edges if u != v]
    stub = 0.6 * (sorted(lengths)[len(lengths) // 2] if lengths else 1.0)
    used = [(pos[u].tolist(), pos[graph.step(u, k)].tolist()) for u, k in sorted(result.true_edges)]
    fake = [(pos[u].tolist(), (pos[u] + stub * torch.tensor(UNIT[DIRECTIONS[k]])).tolist())
            for u, k in sorted(result.invented)]
    pairs = {(u, v) for u, _, v in edges}
    one_way = [(u, v) not in pairs or (v, u) not in pairs for u, _, v in edges]
    span = (pos.max(0).values - pos.min(0).values).clamp(min=1e-6)
    panel_w = min(12.0, max(3.0, 7.0 * float(span[0] / span[1])))
    fig = Figure(figsize=(2 * panel_w + 0.5, 7.5), dpi=120)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharex=True, sharey=True)
    left.add_collection(LineCollection(segs, colors=["tab:blue" if w else "0.3" for w in one_way],
                                       linewidths=0.6))
    left.set_title(f"true graph: {graph.num_nodes} nodes, {len(edges)} edges (one-way: blue)", fontsize=9)
    right.add_collection(LineCollection(segs, colors="0.85", linewidths=0.5))
    right.add_collection(LineCollection(used, colors="tab:green", linewidths=0.9))
    right.add_collection(LineCollection(fake, colors="tab:red", linewidths=1.2))
    right.set_title(f"model: {len(result.true_edges)} true (green), {len(result.invented)} invented (red)",
                    fontsize=9)
    for ax in (left, right):
        ax.autoscale()
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else (0, 0, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def map_reconstruction_from_moves(graph: StreetGraph, moves: Iterable[tuple[int, int]]) -> MapResult:
    """:class:`MapResult` of raw (node, direction index) moves."""
    true_edges, invented = set(), set()
    for u, k in moves:
        (true_edges if graph.step(u, k) >= 0 else invented).add((int(u), int(k)))
    return MapResult(true_edges, invented)
