"""Path-Star graphs G(deg, l) (Bachmann & Nagarajan, arXiv 2403.06963).

A source node has ``deg`` disjoint arms of l-1 nodes each; node ids are drawn from N. The prompt
lists the shuffled directed edges, then the source and the goal (the tip of one arm); the answer
is the l-node path from source to goal, then EOS::

    12 40 | 7 3 | 40 9 | ... | / 12 31 = 12 40 9 ... 31 <eos>

Token losses are masked to the answer (+EOS). Next-token training tends to learn the "Clever
Hans" shortcut (copy the successor of the previous node from the edge list) and cannot learn the
first decision, scoring about 1/deg exact-path accuracy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from nextlat.config import ConfigError, TaskConfig
from nextlat.data import IGNORE, Batch
from nextlat.decoding.reference import generate, objective_head
from nextlat.decoding.sampling import Sampling
from nextlat.tasks.base import Task
from nextlat.tasks.vocab import WordTokenizer


@dataclass
class PathStarConfig(TaskConfig):
    name: str = "pathstar"
    degree: int = 2
    """Number of arms leaving the source (deg)."""
    path_len: int = 5
    """Nodes on the answer path, source and goal included (l); each arm has l-1 nodes."""
    num_nodes: int = 50
    """Node ids are drawn from 0..num_nodes-1 (N)."""
    num_train: int = 50_000
    """Fixed training graphs."""
    num_test: int = 1000
    """Held-out test graphs (disjoint from the training graphs)."""
    data_seed: int = 0
    """Seed of the graph generator (fixed across training seeds)."""
    eval_examples: int = 1000
    """Test graphs used by each evaluation."""

    def validate(self) -> None:
        if self.degree < 2:
            raise ConfigError(f"task.degree={self.degree}: must be >= 2")
        if self.path_len < 2:
            raise ConfigError(f"task.path_len={self.path_len}: must be >= 2")
        needed = self.degree * (self.path_len - 1) + 1
        if self.num_nodes < needed:
            raise ConfigError(
                f"task.num_nodes={self.num_nodes}: G({self.degree},{self.path_len}) needs at least {needed} distinct ids"
            )
        if self.num_train < 1 or self.num_test < 1 or self.eval_examples < 1:
            raise ConfigError("task.num_train, task.num_test and task.eval_examples must be >= 1")


class PathStarTokenizer(WordTokenizer):
    """Node ids are tokens 0..N-1; then '|' (edge separator), '/' (query), '=' (answer), '<eos>'."""

    SPECIALS = ("|", "/", "=", "<eos>")

    def __init__(self, num_nodes: int):
        self.num_nodes = num_nodes
        super().__init__([str(i) for i in range(num_nodes)] + list(self.SPECIALS),
                         f"Path-Star vocabulary (node ids 0..{num_nodes - 1}, {' '.join(self.SPECIALS)})")
        self.sep_id, self.query_id, self.answer_id, self.eos_id = (self.stoi[s] for s in self.SPECIALS)


@dataclass(frozen=True)
class Graph:
    edges: tuple[tuple[int, int], ...]  # shuffled directed edges
    source: int
    goal: int
    path: tuple[int, ...]  # source .. goal, l nodes


def sample_graph(rng: random.Random, degree: int, path_len: int, num_nodes: int) -> Graph:
    nodes = rng.sample(range(num_nodes), degree * (path_len - 1) + 1)
    source, rest = nodes[0], nodes[1:]
    arms = [rest[a * (path_len - 1) : (a + 1) * (path_len - 1)] for a in range(degree)]
    edges = []
    for arm in arms:
        chain = [source, *arm]
        edges.extend(zip(chain[:-1], chain[1:]))
    rng.shuffle(edges)
    goal_arm = arms[rng.randrange(degree)]
    return Graph(tuple(edges), source, goal_arm[-1], (source, *goal_arm))


def generate_graphs(n: int, degree: int, path_len: int, num_nodes: int, seed: int,
                    exclude: set[Graph] | None = None) -> list[Graph]:
    """``n`` distinct graphs (as edge sets with source and goal), none of them in ``exclude``."""
    rng = random.Random(seed)
    seen: set = set()
    excluded = {(frozenset(g.edges), g.source, g.goal) for g in exclude or ()}
    out: list[Graph] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ValueError(f"could not draw {n} distinct G({degree},{path_len}) graphs over {num_nodes} nodes")
        g = sample_graph(rng, degree, path_len, num_nodes)
        key = (frozenset(g.edges), g.source, g.goal)
        if key in seen or key in excluded:
            continue
        seen.add(key)
        out.append(g)
    return out


class PathStarData:
    """Encoded graphs as one (n, L) tensor; every sequence has the same length."""

    def __init__(self, graphs: list[Graph], tok: PathStarTokenizer):
        rows = [encode_graph(g, tok) for g in graphs]
        self.seqs = torch.tensor(rows, dtype=torch.long)  # (n, L): prompt, path, eos
        self.prompt_len = len(rows[0]) - len(graphs[0].path) - 1  # up to and including '='
        self.path_len = len(graphs[0].path)

    def __len__(self) -> int:
        return self.seqs.shape[0]

    def get(self, indices: Tensor) -> Batch:
        seqs = self.seqs[indices]
        inputs, targets = seqs[:, :-1], seqs[:, 1:].clone()
        # Token losses only on the answer and EOS: targets of positions before '=' are masked.
        targets[:, : self.prompt_len - 1] = IGNORE
        return Batch(inputs, targets)


def encode_graph(g: Graph, tok: PathStarTokenizer) -> list[int]:
    ids: list[int] = []
    for u, v in g.edges:
        ids += [u, v, tok.sep_id]
    return ids + [tok.query_id, g.source, g.goal, tok.answer_id, *g.path, tok.eos_id]


class PathStarTask(Task):
    config_class = PathStarConfig
    EVAL_CHUNK = 1000

    def __init__(self, cfg: PathStarConfig):
        super().__init__(cfg)
        self.cfg: PathStarConfig = cfg
        self._tok = PathStarTokenizer(cfg.num_nodes)
        self._train: PathStarData | None = None
        self._test: PathStarData | None = None

    @property
    def tokenizer(self) -> PathStarTokenizer:
        return self._tok

    @property
    def seq_len(self) -> int:
        return 3 * self.cfg.degree * (self.cfg.path_len - 1) + 4 + self.cfg.path_len

    def _graphs(self) -> tuple[list[Graph], list[Graph]]:
        c = self.cfg
        train = generate_graphs(c.num_train, c.degree, c.path_len, c.num_nodes, c.data_seed)
        test = generate_graphs(c.num_test, c.degree, c.path_len, c.num_nodes, c.data_seed + 1, exclude=set(train))
        return train, test

    def _ensure(self) -> None:
        if self._train is None:
            train, test = self._graphs()
            self._train, self._test = PathStarData(train, self._tok), PathStarData(test, self._tok)

    def train_data(self) -> PathStarData:
        self._ensure()
        return self._train

    def test_data(self) -> PathStarData:
        self._ensure()
        return self._test

    def prompts(self, n: int, length: int | None = None, seed: int = 0) -> list[Tensor]:
        """Prompts (edge list, source, goal, '=') of the first ``n`` test graphs; ``length`` is fixed by the graph size."""
        data = self.test_data()
        return list(data.seqs[:n, : data.prompt_len])

    def summary(self, metrics: dict[str, float]) -> str:
        if "acc_greedy" not in metrics:
            return super().summary(metrics)
        c = self.cfg
        return (f"exact-path accuracy {metrics['acc_greedy']:.1%} greedy, {metrics['acc_sampled']:.1%} sampled "
                f"(next-token training stalls near 1/deg = {1 / c.degree:.0%} on G({c.degree},{c.path_len}))")

    @torch.no_grad()
    def evaluate(self, model, objective=None, *, device="cpu", seed: int = 0,
                 max_examples: int | None = None) -> dict[str, float]:
        """Exact-path accuracy (greedy and sampled at temperature 1) and teacher-forced accuracy per path position.

        ``pos_acc_k`` is the accuracy of the k-th answer node given the true prefix (k = 1 is the
        source, copied from the prompt; k = 2 is the first real branch decision). Predictions come from
        the objective's ``decoding_head`` (the LM head but for JTP's fetch module); a goal-conditioned
        objective (BST) decodes towards the goal instead (:meth:`_goal_conditioned`); one
        with ``prev_logits`` also gets ``back_acc_k``: the accuracy of answer node k predicted backwards
        from the prompt and the true rest of the path (node k + 1 .. goal, EOS), i.e. walking back from
        the goal one parent at a time.
        """
        data = self.test_data()
        n = min(len(data), max_examples or self.cfg.eval_examples)
        P, L = data.prompt_len, data.path_len
        was_training = model.training
        model.eval()
        g = torch.Generator(device=device).manual_seed(seed)
        conditioned = getattr(objective, "goal_conditioned", False)
        head = objective_head(model, objective)
        backward = getattr(objective, "prev_logits", None)
        greedy_ok, sampled_ok, pos_ok, back_ok = [], [], [], []
        for start in range(0, n, self.EVAL_CHUNK):  # chunks bound the memory of large test sets
            seqs = data.seqs[start : min(n, start + self.EVAL_CHUNK)].to(device)
            prompt, answer = seqs[:, :P], seqs[:, P : P + L]
            if conditioned:
                greedy, sampled, teacher = self._goal_conditioned(objective, model, seqs, g)
            else:
                greedy = generate(model, prompt, L, head=head)[:, P:]
                sampled = generate(model, prompt, L, sampling=Sampling(temperature=1.0), generator=g, head=head)[:, P:]
                h, _ = model(seqs[:, : P + L - 1])
                teacher = head(h[:, P - 1 :], seqs[:, P - 1 : P + L - 1]).argmax(-1)  # answer tokens 1..L, true prefix
            greedy_ok.append((greedy == answer).all(-1))
            sampled_ok.append((sampled == answer).all(-1))
            pos_ok.append(teacher == answer)
            if backward is not None:
                rest = torch.cat([answer, torch.full_like(answer[:, :1], self._tok.eos_id)], 1)  # answer, EOS
                back = backward(model, prompt, [rest[:, k:] for k in range(1, L)]).argmax(-1)  # (B, L - 1)
                back_ok.append(back == answer[:, : L - 1])
        out = {"acc_greedy": torch.cat(greedy_ok).float().mean().item(),
               "acc_sampled": torch.cat(sampled_ok).float().mean().item()}
        per_pos = torch.cat(pos_ok).float().mean(0)
        for k in range(L):
            out[f"pos_acc_{k + 1}"] = per_pos[k].item()
        if back_ok:
            for k, acc in enumerate(torch.cat(back_ok).float().mean(0).tolist(), start=1):
                out[f"back_acc_{k}"] = acc
        model.train(was_training)
        return out

    def _goal_conditioned(self, objective, model, seqs: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Greedy, sampled and teacher-forced answers (B, L) of an objective that decodes towards a known suffix.

        The suffix is the answer's known end, the goal (given in the prompt) and EOS, so the model
        fills in the L - 1 nodes before the goal through ``objective.decoding_head`` and scores the true
        prefixes with ``objective.next_logits``; the goal itself is given (pos_acc_L is 1).
        """
        P, L = self._test.prompt_len, self._test.path_len
        prompt = seqs[:, :P]
        goal = prompt[:, P - 2 : P - 1]  # the prompt ends '/ source goal ='
        suffix = torch.cat([goal, torch.full_like(goal, self._tok.eos_id)], dim=1)
        head = objective.decoding_head(model, suffix)
        greedy = generate(model, prompt, L - 1, head=head)[:, P:]
        sampled = generate(model, prompt, L - 1, sampling=Sampling(temperature=1.0), generator=g, head=head)[:, P:]
        teacher = objective.next_logits(model, seqs[:, : P + L - 2], suffix)[:, P - 1 :].argmax(-1)
        return tuple(torch.cat([x, goal], dim=1) for x in (greedy, sampled, teacher))
