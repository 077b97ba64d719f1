"""The `nextserve` command line."""
