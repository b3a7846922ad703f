"""istio-vm tests; systemd_container.py is the systemd-nspawn harness of the @pytest.mark.systemd tests."""
