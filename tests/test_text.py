"""Text language modelling: BPE tokenizer, corpus cache, packed windows, evaluation, checkpoints with tokenizer."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from nextlat.cli import main
from nextlat.config import ConfigError, recipe_names
from nextlat.data import IGNORE, doc_ids_from_eos, positions_from_doc_ids
from nextlat.registry import build_task, config_from_dict, load_config
from nextlat.tasks import text as text_mod
from nextlat.tasks.text import (
    BPETokenizer,
    TextConfig,
    TextTask,
    read_stream,
    resolve_files,
    split_documents,
    write_stream,
)
from nextlat.training.build import build
from nextlat.training.checkpoint import read_run_config
from nextlat.training.loop import Trainer

SEP = "\n---\n"
WORDS = "alpha beta gamma delta the cat sat on a mat def return import class while for if else".split()


def _docs(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct little documents (the index is spelled out, so no two are equal)."""
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 60))) + "." for i in range(n)]


@pytest.fixture
def corpus_file(tmp_path) -> tuple[Path, list[str]]:
    docs = _docs(60)
    path = tmp_path / "corpus" / "stories.txt"
    path.parent.mkdir()
    path.write_text(SEP.join(docs))
    return path, docs


def _task_cfg(tmp_path, files, **kw) -> TextConfig:
    data = {"name": "text", "files": [str(f) for f in files], "doc_separator": SEP, "vocab_size": 300,
            "seq_len": 32, "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache"), **kw}
    return config_from_dict({"task": data}).task


def _decode_docs(task: TextTask, stream: torch.Tensor) -> list[str]:
    ids = stream.to(torch.int64).tolist()
    eos = task.tokenizer.eos_id
    assert ids and ids[-1] == eos, "every document, the last one included, ends with EOS"
    docs, cur = [], []
    for i in ids:
        if i == eos:
            docs.append(task.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_determinism_and_save(tmp_path):
    docs = _docs(40)
    a, b = BPETokenizer.train(docs, 300), BPETokenizer.train(docs, 300)
    assert a.to_json() == b.to_json(), "training must be deterministic"  # two trainings in one process
    assert a.vocab_size <= 300 and a.eos_id == 0
    text = "def f(x):\n    return 'ünïcödé ✓' + \"<eos>\"  \t\n"
    ids = a.encode(text)
    assert a.decode(ids) == text  # byte-level: exact round trip of any text
    assert a.eos_id not in ids, "a literal '<eos>' in the text must not become the EOS id"
    assert a.decode([*a.encode("the cat"), a.eos_id]) == "the cat<eos>"
    a.save(tmp_path / "tok.json")
    c = BPETokenizer.load(tmp_path / "tok.json")
    assert c.to_json() == a.to_json() and c.encode(text) == ids and c.eos_id == a.eos_id
    with pytest.raises(ConfigError, match="missing.json"):
        BPETokenizer.load(tmp_path / "missing.json")


def test_a_given_tokenizer_is_used_as_is_and_gets_an_eos_when_it_lacks_one(tmp_path, corpus_file):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(_docs(20, seed=9), trainers.BpeTrainer(
        vocab_size=280, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    raw.save(str(tmp_path / "foreign.json"))
    task = TextTask(_task_cfg(tmp_path, [corpus_file[0]], tokenizer=str(tmp_path / "foreign.json"), vocab_size=5000))
    assert task.vocab_size == raw.get_vocab_size() + 1 and task.tokenizer.eos_id == raw.get_vocab_size()
    corpus = task.corpus()
    assert corpus.tokenizer.to_json() == task.tokenizer.to_json()
    assert corpus.meta["key"]["tokenizer"].keys() == {"sha256"}  # a given tokenizer is keyed by its content
    assert _decode_docs(task, corpus.val)  # documents still end with the added EOS


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_stream_round_trip(tmp_path, dtype):
    top = 65535 if dtype == "uint16" else 70000
    chunks = [[0, 1, top], [5, top - 1]]
    n = write_stream(tmp_path / "s.bin", chunks, dtype)
    assert n == 5 and (tmp_path / "s.bin").stat().st_size == 5 * (2 if dtype == "uint16" else 4)
    s = read_stream(tmp_path / "s.bin", n, dtype)
    assert s[torch.tensor([[0, 2], [3, 4]])].long().tolist() == [[0, top], [5, top - 1]]


# ----------------------------------------------------------------------------- corpus and windows


def test_documents_end_with_eos_and_split_is_disjoint_and_deterministic(tmp_path, corpus_file):
    path, docs = corpus_file
    task = TextTask(_task_cfg(tmp_path, [path]))
    corpus = task.corpus()
    train_docs, val_docs = _decode_docs(task, corpus.train), _decode_docs(task, corpus.val)
    assert len(val_docs) == round(0.2 * len(docs)) and len(train_docs) + len(val_docs) == len(docs)
    assert not set(train_docs) & set(val_docs)  # split by whole documents
    assert sorted(train_docs + val_docs) == sorted(docs)  # nothing lost, nothing cut
    assert train_docs == [d for d in docs if d in set(train_docs)]  # corpus order kept
    assert corpus.meta["train_docs"] == len(train_docs) and corpus.meta["dtype"] == "uint16"

    assert split_documents(60, 0.2, 0) == split_documents(60, 0.2, 0)
    assert split_documents(60, 0.2, 0)[1] != split_documents(60, 0.2, 1)[1]
    other = TextTask(_task_cfg(tmp_path, [path], split_seed=1))
    assert set(_decode_docs(other, other.corpus().val)) != set(val_docs)


def test_windows_open_each_document_with_its_eos_and_score_every_target(tmp_path, corpus_file):
    """eos_position start (the default): the windows cut [EOS] + stream; every target is scored."""
    task = TextTask(_task_cfg(tmp_path, [corpus_file[0]]))
    assert task.cfg.eos_position == "start"
    data, T = task.train_data(), task.cfg.seq_len
    eos = task.tokenizer.eos_id
    stream = torch.cat([torch.tensor([eos]), task.corpus().train.to(torch.int64)])  # the leading EOS made explicit
    assert len(data) == (len(stream) - 1) // T
    idx = torch.arange(len(data))
    batch = data.get(idx)
    assert batch.input_ids.shape == batch.targets.shape == batch.doc_ids.shape == (len(data), T)
    for row, i in enumerate(idx.tolist()):
        window = stream[i * T : i * T + T + 1]  # non-overlapping: stride seq_len, seq_len + 1 tokens
        assert torch.equal(batch.input_ids[row], window[:-1]) and torch.equal(batch.targets[row], window[1:])
    assert (batch.input_ids == eos).sum() > 10, "the test needs windows that cross document boundaries"
    assert torch.equal(batch.doc_ids, doc_ids_from_eos(batch.input_ids, eos, eos_opens=True))
    # every token of the stream but the leading EOS is the target of exactly one window position
    assert torch.equal(batch.targets.flatten(), stream[1 : len(data) * T + 1])
    assert batch.input_ids[0, 0] == eos and batch.doc_ids[0, 0] == 0
    # an EOS opens its document: it and the next token share a document, the token before it is in another
    for r, t in (batch.input_ids == eos).nonzero().tolist():
        if t + 1 < T:
            assert batch.doc_ids[r, t + 1] == batch.doc_ids[r, t]
        if t > 0:
            assert batch.doc_ids[r, t] == batch.doc_ids[r, t - 1] + 1


def test_first_token_of_every_document_is_a_target_predicted_from_its_eos(tmp_path, corpus_file):
    task = TextTask(_task_cfg(tmp_path, [corpus_file[0]]))
    data, tok = task.train_data(), task.tokenizer
    batch = data.get(torch.arange(len(data)))
    train_docs = [tok.encode(d) for d in _decode_docs(task, task.corpus().train)]
    starts = (batch.input_ids == tok.eos_id).nonzero().tolist()  # row-major: stream order
    # every document's opening EOS is an input, but for the last one or two past the final whole window
    assert len(train_docs) - 2 <= len(starts) <= len(train_docs)
    positions = positions_from_doc_ids(batch.doc_ids)
    for (r, t), doc in zip(starts, train_docs):
        assert batch.targets[r, t] == doc[0] != IGNORE  # scored, predicted from the EOS position
        assert positions[r, t] == 0  # the EOS is the document's position 0 (a BOS)
    # the document's last token predicts the next document's EOS (where this one ends)
    ends = [(r, t - 1) for r, t in starts if t > 0]
    assert ends and all(batch.targets[r, t] == tok.eos_id for r, t in ends)


def test_windows_with_closing_eos_ignore_the_target_after_it(tmp_path, corpus_file):
    """eos_position end (nextlat before the setting): the EOS closes its document, the first token is unscored."""
    task = TextTask(_task_cfg(tmp_path, [corpus_file[0]], eos_position="end"))
    data, T = task.train_data(), task.cfg.seq_len
    stream = task.corpus().train.to(torch.int64)
    assert len(data) == (len(stream) - 1) // T
    idx = torch.arange(len(data))
    batch = data.get(idx)
    eos = task.tokenizer.eos_id
    for row, i in enumerate(idx.tolist()):
        window = stream[i * T : i * T + T + 1]
        assert torch.equal(batch.input_ids[row], window[:-1])
        at_eos = window[:-1] == eos
        assert (batch.targets[row][at_eos] == IGNORE).all()
        assert torch.equal(batch.targets[row][~at_eos], window[1:][~at_eos])
    assert torch.equal(batch.doc_ids, doc_ids_from_eos(batch.input_ids, eos, eos_opens=False))
    r, t = (batch.input_ids == eos).nonzero()[0].tolist()
    if t + 1 < T:
        assert batch.doc_ids[r, t] == batch.doc_ids[r, t - 1] and batch.doc_ids[r, t + 1] == batch.doc_ids[r, t] + 1


@pytest.mark.parametrize("eos_position", ["start", "end"])
def test_a_packed_window_scores_each_document_as_if_alone(tmp_path, corpus_file, make_model, eos_position):
    """Float64 states and per-token losses of a packed window equal those of its documents run one by one
    (each starting at position 0), to 1e-12; with ``start`` each piece is a document opened by its EOS."""
    task = TextTask(_task_cfg(tmp_path, [corpus_file[0]], eos_position=eos_position, seq_len=160))
    model = make_model(vocab_size=task.vocab_size, max_seq_len=160).double()
    data = task.train_data()
    batch = data.get(torch.arange(len(data)))
    r = int((batch.doc_ids.amax(1) >= 2).nonzero()[0])  # a row with 3+ documents (pieces)
    x, y, docs = batch.input_ids[r : r + 1], batch.targets[r], batch.doc_ids[r]
    h, _ = model(x, batch.doc_ids[r : r + 1])
    ce = torch.nn.functional.cross_entropy(model.logits(h[0]), y, ignore_index=IGNORE, reduction="none")  # (T,)
    pieces = 0
    for d in docs.unique().tolist():
        at = (docs == d).nonzero().flatten()
        a, e = int(at[0]), int(at[-1]) + 1
        assert torch.equal(at, torch.arange(a, e))  # a document is contiguous
        if eos_position == "start" and a > 0:
            assert x[0, a] == task.tokenizer.eos_id  # every document but a row's continuation opens with EOS
        h_doc, _ = model(x[:, a:e])
        torch.testing.assert_close(h[:, a:e], h_doc, rtol=1e-12, atol=1e-12)
        ce_doc = torch.nn.functional.cross_entropy(model.logits(h_doc[0]), y[a:e], ignore_index=IGNORE,
                                                   reduction="none")
        torch.testing.assert_close(ce[a:e], ce_doc, rtol=1e-12, atol=1e-12)
        pieces += 1
    assert pieces >= 3
    scored = int((y != IGNORE).sum())
    assert scored == (len(y) if eos_position == "start" else len(y) - int((x == task.tokenizer.eos_id).sum()))


def test_cache_is_reused_and_an_incomplete_cache_is_not_trusted(tmp_path, corpus_file, monkeypatch):
    cfg = _task_cfg(tmp_path, [corpus_file[0]])
    builds = []
    real_build = text_mod._build
    monkeypatch.setattr(text_mod, "_build", lambda *a: (builds.append(1), real_build(*a))[1])

    first = TextTask(cfg).corpus()
    assert len(builds) == 1
    train_bin = first.path / "train.bin"
    stamp = train_bin.stat().st_mtime_ns
    again = TextTask(cfg).corpus()
    assert len(builds) == 1 and again.path == first.path and train_bin.stat().st_mtime_ns == stamp
    assert torch.equal(again.train, first.train)
    assert [p.name for p in first.path.parent.iterdir()] == [first.path.name], "no temporary folders left behind"
    # a different seq_len reads the same token streams; a different split does not
    assert TextTask(_task_cfg(tmp_path, [corpus_file[0]], seq_len=16)).corpus().path == first.path
    assert len(builds) == 1

    # Interrupted or damaged folders are rebuilt, never used: no meta.json (it is written last), a short stream.
    for damage in (lambda p: (p / "meta.json").unlink(), lambda p: (p / "train.bin").write_bytes(b"\0\0")):
        damage(first.path)
        rebuilt = TextTask(cfg).corpus()
        assert rebuilt.path == first.path and torch.equal(rebuilt.train, first.train)
    assert len(builds) == 3

    # an edited corpus file is a new corpus
    corpus_file[0].write_text(corpus_file[0].read_text() + SEP + "doc new: the cat.")
    assert TextTask(cfg).corpus().path != first.path and len(builds) == 4


def test_max_bytes_caps_the_corpus_and_folders_and_globs_are_read(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    docs = _docs(30)
    (folder / "a.txt").write_text(SEP.join(docs[:10]))
    (folder / "sub" / "b.txt").write_text(SEP.join(docs[10:20]))
    (folder / ".hidden" / "c.txt").write_text(SEP.join(docs[20:]))
    assert resolve_files([str(folder)]) == [(folder / "a.txt").resolve(), (folder / "sub" / "b.txt").resolve()]
    assert resolve_files([str(folder / "**" / "*.txt")]) == resolve_files([str(folder)])
    task = TextTask(_task_cfg(tmp_path, [folder], max_bytes=(folder / "a.txt").stat().st_size))
    meta = task.corpus().meta
    assert meta["bytes"] == (folder / "a.txt").stat().st_size and meta["train_docs"] + meta["val_docs"] == 10


def test_stdlib_entry_is_the_python_files_of_the_standard_library():
    files = resolve_files(["stdlib"])
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert len(files) > 50 and all(f.suffix == ".py" and f.parent == stdlib for f in files)
    assert not any("site-packages" in str(f) for f in files)


# ----------------------------------------------------------------------------- config errors


def test_bad_configs_raise_config_errors_naming_the_value(tmp_path, corpus_file):
    with pytest.raises(ConfigError, match=r"task.val_fraction=1.5"):
        _task_cfg(tmp_path, [corpus_file[0]], val_fraction=1.5)
    with pytest.raises(ConfigError, match=r"task.files=\[\]"):
        _task_cfg(tmp_path, [])
    with pytest.raises(ConfigError, match="task.vocab_size=100"):
        _task_cfg(tmp_path, [corpus_file[0]], vocab_size=100)
    with pytest.raises(ConfigError, match="unknown key task.degree"):
        config_from_dict({"task": {"name": "text", "degree": 2}})
    # Files are looked up when the data is needed (a checkpoint's config must load without its corpus).
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ConfigError, match=re.escape(f"pattern '{pattern}' matched no files")):
        TextTask(_task_cfg(tmp_path, [pattern])).train_data()
    with pytest.raises(ConfigError, match="missing.txt' does not exist"):
        TextTask(_task_cfg(tmp_path, [tmp_path / "missing.txt"])).train_data()
    one = tmp_path / "one.txt"
    one.write_text("a single document")
    with pytest.raises(ConfigError, match="1 document"):
        TextTask(_task_cfg(tmp_path, [one])).train_data()
    with pytest.raises(ConfigError, match="task.seq_len=4096"):
        TextTask(_task_cfg(tmp_path, [corpus_file[0]], seq_len=4096)).train_data()


@pytest.mark.parametrize("name", [n for n in recipe_names() if n.startswith("text-")])
def test_text_recipes_load_and_build_without_reading_data(name, tmp_path, monkeypatch):
    monkeypatch.setenv("NEXTLAT_CACHE", str(tmp_path / "cache"))
    cfg = load_config(name)
    assert isinstance(cfg.task, TextConfig) and cfg.task.files
    comps = build(cfg)  # the vocabulary size comes from the config: no corpus is read or tokenized
    assert comps.model.cfg.vocab_size == cfg.task.vocab_size
    assert comps.model.cfg.max_seq_len >= cfg.task.seq_len
    assert not (tmp_path / "cache").exists()


# ----------------------------------------------------------------------------- evaluation, prompts


def test_evaluate_is_a_deterministic_document_masked_token_mean(tmp_path, corpus_file, make_model):
    task = TextTask(_task_cfg(tmp_path, [corpus_file[0]], eval_tokens=64))
    model = make_model(vocab_size=task.vocab_size)
    res = task.evaluate(model)
    assert math.isfinite(res["val_loss"]) and res["val_ppl"] == pytest.approx(math.exp(res["val_loss"]))
    batch = task.val_data().get(torch.arange(2))  # eval_tokens=64 with seq_len 32: the first two windows
    assert res["val_tokens"] == int((batch.targets != IGNORE).sum())
    assert task.evaluate(model) == res  # deterministic: same process, same inputs
    assert task.evaluate(model, max_examples=1)["val_tokens"] < res["val_tokens"]


def test_prompts_are_starts_of_validation_documents(tmp_path, corpus_file):
    task = TextTask(_task_cfg(tmp_path, [corpus_file[0]]))
    prompts = task.prompts(4, 8, seed=3)
    assert len(prompts) == 4 and all(p.shape == (8,) and p.dtype == torch.int64 for p in prompts)
    val_docs = _decode_docs(task, task.corpus().val)
    eos = task.tokenizer.eos_id
    assert task.prompt_prefix() == [eos]
    for p in prompts:
        assert p[0] == eos  # a prompt opens like a training document (eos_position start)
        text = task.tokenizer.decode(p[1:].tolist())
        assert any(d.startswith(text) for d in val_docs)
    closing = TextTask(_task_cfg(tmp_path, [corpus_file[0]], eos_position="end"))
    assert closing.prompt_prefix() == []
    for p in closing.prompts(4, 8, seed=3):  # eos_position end: documents' first tokens, nothing before them
        assert p.shape == (8,) and eos not in p.tolist()
        assert any(d.startswith(task.tokenizer.decode(p.tolist())) for d in val_docs)
    assert all(torch.equal(a, b) for a, b in zip(prompts, task.prompts(4, 8, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(prompts, task.prompts(4, 8, seed=4)))
    with pytest.raises(ValueError, match=r"documents have at least 9999 tokens \(prompts of 10000 tokens, EOS included"):
        task.prompts(1, 10000)


# ----------------------------------------------------------------------------- training and checkpoints


def test_runs_saved_before_eos_position_keep_the_closing_convention(tmp_path):
    """New configs (the shipped recipes included) open documents with the EOS; a run's config.yaml written
    before the setting existed (it lists every other setting) reads back with the convention it trained with."""
    import yaml

    cfg = load_config("text-tinystories-cpu-next-latent")
    assert cfg.task.eos_position == "start"
    old = cfg.to_dict()
    del old["task"]["eos_position"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert read_run_config(tmp_path / "old.yaml").task.eos_position == "end"
    (tmp_path / "new.yaml").write_text(cfg.to_yaml())
    assert read_run_config(tmp_path / "new.yaml") == cfg
    with pytest.raises(ConfigError, match="task.eos_position='middle'"):
        config_from_dict({"task": {"name": "text", "eos_position": "middle"}})



def test_trained_checkpoint_generates_without_the_cache_and_eval_names_missing_files(tmp_path, corpus_file, capsys,
                                                                                    monkeypatch):
    path, _ = corpus_file
    monkeypatch.chdir(path.parent)  # task.files relative to the folder the run starts from
    cfg = config_from_dict({
        "run_name": "tiny-text",
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 64},
        "objective": {"name": "next_latent", "horizon": 1},
        "task": {"name": "text", "files": [path.name], "doc_separator": SEP, "vocab_size": 300, "seq_len": 32,
                 "val_fraction": 0.2, "cache_dir": str(tmp_path / "cache"), "eval_tokens": 128},
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "log_every": 1, "progress": False, "device": "cpu",
                  "precision": "fp32"},
    })
    run = tmp_path / "run"
    results = Trainer(cfg, out_dir=run).fit()
    capsys.readouterr()
    saved = read_run_config(run / "config.yaml")
    assert [Path(f).resolve() for f in saved.task.files] == [path.resolve()]  # saved absolute
    monkeypatch.chdir(tmp_path)  # so eval, resume and generate work from any folder
    assert math.isfinite(results["eval"]["val_loss"])
    ckpt = run / "checkpoints" / "step_0000003"
    assert (ckpt / "tokenizer.json").is_file() and json.loads((ckpt / "meta.json").read_text())["artifacts"] == [
        "tokenizer.json"]
    cache = Path(cfg.task.cache_dir)
    trained = next(cache.iterdir())
    assert (ckpt / "tokenizer.json").read_text() == (trained / "tokenizer.json").read_text()

    # eval of the checkpoint reuses the training cache (same tokenizer) and reproduces the final evaluation
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["val_loss"] == pytest.approx(results["eval"]["val_loss"], rel=1e-6)
    assert [p.name for p in cache.iterdir()] == [trained.name]

    # a resumed run keeps the checkpoint's tokenizer and the same data
    resumed = Trainer(config_from_dict({**saved.to_dict(), "train": {**saved.to_dict()["train"], "steps": 4}}),
                      out_dir=run, resume=True)
    assert resumed.start_step == 3 and resumed.task.corpus().path == trained
    resumed.fit()
    capsys.readouterr()

    # without the cache, generation needs nothing but the checkpoint folder
    shutil.rmtree(cache)
    assert main(["generate", str(run), "--prompt", "the cat sat", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert not cache.exists(), "generate must not prepare the corpus"
    task = build_task(cfg.task, ckpt)
    assert task.vocab_size == 300 and task.tokenizer.to_json() == (ckpt / "tokenizer.json").read_text()

    # without the corpus, eval fails with the name of the missing file
    os.remove(path)
    assert main(["eval", str(run), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "does not exist" in err


def test_jtp_is_scored_through_its_fetch_module(tmp_path, corpus_file, make_model, make_objective):
    """The validation loss of a JTP model is the cross-entropy of its slot-0 next-token head."""
    import torch.nn.functional as F

    task = TextTask(_task_cfg(tmp_path, [corpus_file[0]], eval_tokens=64))
    model = make_model(vocab_size=task.vocab_size).double()
    objective = make_objective(model, name="jtp", horizon=2).double()
    res = task.evaluate(model, objective)
    batch = task.val_data().get(torch.arange(2))
    with torch.no_grad():
        h, _ = model(batch.input_ids, batch.doc_ids)
        expected = F.cross_entropy(objective.decoding_head(model)(h, batch.input_ids).flatten(0, 1),
                                   batch.targets.flatten(), ignore_index=IGNORE)
    assert res["val_loss"] == pytest.approx(expected.item(), rel=1e-7)  # the task takes the logits in float32
    assert res["val_loss"] != pytest.approx(task.evaluate(model)["val_loss"], rel=1e-4)  # the LM head scores otherwise
