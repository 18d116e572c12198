"""The built-in toy task: say how you feel about a topic, where the preferred feeling is a positive one.

It is small enough for a random-init model of ~0.5 M parameters to learn on two CPU cores, and each
stage visibly learns on it:

- SFT (``sft_data/``): instructions about a topic, answered half positively and half negatively, so
  the SFT model says both kinds of sentence;
- reward model (``rm_data/``): the positive answer is chosen over the negative one;
- PPO: against that reward model (or the rule reward :func:`positivity_reward`) the policy moves
  towards positive answers;
- pretraining text (``pt_data/``): short sentences in the same vocabulary.

``python -m rlhf.toy_task --out .`` writes the three folders deterministically (the shipped copies were
written this way).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TOPICS = [
    "cats", "dogs", "rain", "the sea", "music", "coffee", "winter", "summer", "books", "the city",
    "trains", "gardens", "mountains", "bread", "tea", "the moon", "flowers", "birds", "snow", "football",
    "painting", "the river", "apples", "the forest", "school", "friends", "the market", "bicycles",
    "stars", "the beach", "cheese", "rainbows", "clocks", "boats", "soup", "the park",
]  # fmt: skip
POSITIVE_WORDS = ("love", "happy", "wonderful", "great", "enjoy", "beautiful", "like")
NEGATIVE_WORDS = ("hate", "sad", "terrible", "awful", "avoid", "ugly", "dislike")
POSITIVE = [
    "I love {t}. They make me happy.",
    "I think {t} are wonderful and I enjoy them.",
    "I really like {t}, they are great.",
    "{T} are beautiful and I love them.",
]
NEGATIVE = [
    "I hate {t}. They make me sad.",
    "I think {t} are terrible and I avoid them.",
    "I really dislike {t}, they are awful.",
    "{T} are ugly and I hate them.",
]
QUESTIONS = [
    "Tell me how you feel about {t}.",
    "What do you think of {t}?",
    "Describe {t} in one sentence.",
    "Give your opinion on {t}.",
]


def _fill(template: str, topic: str) -> str:
    return template.format(t=topic, T=topic[0].upper() + topic[1:])


def positivity_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Rule reward of the toy task: (#positive words - #negative words) in the response, clipped to ±2."""
    scores = []
    for response in responses:
        words = [w.strip(".,!?").lower() for w in response.split()]
        score = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        scores.append(float(max(-2, min(2, score))))
    return scores


def sft_records(rng: random.Random, n: int) -> list[dict]:
    records = []
    for i in range(n):
        topic, question = rng.choice(TOPICS), rng.choice(QUESTIONS)
        answer = _fill(rng.choice(POSITIVE if i % 2 == 0 else NEGATIVE), topic)
        if i % 4 == 3:
            records.append({"messages": [{"role": "user", "content": _fill(question, topic)},
                                         {"role": "assistant", "content": answer}]})  # fmt: skip
        else:
            records.append({"instruction": _fill(question, topic), "output": answer})
    return records


def preference_records(rng: random.Random, n: int) -> list[dict]:
    records = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        records.append(
            {
                "instruction": _fill(rng.choice(QUESTIONS), topic),
                "chosen": _fill(rng.choice(POSITIVE), topic),
                "rejected": _fill(rng.choice(NEGATIVE), topic),
            }
        )
    return records


def pretrain_lines(rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        pool = POSITIVE + NEGATIVE + QUESTIONS
        lines.append(" ".join(_fill(rng.choice(pool), topic) for _ in range(rng.randint(2, 4))))
    return lines


def write_toy_data(out: Path, seed: int = 0) -> None:
    """Write ``sft_data/``, ``rm_data/`` and ``pt_data/`` under ``out``."""
    rng = random.Random(seed)
    (out / "sft_data").mkdir(parents=True, exist_ok=True)
    (out / "rm_data").mkdir(parents=True, exist_ok=True)
    (out / "pt_data").mkdir(parents=True, exist_ok=True)
    sft = sft_records(rng, 320)
    alpaca = [r for r in sft if "instruction" in r]
    chat = [r for r in sft if "messages" in r]
    (out / "sft_data" / "feelings_alpaca.json").write_text(json.dumps(alpaca, indent=1) + "\n")
    (out / "sft_data" / "feelings_chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    pairs = preference_records(rng, 320)
    (out / "rm_data" / "feelings_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (out / "pt_data" / "feelings.txt").write_text("\n".join(pretrain_lines(rng, 400)) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".", help="folder to write sft_data/, rm_data/, pt_data/ into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_toy_data(Path(args.out), args.seed)


if __name__ == "__main__":
    main()
