"""The config wing (map to come)."""
