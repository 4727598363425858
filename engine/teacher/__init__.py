"""The teacher behind an OpenAI-compatible endpoint: what the flows see of it (``protocol``)
and the HTTP client with its limits, routing, health, retries, cache and transport."""
