"""The service wing (map to come)."""
