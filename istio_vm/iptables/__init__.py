"""The iptables wing (map to come)."""
