"""Fitting text and held-out prompts for the SmolLM2 drafter measurement (results/drafter-smollm2.md).

Writes into OUT (default runs/drafter-data): stories (the TinyStories sample: the first 85% to fit on, prompts
from the rest), code (Python's standard library: files split by a hash of their path, fit on one part, prompts
from function starts of the other), chat (user questions from templates: fitting questions and held-out
questions on other topics). Prompts are .jsonl files, one JSON string a line.

    python scripts/drafter_data.py [OUT] [--fit-chars N]

The first measurement used 160,000 characters per text domain; the second ``--fit-chars 1200000`` (stories
then take all of their 85%: 675,447 characters).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sysconfig
from pathlib import Path

STORIES = Path("/work/shared/data/text/tinystories_valid_sample.txt")
N_PROMPTS = 24

TEMPLATES = ["Explain {} in simple terms.", "What are three interesting facts about {}?",
             "Write a short paragraph about {}.", "How does {} work?", "Give me some tips about {}.",
             "Why is {} important?"]
FIT_TOPICS = ["photosynthesis", "the moon", "volcanoes", "healthy sleep", "learning a new language", "recycling",
              "the water cycle", "electric cars", "bees", "the internet", "exercise", "saving money", "rainbows",
              "the human heart", "chess", "gardening", "the ocean", "dinosaurs", "clouds", "the solar system",
              "bread baking", "music", "trees", "the brain", "airplanes", "honey", "magnets", "the desert",
              "mountains", "vaccines", "batteries", "the printing press", "elephants", "rivers", "snow",
              "computers", "the olympics", "teamwork", "time management", "reading books", "wind power", "owls",
              "the seasons", "climate change", "robots", "ancient Egypt", "kindness", "pizza"]
TEST_TOPICS = ["black holes", "coffee", "earthquakes", "public speaking", "penguins", "solar panels", "friendship",
               "the Roman empire"]


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps(t) + "\n" for t in texts), encoding="utf-8")


def stories(out: Path, fit_chars: int = 160_000) -> None:
    text = STORIES.read_text(encoding="utf-8")
    cut = text.index("\n\n", int(len(text) * 0.85))
    (out / "stories_fit.txt").write_text(text[: min(cut, fit_chars)], encoding="utf-8")
    starts = [p for p in text[cut:].split("\n\n") if len(p) > 300]
    _write_jsonl(out / "stories_test.jsonl", [p[: p.index(" ", 160)] for p in starts[:N_PROMPTS]])


def code(out: Path, fit_chars: int = 160_000) -> None:
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held = [p for p in files if int(hashlib.sha256(p.name.encode()).hexdigest(), 16) % 5 == 0]
    fit = [p for p in files if p not in held]
    random.Random(0).shuffle(fit)
    parts, size = [], 0
    for p in fit:
        if size >= fit_chars:
            break
        parts.append(p.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
    (out / "code_fit.txt").write_text("\n\n".join(parts)[:fit_chars], encoding="utf-8")
    prompts = []
    for p in held:
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and i + 40 < len(lines)]
        if starts:
            i = starts[len(starts) // 2]
            prompts.append("\n".join(lines[i : i + 6]) + "\n")
        if len(prompts) == N_PROMPTS:
            break
    _write_jsonl(out / "code_test.jsonl", prompts)


def chat(out: Path) -> None:
    _write_jsonl(out / "chat_fit.jsonl", [t.format(topic) for topic in FIT_TOPICS for t in TEMPLATES])
    rng = random.Random(0)
    _write_jsonl(out / "chat_test.jsonl", [rng.choice(TEMPLATES).format(topic) for topic in TEST_TOPICS
                                           for _ in range(3)][:N_PROMPTS])


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="runs/drafter-data")
    p.add_argument("--fit-chars", type=int, default=160_000, help="fitting characters per text domain (at most)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stories(out, args.fit_chars)
    code(out, args.fit_chars)
    chat(out)
    for f in sorted(out.iterdir()):
        print(f, f.stat().st_size)
