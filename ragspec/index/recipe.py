"""Index recipes: a small TOML file naming the documents and build options of one index.

    name = "pride-and-prejudice"
    paths = ["../../shared/data/corpus/pg1342_pride_and_prejudice.txt"]  # relative to the recipe
    chunk_tokens = 256
    overlap_tokens = 32
    faiss = "Flat"
    # dense_on_disk = true   (with faiss = "IVF4096,Flat": inverted lists in dense.ivfdata, memory-mapped)
    # model = "path/to/model-or.gguf"      (default: the embedded SmolLM2-135M-Instruct)
    # embedder = "path/to/sentence-transformer"   (default: embedded all-MiniLM-L6-v2)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ragspec.errors import ConfigError

_KEYS = {"name", "paths", "chunk_tokens", "overlap_tokens", "faiss", "dense_on_disk", "model", "embedder",
         "description"}


@dataclass(frozen=True)
class Recipe:
    name: str
    paths: tuple[Path, ...]
    chunk_tokens: int = 256
    overlap_tokens: int = 32
    faiss: str = "Flat"
    dense_on_disk: bool = False  # IVF inverted lists on disk (memory-mapped), for indexes larger than RAM
    model: str | None = None
    embedder: str | None = None


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe; ConfigError naming the file and the bad entry."""
    data = _read_toml(Path(path))
    unknown = set(data) - _KEYS
    if unknown or "name" not in data or not data.get("paths"):
        raise ConfigError(
            f"recipe {path}: needs name and paths, knows {sorted(_KEYS)}; unknown keys: {sorted(unknown)}"
        )
    paths = data["paths"]
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(f'recipe {path}: paths must be a list of file or folder names, e.g. paths = ["docs/"]')
    for key in ("name", "faiss", "model", "embedder", "description"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"recipe {path}: {key} must be a string, got {data[key]!r}")
    for key in ("chunk_tokens", "overlap_tokens"):
        if key in data and type(data[key]) is not int:
            raise ConfigError(f"recipe {path}: {key} must be a whole number, got {data[key]!r}")
    if "dense_on_disk" in data and type(data["dense_on_disk"]) is not bool:
        raise ConfigError(f"recipe {path}: dense_on_disk must be true or false, got {data['dense_on_disk']!r}")
    base = Path(path).resolve().parent
    return Recipe(
        name=data["name"],
        paths=tuple((base / p).resolve() for p in paths),
        chunk_tokens=data.get("chunk_tokens", 256),
        overlap_tokens=data.get("overlap_tokens", 32),
        faiss=data.get("faiss", "Flat"),
        dense_on_disk=data.get("dense_on_disk", False),
        model=data.get("model"),
        embedder=data.get("embedder"),
    )


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read recipe {path}: it is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (OSError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"cannot read recipe {path}: {exc}") from exc
