"""Test helpers: a tiny HTTP app, a load generator and a real-Envoy harness."""
