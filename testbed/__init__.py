"""The test bed: network namespaces, the service under test, Envoy, load, containers."""
