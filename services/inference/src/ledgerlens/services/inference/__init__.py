"""The inference service: an LLM gateway and grounded answers (see README.md)."""
