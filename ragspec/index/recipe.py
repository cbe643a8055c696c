"""Index recipes: a small TOML file naming the documents and build options of one index.

    name = "pride-and-prejudice"
    paths = ["../../shared/data/corpus/pg1342_pride_and_prejudice.txt"]  # relative to the recipe
    chunk_tokens = 256
    overlap_tokens = 32
    faiss = "Flat"
    # model = "path/to/model-or.gguf"      (default: the embedded SmolLM2-135M-Instruct)
    # embedder = "path/to/sentence-transformer"   (default: embedded all-MiniLM-L6-v2)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ragspec.errors import ConfigError

_KEYS = {"name", "paths", "chunk_tokens", "overlap_tokens", "faiss", "model", "embedder", "description"}


@dataclass(frozen=True)
class Recipe:
    name: str
    paths: tuple[Path, ...]
    chunk_tokens: int = 256
    overlap_tokens: int = 32
    faiss: str = "Flat"
    model: str | None = None
    embedder: str | None = None


def load_recipe(path: Path) -> Recipe:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
    unknown = set(data) - _KEYS
    if unknown or "name" not in data or not data.get("paths"):
        raise ConfigError(
            f"recipe {path}: needs name and paths, knows {sorted(_KEYS)}; unknown keys: {sorted(unknown)}"
        )
    base = Path(path).resolve().parent
    return Recipe(
        name=str(data["name"]),
        paths=tuple((base / p).resolve() for p in data["paths"]),
        chunk_tokens=int(data.get("chunk_tokens", 256)),
        overlap_tokens=int(data.get("overlap_tokens", 32)),
        faiss=str(data.get("faiss", "Flat")),
        model=data.get("model"),
        embedder=data.get("embedder"),
    )
