"""quota-sidecar: a token-budget proxy between OpenAI-compatible clients and LiteLLM."""

__version__ = "0.1.0"
