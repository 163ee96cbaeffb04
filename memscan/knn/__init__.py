"""Nearest neighbours over activation datasets: exact blockwise search and FAISS indexes.

The only package that touches FAISS. `exact` searches iterators of (ids, X) blocks with
exactly recomputed distances; `index` builds, saves, loads and evaluates FAISS indexes.
"""

from memscan.knn.exact import array_blocks, choose_backend, knn, search_blocks, self_join
from memscan.knn.index import IndexResult, IndexSettings, KnnIndex, build, dataset_blocks
from memscan.knn.shards import Engine, InProcess

__all__ = ["Engine", "InProcess", "IndexResult", "IndexSettings", "KnnIndex", "array_blocks", "build", "choose_backend",
           "dataset_blocks", "knn", "search_blocks", "self_join"]
