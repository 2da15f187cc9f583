"""`arbiter gateway`: the HTTP front door (FastAPI) — a native jobs API and OpenAI-compatible endpoints
over `broker.client`, behind API keys."""
