"""Evaluation: leave-one-out full ranking under both protocols, per-interest retrieval,
beyond-accuracy figures and interest diagnostics (`evaluate`), and the report (`report`)."""
