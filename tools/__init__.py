"""Developer tools that write the generated docs; not part of the wheel."""
