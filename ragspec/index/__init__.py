"""Retrieval indexes: chunked documents, a FAISS dense index and a token datastore for drafting.

    from ragspec.index import build_index, open_index
    index = build_index([Path("docs/")], "docs")
    hits = index.search("how do I configure X?", k=5)          # list[RetrievedChunk]
    length, positions = index.datastore.longest_match(context_ids)
"""

from ragspec.index.build import add_to_index, build_index, build_index_from_texts
from ragspec.index.datastore import SEPARATOR, TokenDatastore, build_suffix_array
from ragspec.index.encoders import tokenizer_fingerprint
from ragspec.index.index import (
    BuildStats, Index, RetrievedChunk, index_home, list_indexes, open_index, remove_index, verify_index,
)

__all__ = [
    "SEPARATOR", "BuildStats", "Index", "RetrievedChunk", "TokenDatastore", "add_to_index", "build_index",
    "build_index_from_texts", "build_suffix_array", "index_home", "list_indexes", "open_index",
    "remove_index", "tokenizer_fingerprint", "verify_index",
]
