"""Integrations with training frameworks built on megatron-core (imported on demand)."""
