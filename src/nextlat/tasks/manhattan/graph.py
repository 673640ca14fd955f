"""Street graphs, walks and their tokens for the Manhattan world-model experiment.

The world of Vafa et al. (arXiv 2406.03689) is a directed street graph: intersections joined by
one-way or two-way street segments, each move labelled with one of eight compass directions. A
traversal is written ``origin destination dir dir ... end``; the graph is a deterministic finite
automaton whose state is the current intersection (and the destination).

Graph files are JSON::

    {"directions": ["E", "N", "NE", "NW", "S", "SE", "SW", "W"],   # optional, a subset of the 8
     "num_nodes": 4579,                                             # optional, checked when given
     "edges": [[node_id, "DIR", node_id], ...],                     # required
     "coords": {"node_id": [x, y], ...},                            # optional, for drawing
     "source": "..."}                                               # optional, free text

Node ids are arbitrary integers (OpenStreetMap ids in the real graph); they are mapped to dense
indices 0..N-1 in sorted order. A node may have at most one edge per direction. Self-loops, dead
ends and graphs that are not strongly connected are accepted (the real Manhattan graph has all
three): shortest paths and detours only use pairs from which the destination can be reached.
Other top-level keys are ignored.

Shortest paths are unweighted (fewest moves). Among several shortest routes the *canonical* one
takes, at every intersection, the first direction in :data:`DIRECTIONS` order that brings the walk
one move closer; all canonical routes to one destination therefore form a tree, so two routes
that meet continue together (the sequence-compression test relies on this).
"""

from __future__ import annotations

import json
import math
import random
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from nextlat.config import ConfigError
from nextlat.tasks.vocab import WordTokenizer

DIRECTIONS: tuple[str, ...] = ("E", "N", "NE", "NW", "S", "SE", "SW", "W")
"""The eight compass directions; their order fixes direction indices and the canonical shortest paths."""
DIR_INDEX: dict[str, int] = {d: i for i, d in enumerate(DIRECTIONS)}
_S = 1 / math.sqrt(2)
UNIT: dict[str, tuple[float, float]] = {
    "E": (1.0, 0.0), "N": (0.0, 1.0), "NE": (_S, _S), "NW": (-_S, _S),
    "S": (0.0, -1.0), "SE": (_S, -_S), "SW": (-_S, -_S), "W": (-1.0, 0.0),
}
"""Unit vector (x east, y north) of each direction, used to lay out graphs without coordinates."""
OPPOSITE: dict[str, str] = {"E": "W", "W": "E", "N": "S", "S": "N", "NE": "SW", "SW": "NE", "NW": "SE", "SE": "NW"}

Edge = tuple[int, str, int]  # (node id, direction, node id)


class GraphError(ConfigError):
    """A street-graph file or edge list is malformed; the message names the file and the bad value."""


# ----------------------------------------------------------------------------- the graph


class StreetGraph:
    """A directed street graph with at most one edge per (node, direction).

    Attributes: ``ids`` (sorted original node ids; dense index i <-> ``ids[i]``), ``index`` (id ->
    dense index), ``succ`` ((N, 8) int64 tensor: ``succ[u, k]`` is the node reached from u by
    direction k, -1 where there is no such street).
    """

    CACHE_SIZE = 8192  # destinations whose distance / next-move tables are kept

    def __init__(self, edges: Iterable[Edge], *, coords: dict[int, tuple[float, float]] | None = None,
                 source: str = ""):
        edges = list(edges)
        if not edges:
            raise GraphError("a street graph needs at least one edge")
        self.source = source
        self.ids: list[int] = sorted({u for u, _, _ in edges} | {v for _, _, v in edges})
        self.index: dict[int, int] = {n: i for i, n in enumerate(self.ids)}
        N = len(self.ids)
        succ = [[-1] * len(DIRECTIONS) for _ in range(N)]
        for u, d, v in edges:
            if d not in DIR_INDEX:
                raise GraphError(f"edge {[u, d, v]}: unknown direction {d!r} (known: {', '.join(DIRECTIONS)})")
            ui, k, vi = self.index[u], DIR_INDEX[d], self.index[v]
            if succ[ui][k] >= 0 and succ[ui][k] != vi:
                raise GraphError(f"node {u} has two {d!r} edges: to {self.ids[succ[ui][k]]} and to {v}")
            succ[ui][k] = vi
        self.succ = torch.tensor(succ, dtype=torch.long)  # (N, 8)
        self._out: list[list[int]] = [[v for v in row if v >= 0] for row in succ]  # successors per node
        self._pred: list[list[int]] = [[] for _ in range(N)]
        for u, row in enumerate(self._out):
            for v in row:
                self._pred[v].append(u)
        self._coords: Tensor | None = None
        if coords is not None:
            missing = [n for n in self.ids if n not in coords]
            if missing:
                raise GraphError(f"coords: node {missing[0]} has no coordinates ({len(missing)} nodes lack them)")
            self._coords = torch.tensor([list(coords[n]) for n in self.ids], dtype=torch.float64)  # (N, 2)
        self._layout: Tensor | None = None
        self._tables: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()

    # ------------------------------------------------------------------ size and moves

    @property
    def num_nodes(self) -> int:
        return len(self.ids)

    @property
    def num_edges(self) -> int:
        return int((self.succ >= 0).sum())

    def edges(self) -> list[tuple[int, int, int]]:
        """Every edge as dense (u, direction index, v), sorted by u then direction."""
        return [(u, k, v) for u, row in enumerate(self.succ.tolist()) for k, v in enumerate(row) if v >= 0]

    def moves(self, u: int) -> dict[str, int]:
        """Legal moves from dense node ``u``: direction name -> dense node reached."""
        return {DIRECTIONS[k]: v for k, v in enumerate(self.succ[u].tolist()) if v >= 0}

    def step(self, u: int, k: int) -> int:
        """Dense node reached from ``u`` by direction index ``k``, or -1 when there is no such street."""
        return int(self.succ[u, k])

    # ------------------------------------------------------------------ distances

    def _bfs(self, start: int, adj: list[list[int]]) -> list[int]:
        dist = [-1] * self.num_nodes
        dist[start] = 0
        queue = [start]
        for u in queue:  # the list grows while it is read: a FIFO without pops
            du = dist[u] + 1
            for v in adj[u]:
                if dist[v] < 0:
                    dist[v] = du
                    queue.append(v)
        return dist

    def dist_from(self, origin: int) -> Tensor:
        """Moves needed from ``origin`` to every node: (N,) int32, -1 where unreachable."""
        self._check_node(origin)
        return torch.tensor(self._bfs(origin, self._out), dtype=torch.int32)

    def _table(self, dest: int) -> tuple[Tensor, Tensor]:
        """Distances to ``dest`` (N,) int32 (-1: cannot reach it) and canonical next moves (N,) int8 (-1: none)."""
        hit = self._tables.get(dest)
        if hit is None:
            self._check_node(dest)
            return self._fill_tables([dest])[dest]
        self._tables.move_to_end(dest)
        return hit

    def _fill_tables(self, dests: list[int], chunk: int = 256) -> dict[int, tuple[Tensor, Tensor]]:
        """Compute (and cache) the tables of ``dests``: one Python BFS each on the reversed graph, the rest batched."""
        out: dict[int, tuple[Tensor, Tensor]] = {}
        succ0 = self.succ.clamp(min=0)  # (N, 8)
        has = self.succ >= 0
        for s in range(0, len(dests), chunk):
            part = dests[s : s + chunk]
            flat = array("i")
            for d in part:
                flat.extend(self._bfs(d, self._pred))
            dist = torch.frombuffer(flat, dtype=torch.int32).view(len(part), self.num_nodes).clone()  # (K, N)
            after = dist[:, succ0]  # (K, N, 8) distance after each move
            closer = has & (dist[..., None] > 0) & (after == dist[..., None] - 1)
            first = closer.to(torch.int8).argmax(-1)  # first direction in DIRECTIONS order that gets closer
            nxt = torch.where(closer.any(-1), first, torch.full_like(first, -1)).to(torch.int8)  # (K, N)
            for i, d in enumerate(part):
                out[d] = self._tables[d] = (dist[i], nxt[i])
                if len(self._tables) > self.CACHE_SIZE:
                    self._tables.popitem(last=False)
        return out

    def dist_to(self, dest: int) -> Tensor:
        """Moves needed from every node to ``dest``: (N,) int32, -1 where ``dest`` cannot be reached (cached)."""
        return self._table(dest)[0]

    def next_move_to(self, dest: int) -> Tensor:
        """Canonical first move of a shortest route to ``dest`` from every node: (N,) int8, -1 at ``dest``/unreachable."""
        return self._table(dest)[1]

    def dest_tables(self, dests: Tensor) -> tuple[Tensor, Tensor]:
        """Stacked :meth:`dist_to` and :meth:`next_move_to` of ``dests`` (K,): (K, N) int32 and (K, N) int8."""
        dests_list = dests.tolist()
        missing = sorted({d for d in dests_list if d not in self._tables})
        for d in missing:
            self._check_node(d)
        fresh = self._fill_tables(missing)
        tables = [fresh[d] if d in fresh else self._table(d) for d in dests_list]
        if not tables:
            return torch.empty(0, self.num_nodes, dtype=torch.int32), torch.empty(0, self.num_nodes, dtype=torch.int8)
        return torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables])

    def distance(self, origin: int, dest: int) -> int:
        """Fewest moves from ``origin`` to ``dest``; -1 when unreachable."""
        self._check_node(origin)
        return int(self.dist_to(dest)[origin])

    def reachable(self, origin: int, dest: int) -> bool:
        return self.distance(origin, dest) >= 0

    def shortest_path(self, origin: int, dest: int) -> list[int] | None:
        """Direction indices of the canonical shortest route, or None when ``dest`` is unreachable."""
        dist = self.distance(origin, dest)
        if dist < 0:
            return None
        nxt = self.next_move_to(dest)
        moves, u = [], origin
        while u != dest:
            k = int(nxt[u])
            moves.append(k)
            u = int(self.succ[u, k])
        assert len(moves) == dist
        return moves

    def _check_node(self, u: int) -> None:
        if not 0 <= u < self.num_nodes:
            raise ValueError(f"node index {u} is outside the graph's {self.num_nodes} nodes")

    # ------------------------------------------------------------------ structure

    def strongly_connected_components(self) -> list[list[int]]:
        """Strongly connected components (lists of dense nodes), largest first (iterative Kosaraju)."""
        N = self.num_nodes
        seen = [False] * N
        order: list[int] = []
        for s in range(N):
            if seen[s]:
                continue
            seen[s] = True
            stack = [(s, iter(self._out[s]))]
            while stack:
                u, it = stack[-1]
                for v in it:
                    if not seen[v]:
                        seen[v] = True
                        stack.append((v, iter(self._out[v])))
                        break
                else:
                    stack.pop()
                    order.append(u)  # finished: post-order
        comp = [-1] * N
        comps: list[list[int]] = []
        for s in reversed(order):
            if comp[s] >= 0:
                continue
            comp[s] = len(comps)
            members, stack = [], [s]
            while stack:
                u = stack.pop()
                members.append(u)
                for v in self._pred[u]:
                    if comp[v] < 0:
                        comp[v] = comp[s]
                        stack.append(v)
            comps.append(sorted(members))
        return sorted(comps, key=len, reverse=True)

    def is_strongly_connected(self) -> bool:
        return len(self.strongly_connected_components()) == 1

    def subgraph(self, nodes: Iterable[int]) -> StreetGraph:
        """The graph induced by dense ``nodes`` (original ids and coordinates kept)."""
        keep = set(nodes)
        edges = [(self.ids[u], DIRECTIONS[k], self.ids[v]) for u, k, v in self.edges() if u in keep and v in keep]
        coords = None
        if self._coords is not None:
            coords = {self.ids[u]: tuple(self._coords[u].tolist()) for u in keep}
        return StreetGraph(edges, coords=coords, source=self.source)

    # ------------------------------------------------------------------ layout

    def positions(self) -> Tensor:
        """(N, 2) float64 drawing positions: the file's ``coords`` when given, else a least-squares layout.

        Without coordinates each edge asks for ``pos[v] - pos[u]`` to equal its direction's unit
        vector; the positions minimising the squared mismatch solve a graph-Laplacian system, which
        conjugate gradients solves in a few hundred sparse passes. Weakly connected pieces are each
        centred at the origin.
        """
        if self._coords is not None:
            return self._coords
        if self._layout is None:
            self._layout = self._least_squares_layout()
        return self._layout

    def _least_squares_layout(self, max_iter: int = 2000, tol: float = 1e-9) -> Tensor:
        src, dirs, dst = (torch.tensor(c, dtype=torch.long) for c in zip(*self.edges()))
        unit = torch.tensor([UNIT[d] for d in DIRECTIONS], dtype=torch.float64)[dirs]  # (E, 2)
        N = self.num_nodes

        def laplacian(p: Tensor) -> Tensor:  # (N, 2) -> (N, 2)
            diff = p[dst] - p[src]
            return torch.zeros_like(p).index_add_(0, dst, diff).index_add_(0, src, -diff)

        b = torch.zeros(N, 2, dtype=torch.float64).index_add_(0, dst, unit).index_add_(0, src, -unit)
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rs = (r * r).sum(0)  # (2,): x and y are two independent systems
        stop = tol * max(float((b * b).sum()), 1e-30)
        for _ in range(max_iter):
            if float(rs.sum()) <= stop:
                break
            Ap = laplacian(p)
            alpha = rs / (p * Ap).sum(0).clamp(min=1e-30)
            x += alpha * p
            r -= alpha * Ap
            rs_new = (r * r).sum(0)
            p = r + (rs_new / rs.clamp(min=1e-30)) * p
            rs = rs_new
        return x

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        out: dict = {"source": self.source, "directions": list(DIRECTIONS), "num_nodes": self.num_nodes,
                     "edges": [[self.ids[u], DIRECTIONS[k], self.ids[v]] for u, k, v in self.edges()]}
        if self._coords is not None:
            out["coords"] = {str(n): xy for n, xy in zip(self.ids, self._coords.tolist())}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> StreetGraph:
        """Read and validate a graph file (format in the module docstring); errors name the file and the bad value."""
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GraphError(f"street graph file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GraphError(f"cannot read street graph file {str(path)!r}: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GraphError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_json(cls, text: str, where: str = "graph") -> StreetGraph:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GraphError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(data, where=where)

    @classmethod
    def from_dict(cls, data, where: str = "graph") -> StreetGraph:
        """Validate a decoded graph file; ``where`` (e.g. the file name) prefixes every error."""
        if not isinstance(data, dict):
            raise GraphError(f"{where}: expected a JSON object with an 'edges' list, got {type(data).__name__}")
        if "edges" not in data:
            raise GraphError(f"{where}: missing key 'edges' (found keys: {', '.join(map(str, data)) or 'none'})")
        allowed = _check_directions(data.get("directions", list(DIRECTIONS)), where)
        raw = data["edges"]
        if not isinstance(raw, list) or not raw:
            raise GraphError(f"{where}: 'edges' must be a non-empty list of [node, direction, node], got {_short(raw)}")
        edges: list[Edge] = []
        first: dict[tuple[int, str], tuple[int, int]] = {}  # (node, direction) -> (target, edge number)
        for i, e in enumerate(raw):
            if not isinstance(e, (list, tuple)) or len(e) != 3:
                raise GraphError(f"{where}: edges[{i}]={_short(e)} is not a triple [node, direction, node]")
            u, d, v = e
            for j, n in ((0, u), (2, v)):
                if not isinstance(n, int) or isinstance(n, bool):
                    raise GraphError(f"{where}: edges[{i}][{j}]={n!r}: node ids must be integers")
            if not isinstance(d, str) or d not in allowed:
                known = ", ".join(sorted(allowed, key=DIR_INDEX.get))
                raise GraphError(f"{where}: edges[{i}]={_short(e)}: unknown direction {d!r} (known: {known})")
            seen = first.get((u, d))
            if seen is not None:
                if seen[0] != v:
                    raise GraphError(f"{where}: node {u} has two {d!r} edges: to {seen[0]} (edges[{seen[1]}]) "
                                     f"and to {v} (edges[{i}])")
                continue  # an exact repeat says nothing new
            first[(u, d)] = (v, i)
            edges.append((u, d, v))
        nodes = {u for u, _, _ in edges} | {v for _, _, v in edges}
        if "num_nodes" in data:
            n = data["num_nodes"]
            if not isinstance(n, int) or isinstance(n, bool):
                raise GraphError(f"{where}: num_nodes={n!r} must be an integer")
            if n != len(nodes):
                raise GraphError(f"{where}: num_nodes={n} but the edges mention {len(nodes)} distinct nodes "
                                 "(every node must have at least one edge)")
        coords = _check_coords(data["coords"], nodes, where) if "coords" in data else None
        source = data.get("source", "")
        return cls(edges, coords=coords, source=source if isinstance(source, str) else str(source))


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_directions(dirs, where: str) -> set[str]:
    if not isinstance(dirs, list) or not dirs:
        raise GraphError(f"{where}: 'directions' must be a non-empty list of direction names, got {_short(dirs)}")
    for d in dirs:
        if d not in DIR_INDEX:
            raise GraphError(f"{where}: directions: unknown direction {d!r} (known: {', '.join(DIRECTIONS)})")
    return set(dirs)


def _check_coords(raw, nodes: set[int], where: str) -> dict[int, tuple[float, float]]:
    if not isinstance(raw, dict):
        raise GraphError(f"{where}: 'coords' must map node ids to [x, y], got {_short(raw)}")
    out: dict[int, tuple[float, float]] = {}
    for key, xy in raw.items():
        try:
            n = int(key)
        except (TypeError, ValueError):
            raise GraphError(f"{where}: coords key {key!r} is not a node id") from None
        if n not in nodes:
            raise GraphError(f"{where}: coords lists node {n}, which has no edges")
        if (not isinstance(xy, (list, tuple)) or len(xy) != 2
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in xy)):
            raise GraphError(f"{where}: coords[{key!r}]={_short(xy)} must be [x, y] (two finite numbers)")
        out[n] = (float(xy[0]), float(xy[1]))
    missing = sorted(nodes - set(out))
    if missing:
        raise GraphError(f"{where}: coords: node {missing[0]} has no coordinates ({len(missing)} nodes lack them)")
    return out


# ----------------------------------------------------------------------------- procedural city


def procedural_city(width: int = 12, height: int = 12, seed: int = 0, one_way_frac: float = 0.3,
                    missing_frac: float = 0.1, diagonals: int = 1) -> StreetGraph:
    """A small grid city: E-W streets, N-S avenues and ``diagonals`` NE-SW boulevards.

    Intersection (x, y) has id ``y * width + x`` and coordinates (x, y). Each street, avenue and
    boulevard is one-way (a random direction) with probability ``one_way_frac``; each block-long
    segment is missing (both ways) with probability ``missing_frac``. The largest strongly
    connected component is kept, so every intersection can reach every other one.
    """
    for name, value, low in (("width", width, 2), ("height", height, 2), ("diagonals", diagonals, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"procedural_city: {name}={value!r} must be an integer >= {low}")
    for name, value in (("one_way_frac", one_way_frac), ("missing_frac", missing_frac)):
        if not 0 <= value < 1:
            raise ValueError(f"procedural_city: {name}={value!r} must be in [0, 1)")
    rng = random.Random(seed)
    node = lambda x, y: y * width + x  # noqa: E731
    edges: list[Edge] = []

    def add_line(points: list[tuple[int, int]], forward: str) -> None:
        """A street through ``points`` in order; ``forward`` names the direction from one point to the next."""
        mode = "both" if rng.random() >= one_way_frac else rng.choice(("forward", "backward"))
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if rng.random() < missing_frac:
                continue
            a, b = node(x0, y0), node(x1, y1)
            if mode in ("both", "forward"):
                edges.append((a, forward, b))
            if mode in ("both", "backward"):
                edges.append((b, OPPOSITE[forward], a))

    for y in range(height):
        add_line([(x, y) for x in range(width)], "E")
    for x in range(width):
        add_line([(x, y) for y in range(height)], "N")
    for _ in range(diagonals):
        x0 = rng.randrange(-(height // 2), width - 1)  # may start on the west edge, lower down
        start = (x0, 0) if x0 >= 0 else (0, -x0)
        points = [start]
        while points[-1][0] + 1 < width and points[-1][1] + 1 < height:
            points.append((points[-1][0] + 1, points[-1][1] + 1))
        if len(points) > 1:
            add_line(points, "NE")
    if not edges:
        raise ValueError(f"procedural_city: missing_frac={missing_frac} removed every street")
    coords = {node(x, y): (float(x), float(y)) for y in range(height) for x in range(width)}
    used = {u for u, _, _ in edges} | {v for _, _, v in edges}
    grid = StreetGraph(edges, coords={n: coords[n] for n in used},
                       source=f"procedural_city(width={width}, height={height}, seed={seed}, "
                              f"one_way_frac={one_way_frac}, missing_frac={missing_frac}, diagonals={diagonals})")
    largest = grid.strongly_connected_components()[0]
    if len(largest) < 2:
        raise ValueError(f"procedural_city: no two intersections are mutually reachable (seed={seed}); "
                         "lower one_way_frac or missing_frac")
    return grid if len(largest) == grid.num_nodes else grid.subgraph(largest)


# ----------------------------------------------------------------------------- held-out pairs


class HeldOutPairs:
    """A seeded pseudo-random ``frac`` of all (origin, destination) pairs, decided by hashing the pair.

    No list of pairs is stored: ``held_out(o, d)`` is a pure function of (o, d, seed), vectorised
    over tensors, so it works for graphs of any size. With ``ids`` (dense index -> original node id,
    e.g. ``graph.ids``) the hash sees original ids, so the held-out set of a pair does not depend on
    which other nodes the graph holds. Held-out pairs never appear in training and serve
    out-of-distribution evaluation.
    """

    _P = 2_147_483_647  # 2^31 - 1: every product below stays far inside int64
    _MULT = (48271, 69621, 16807, 39373)

    def __init__(self, frac: float, seed: int = 0, ids: list[int] | None = None):
        if not 0 <= frac <= 1:
            raise ValueError(f"held-out fraction {frac!r} must be in [0, 1]")
        self.frac, self.seed = frac, seed
        self._ids = None if ids is None else torch.tensor(ids, dtype=torch.long)
        self._salt = [(seed * 7919 + 104729 * (i + 1)) % self._P for i in range(len(self._MULT))]

    def score(self, origins: Tensor, dests: Tensor) -> Tensor:
        """Pseudo-uniform value in [0, 1) per pair: (...) int -> (...) float64."""
        P = self._P
        if self._ids is not None:
            origins, dests = self._ids[origins.long()], self._ids[dests.long()]
        x = (origins.long() % P * 1_000_003 + dests.long() % P) % P
        for mult, salt in zip(self._MULT, self._salt):
            x = (x * mult + salt) % P
            x = x ^ (x >> 13)
        return x.double() / P

    def __call__(self, origins: Tensor, dests: Tensor) -> Tensor:
        """(...) bool: which pairs are held out."""
        return self.score(origins, dests) < self.frac

    def contains(self, origin: int, dest: int) -> bool:
        return bool(self(torch.tensor(origin), torch.tensor(dest)))


PairFilter = Callable[[Tensor, Tensor], Tensor]  # (origins (M,), dests (M,)) -> (M,) bool: keep the pair


# ----------------------------------------------------------------------------- walks


@dataclass
class Walks:
    """Traversals as flat tensors: walk i goes from ``origins[i]`` to ``dests[i]`` by ``moves[offsets[i]:offsets[i+1]]``."""

    origins: Tensor  # (M,) int64 dense nodes
    dests: Tensor  # (M,) int64
    moves: Tensor  # (sum of lengths,) int8 direction indices, walks concatenated
    offsets: Tensor  # (M + 1,) int64

    def __len__(self) -> int:
        return self.origins.shape[0]

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]  # (M,)

    def moves_of(self, i: int) -> list[int]:
        return self.moves[int(self.offsets[i]) : int(self.offsets[i + 1])].tolist()

    def select(self, idx: Tensor) -> Walks:
        """The walks ``idx`` (1-D int64) in that order."""
        lengths = self.lengths[idx]
        starts = self.offsets[:-1][idx]
        walk = torch.repeat_interleave(torch.arange(len(idx)), lengths)
        new_offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        pos = starts[walk] + torch.arange(int(lengths.sum())) - new_offsets[:-1][walk]
        return Walks(self.origins[idx], self.dests[idx], self.moves[pos], new_offsets)

    def __getitem__(self, item: slice) -> Walks:
        return self.select(torch.arange(len(self))[item])

    @staticmethod
    def from_padded(origins: Tensor, dests: Tensor, padded: Tensor, lengths: Tensor) -> Walks:
        """From (M, L) move matrices whose row i holds ``lengths[i]`` valid moves."""
        mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.long().cumsum(0)])
        return Walks(origins.long(), dests.long(), padded[mask].to(torch.int8), offsets)

    @staticmethod
    def empty() -> Walks:
        none = torch.empty(0, dtype=torch.long)
        return Walks(none, none.clone(), torch.empty(0, dtype=torch.int8), torch.zeros(1, dtype=torch.long))

    @staticmethod
    def cat(parts: list[Walks]) -> Walks:
        if not parts:
            return Walks.empty()
        offsets = [torch.zeros(1, dtype=torch.long)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return Walks(torch.cat([p.origins for p in parts]), torch.cat([p.dests for p in parts]),
                     torch.cat([p.moves for p in parts]), torch.cat(offsets))


def sample_pairs(graph: StreetGraph, n: int, *, seed: int, keep: PairFilter | None = None, min_dist: int = 1,
                 max_dist: int | None = None) -> Tensor:
    """``n`` random (origin, destination) pairs (n, 2), drawn uniformly with replacement among the pairs
    that ``keep`` accepts and whose shortest route has ``min_dist``..``max_dist`` moves (origin != destination)."""
    if n < 0:
        raise ValueError(f"cannot sample n={n} pairs")
    g = torch.Generator().manual_seed(seed)
    N = graph.num_nodes
    out: list[Tensor] = []
    have, drawn = 0, 0
    while have < n:
        m = max(64, 2 * (n - have))
        o = torch.randint(0, N, (m,), generator=g)
        d = torch.randint(0, N, (m,), generator=g)
        drawn += m
        ok = o != d
        if keep is not None:
            ok &= keep(o, d)
        o, d = o[ok], d[ok]
        if len(o):
            uniq, inv = torch.unique(d, return_inverse=True)
            dist, _ = graph.dest_tables(uniq)
            dd = dist[inv, o]  # (m',)
            ok = dd >= max(min_dist, 1)
            if max_dist is not None:
                ok &= dd <= max_dist
            found = torch.stack([o[ok], d[ok]], 1)
            out.append(found[: n - have])
            have += min(len(found), n - have)
        if drawn > 1000 * (n + 64) and have < n:
            raise ValueError(f"could not find {n} origin/destination pairs with {min_dist}..{max_dist} moves "
                             f"among the allowed pairs of this {N}-node graph (found {have})")
    return torch.cat(out) if out else torch.empty(0, 2, dtype=torch.long)


def shortest_walks(graph: StreetGraph, pairs: Tensor, chunk: int = 100_000) -> Walks:
    """Canonical shortest routes for (M, 2) reachable (origin, destination) pairs, all walked in lockstep."""
    parts = []
    for part in pairs.split(chunk) if len(pairs) else ():
        o, d = part[:, 0], part[:, 1]
        uniq, inv = torch.unique(d, return_inverse=True)
        dist, nxt = graph.dest_tables(uniq)  # (K, N)
        lengths = dist[inv, o].long()  # (m,)
        if bool((lengths < 0).any()):
            bad = int(torch.nonzero(lengths < 0)[0])
            raise ValueError(f"pair ({int(o[bad])}, {int(d[bad])}): the destination cannot be reached from the origin")
        L = int(lengths.max()) if len(lengths) else 0
        padded = torch.zeros(len(part), L, dtype=torch.int8)
        cur = o.clone()
        for j in range(L):
            active = lengths > j
            k = nxt[inv, cur].long()  # (m,) next canonical direction (-1 once arrived)
            padded[:, j] = torch.where(active, k, torch.zeros_like(k)).to(torch.int8)
            cur = torch.where(active, graph.succ[cur, k.clamp(min=0)], cur)
        assert bool((cur == d).all())
        parts.append(Walks.from_padded(o, d, padded, lengths))
    return Walks.cat(parts)


def random_walks(graph: StreetGraph, n: int, *, seed: int, max_moves: int, keep: PairFilter | None = None) -> Walks:
    """``n`` random walks: from a uniformly random origin, take uniformly random legal moves.

    Each walk draws its length uniformly from 1..``max_moves`` and stops early only at a dead end
    (a node without outgoing streets). Its destination is where it stops. Walks that end at their
    origin, or whose (origin, destination) pair ``keep`` rejects, are discarded and redrawn.
    """
    if max_moves < 1:
        raise ValueError(f"random walks need max_moves >= 1, got {max_moves}")
    g = torch.Generator().manual_seed(seed)
    N = graph.num_nodes
    legal = graph.succ >= 0  # (N, 8)
    deg = legal.sum(1)  # (N,)
    # Row u lists u's legal direction indices first, so the r-th legal move is legal_dirs[u, r].
    legal_dirs = torch.sort(torch.where(legal, torch.arange(8), torch.full_like(graph.succ, 8)), dim=1).values
    parts: list[Walks] = []
    have, drawn = 0, 0
    while have < n:
        m = max(256, 2 * (n - have))
        drawn += m
        o = torch.randint(0, N, (m,), generator=g)
        target = torch.randint(1, max_moves + 1, (m,), generator=g)
        padded = torch.zeros(m, max_moves, dtype=torch.int8)
        lengths = torch.zeros(m, dtype=torch.long)
        cur = o.clone()
        for j in range(max_moves):
            active = (target > j) & (deg[cur] > 0)
            r = (torch.rand(m, generator=g) * deg[cur]).long().clamp(max=7)
            k = legal_dirs[cur, r].clamp(max=7)
            padded[:, j] = torch.where(active, k, torch.zeros_like(k)).to(torch.int8)
            cur = torch.where(active, graph.succ[cur, k], cur)
            lengths += active.long()
        ok = (cur != o) & (lengths > 0)
        if keep is not None:
            ok &= keep(o, cur)
        idx = torch.nonzero(ok).flatten()[: n - have]
        if len(idx):
            parts.append(Walks.from_padded(o[idx], cur[idx], padded[idx], lengths[idx]))
            have += len(idx)
        if drawn > 1000 * (n + 256) and have < n:
            raise ValueError(f"could not draw {n} random walks whose origin/destination pair is allowed (found {have})")
    return Walks.cat(parts)


# ----------------------------------------------------------------------------- tokens


class WalkTokenizer(WordTokenizer):
    """Tokens: node i is id i (named by its original id), then the 8 directions, ``end`` and ``<eos>``.

    A walk is ``origin destination dir ... dir end``; ``<eos>`` separates walks packed into one
    training sequence.
    """

    END, EOS = "end", "<eos>"

    def __init__(self, graph: StreetGraph):
        N = graph.num_nodes
        self.num_nodes = N
        super().__init__([str(n) for n in graph.ids] + list(DIRECTIONS) + [self.END, self.EOS],
                         f"street-graph vocabulary (node ids of the graph, {' '.join(DIRECTIONS)}, {self.END}, {self.EOS})")
        self.dir0 = N  # token of direction index k is dir0 + k
        self.end_id = N + len(DIRECTIONS)
        self.eos_id = self.end_id + 1

    def is_move(self, ids: Tensor) -> Tensor:
        """Direction tokens: (...) -> (...) bool."""
        return (ids >= self.dir0) & (ids < self.end_id)

    def walk(self, origin: int, dest: int, moves: list[int], end: bool = True) -> list[int]:
        """Token ids of one walk given dense nodes and direction indices (``end`` appended unless end=False)."""
        return [origin, dest, *(self.dir0 + k for k in moves)] + ([self.end_id] if end else [])

    def encode_walks(self, walks: Walks, chunk: int = 65536) -> tuple[Tensor, Tensor]:
        """Every walk as ``origin destination dirs end``, concatenated.

        Returns (tokens (S,) int32, offsets (M + 1,) int64): walk i is ``tokens[offsets[i]:offsets[i+1]]``.
        """
        lengths = walks.lengths
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), (lengths + 3).cumsum(0)])
        tokens = torch.empty(int(offsets[-1]), dtype=torch.int32)
        for s in range(0, len(walks), chunk):  # chunks bound the int64 temporaries of large corpora
            e = min(s + chunk, len(walks))
            starts = offsets[s:e]
            tokens[starts] = walks.origins[s:e].int()
            tokens[starts + 1] = walks.dests[s:e].int()
            tokens[offsets[s + 1 : e + 1] - 1] = self.end_id
            m0, m1 = int(walks.offsets[s]), int(walks.offsets[e])
            walk = torch.repeat_interleave(torch.arange(s, e), lengths[s:e])  # walk of every move
            tokens[torch.arange(m0, m1) + 3 * walk + 2] = walks.moves[m0:m1].int() + self.dir0
        return tokens, offsets
