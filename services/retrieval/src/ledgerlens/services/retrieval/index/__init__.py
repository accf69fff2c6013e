"""Where dense vectors and chunks live: one interface, two backends.

:class:`~ledgerlens.services.retrieval.index.base.VectorBackend` is the interface;
:mod:`.local` is the embedded default (HNSW through usearch, durable rows in the
service's database, the graph snapshotted in ``data_dir``) and :mod:`.qdrant` is
Qdrant through ``qdrant-client`` (a server or cluster, or its local mode).
"""

from ledgerlens.services.retrieval.index.base import VectorBackend

__all__ = ["VectorBackend"]
