"""Training text for a draft model: prompts the target answers itself, and plain text windows.

Never the benchmark: Spec-Bench and MT-Redundant prompts are what drafts are measured on, so
NQ-open questions that appear in Spec-Bench are left out, and every other prompt is built from
the book, the L-Eval documents, or instructions written here. What teaches a draft model most is
the target's own answers (the distribution it will draft from), so most sequences are chat
prompts answered by the target; plain text windows keep its language model general.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ragspec.errors import ConfigError

Messages = list[dict[str, str]]

BOOK_FILE = Path("corpus") / "pg1342_pride_and_prejudice.txt"
LONGDOC_DIR = Path("longdoc")
NQ_FILE = Path("nq_open") / "NQ-open.dev.jsonl"
BENCHMARK_FILES = (Path("spec_bench") / "question.jsonl", Path("mt_redundant") / "question.jsonl")

# Instructions over a passage (book paragraphs, document windows); {passage} is filled in.
PASSAGE_TASKS = (
    "Summarize: {passage}",
    "Summarize the following passage in two sentences.\n\n{passage}",
    "Rewrite the following passage in plain modern English.\n\n{passage}",
    "Translate the following text into French.\n\n{passage}",
    "List the people mentioned in this passage and describe each in one sentence.\n\n{passage}",
    "Write three questions a reader might ask about this passage, and answer them.\n\n{passage}",
    "Continue this text for a few sentences.\n\n{passage}",
    "Explain what happens in this passage.\n\n{passage}",
    "Extract the key facts from this text as a bulleted list.\n\n{passage}",
)
TOPICS = (
    "the water cycle", "photosynthesis", "the French Revolution", "climate change", "healthy sleep",
    "learning a new language", "the stock market", "black holes", "the Roman Empire", "vaccines",
    "renewable energy", "time management", "the human heart", "machine learning", "volcanoes",
    "the printing press", "honey bees", "public libraries", "electric cars", "the Silk Road",
)
CODE_TASKS = (
    "reverses a string", "checks whether a number is prime", "returns the n-th Fibonacci number",
    "counts the words in a text", "merges two sorted lists", "removes duplicates from a list",
    "computes the factorial of n", "finds the largest element of a list", "checks if a word is a palindrome",
    "converts Celsius to Fahrenheit", "sorts a list of dictionaries by a key", "reads a CSV file and sums a column",
)
ROLES = ("a ship captain", "a medieval baker", "a detective", "a museum guide", "an astronaut", "a chef")
GENERIC_TASKS = (
    "Write a short poem about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Give three practical tips about {topic}.",
    "Write a short blog post introduction about {topic}.",
    "What are the main advantages and disadvantages of {topic}?",
    "Write a short email to a colleague about {topic}.",
    "Compare {topic} and {other}.",
    "Write a Python function that {code}.",
    "Explain how to write a program that {code}, then show the code.",
    "Pretend you are {role} and describe your day.",
    "You are {role}. Greet a visitor and tell them about {topic}.",
    "A shop sells {item} for {price} dollars each. How many can I buy with {money} dollars? Explain step by step.",
    "If a train travels {speed} km per hour for {hours} hours, how far does it go? Show your reasoning.",
    "What is {a} times {b}? Explain how you got the answer.",
)
ITEMS = ("pencils", "apples", "notebooks", "tickets", "cups of coffee", "plants")


@dataclass(frozen=True)
class DataPlan:
    """How much of each kind of training text to make (counts of sequences)."""

    num_prompts: int = 320  # chat prompts the target answers
    num_text_windows: int = 128  # plain text windows of seq_len tokens
    nq_share: float = 0.3  # of the prompts: NQ-open questions
    passage_share: float = 0.4  # of the prompts: instructions over a passage; the rest: written tasks
    max_passage_chars: int = 600  # keeps prompt + answer near seq_len tokens


def normalized(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def benchmark_text(data_dir: Path) -> str:
    """Every benchmark prompt, normalized and joined: anything found in it is not trained on."""
    parts = []
    for name in BENCHMARK_FILES:
        path = data_dir / name
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    parts.extend(normalized(turn) for turn in json.loads(line).get("turns", []))
    return " | ".join(parts)


def nq_questions(data_dir: Path, exclude: str) -> list[str]:
    """NQ-open dev questions whose text appears in no benchmark prompt."""
    path = data_dir / NQ_FILE
    if not path.is_file():
        return []
    questions = (json.loads(line)["question"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return [q for q in questions if normalized(q) and normalized(q) not in exclude]


def book_paragraphs(data_dir: Path) -> list[str]:
    path = data_dir / BOOK_FILE
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    start = text.find("It is a truth universally acknowledged")
    end = text.find("*** END OF")
    body = text[max(start, 0): end if end > 0 else len(text)]
    return [" ".join(p.split()) for p in body.split("\n\n") if len(p.split()) >= 20]


def longdoc_records(data_dir: Path) -> list[dict]:
    folder = data_dir / LONGDOC_DIR
    records = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        records.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return records


def passage_window(text: str, max_chars: int, rng: random.Random) -> str:
    """A window of whole words, at most `max_chars` long, from a random place in `text`."""
    words = text.split()
    if len(" ".join(words)) <= max_chars:
        return " ".join(words)
    start = rng.randrange(0, max(1, len(words) - max_chars // 5))
    window: list[str] = []
    for word in words[start:]:
        if len(" ".join([*window, word])) > max_chars:
            break
        window.append(word)
    return " ".join(window)


def build_prompts(data_dir: Path, plan: DataPlan, seed: int) -> list[Messages]:
    """`plan.num_prompts` chat prompts: NQ questions, passage tasks, written tasks (in that mix)."""
    rng = random.Random(seed)
    questions = nq_questions(data_dir, benchmark_text(data_dir))
    paragraphs = book_paragraphs(data_dir)
    docs = longdoc_records(data_dir)
    if not paragraphs and not docs:
        raise ConfigError(f"no training text under {data_dir}: expected {BOOK_FILE} or {LONGDOC_DIR}/*.jsonl")
    num_nq = min(len(questions), round(plan.num_prompts * plan.nq_share))
    num_passage = min(round(plan.num_prompts * plan.passage_share), plan.num_prompts - num_nq)
    prompts = [_user(q[:1].upper() + q[1:] + "?") for q in rng.sample(questions, num_nq)]
    prompts += [_passage_prompt(paragraphs, docs, plan.max_passage_chars, rng) for _ in range(num_passage)]
    prompts += [_user(_generic_task(rng)) for _ in range(plan.num_prompts - len(prompts))]
    rng.shuffle(prompts)
    return prompts


def text_sources(data_dir: Path) -> list[str]:
    """Long plain texts to cut token windows from: the book and each L-Eval document."""
    paragraphs = book_paragraphs(data_dir)
    texts = ["\n\n".join(paragraphs)] if paragraphs else []
    return texts + [record["input"] for record in longdoc_records(data_dir) if record.get("input")]


def text_windows(tokenizer, data_dir: Path, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` windows of `length` tokens from random places in the book and the documents."""
    if count <= 0:
        return []
    rng = random.Random(seed + 1)
    sources = text_sources(data_dir)
    encoded: dict[int, list[int]] = {}  # tokenized on first use: a small run reads few texts
    windows = []
    for _ in range(20 * count):
        if len(windows) == count:
            break
        pick = rng.randrange(len(sources)) if sources else 0
        if sources and pick not in encoded:
            encoded[pick] = tokenizer.encode(sources[pick], add_special_tokens=False)
        ids = encoded.get(pick, [])
        if len(ids) > length:
            start = rng.randrange(len(ids) - length)
            windows.append(ids[start:start + length])
    if len(windows) < count:
        raise ConfigError(f"not enough text of more than {length} tokens under {data_dir} to train on")
    return windows


def _user(content: str) -> Messages:
    return [{"role": "user", "content": content}]


def _passage_prompt(paragraphs: list[str], docs: list[dict], max_chars: int, rng: random.Random) -> Messages:
    """A passage task, or (documents with questions) a question over a document window."""
    if docs and rng.random() < 0.5:
        doc = docs[rng.randrange(len(docs))]
        window = passage_window(doc["input"], max_chars, rng)
        questions = [q for q in doc.get("instructions", []) if len(q) < 300]
        if questions and rng.random() < 0.5:
            question = questions[rng.randrange(len(questions))].strip()
            return _user(f"Answer the question using the document below.\n\n{window}\n\nQuestion: {question}")
        passage = window
    else:
        pool = paragraphs or [doc["input"] for doc in docs]
        passage = passage_window(pool[rng.randrange(len(pool))], max_chars, rng)
    return _user(PASSAGE_TASKS[rng.randrange(len(PASSAGE_TASKS))].format(passage=passage))


def _generic_task(rng: random.Random) -> str:
    topic, other = rng.sample(TOPICS, 2)
    return GENERIC_TASKS[rng.randrange(len(GENERIC_TASKS))].format(
        topic=topic, other=other, code=rng.choice(CODE_TASKS), role=rng.choice(ROLES), item=rng.choice(ITEMS),
        price=rng.randint(2, 9), money=rng.randint(20, 100), speed=rng.randint(40, 120), hours=rng.randint(2, 6),
        a=rng.randint(11, 99), b=rng.randint(3, 19),
    )
