"""llorch: a contract-first orchestrator for LLM inference."""

__version__ = "0.1.0"
