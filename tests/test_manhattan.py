"""Manhattan world model: graph loading, procedural city, corpora, packing and Vafa et al.'s metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nextlat.config import ConfigError
from nextlat.data import IGNORE, doc_ids_from_eos
from nextlat.registry import build_task, config_from_dict
from nextlat.tasks.manhattan.graph import (
    DIRECTIONS,
    GraphError,
    HeldOutPairs,
    StreetGraph,
    WalkTokenizer,
    procedural_city,
    random_walks,
    sample_pairs,
    shortest_walks,
)
from nextlat.tasks.manhattan.metrics import (
    RecomputeModel,
    TransformerWalkModel,
    compression_pairs,
    detour_robustness,
    draw_map,
    effective_rank,
    map_reconstruction,
    next_token_test,
    sequence_compression,
    valid_trajectories,
)
from nextlat.tasks.manhattan.task import ManhattanConfig, ManhattanTask, pack_documents
from nextlat.training.build import load_components
from nextlat.training.loop import Trainer

Tensor = torch.Tensor
K = {d: i for i, d in enumerate(DIRECTIONS)}

# A hand-built town (ids deliberately large and unsorted):
#
#   30 --E--> 40 <-E/W-> 50        10 -N-> 30, 30 -S-> 10 (two-way avenue)
#    ^ |               |           20 -N-> 40 (one-way north), 50 -S-> 60 (one-way south)
#    | S               S           60 -W-> 20 (one-way west), 20 -W-> 10 (one-way west)
#   10 <--W-- 20 <--W-- 60         40 -NE-> 40 is a self-loop (accepted, as in the real graph)
TOWN = [[30, "E", 40], [40, "E", 50], [50, "W", 40], [10, "N", 30], [30, "S", 10], [20, "N", 40],
        [50, "S", 60], [60, "W", 20], [20, "W", 10], [40, "NE", 40]]


def town() -> StreetGraph:
    return StreetGraph.from_dict({"edges": TOWN})


def _write(tmp_path, content, name="g.json"):
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


# ----------------------------------------------------------------------------- loading


def test_loads_the_file_format_and_maps_ids_densely(tmp_path):
    p = _write(tmp_path, {"source": "hand", "directions": list(DIRECTIONS), "num_nodes": 6, "edges": TOWN,
                          "extra": "ignored"})
    g = StreetGraph.load(p)
    assert g.ids == [10, 20, 30, 40, 50, 60] and g.num_nodes == 6 and g.num_edges == len(TOWN)
    i = g.index
    assert g.moves(i[30]) == {"E": i[40], "S": i[10]}
    assert g.moves(i[40]) == {"E": i[50], "NE": i[40]}
    assert g.step(i[20], K["N"]) == i[40] and g.step(i[20], K["S"]) == -1
    assert g.source == "hand"


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"nodes": []}, "missing key 'edges'"),
    ({"edges": []}, "non-empty list"),
    ({"edges": [[1, "N", 2], [2, "S"]]}, "edges[1]=[2, 'S'] is not a triple"),
    ({"edges": [[1, "N", 2], "2 S 1"]}, "edges[1]='2 S 1' is not a triple"),
    ({"edges": [[1, "N", "2"]]}, "edges[0][2]='2': node ids must be integers"),
    ({"edges": [[1.5, "N", 2]]}, "edges[0][0]=1.5"),
    ({"edges": [[True, "N", 2]]}, "edges[0][0]=True"),
    ({"edges": [[1, "UP", 2]]}, "unknown direction 'UP'"),
    ({"edges": [[1, "NE", 2]], "directions": ["N", "S"]}, "unknown direction 'NE' (known: N, S)"),
    ({"edges": [[1, "N", 2]], "directions": ["N", "north"]}, "directions: unknown direction 'north'"),
    ({"edges": [[1, "N", 2], [2, "S", 1], [1, "N", 3]]}, "node 1 has two 'N' edges: to 2 (edges[0]) and to 3 (edges[2])"),
    ({"edges": [[1, "N", 2], [2, "S", 1]], "num_nodes": 3}, "num_nodes=3 but the edges mention 2 distinct nodes"),
    ({"edges": [[1, "N", 2]], "num_nodes": "2"}, "num_nodes='2' must be an integer"),
    ({"edges": [[1, "N", 2]], "coords": {"1": [0, 0], "2": [0, 1], "7": [5, 5]}}, "coords lists node 7, which has no edges"),
    ({"edges": [[1, "N", 2]], "coords": {"1": [0, 0]}}, "coords: node 2 has no coordinates"),
    ({"edges": [[1, "N", 2]], "coords": {"1": [0, 0], "2": [0, "x"]}}, "coords['2']=[0, 'x']"),
])
def test_malformed_files_give_clear_errors(tmp_path, content, needle):
    p = _write(tmp_path, content)
    with pytest.raises(GraphError) as err:
        StreetGraph.load(p)
    assert needle in str(err.value)
    assert str(p) in str(err.value)  # the file is named


def test_missing_file_is_named(tmp_path):
    with pytest.raises(GraphError, match="nope.json' does not exist"):
        StreetGraph.load(tmp_path / "nope.json")
    assert issubclass(GraphError, ConfigError) and issubclass(GraphError, ValueError)


def test_exact_duplicate_edges_dead_ends_and_self_loops_are_accepted():
    g = StreetGraph.from_dict({"edges": [[1, "N", 2], [1, "N", 2], [2, "E", 2], [2, "S", 3]]})
    assert g.num_edges == 3 and g.moves(g.index[3]) == {}  # 3 is a dead end
    assert not g.is_strongly_connected()
    assert g.shortest_path(g.index[3], g.index[1]) is None and not g.reachable(g.index[3], g.index[1])


# ----------------------------------------------------------------------------- shortest paths


def test_shortest_paths_on_a_hand_built_graph():
    g = town()
    i = g.index
    # 20 -> 30: 20 -W-> 10 -N-> 30 (2 moves); 20 -N-> 40 leads on only to 50, 60, 20 again
    assert g.distance(i[20], i[30]) == 2
    assert g.shortest_path(i[20], i[30]) == [K["W"], K["N"]]
    # 10 -> 60: 10 N 30 E 40 E 50 S 60
    assert g.shortest_path(i[10], i[60]) == [K["N"], K["E"], K["E"], K["S"]]
    # ties: 60 -> 40 is W N (via 20) in 2 moves; the only route
    assert g.shortest_path(i[60], i[40]) == [K["W"], K["N"]]
    assert g.shortest_path(i[40], i[40]) == []
    assert g.dist_to(i[30]).tolist() == [1, 2, 0, 5, 4, 3]  # from 10, 20, 30, 40, 50, 60
    assert g.dist_from(i[10]).tolist() == [0, 5, 1, 2, 3, 4]
    assert g.is_strongly_connected()


def test_canonical_routes_take_the_first_direction_that_gets_closer():
    # 0 -> 3 by E then N, or N then E: the canonical route starts with E (E comes before N in DIRECTIONS)
    g = StreetGraph.from_dict({"edges": [[0, "E", 1], [0, "N", 2], [1, "N", 3], [2, "E", 3], [3, "SW", 0]]})
    assert g.shortest_path(0, 3) == [K["E"], K["N"]]
    assert g.next_move_to(3).tolist() == [K["E"], K["N"], K["E"], -1]


def test_distances_match_a_brute_force_search():
    g = procedural_city(6, 5, seed=3)
    N = g.num_nodes
    INF = 10**9
    d = [[0 if a == b else INF for b in range(N)] for a in range(N)]
    for u, _, v in g.edges():
        if u != v:
            d[u][v] = min(d[u][v], 1)
    for m in range(N):  # Floyd-Warshall
        for a in range(N):
            for b in range(N):
                d[a][b] = min(d[a][b], d[a][m] + d[m][b])
    for dest in range(N):
        assert g.dist_to(dest).tolist() == [d[a][dest] for a in range(N)]
    pairs = torch.tensor([[a, b] for a in range(N) for b in range(N) if a != b])
    walks = shortest_walks(g, pairs)
    assert walks.lengths.tolist() == [d[a][b] for a, b in pairs.tolist()]
    for w in range(len(walks)):
        u = int(walks.origins[w])
        for k in walks.moves_of(w):
            u = g.step(u, k)
            assert u >= 0
        assert u == int(walks.dests[w])


def test_layout_without_coordinates_follows_the_compass():
    g = StreetGraph.from_dict({"edges": [[1, "E", 2], [2, "N", 3], [3, "W", 4], [4, "S", 1]]})
    p = g.positions()
    p = p - p[0]
    assert torch.allclose(p, torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], dtype=p.dtype), atol=1e-6)


# ----------------------------------------------------------------------------- procedural city


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_procedural_city_is_strongly_connected_and_round_trips(tmp_path, seed):
    g = procedural_city(8, 7, seed=seed, one_way_frac=0.4, missing_frac=0.15, diagonals=2)
    assert g.is_strongly_connected() and g.num_nodes >= 20
    assert all(0 <= n < 56 for n in g.ids)
    # every edge is one block long in its compass direction
    block = {"E": (1, 0), "W": (-1, 0), "N": (0, 1), "S": (0, -1), "NE": (1, 1), "SW": (-1, -1)}
    pos = g.positions()
    assert all((pos[v] - pos[u]).tolist() == list(block[DIRECTIONS[k]]) for u, k, v in g.edges())
    back = StreetGraph.load(g.save(tmp_path / "city.json"))
    assert back.ids == g.ids and torch.equal(back.succ, g.succ) and torch.equal(back.positions(), g.positions())
    again = procedural_city(8, 7, seed=seed, one_way_frac=0.4, missing_frac=0.15, diagonals=2)
    assert again.to_json() == g.to_json()  # a pure function of its arguments


def test_procedural_city_has_one_way_streets_and_missing_blocks():
    g = procedural_city(12, 12, seed=0, one_way_frac=0.3, missing_frac=0.1)
    pairs = {(u, v) for u, _, v in g.edges()}
    assert any((v, u) not in pairs for u, v in pairs)  # one-way segments
    assert g.num_edges < 2 * (2 * 12 * 11)  # fewer than a complete two-way grid
    assert any(DIRECTIONS[k] in ("NE", "SW") for _, k, _ in g.edges())  # the diagonal boulevard


@pytest.mark.parametrize("kw, needle", [({"width": 1}, "width=1"), ({"one_way_frac": 1.0}, "one_way_frac=1.0"),
                                        ({"missing_frac": -0.1}, "missing_frac=-0.1"), ({"diagonals": -1}, "diagonals=-1")])
def test_procedural_city_rejects_bad_parameters(kw, needle):
    with pytest.raises(ValueError, match=needle):
        procedural_city(**kw)


# ----------------------------------------------------------------------------- tokens, corpora, packing


def test_tokenizer_round_trip_and_errors():
    g = town()
    tok = WalkTokenizer(g)
    assert tok.vocab_size == 6 + 8 + 2 and tok.eos_id == tok.vocab_size - 1 and tok.end_id == tok.eos_id - 1
    text = "10 60 N E E S end <eos>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids[:2] == [0, 5]
    assert ids == tok.walk(0, 5, [K["N"], K["E"], K["E"], K["S"]]) + [tok.eos_id]
    for bad in ("70", "UP", "<pad>"):
        with pytest.raises(ValueError, match=repr(bad)):
            tok.encode(f"10 {bad}")


def _docs(task: ManhattanTask) -> list[list[int]]:
    """The walks of every training window (split at EOS, padding dropped)."""
    data = task.train_data()
    out = []
    for row, docs in zip(data.rows.long().tolist(), data.docs.long().tolist()):
        cur: list[int] = []
        for t, d in zip(row, docs):
            if d < 0:
                continue
            if t == task.tokenizer.eos_id:
                out.append(cur)
                cur = []
            else:
                cur.append(t)
        assert not cur  # every packed walk is whole
    return out


def _check_walk(g: StreetGraph, tok: WalkTokenizer, w: list[int]) -> int:
    origin, dest = w[0], w[1]
    assert 0 <= origin < tok.num_nodes and 0 <= dest < tok.num_nodes and origin != dest
    assert w[-1] == tok.end_id and all(tok.dir0 <= t < tok.end_id for t in w[2:-1])
    u = origin
    for t in w[2:-1]:
        u = g.step(u, t - tok.dir0)
        assert u >= 0, f"illegal move in {tok.decode(w)}"
    assert u == dest
    return len(w) - 3


@pytest.mark.parametrize("corpus", ["shortest", "random_walk", "mixed"])
def test_corpora_are_well_formed_legal_and_avoid_held_out_pairs(corpus):
    cfg = ManhattanConfig(city_width=6, city_height=6, corpus=corpus, num_train_walks=400, walk_max_len=12,
                          seq_len=40, held_out_frac=0.2)
    task = ManhattanTask(cfg)
    g, tok, held = task.graph, task.tokenizer, task.held_out
    docs = _docs(task)
    assert len(docs) == 400
    lengths = [_check_walk(g, tok, w) for w in docs]
    assert not any(held.contains(w[0], w[1]) for w in docs)
    if corpus == "shortest":
        assert all(n == g.distance(w[0], w[1]) for n, w in zip(lengths, docs))
    if corpus == "random_walk":
        assert max(lengths) <= 12 and len(set(lengths)) > 5
        assert sum(n > g.distance(w[0], w[1]) for n, w in zip(lengths, docs)) > 100  # not shortest routes
    # validation walks and test pairs are held out
    val = task.val_walks(50)
    assert len(val) == 50 and all(held.contains(w[0], w[1]) for w in val)
    for w in val:
        _check_walk(g, tok, w)
    pairs = task.test_pairs(40)
    assert all(held.contains(o, d) and 1 <= g.distance(o, d) <= cfg.valid_max_dist for o, d in pairs.tolist())
    # the data is a pure function of the config
    assert _docs(ManhattanTask(cfg)) == docs


def test_held_out_pairs_are_a_seeded_fraction():
    o = torch.arange(300).repeat_interleave(300)
    d = torch.arange(300).repeat(300)
    a, b = HeldOutPairs(0.1, seed=0), HeldOutPairs(0.1, seed=1)
    frac = a(o, d).float().mean().item()
    assert 0.095 < frac < 0.105
    assert (a(o, d) != b(o, d)).any()  # the seed matters
    assert torch.equal(a(o, d), HeldOutPairs(0.1, seed=0)(o, d))
    assert a.contains(int(o[a(o, d)][0]), int(d[a(o, d)][0]))
    # with original ids, a pair's fate does not depend on the dense numbering
    g1 = StreetGraph.from_dict({"edges": [[100, "N", 200], [200, "S", 100]]})
    g2 = StreetGraph.from_dict({"edges": [[100, "N", 200], [200, "S", 100], [5, "E", 100], [100, "W", 5]]})
    for seed in range(20):
        h1, h2 = HeldOutPairs(0.5, seed, g1.ids), HeldOutPairs(0.5, seed, g2.ids)
        assert h1.contains(g1.index[100], g1.index[200]) == h2.contains(g2.index[100], g2.index[200])


def test_packing_keeps_documents_whole_with_doc_ids():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11], [12, 13]]
    tokens = torch.tensor([t for doc in docs for t in doc])
    offsets = torch.tensor([0, 3, 5, 10, 11, 13])
    rows, ids = pack_documents(tokens, offsets, eos_id=99, window=7)
    E = 99
    # [1 2 3 E 4 5 E] full; [6..10 E] opens row 1, [11 E] does not fit there -> row 2; [12 13 E] -> row 2
    assert rows.tolist() == [[1, 2, 3, E, 4, 5, E], [6, 7, 8, 9, 10, E, E], [11, E, 12, 13, E, E, E]]
    assert ids.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, -1], [0, 0, 1, 1, 1, -1, -1]]
    assert all(torch.equal(a, b) for a, b in zip(pack_documents(tokens, offsets, 99, 7, chunk=2), (rows, ids)))
    with pytest.raises(ValueError, match="document of 6 tokens"):
        pack_documents(tokens, offsets, 99, window=5)


def test_training_batches_score_moves_and_end_only():
    task = ManhattanTask(ManhattanConfig(city_width=5, city_height=5, num_train_walks=300, seq_len=32))
    tok = task.tokenizer
    data = task.train_data()
    batch = data.get(torch.arange(len(data)))
    inputs, targets, doc_ids = batch.input_ids, batch.targets, batch.doc_ids
    assert inputs.shape == (len(data), 32)
    nxt = data.rows[:, 1:].long()
    scored = targets != IGNORE
    assert torch.equal(targets[scored], nxt[scored])
    is_move_or_end = tok.is_move(nxt) | (nxt == tok.end_id)
    assert torch.equal(scored, is_move_or_end)  # origins, destinations, EOS and padding are never scored
    real = doc_ids >= 0
    # on real tokens the doc ids are exactly the EOS-based ones of data.py
    assert torch.equal(doc_ids[real], doc_ids_from_eos(inputs, tok.eos_id, eos_opens=False)[real])
    assert (inputs[~real] == tok.eos_id).all()
    # padding only at the end of a row
    assert all(r[r >= 0].numel() == 0 or bool((r[: int((r >= 0).sum())] >= 0).all()) for r in doc_ids)


def test_random_walks_stop_at_dead_ends():
    g = StreetGraph.from_dict({"edges": [[1, "N", 2], [2, "E", 3], [2, "W", 1]]})  # 3 is a dead end
    w = random_walks(g, 200, seed=0, max_moves=10)
    assert len(w) == 200
    for i in range(len(w)):
        u = int(w.origins[i])
        for k in w.moves_of(i):
            u = g.step(u, k)
        assert u == int(w.dests[i]) != int(w.origins[i])


def test_impossible_pair_requests_fail_clearly():
    g = StreetGraph.from_dict({"edges": [[1, "N", 2], [2, "S", 1]]})
    with pytest.raises(ValueError, match="could not find 5 origin/destination pairs"):
        sample_pairs(g, 5, seed=0, min_dist=2)


def test_config_validation():
    with pytest.raises(ConfigError, match="task.corpus='taxi'"):
        ManhattanConfig(corpus="taxi").validate()
    with pytest.raises(ConfigError, match="task.walk_max_len=200"):
        ManhattanConfig(corpus="random_walk", walk_max_len=200, seq_len=128).validate()
    with pytest.raises(ConfigError, match="task.held_out_frac=0"):
        ManhattanConfig(held_out_frac=0).validate()
    with pytest.raises(ConfigError, match="task.eval_valid=-1"):
        ManhattanConfig(eval_valid=-1).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        _ = build_task(ManhattanConfig(graph="/nonexistent/graph.json")).vocab_size


# ----------------------------------------------------------------------------- metrics


class Oracle(RecomputeModel):
    """Puts (almost) all probability on the canonical shortest-path move, or ``end`` at the destination.

    ``illegal=True`` instead always names a direction without a street (or <eos> where all 8 exist).
    """

    def __init__(self, graph: StreetGraph, tok: WalkTokenizer, illegal: bool = False):
        self.g, self.tok, self.illegal = graph, tok, illegal

    def _choice(self, cur: int, dest: int) -> int:
        if self.illegal:
            missing = [k for k in range(8) if self.g.step(cur, k) < 0] if cur >= 0 else [0]
            return self.tok.dir0 + missing[0] if missing else self.tok.eos_id
        if cur < 0 or cur == dest:
            return self.tok.end_id
        return self.tok.dir0 + int(self.g.next_move_to(dest)[cur])

    def _onehot(self, choices: list[int]) -> Tensor:
        out = torch.full((len(choices), self.tok.vocab_size), -50.0)
        out[torch.arange(len(choices)), torch.tensor(choices)] = 50.0
        return out

    def _advance(self, cur: int, t: int) -> int:
        return self.g.step(cur, t - self.tok.dir0) if cur >= 0 and self.tok.dir0 <= t < self.tok.end_id else -1

    def score(self, ids, doc_ids=None):
        B, T = ids.shape
        out = torch.zeros(B, T, self.tok.vocab_size)
        for b in range(B):
            row = ids[b].tolist()
            cur = row[0]
            for t in range(1, T):
                if t > 1:
                    cur = self._advance(cur, row[t])
                out[b, t] = self._onehot([self._choice(cur, row[1])])[0]
        return out

    def start(self, prompt):
        self._cur, self._dest = prompt[:, 0].tolist(), prompt[:, 1].tolist()
        for t in range(2, prompt.shape[1]):
            self._cur = [self._advance(c, int(x)) for c, x in zip(self._cur, prompt[:, t])]
        return self._onehot([self._choice(c, d) for c, d in zip(self._cur, self._dest)])

    def step(self, tokens):
        self._cur = [self._advance(c, int(x)) for c, x in zip(self._cur, tokens)]
        return self._onehot([self._choice(c, d) for c, d in zip(self._cur, self._dest)])


@pytest.fixture(scope="module")
def city():
    g = procedural_city(6, 6, seed=1, one_way_frac=0.3, missing_frac=0.1)
    return g, WalkTokenizer(g)


def _val_walks(g, tok, n=60):
    pairs = sample_pairs(g, n, seed=5)
    walks = random_walks(g, n, seed=6, max_moves=15)
    out = []
    for w in (shortest_walks(g, pairs), walks):
        tokens, offsets = tok.encode_walks(w)
        out += [tokens[a:b].tolist() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
    return out


def test_an_oracle_scores_perfectly(city):
    g, tok = city
    oracle = Oracle(g, tok)
    r = next_token_test(oracle, g, tok, _val_walks(g, tok), batch_size=16)
    assert r.legal == 1.0 and r.positions > 500
    pairs = sample_pairs(g, 40, seed=1)
    valid = valid_trajectories(oracle, g, tok, pairs, max_len=30)
    assert valid.valid == 1.0
    assert all(len(t.tokens) == g.distance(t.origin, t.dest) + 1 for t in valid.traversals)  # shortest, then end
    trials = compression_pairs(g, 25, seed=2)
    assert all(p.origin_a != p.origin_b and p.node != p.dest for p in trials)
    assert sequence_compression(oracle, g, tok, trials, max_len=30, suffixes=5, seed=0) == 1.0
    detour = detour_robustness(oracle, g, tok, pairs, max_len=300, prob=0.75, seed=0)
    assert detour.valid == 1.0 and sum(t.detours for t in detour.traversals) > 40
    m = map_reconstruction(g, valid.traversals)
    assert not m.invented and m.true_edges and m.precision == 1.0


def test_a_model_of_illegal_moves_scores_zero(city, tmp_path):
    g, tok = city
    bad = Oracle(g, tok, illegal=True)
    assert next_token_test(bad, g, tok, _val_walks(g, tok)).legal == 0.0
    pairs = sample_pairs(g, 30, seed=1)
    valid = valid_trajectories(bad, g, tok, pairs, max_len=30)
    assert valid.valid == 0.0 and all(t.status == "illegal" and len(t.tokens) == 1 for t in valid.traversals)
    assert detour_robustness(bad, g, tok, pairs, max_len=100, prob=0.75, seed=0).valid == 0.0
    m = map_reconstruction(g, valid.traversals)
    assert not m.true_edges and m.invented and m.precision == 0.0
    assert all(g.step(u, k) < 0 for u, k in m.invented)
    png = draw_map(g, m, tmp_path / "maps" / "bad.png", title="illegal model")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compression_fails_for_a_model_that_remembers_the_origin(city):
    """A model whose continuation depends on where the walk started (not only on where it is) is not compressed."""
    g, tok = city

    class OriginBiased(Oracle):
        def score(self, ids, doc_ids=None):
            out = super().score(ids)
            for b in range(ids.shape[0]):
                if int(ids[b, 0]) % 2:
                    out[b] = out[b].roll(1, dims=-1)  # mass moves to another token
            return out

        def start(self, prompt):
            self._odd = (prompt[:, 0] % 2).bool()
            return self._bias(super().start(prompt))

        def step(self, tokens):
            return self._bias(super().step(tokens))

        def _bias(self, logits):
            logits[self._odd] = logits[self._odd].roll(1, dims=-1)
            return logits

    trials = [p for p in compression_pairs(g, 60, seed=3) if (p.origin_a + p.origin_b) % 2][:20]
    assert len(trials) == 20
    assert sequence_compression(OriginBiased(g, tok), g, tok, trials, max_len=30, suffixes=3) == 0.0


def test_effective_rank():
    torch.manual_seed(0)
    for k in (1, 3, 7):
        a, b = torch.randn(200, k), torch.randn(k, 16)
        assert effective_rank(a @ b) <= k + 1e-6
    q, _ = torch.linalg.qr(torch.randn(100, 5))  # 5 orthonormal columns: 5 equal singular values
    assert effective_rank(3.0 * q) == pytest.approx(5.0, abs=1e-9)
    assert effective_rank(torch.eye(16)) == pytest.approx(16.0)
    assert effective_rank(torch.zeros(4, 4)) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        effective_rank(torch.zeros(3))


def test_transformer_adapter_decodes_like_a_full_forward(make_model, city):
    """KV-cached start/step logits equal the teacher-forced logits of the same tokens.

    The model runs in float64 (cached and whole-sequence passes have other kernel shapes, which round float32
    differently by BLAS); the adapter returns float32, so the two may differ by that last rounding only."""
    g, tok = city
    model = make_model(vocab_size=tok.vocab_size).double()
    model.train()
    lm = TransformerWalkModel(model)
    ids = torch.randint(0, tok.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        full = lm.score(ids)  # (3, 9, V)
        step = [lm.start(ids[:, :2])] + [lm.step(ids[:, t]) for t in range(2, 9)]
    assert torch.allclose(torch.stack(step, 1), full[:, 1:], rtol=2 * torch.finfo(torch.float32).eps, atol=1e-12)
    pairs = sample_pairs(g, 5, seed=0)
    model.train()
    valid_trajectories(model, g, tok, pairs, max_len=20)
    assert model.training  # restored
    with pytest.raises(ValueError, match="max_seq_len=64"):
        valid_trajectories(model, g, tok, pairs, max_len=63)


def test_transformer_adapter_predicts_through_the_objectives_head(make_model, make_objective, city):
    """With JTP's slot-0 head, the adapter's teacher-forced logits are that head's, and its KV-cached decoding gives
    the same logits (float64); the Manhattan task builds its adapter with the objective's head."""
    g, tok = city
    model = make_model(vocab_size=tok.vocab_size).double().eval()
    objective = make_objective(model, name="jtp", horizon=2).double()
    head = objective.decoding_head(model)
    lm = TransformerWalkModel(model, head)
    ids = torch.randint(0, tok.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = lm.score(ids)
        h, _ = model(ids)
        torch.testing.assert_close(full, head(h, ids).float())
        assert not torch.equal(full.argmax(-1), model.logits(h).argmax(-1))
        step = [lm.start(ids[:, :2])] + [lm.step(ids[:, t]) for t in range(2, 9)]
    assert torch.allclose(torch.stack(step, 1), full[:, 1:], rtol=2 * torch.finfo(torch.float32).eps, atol=1e-12)


def test_manhattan_evaluates_jtp_through_its_fetch_module(monkeypatch):
    cfg = config_from_dict({**TINY, "objective": {"name": "jtp", "horizon": 2}})
    from nextlat.training.build import build

    comps = build(cfg)
    head, calls = comps.objective.decoding_head(comps.model), []

    def spy(h, ids):
        calls.append((tuple(h.shape[:-1]), tuple(ids.shape)))
        return head(h, ids)

    monkeypatch.setattr(comps.objective, "decoding_head", lambda m: spy)
    comps.task.evaluate(comps.model, comps.objective, seed=0)
    assert len(calls) > 10 and all(a == b for a, b in calls)  # teacher-forced scores and every decoding step


TINY = {
    "run_name": "tiny-manhattan",
    "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64},
    "objective": {"name": "next_latent", "horizon": 2, "lambda_h": 1.0, "lambda_kl": 0.1},
    "task": {"name": "manhattan", "city_width": 5, "city_height": 5, "num_train_walks": 200, "seq_len": 32,
             "eval_next_token": 20, "eval_valid": 10, "eval_compression": 3, "compression_suffixes": 4,
             "eval_rank_seqs": 4, "rank_tokens": 32, "eval_detour": 10, "max_len": 30},
    "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "log_every": 1, "progress": False, "device": "cpu",
              "precision": "fp32", "seed": 0},
}


def test_tiny_next_latent_run_trains_evaluates_and_reloads(tmp_path):
    cfg = config_from_dict(TINY)
    trainer = Trainer(cfg, out_dir=tmp_path)
    results = trainer.fit()
    ev = results["eval"]
    assert set(ev) == {"next_token", "val_loss", "valid", "map_true_edges", "map_invented_edges", "map_precision",
                       "compression", "eff_rank", "detour"}
    for key in ("next_token", "valid", "map_precision", "compression", "detour"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert 1.0 <= ev["eff_rank"] <= 32 and math.isfinite(ev["val_loss"])
    assert trainer.model.training
    # the checkpoint carries its graph: the task of the checkpoint does not need the city settings
    comps, _ = load_components(tmp_path)
    assert (tmp_path / "checkpoints" / "step_0000002" / "graph.json").is_file()
    assert comps.task.graph.to_json() == trainer.task.graph.to_json()
    assert comps.task.evaluate(comps.model, seed=0) == trainer.task.evaluate(trainer.model, seed=0)
    # prompts for decoding benchmarks are held-out (origin, destination) pairs
    prompts = comps.task.prompts(3)
    assert all(p.shape == (2,) and comps.task.held_out.contains(int(p[0]), int(p[1])) for p in prompts)


def test_loaded_graph_files_drive_the_task(tmp_path):
    g = procedural_city(5, 4, seed=2)
    path = g.save(tmp_path / "town.json")
    task = ManhattanTask(ManhattanConfig(graph=str(path), num_train_walks=50, seq_len=32))
    assert task.graph.to_json() == g.to_json() and task.vocab_size == g.num_nodes + 10
    assert len(_docs(task)) == 50
