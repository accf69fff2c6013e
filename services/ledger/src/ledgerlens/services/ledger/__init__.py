"""The ledger service: document and audit anchoring on Fabric or the dev ledger."""
