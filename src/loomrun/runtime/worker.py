"""The worker-side runtime. Filled in by the mailbox work; a no-op outside loomrun."""


def attach() -> None:
    """Attach this worker to its supervisor's mailbox, when it has one."""
