"""`python -m istio_vm`: the same as the `istio-vm` command."""

from istio_vm.cli import main

raise SystemExit(main())
