"""What runs inside every worker: the boot entry, the step boundary, the torch hooks."""
