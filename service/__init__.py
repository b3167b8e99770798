"""The online side: the FastAPI retrieval service (see ARCHITECTURE.md for its modules)."""
