"""Nearest neighbours over activation datasets: exact blockwise search and FAISS indexes.

The only package that touches FAISS. `exact` searches iterators of (ids, X) blocks with
exactly recomputed distances; `index` builds, saves, loads and evaluates FAISS indexes.
"""

import importlib.util

if importlib.util.find_spec("faiss") is None:   # every module of the package imports it
    raise ImportError("memscan needs FAISS: pip install 'memscan[cpu]', or 'memscan[gpu]' on a machine with "
                      "CUDA (one of the two, never both)")

from memscan.knn.exact import array_blocks, choose_backend, knn, search_blocks, self_join
from memscan.knn.index import IndexResult, IndexSettings, KnnIndex, build, dataset_blocks
from memscan.knn.shards import Engine, InProcess

__all__ = ["Engine", "InProcess", "IndexResult", "IndexSettings", "KnnIndex", "array_blocks", "build", "choose_backend",
           "dataset_blocks", "knn", "search_blocks", "self_join"]
