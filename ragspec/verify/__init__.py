"""Verification: one target forward over the pending token plus a draft tree."""

from ragspec.verify.prefix_pool import PrefixPool
from ragspec.verify.verifier import KVPrefix, TreeVerifier

__all__ = ["KVPrefix", "PrefixPool", "TreeVerifier"]
