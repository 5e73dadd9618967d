"""The OpenAI-compatible front door: request mapping, answers and error bodies."""
